r"""Storage estimate of the InsEmb table (paper Eq. 12).

  bytes = instances_per_day x retention_days x d x bytes_per_value

plus, in this implementation, a per-row overhead shown separately: the 8-byte
uint64 InsID key of every row, and for int8 the 4-byte float32 row scale.
The paper's example: 3e8 instances/day kept 730 days at d=64 float32 is
3e8 x 730 x 64 x 4 B = 5.6e13 B, about 56 TB (decimal units, 1 TB = 1e12 B).

  python -m iat_jax.store.estimate --instances_per_day=3e8 \
      --retention_days=730 --dim=64 --dtype=float32 [--store=PATH]

With --store, the measured bytes per row on disk of that real OCDBT table (all
its files: keys, values, scales, segment indexes, the OCDBT manifest) are
printed beside the formula's figure for the table's own d and dtype.
"""

from __future__ import annotations

from absl import app
from absl import flags

from iat_jax.store import reader

BYTES_PER_VALUE = {"float32": 4, "bfloat16": 2, "int8": 1}
KEY_BYTES = 8
SCALE_BYTES = {"float32": 0, "bfloat16": 0, "int8": 4}

_PER_DAY = flags.DEFINE_float("instances_per_day", 3e8, "Instances a day.")
_DAYS = flags.DEFINE_float("retention_days", 730, "Days of instances kept.")
_DIM = flags.DEFINE_integer("dim", 64, "InsEmb width d.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(BYTES_PER_VALUE),
                           "Stored dtype (marked in the table; all are shown).")
_STORE = flags.DEFINE_string("store", None,
                             "A real InsEmb table: also print its bytes per row.")


def estimate_bytes(instances_per_day: float, retention_days: float, dim: int,
                   dtype: str) -> dict:
  """Eq. 12 for one dtype.

  Args:
    instances_per_day: instances (rows) produced a day.
    retention_days: days they are kept.
    dim: InsEmb width d.
    dtype: "float32", "bfloat16" or "int8".

  Returns:
    dict with rows, bytes_per_value, value_bytes (Eq. 12), overhead_bytes
    (keys + int8 scales), total_bytes, and the per-row figures
    value_bytes_per_row, overhead_bytes_per_row, bytes_per_row.
  """
  if dtype not in BYTES_PER_VALUE:
    raise ValueError(f"dtype {dtype!r} is not one of {sorted(BYTES_PER_VALUE)}")
  rows = float(instances_per_day) * float(retention_days)
  per_value = BYTES_PER_VALUE[dtype]
  value_row = dim * per_value
  overhead_row = KEY_BYTES + SCALE_BYTES[dtype]
  return {
      "rows": rows,
      "bytes_per_value": per_value,
      "value_bytes": rows * value_row,
      "overhead_bytes": rows * overhead_row,
      "total_bytes": rows * (value_row + overhead_row),
      "value_bytes_per_row": value_row,
      "overhead_bytes_per_row": overhead_row,
      "bytes_per_row": value_row + overhead_row
  }


def human(n: float) -> str:
  """Bytes in decimal units: 5.6064e13 -> '56.1 TB'."""
  for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
    if abs(n) < 1000 or unit == "PB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
    n /= 1000
  raise AssertionError


def report(instances_per_day: float,
           retention_days: float,
           dim: int,
           dtype: str,
           store: str | None = None) -> str:
  """The text the CLI prints."""
  lines = [
      f"InsEmb storage, Eq. 12: {instances_per_day:.3g} instances/day x "
      f"{retention_days:g} days x d={dim} x bytes/value "
      f"({instances_per_day * retention_days:.3g} rows)", ""
  ]
  lines.append(f"  {'':24s}" + "".join(f"{d:>14s}" for d in BYTES_PER_VALUE))
  ests = {
      d: estimate_bytes(instances_per_day, retention_days, dim, d)
      for d in BYTES_PER_VALUE
  }
  for label, key, fmt in [("bytes/value", "bytes_per_value", lambda v: f"{v} B"),
                          ("values (Eq. 12)", "value_bytes", human),
                          ("+ keys / scales", "overhead_bytes", human),
                          ("= total", "total_bytes", human),
                          ("bytes/row (values+ovh)", "bytes_per_row",
                           lambda v: f"{v} B")]:
    lines.append(f"  {label:24s}" + "".join(f"{fmt(ests[d][key]):>14s}" for d in ests))
  lines.append(f"  {'':24s}" +
               "".join(f"{'^ --dtype' if d == dtype else '':>14s}" for d in ests))
  if store:
    table = reader.Table(store)
    m = table.metadata
    disk = table.bytes_on_disk()
    own = estimate_bytes(1, max(m["num_rows"], 1), m["d"], m["dtype"])
    measured = disk / max(m["num_rows"], 1)
    scaled = measured * instances_per_day * retention_days
    lines += [
        "", f"  store {store} ({table.version}): {m['num_rows']:,} rows, "
        f"d={m['d']}, {m['dtype']}",
        f"    measured on disk   {measured:10.1f} B/row  ({human(disk)} in all)",
        f"    formula            {own['bytes_per_row']:10.1f} B/row  "
        f"({own['value_bytes_per_row']} values + "
        f"{own['overhead_bytes_per_row']} key/scale)",
        f"    measured x {instances_per_day * retention_days:.3g} rows = "
        f"{human(scaled)}"
    ]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(report(_PER_DAY.value, _DAYS.value, _DIM.value, _DTYPE.value, _STORE.value))


if __name__ == "__main__":
  app.run(main)

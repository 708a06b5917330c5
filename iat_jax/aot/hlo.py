"""What a compiled step's HLO text says about communication and precision.

`collectives(text)`: per kind (all-gather, all-reduce, reduce-scatter,
all-to-all, collective-permute) the number of ops and the bytes of their
outputs (an async op's `-start` counts once; its `-done` not at all).
`dots(text)`: the FLOPs of the dot products (2 x output elements x
contracted size) by the dtype of their operands, so a report can say whether
the large matrix products of a bfloat16 model run in bfloat16. Collectives
are read from the compiled HLO (`jax.stages.Compiled.as_text()`, any
backend), dots from the lowered StableHLO (`jax.stages.Lowered.as_text()`:
before partitioning, global shapes; a TPU compile turns dots into
convolutions whose operand types its text does not print).
"""

from __future__ import annotations

import math
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
         "collective-permute")
_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8
}
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(KINDS) + r")(-start)?\(")
_DOT = re.compile(r"stablehlo\.dot_general .*?contracting_dims = \[([\d, ]*)\] x .*?"
                  r": \(tensor<([^>]*)>, tensor<[^>]*>\) -> tensor<([^>]*)>")


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(t, tuple(int(d)
                    for d in dims.split(",")
                    if d))
          for t, dims in _ARRAY.findall(text)
          if t in _BYTES]


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
  return _BYTES[dtype] * math.prod(shape)


def collectives(text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count": ops, "bytes": output bytes}} for every kind in KINDS."""
  out = {k: {"count": 0, "bytes": 0} for k in KINDS}
  for line in text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    arrays = _arrays(m.group(1))
    if m.group(3) and len(arrays) > 1:  # async start: (operands..., output)
      arrays = arrays[-1:]
    out[m.group(2)]["count"] += 1
    out[m.group(2)]["bytes"] += sum(_nbytes(t, s) for t, s in arrays)
  return out


def _tensor(text: str) -> tuple[str, tuple[int, ...]]:
  """"256x512xbf16" -> ("bf16", (256, 512))."""
  *dims, dtype = text.split("x")
  return dtype, tuple(int(d) for d in dims)


def dots(text: str) -> dict[str, float]:
  """{operand dtype: FLOPs of the dot_generals whose lhs has it} of a lowered
  module's StableHLO text."""
  out: dict[str, float] = {}
  for m in _DOT.finditer(text):
    dtype, lhs = _tensor(m.group(2))
    _, result = _tensor(m.group(3))
    contracted = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d.strip())
    out[dtype] = out.get(dtype, 0.0) + 2.0 * math.prod(result) * contracted
  return out

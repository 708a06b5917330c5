"""Does a compiled train step fit the memory of a device? Checked when a stage
is built, before its first step.
"""

from __future__ import annotations

import os

import jax

from iat_jax import errors
from iat_jax.data import orders


def available_memory() -> tuple[int, str]:
  """(bytes one device may use, where that number comes from).

  Accelerators: the device's memory limit. CPU: the host's available memory
  (/proc/meminfo MemAvailable, else physical pages) shared by its local
  devices. IAT_JAX_MEMORY_BYTES overrides both (e.g. on a shared host)."""
  if os.environ.get("IAT_JAX_MEMORY_BYTES"):
    return int(os.environ["IAT_JAX_MEMORY_BYTES"]), "IAT_JAX_MEMORY_BYTES"
  device = jax.local_devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
      return int(stats["bytes_limit"]), f"{device.device_kind} memory limit"
  total = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          total = int(line.split()[1]) * 1024
  except OSError:
    pass
  if total is None:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return total // max(jax.local_device_count(), 1), "host memory available per device"


def size_flags(order: str) -> str:
  """The flags that size a train step of batch order `order`."""
  return ", ".join(
      [orders.size_flags(order), "--config.data.seq_len", "the model widths"])


def check(compiled, order: str, name: str) -> None:
  """Raises ConfigError naming the size flags when the compiled train step
  needs more memory per device than there is (XLA's memory analysis of the
  executable: arguments + outputs + temporaries - donated buffers). Its inputs
  are already resident on an accelerator; on CPU only what the step
  allocates is compared with the host's available memory."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend has it
    m = None
  if m is None:
    return
  new = m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  need = new + m.argument_size_in_bytes
  limit, what = available_memory()
  if jax.local_devices(
  )[0].platform == "cpu" and not os.environ.get("IAT_JAX_MEMORY_BYTES"):
    need = new
  if need > limit:
    raise errors.ConfigError(
        "batch_size / sizes", f"the train step of {name} needs "
        f"{need / 2**30:.2f} GiB per device, more than the {limit / 2**30:.2f} GiB "
        f"of {what}; lower {size_flags(order)}, or shard over more devices "
        f"(--config.mesh_shape)")

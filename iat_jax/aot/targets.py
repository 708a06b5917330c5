"""The hardware a config can be compiled for without it: one table of chips.

`--config.compile.target` names a chip and a slice:

  tpu:<chip>:<topology>   a TPU slice, e.g. tpu:v5e:2x2, tpu:v5e:16x16,
                          tpu:v5p:2x2x1, tpu:v4:2x2x2, tpu:v6e:8x8; its
                          devices come from libtpu's compile-only topology
                          (the `tpu` extra: jax[tpu] at the pinned jax);
  gpu:<chip>:<n>          one host of n GPUs (gpu:h100:8), or
  gpu:<chip>:<h>x<n>      h hosts of n each; the devices come from the CUDA
                          PJRT plugin (the `cuda-compile` extra) given a
                          target description written from the chip's row.

A chip's row holds what the report needs (`CHIPS`): memory per chip, dense
bf16 peak FLOP/s and memory bandwidth, from the vendors' public figures:
Google Cloud's TPU system-architecture pages (v4: 275 TFLOP/s, 32 GiB, 1,200
GB/s; v5e: 197 TFLOP/s, 16 GiB, 819 GB/s; v5p: 459 TFLOP/s, 95 GiB, 2,765
GB/s; v6e: 918 TFLOP/s, 32 GiB, 1,640 GB/s) and NVIDIA's data sheets (H100
SXM: 989 TFLOP/s dense bf16, 80 GB, 3.35 TB/s; A100 SXM 80 GB: 312 TFLOP/s,
2.04 TB/s). A GPU row also carries the device description XLA compiles for
(SM count, compute capability, shared memory, clock).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

from iat_jax import errors

_FLAG = "compile.target"
_HOST_BOUNDS = (2, 2, 1)


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator: what a compile for it needs and what the report uses.

  Attributes:
    name: the chip's key in a target (v5e, h100).
    platform: "tpu" or "gpu".
    memory_bytes: memory per chip (HBM).
    bf16_flops: dense bf16 peak FLOP/s per chip.
    memory_bytes_per_s: HBM bandwidth per chip.
    gpu: the device description fields of a GPU (XLA's GpuTargetConfigProto
      gpu_device_info), None for a TPU.
  """
  name: str
  platform: str
  memory_bytes: int
  bf16_flops: float
  memory_bytes_per_s: float
  gpu: dict | None = None


def _gpu(sms: int, major: int, minor: int, memory: int, bandwidth: float, l2: int,
         clock_ghz: float, smem_per_sm: int, smem_optin: int) -> dict:
  return {
      "threads_per_block_limit": 1024,
      "threads_per_warp": 32,
      "shared_memory_per_block": 49152,
      "shared_memory_per_core": smem_per_sm,
      "shared_memory_per_block_optin": smem_optin,
      "threads_per_core_limit": 2048,
      "core_count": sms,
      "fpus_per_core": 128 if major >= 9 else 64,
      "block_dim_limit_x": 2**31 - 1,
      "block_dim_limit_y": 65535,
      "block_dim_limit_z": 65535,
      "memory_bandwidth": int(bandwidth),
      "l2_cache_size": l2,
      "clock_rate_ghz": clock_ghz,
      "device_memory_size": memory,
      "registers_per_core_limit": 65536,
      "registers_per_block_limit": 65536,
      "cuda_compute_capability": {
          "major": major,
          "minor": minor
      },
  }


CHIPS: dict[str, Chip] = {
    c.name: c for c in (
        Chip("v4", "tpu", 32 << 30, 275e12, 1200e9),
        Chip("v5e", "tpu", 16 << 30, 197e12, 819e9),
        Chip("v5p", "tpu", 95 << 30, 459e12, 2765e9),
        Chip("v6e", "tpu", 32 << 30, 918e12, 1640e9),
        Chip("h100", "gpu", 80 * 10**9, 989e12, 3.35e12,
             _gpu(132, 9, 0, 80 * 10**9, 3.35e12, 50 << 20, 1.98, 233472, 232448)),
        Chip("a100", "gpu", 80 * 10**9, 312e12, 2.04e12,
             _gpu(108, 8, 0, 80 * 10**9, 2.04e12, 40 << 20, 1.41, 167936, 166912)),
    )
}


@dataclasses.dataclass(frozen=True)
class Target:
  """A parsed --config.compile.target: `chip` times `shape` (the slice's
  topology, e.g. (16, 16); GPUs: (hosts, per host))."""
  text: str
  chip: Chip
  shape: tuple[int, ...]

  @property
  def num_devices(self) -> int:
    return math.prod(self.shape)

  @property
  def compiler_options(self) -> dict:
    """XLA options of a compile for the target. GPU: no autotuning (there is
    no device to time on) and cuBLAS instead of Triton for GEMMs (XLA 0.10.2's
    deviceless Triton GEMM tiling fails on some of the models' dots:
    "Couldn't find output tile sizes"); memory figures are those of that
    program."""
    if self.chip.platform == "gpu":
      return {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False}
    return {}

  def devices(self) -> list[jax.Device]:
    """The compile-only devices of the slice (nothing runs on them)."""
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    if self.chip.platform == "tpu":
      # libtpu takes a process-wide lock file when it loads; compiling needs no
      # exclusive use of a chip, so a second process may load it too.
      os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
      topo = "x".join(map(str, self.shape))
      # libtpu's hosts hold 2x2x1 chips by default; a smaller slice (one
      # chip: tpu:v5e:1x1) is one host of its own size.
      dims = (self.shape + (1, 1, 1))[:3]
      kwargs = {}
      if any(d < b for d, b in zip(dims, _HOST_BOUNDS)):
        kwargs["chips_per_host_bounds"] = tuple(map(min, dims, _HOST_BOUNDS))
      try:
        return list(
            topologies.get_topology_desc(topology_name=f"{self.chip.name}:{topo}",
                                         platform="tpu",
                                         **kwargs).devices)
      except (RuntimeError, ValueError) as e:
        raise errors.ConfigError(
            _FLAG, f"{self.text}: no TPU topology ({e}); TPU targets need the "
            f"`tpu` extra (pip install -e '.[tpu]' -c constraints.txt) and a "
            f"topology libtpu knows (e.g. v5e 2x2, 16x16; v5p 2x2x1)") from None
    hosts, per_host = (1,) + self.shape if len(self.shape) == 1 else self.shape
    try:
      return list(
          topologies.get_topology_desc(platform="cuda",
                                       topology=f"1x{hosts}x{per_host}",
                                       target_config=gpu_spec(self.chip)).devices)
    except (RuntimeError, ValueError, NotImplementedError) as e:
      raise errors.ConfigError(
          _FLAG, f"{self.text}: no CUDA compile-only devices ({e}); GPU targets "
          f"need the `cuda-compile` extra (pip install -e '.[cuda-compile]' "
          f"-c constraints.txt)") from None


def gpu_spec(chip: Chip) -> str:
  """The chip's GpuTargetConfigProto as text: what XLA compiles a GPU for."""

  def fields(d: dict, indent: str) -> list[str]:
    out = []
    for k, v in d.items():
      if isinstance(v, dict):
        out += [f"{indent}{k} {{"] + fields(v, indent + "  ") + [f"{indent}}}"]
      else:
        out.append(f"{indent}{k}: {v}")
    return out

  lines = ["gpu_device_info {"] + fields(chip.gpu, "  ") + ["}"]
  lines += [
      'platform_name: "CUDA"', "dnn_version_info { major: 9 minor: 1 }",
      f'device_description_str: "{chip.name} (iat-jax compile target)"'
  ]
  return "\n".join(lines) + "\n"


_TARGET = re.compile(r"^(tpu|gpu):(\w+):(\d+(?:x\d+)*)$")


def parse(text: str) -> Target:
  """The Target of a --config.compile.target value; ConfigError naming the
  flag when it is not one (see the module docstring)."""
  m = _TARGET.match(str(text).strip())
  if not m:
    raise errors.ConfigError(
        _FLAG, f"{text!r} is not <platform>:<chip>:<topology>, e.g. tpu:v5e:16x16, "
        f"tpu:v5p:2x2x1 or gpu:h100:8")
  platform, name, shape = m.groups()
  chip = CHIPS.get(name)
  if chip is None or chip.platform != platform:
    known = [f"{c.platform}:{c.name}" for c in CHIPS.values()]
    raise errors.ConfigError(_FLAG, f"{text!r}: unknown chip; known: {known}")
  dims = tuple(int(x) for x in shape.split("x"))
  if min(dims) < 1 or (platform == "gpu" and len(dims) > 2):
    raise errors.ConfigError(
        _FLAG, f"{text!r}: a GPU target is <n> or <hosts>x<n>, a TPU one the "
        f"slice's topology, all > 0")
  return Target(str(text).strip(), chip, dims)

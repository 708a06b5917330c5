"""glibc malloc settings that keep freed memory, applied at process start.

XLA's per-step temporary buffer (and the host batch arrays) are larger than
glibc's mmap threshold, so with the defaults every step maps fresh pages
(zeroed by the kernel, one page fault per 4 KiB) and unmaps them when the
step ends: measured 19% of a CPU training run's time in the kernel. With
`MALLOC_MMAP_MAX_=0` large blocks come from the heap instead, and with a large
`MALLOC_TRIM_THRESHOLD_` freed heap memory is kept for the next step rather
than returned to the kernel (and with `MALLOC_TOP_PAD_`, so are the worker
threads' heaps; see "Threads" below). The process's resident memory then stays at its
peak instead of falling between steps.

glibc reads these variables once, when the process starts, so setting them
from Python is too late: `ensure()` re-executes the process once with them
added (values already in the environment win). `iat_jax.main` calls it
first; the launchers set the variables themselves (`environ`), so their
processes need no re-exec.

Threads. XLA:CPU runs a step on its worker threads, whose glibc arenas
serve a request above 64 MiB (an arena heap's HEAP_MAX_SIZE) by mmap
whatever MALLOC_MMAP_MAX_ says, and delete a secondary heap as soon as it is
empty; the trim threshold governs only how far a heap shrinks. So a step
whose one temporary buffer is larger than that maps fresh pages every step
(ML-100K downstream step: a 77.7 MiB buffer, 19.9k minor faults and 39% sys
/ user CPU per step). `compiler_options` asks XLA:CPU to cut its temporaries
into heaps of at most 8 MiB, which the arenas can keep: 1.9k faults, 3.3%
(`experiments/bench_train.py`). XLA logs a warning at compile time for each
buffer larger than a heap ("larger than the per-heap size limit"); such a
buffer gets a heap of its own. glibc deletes an empty secondary heap unless
the heap before it lacks `MALLOC_TOP_PAD_` bytes of room, so a top pad of
HEAP_MAX_SIZE keeps every heap an arena ever grew (it is address space: the
pages it reserves are not touched). Without it, the demo downstream step
deleted and re-created about one heap per step (strace: 80 munmaps of a
64 MiB heap in 70 steps, 12 with it) in some runs: 418-2,162 faults and
2.4-9.3% sys / user per step over five child processes, against 164-416 and
0.7-1.8% with it. `MALLOC_ARENA_MAX=1` would also stop the faults, but costs
a small-op step 30% (one arena lock for every thread), so it is not used.

Opt out with IAT_JAX_KEEP_MALLOC=1 (nothing is changed, the XLA option
included). Non-Linux hosts and non-glibc C libraries are left alone.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

SETTINGS = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_TOP_PAD_": str(64 << 20),
}
# XLA:CPU temporaries in heaps of at most this many bytes (`compiler_options`).
CPU_HEAP_BYTES = 8 << 20
# Set to 1 to leave the allocator alone.
OPT_OUT = "IAT_JAX_KEEP_MALLOC"
# Set in the re-executed process, so it never re-executes again.
MARKER = "IAT_JAX_MALLOC_REEXEC"


def opted_out(env: Mapping[str, str]) -> bool:
  """Whether `env` sets IAT_JAX_KEEP_MALLOC (to anything but '' or '0')."""
  return env.get(OPT_OUT, "") not in ("", "0")


def applies() -> bool:
  """Whether the settings mean anything here (Linux with glibc)."""
  return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def environ(env: Mapping[str, str] | None = None) -> dict[str, str]:
  """`env` (default os.environ) plus the settings it lacks (unless opted out)."""
  env = dict(os.environ if env is None else env)
  if opted_out(env):
    return env
  return {**SETTINGS, **env}


def compiler_options(platform: str) -> dict[str, int]:
  """XLA compiler options for a step compiled for `platform` ('cpu', 'gpu',
  'tpu'): on CPU with glibc, temporaries in heaps of <= CPU_HEAP_BYTES (see
  the module docstring); nothing elsewhere or when opted out."""
  if platform != "cpu" or not applies() or opted_out(os.environ):
    return {}
  return {"xla_multiheap_size_constraint_per_heap": CPU_HEAP_BYTES}


def missing(env: Mapping[str, str] | None = None) -> dict[str, str]:
  """The settings `env` (default os.environ) lacks."""
  env = os.environ if env is None else env
  return {k: v for k, v in SETTINGS.items() if k not in env}


def ensure() -> None:
  """Re-executes this process once with the settings, if they are missing.

  Returns normally when nothing is to be done: settings present, opted out,
  already re-executed (the marker), or not glibc. Otherwise never returns.
  """
  env = os.environ
  if opted_out(env) or env.get(MARKER) or not missing(env) or not applies():
    return
  new = {**environ(env), MARKER: "1"}
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), new)


def at_start() -> dict[str, str]:
  """The allocator variables this process started with (/proc/self/environ).

  os.environ can be changed later; /proc/self/environ is what glibc read.
  """
  try:
    with open("/proc/self/environ", "rb") as f:
      pairs = [p.split(b"=", 1) for p in f.read().split(b"\0") if b"=" in p]
  except OSError:
    return {}
  start = {k.decode(): v.decode() for k, v in pairs}
  return {k: start[k] for k in (*SETTINGS, OPT_OUT) if k in start}

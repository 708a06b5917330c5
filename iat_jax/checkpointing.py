"""Orbax checkpoints of the train state together with the Grain iterator.

Two managers per stage directory:
  ckpt/  periodic: {state, data_iter}, the last `keep` steps (resume point);
  best/  {params} at the best valid AUC of the main task (max_to_keep=1).
Orbax writes each step into a temporary directory and renames it when
complete, so a kill mid-save leaves the previous checkpoints intact. A step
damaged after it was committed (a truncated or emptied file, garbage
metadata) is found when it fails to restore: `restore_latest` logs a warning
naming it and the reason and falls back to the next newest step (moving the
damaged one to ckpt.damaged/); only when no step restores is it a
`CheckpointError`.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

from iat_jax import errors


def _reason(e: BaseException) -> str:
  """One line: the innermost cause of `e` (Orbax wraps the real error)."""
  while e.__cause__ is not None:
    e = e.__cause__
  return f"{type(e).__name__}: {' '.join(str(e).split())}"[:400]


def _barriers(prefix: str) -> ocp.options.MultiprocessingOptions:
  """Multi-process options whose barrier names start with `prefix`.

  Orbax names a save's barriers after the step (`async_write_complete.<step>`)
  and its progress tracker's after nothing at all, so two managers saving the
  same step at once (ckpt/ and best/ at an evaluation step) would meet at the
  same barrier in a multi-process run ("Barrier ... is already ongoing") and
  the save would fail or time out. One prefix per manager keeps them apart.
  """
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)


class Checkpoints:
  """Periodic resume checkpoints and the best-by-valid-metric parameters."""

  def __init__(self, directory: str, keep: int, best_metric: str):
    self.best_metric = best_metric
    self.ckpt = ocp.CheckpointManager(
        os.path.join(directory, "ckpt"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             create=True,
                                             multiprocessing_options=_barriers("ckpt")),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data_iter": grain.checkpoint.CheckpointHandler()
        })
    self.best = ocp.CheckpointManager(
        os.path.join(directory, "best"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1,
                                             create=True,
                                             best_fn=lambda m: m[best_metric],
                                             best_mode="max",
                                             keep_checkpoints_without_metrics=False,
                                             multiprocessing_options=_barriers("best")),
        item_handlers={"params": ocp.StandardCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.ckpt.latest_step()

  def save(self, step: int, state: Any, data_iter: Any) -> None:
    if step in self.ckpt.all_steps():
      return
    self.ckpt.save(step,
                   args=ocp.args.Composite(
                       state=ocp.args.StandardSave(state),
                       data_iter=grain.checkpoint.CheckpointSave(data_iter)))

  def restore(self, abstract_state: Any, data_iter: Any, step: int | None = None):
    """Restores state (onto the shardings in `abstract_state`) and the iterator."""
    step = self.ckpt.latest_step() if step is None else step
    out = self.ckpt.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
    return out["state"]

  def restore_latest(self, abstract_state: Any, data_iter: Any) -> tuple[Any, int]:
    """(state, step) of the newest periodic checkpoint that restores.

    Returns (None, 0) when there is none. A step that fails to restore is
    reported (warning: path and reason) and the next older one tried; the
    caller redoes the steps in between. Once an older step restores, the
    failed newer ones are moved to ckpt.damaged/<step>-<time> (kept, and
    their step numbers free for the redone saves). If none restores, nothing
    is moved (a changed model config fails every step alike) and it is a
    errors.CheckpointError naming the directory."""
    failed = []
    for step in sorted(self.ckpt.all_steps(), reverse=True):
      try:
        state = self.restore(abstract_state, data_iter, step)
      except Exception as e:  # pylint: disable=broad-except
        failed.append(step)
        logging.warning(
            "checkpoint %s does not restore (%s); falling back to an "
            "earlier one", os.path.join(self.ckpt.directory, str(step)), _reason(e))
        continue
      for bad in failed:
        self._set_aside(bad)
      return state, step
    if failed:
      directory = os.fspath(self.ckpt.directory)
      raise errors.CheckpointError(
          f"no checkpoint in {directory} restores (tried steps {failed}; see the "
          f"warnings above); if the model flags changed, re-run with the original "
          f"ones or another --workdir, else delete {os.path.dirname(directory)} "
          f"to train this stage afresh")
    return None, 0

  def _set_aside(self, step: int) -> None:
    """Moves a damaged step out of ckpt/ (process 0) and rescans the steps."""
    if jax.process_index() == 0:
      src = os.path.join(self.ckpt.directory, str(step))
      dst_dir = os.fspath(self.ckpt.directory) + ".damaged"
      os.makedirs(dst_dir, exist_ok=True)
      dst = os.path.join(dst_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
      try:
        shutil.move(src, dst)
      except OSError as e:
        raise errors.CheckpointError(
            f"checkpoint {src} does not restore and cannot be moved "
            f"aside ({e}); delete it and re-run") from None
    self.ckpt.reload()

  def save_best(self, step: int, params: Any, metrics: dict[str, float]) -> None:
    """Offers params evaluated at `step`; kept only if best so far."""
    if step in self.best.all_steps():
      return
    self.best.save(step,
                   args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                   metrics={
                       k: float(v) for k, v in metrics.items()
                   })

  def restore_best(self, abstract_params: Any) -> tuple[int, Any]:
    """(step, params) of the best checkpoint; errors.CheckpointError naming best/ and
    what to do when there is none or it does not restore (best/ keeps one
    step, so there is nothing to fall back to)."""
    step = self.best.best_step()
    where = os.fspath(self.best.directory)
    if step is None:
      raise errors.CheckpointError(f"no best checkpoint in {where}; train this stage "
                                   f"(--mode=train) before evaluating or exporting it")
    try:
      out = self.best.restore(
          step,
          args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
    except Exception as e:  # pylint: disable=broad-except
      stage = os.path.dirname(where)
      raise errors.CheckpointError(
          f"best checkpoint {os.path.join(where, str(step))} does not restore "
          f"({_reason(e)}); delete {stage} to retrain this stage (or restore "
          f"{where} from a backup)") from None
    return step, out["params"]

  def wait(self) -> None:
    self.ckpt.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and stops the managers' threads; idempotent."""
    if getattr(self, "_closed", False):
      return
    self._closed = True
    try:
      self.wait()
    finally:
      self.ckpt.close()
      self.best.close()


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: restore targets."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

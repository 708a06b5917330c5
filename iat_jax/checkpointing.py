"""Orbax checkpoints of the train state together with the Grain iterator.

Two managers per stage directory:
  ckpt/  periodic: {state, data_iter}, the last `keep` steps (resume point);
  best/  {params} at the best valid AUC of the main task (max_to_keep=1).
Orbax writes each step into a temporary directory and renames it when
complete, so a kill mid-save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """Periodic resume checkpoints and the best-by-valid-metric parameters."""

  def __init__(self, directory: str, keep: int, best_metric: str):
    self.best_metric = best_metric
    self.ckpt = ocp.CheckpointManager(
        os.path.join(directory, "ckpt"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data_iter": grain.checkpoint.CheckpointHandler()})
    self.best = ocp.CheckpointManager(
        os.path.join(directory, "best"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m[best_metric],
            best_mode="max", keep_checkpoints_without_metrics=False),
        item_handlers={"params": ocp.StandardCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.ckpt.latest_step()

  def save(self, step: int, state: Any, data_iter: Any) -> None:
    if step in self.ckpt.all_steps():
      return
    self.ckpt.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=grain.checkpoint.CheckpointSave(data_iter)))

  def restore(self, abstract_state: Any, data_iter: Any, step: int | None = None):
    """Restores state (onto the shardings in `abstract_state`) and the iterator."""
    step = self.ckpt.latest_step() if step is None else step
    out = self.ckpt.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
    return out["state"]

  def save_best(self, step: int, params: Any, metrics: dict[str, float]) -> None:
    """Offers params evaluated at `step`; kept only if best so far."""
    if step in self.best.all_steps():
      return
    self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                   metrics={k: float(v) for k, v in metrics.items()})

  def restore_best(self, abstract_params: Any) -> tuple[int, Any]:
    step = self.best.best_step()
    if step is None:
      raise FileNotFoundError(f"no best checkpoint in {self.best.directory}")
    out = self.best.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))
    return step, out["params"]

  def wait(self) -> None:
    self.ckpt.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.ckpt.close()
    self.best.close()


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: restore targets."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

"""Training and evaluation of one stage (`iat_jax.stages`) in its directory.

`Run` holds a stage's model, mesh, sharded state and compiled steps;
`train` resumes it from its checkpoints and trains it to the end; `run_loop`
is the loop the other trainers (`stream_lib`, `two_pass_lib`) share. The
directory layout is `iat_jax.workdir`'s.
"""

from __future__ import annotations

import signal
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from iat_jax import checkpointing
from iat_jax import errors
from iat_jax import metrics as metrics_lib
from iat_jax import sharding
from iat_jax import stages
from iat_jax import workdir as workdir_lib
from iat_jax.data import dataset as dataset_lib
from iat_jax.data import input_pipeline
from iat_jax.data import orders
from iat_jax.train import cost
from iat_jax.train import memory
from iat_jax.train import predict
from iat_jax.train import steps


class _Preemption:
  """Turns SIGTERM into a flag the train loop polls (then checkpoints, exits)."""

  def __init__(self):
    self.requested = False
    self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, *_):
    logging.warning("SIGTERM received: checkpointing and exiting")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


class PerShape:
  """A jitted step compiled ahead of time once per batch shape signature.

  Batches have one shape except for deduplicated history InsEmbs
  (hist_insemb_unique [G, U, d], U on `input_pipeline.unique_rows`' ladder, or
  hist_insemb [B, L, d] when dense), so a run compiles a bounded few.
  `cost_analysis()` is the first (the sample batch's) executable's.
  """

  def __init__(self, jitted, state, sample):
    self._jitted = jitted
    self._compiled = {}
    self.first = self._get(state, sample)

  @staticmethod
  def shape_key(batch) -> tuple:
    """The batch's shape signature (one compiled step per signature)."""
    return tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))

  def _get(self, state, batch):
    key = self.shape_key(batch)
    if key not in self._compiled:
      self._compiled[key] = self._jitted.lower(state, batch).compile()
    return self._compiled[key]

  def __call__(self, state, batch):
    return self._get(state, batch)(state, batch)

  def cost_analysis(self):
    return self.first.cost_analysis()

  def trace(self, state, batch) -> jax.stages.Traced:
    """The step traced for these arguments (`.jaxpr`), not compiled."""
    return self._jitted.trace(state, batch)


class Run:
  """One stage's model, mesh, sharded state and compiled steps.

  By default it trains on `batches(..., "train")`; the streaming stage passes
  its own `train_data`, a `fill` that completes each host batch right before
  the step (fetching InsEmbs written by the previous step) and the `aux`
  outputs its train step returns.
  """

  def __init__(self,
               stage: stages.Stage,
               config: ml_collections.ConfigDict,
               workdir: str,
               name: str,
               ds: dataset_lib.Dataset,
               table=None,
               *,
               train_data=None,
               fill=lambda batch: batch,
               aux: tuple[str, ...] = ()):
    self.stage = stage
    self.config = config
    self.name = name
    self.dir = workdir_lib.stage_dir(workdir, name)
    self.ds = ds
    self.table = table
    self.fill = fill
    self.mesh = sharding.make_mesh(tuple(config.mesh_shape), tuple(config.mesh_axes))
    self.rules = tuple(tuple(rule) for rule in config.logical_axis_rules)
    self.model = stage.model(config, ds.schema)
    self.train_data = train_data if train_data is not None else orders.batches(
        config, ds, stage.order, "train", train=True, table=table)
    self.num_steps = len(self.train_data)
    sample = steps.to_device(fill(self.train_data[0]), self.mesh)
    tx = steps.make_optimizer(config, self.num_steps)
    self.state, self.shardings = steps.create_state(self.model, tx, sample, config.seed,
                                                    self.mesh, self.rules)
    # Compiled ahead of time per batch shape (the first one now): the same
    # executables run and are costed.
    self.train_step = PerShape(
        steps.make_train_step(self.model, self.shardings, self.mesh, self.rules, aux),
        self.state, sample)
    outputs = ("probs", "insemb") if stage.exports else ("probs",)
    self.eval_step = steps.make_eval_step(self.model,
                                          self.shardings.params,
                                          self.mesh,
                                          self.rules,
                                          outputs=outputs)
    memory.check(self.train_step.first, stage.order, name)
    self.ckpts = checkpointing.Checkpoints(self.dir, config.keep_checkpoints,
                                           f"auc/{ds.schema.tasks[0]}")

  def close(self) -> None:
    """Waits for and stops the checkpoint threads (idempotent)."""
    self.ckpts.close()

  def cost(self) -> dict[str, float]:
    """Parameter counts and XLA's FLOPs of one compiled train step."""
    counts = cost.param_counts(self.state.params)
    return {
        "params": counts["total"],
        "dense_params": counts["dense"],
        "embedding_params": counts["embedding"],
        "flops_per_batch": cost.compiled_flops(self.train_step)
    }

  def evaluate(self, params, split: str) -> dict[str, float]:
    """Task metrics of `params` over every instance of `split`."""
    data = orders.batches(self.config,
                          self.ds,
                          self.stage.order,
                          split,
                          train=False,
                          table=self.table)
    res = predict.predict(self.eval_step, params, data, self.mesh)
    return metrics_lib.task_metrics(self.ds.schema.tasks, res["labels"], res["probs"])


def resume(st: Run, writer: metrics_lib.Writer, it) -> tuple[Any, int]:
  """(state, step) from the stage's latest checkpoint, or fresh at step 0.

  Restores the Grain iterator in place and drops metric lines that a killed
  run wrote past the restored step. A damaged newest checkpoint is reported
  and the next older one used (`Checkpoints.restore_latest`).
  """
  restored, start = st.ckpts.restore_latest(checkpointing.abstract(st.state), it)
  state = st.state if restored is None else restored
  if start:
    logging.info("%s: resumed from step %d", st.name, start)
  writer.truncate(start)
  return state, start


def run_loop(st: Run,
             state,
             it,
             start: int,
             writer: metrics_lib.Writer,
             *,
             after_step=None,
             before_checkpoint=None,
             validate: bool = True):
  """Steps start+1..num_steps: log, validate, checkpoint; stop on NaN/SIGTERM.

  Args:
    st: the stage.
    state: the train state at `start`.
    it: the Grain iterator, positioned at `start`.
    start: steps already done.
    writer: metrics writer.
    after_step: optional `f(step, state, batch, aux)`, run before the
      step's checkpoint (the streaming stage writes InsEmbs back there).
    before_checkpoint: optional `f(step)`, run right before each checkpoint
      is saved (tables written while training make their writes durable).
    validate: evaluate on valid every config.eval_every steps and at the
      end, keeping the best params.

  Returns:
    The final state.
  """
  config = st.config
  progress = metrics_lib.Progress(st.num_steps,
                                  orders.get(st.stage.order).instances(config),
                                  config.log_every, start)
  preempt = _Preemption()
  try:
    for step in range(start + 1, st.num_steps + 1):
      batch = st.fill(next(it))
      state, out, aux = st.train_step(state, steps.to_device(batch, st.mesh))
      loss = _finite_loss(st, out, step)
      if after_step is not None:
        after_step(step, state, batch, aux)
      last = step == st.num_steps
      if step % config.log_every == 0 or last:
        _log(writer, progress, step, loss, batch)
      if validate and ((config.eval_every and step % config.eval_every == 0) or last):
        valid = st.evaluate(state.params, "valid")
        writer.write(step, "valid", valid)
        st.ckpts.save_best(step, state.params, _finite(valid))
      if step % config.checkpoint_every == 0 or last or preempt.requested:
        if before_checkpoint is not None:
          before_checkpoint(step)
        st.ckpts.save(step, state, it)
      if preempt.requested:
        st.ckpts.wait()
        raise SystemExit(f"{st.name}: preempted at step {step}; checkpoint saved")
  finally:
    preempt.restore()
    st.ckpts.wait()
  return state


def finish(st: Run, writer: metrics_lib.Writer, results: dict) -> dict:
  """Writes the final metrics and results.json (which marks the stage done)."""
  writer.write(st.num_steps, "final_valid", results["valid"])
  writer.write(st.num_steps, "test", results["test"])
  writer.close()
  st.ckpts.close()
  workdir_lib.write_results(st.dir, results)
  logging.info("%s done: test %s", st.name, results["test"])
  return results


def train(stage: stages.Stage,
          config: ml_collections.ConfigDict,
          workdir: str,
          name: str,
          ds: dataset_lib.Dataset,
          table=None,
          *,
          train_data=None,
          after_step=None,
          before_checkpoint=None) -> dict:
  """Trains `stage` into <workdir>/<name>; resumes from its checkpoints.

  Args:
    stage, config, workdir, name, ds, table: the run (`stage`, whose name is
      config.stage, into <workdir>/<name>, reading InsEmbs from `table` if it
      is downstream).
    train_data: batches to train on instead of the stage's default order.
    after_step: `f(step, state, batch, aux)` with aux {'probs', 'insemb'}
      of the step's forward pass (see `run_loop`).
    before_checkpoint: `f(step)` before each checkpoint (see `run_loop`).

  Returns:
    The stage's results dict (also written to results.json).
  """
  aux = ("probs", "insemb") if after_step else ()
  st = Run(stage, config, workdir, name, ds, table, train_data=train_data, aux=aux)
  writer = metrics_lib.Writer(st.dir, active=jax.process_index() == 0)
  with closing(st, writer):
    it = input_pipeline.iterate(st.train_data, config.worker_count)
    state, start = resume(st, writer, it)
    cost = st.cost()
    state = run_loop(st,
                     state,
                     it,
                     start,
                     writer,
                     after_step=after_step,
                     before_checkpoint=before_checkpoint)
    best_step, params = st.ckpts.restore_best(checkpointing.abstract(state.params))
    return finish(
        st, writer, {
            "valid": st.evaluate(params, "valid"),
            "test": st.evaluate(params, "test"),
            "best_step": best_step,
            **cost
        })


class closing:  # pylint: disable=invalid-name
  """Closes a stage's checkpoints and metrics writer however the block ends,
  so no Orbax or TensorBoard thread outlives a failure (and prints during
  interpreter shutdown). A close that fails while another error propagates
  is logged, not raised over it."""

  def __init__(self, st: Run, writer: metrics_lib.Writer | None = None):
    self.st, self.writer = st, writer

  def __enter__(self):
    return self.st

  def __exit__(self, exc_type, exc, tb) -> None:
    for close in (self.st.close, self.writer.close if self.writer else None):
      if close is None:
        continue
      try:
        close()
      except Exception as e:  # pylint: disable=broad-except
        if exc_type is None:
          raise
        logging.warning("%s: while stopping after an error: %s", self.st.name, e)


def _finite_loss(st: Run, out, step: int) -> float:
  return finite_loss(out, st.name, f"at step {step}", _last_good(st))


def finite_loss(out, name: str, where: str, saved: str) -> float:
  """A train step's loss (a replicated scalar); DivergedError naming the
  model, where it diverged and what is saved, if not finite."""
  loss = float(out["loss"].addressable_data(0))
  if not np.isfinite(loss):
    raise errors.DivergedError(
        f"{name}: non-finite loss {loss} {where}; stopped without saving; "
        f"{saved}; lower --config.optimizer.learning_rate or set "
        f"--config.optimizer.grad_clip_norm")
  return loss


def _log(writer: metrics_lib.Writer, progress: metrics_lib.Progress, step: int,
         loss: float, batch: dict) -> None:
  """The train-metric line of `step` and the progress line (rate, ETA)."""
  logged = {"loss": loss}
  if "hist_missing" in batch:  # history InsIDs the store lacked, this step
    logged["hist_missing"] = float(batch["hist_missing"])
  writer.write(step, "train", logged)
  progress(step, loss)


def _last_good(st: Run) -> str:
  step = st.ckpts.latest_step()
  if step is None:
    return f"no checkpoint saved yet in {st.dir}/ckpt (a re-run starts afresh)"
  return f"last good checkpoint: step {step} in {st.dir}/ckpt"


def _finite(m: dict[str, float]) -> dict[str, float]:
  return {k: (v if np.isfinite(v) else -1.0) for k, v in m.items()}


def load_best(stage: stages.Stage,
              config,
              workdir: str,
              name: str,
              ds,
              table=None) -> tuple[Run, int, Any]:
  """A trained stage with its best params: (run, best step, params).

  Its checkpoint managers are closed: the run only evaluates."""
  st = Run(stage, config, workdir, name, ds, table)
  with closing(st):
    step, params = st.ckpts.restore_best(checkpointing.abstract(st.state.params))
  return st, step, params


def evaluate_stage(stage: stages.Stage,
                   config,
                   workdir: str,
                   name: str,
                   ds,
                   table=None) -> dict:
  """Valid and test metrics of a trained stage's best params."""
  st, step, params = load_best(stage, config, workdir, name, ds, table)
  return {
      "valid": st.evaluate(params, "valid"),
      "test": st.evaluate(params, "test"),
      "best_step": step
  }

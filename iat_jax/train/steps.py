"""Train state, sharded initialization, and the jitted train / eval steps.

The state is built in the house order: `jax.eval_shape(init)` ->
`nn.get_partition_spec` -> `nn.logical_to_mesh_sharding(rules)` ->
`jax.jit(init, out_shardings)` -> unboxed arrays. Steps are jitted with
explicit in/out shardings on the mesh and donate the old state, and compiled
with `allocator.compiler_options` (on CPU: temporaries in heaps the glibc
arenas keep between steps).
"""

from __future__ import annotations

from typing import Any, Callable

from flax import linen as nn
from flax.training import train_state
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from iat_jax import allocator
from iat_jax import sharding
from iat_jax.data import input_pipeline

Batch = dict[str, Any]


class TrainState(train_state.TrainState):
  """Params, optimizer state and step (from flax) plus the dropout RNG key."""
  rng: jax.Array


def make_optimizer(config: ml_collections.ConfigDict,
                   num_steps: int | None = None) -> optax.GradientTransformation:
  """AdamW, warm-up + cosine schedule over num_steps (None: warm-up, then
  constant, for training that never ends), global-norm clipping
  (config.optimizer)."""
  opt = config.optimizer
  if num_steps is None:
    schedule = optax.warmup_constant_schedule(0.0, opt.learning_rate, opt.warmup_steps)
  else:
    warmup = min(opt.warmup_steps, max(num_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, opt.learning_rate, warmup,
                                                  max(num_steps, warmup + 1))
  chain = [optax.adamw(schedule, weight_decay=opt.weight_decay)]
  if opt.grad_clip_norm > 0:
    chain.insert(0, optax.clip_by_global_norm(opt.grad_clip_norm))
  return optax.chain(*chain)


def model_inputs(batch: Batch) -> Batch:
  """Drops the host-only keys (uint64 ids, row numbers, counters)."""
  return {k: v for k, v in batch.items() if k not in input_pipeline.HOST_KEYS}


def to_device(batch: Batch, mesh: jax.sharding.Mesh) -> Batch:
  """Process-local numpy batch (its `sharding.process_blocks` of the global
  batch) -> global arrays sharded over 'data'.

  With several processes, deduplicated history InsEmbs (those with
  hist_unique) are first brought to the largest U of any process
  (`input_pipeline.fit_unique`: padded, or dense past its limit), so that
  every process builds the same global shapes. That costs one scalar
  all-gather per batch (every process calls this for every batch, as it then
  runs the step on it), which waits for the devices' previous step: the host
  cannot dispatch a step ahead of the device then. One process needs no
  agreement.
  """
  data = sharding.batch_sharding(mesh)
  if "hist_unique" in batch and jax.process_count() > 1:
    u = multihost_utils.process_allgather(np.int64(batch["hist_unique"]))
    batch = input_pipeline.fit_unique(batch, int(np.max(u)))
  batch = model_inputs(batch)
  # This process holds `local` of the `blocks` leading blocks (shared with
  # another process where a data row of the mesh spans both).
  blocks, local = mesh.shape["data"], sharding.local_batch_shards(mesh)
  return {
      k:
          jax.make_array_from_process_local_data(
              data, np.asarray(v), (len(v) // local * blocks,) + np.shape(v)[1:])
      for k, v in batch.items()
  }


def _init_fn(model: nn.Module, tx: optax.GradientTransformation) -> Callable:
  """init(rng, batch) -> a boxed TrainState (params with logical names)."""

  def init(rng, batch):
    p_rng, d_rng = jax.random.split(rng)
    variables = model.init({"params": p_rng, "dropout": d_rng}, batch, train=False)
    return TrainState.create(apply_fn=model.apply,
                             params=variables["params"],
                             tx=tx,
                             rng=d_rng)

  return init


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, batch: Batch,
                   mesh: jax.sharding.Mesh, rules) -> tuple[TrainState, Any]:
  """The train state's shapes, dtypes and shardings, nothing materialized.

  Args:
    model, tx, mesh, rules: as `create_state`.
    batch: a batch with the training shapes (arrays or jax.ShapeDtypeStruct).

  Returns:
    (state of jax.ShapeDtypeStruct leaves carrying their shardings, the
    state's shardings): what ahead-of-time compilation lowers against.
  """
  init = _init_fn(model, tx)
  with sharding.mesh_context(mesh, rules):
    boxed = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32), batch)
    shardings = sharding.param_shardings(boxed, mesh, rules)
  shapes = nn.meta.unbox(boxed)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       shapes, shardings)
  return state, shardings


def create_state(model: nn.Module, tx: optax.GradientTransformation, batch: Batch,
                 seed: int, mesh: jax.sharding.Mesh, rules) -> tuple[TrainState, Any]:
  """Initializes a sharded TrainState.

  Args:
    model: the Flax module; its params carry logical axis names.
    tx: the optimizer.
    batch: a device batch (global arrays) with the training shapes.
    seed: parameter / dropout seed.
    mesh: the device mesh.
    rules: logical axis rules.

  Returns:
    (state with unboxed arrays placed on their shardings, state shardings).
  """
  _, shardings = abstract_state(model, tx, batch, mesh, rules)
  init = _init_fn(model, tx)
  with sharding.mesh_context(mesh, rules):
    state = jax.jit(lambda r, b: nn.meta.unbox(init(r, b)),
                    out_shardings=shardings)(jax.random.PRNGKey(seed), batch)
  return state, shardings


def _task_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Sum over tasks of BCE, mean over real instances: scalar."""
  bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels).sum(-1)
  m = mask.astype(jnp.float32)
  return (bce * m).sum() / jnp.maximum(m.sum(), 1.0)


def make_train_step(model: nn.Module,
                    state_shardings,
                    mesh,
                    rules,
                    aux: tuple[str, ...] = ()) -> Callable:
  """jit(train_step(state, batch) -> (state, {'loss'}, {aux})) on the mesh.

  `aux` names outputs of the same forward pass to return, sharded like the
  batch: 'probs' (predict-then-train) and model outputs such as 'insemb'.
  """

  def train_step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      out = model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})
      out["probs"] = jax.nn.sigmoid(out["logits"].astype(jnp.float32))
      loss = _task_loss(out["logits"], batch["labels"], batch["mask"])
      return loss, {k: out[k] for k in aux}

    (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), {"loss": loss}, extra

  data = sharding.batch_sharding(mesh)
  jitted = jax.jit(train_step,
                   in_shardings=(state_shardings, data),
                   out_shardings=(state_shardings, sharding.replicated(mesh), data),
                   donate_argnums=0,
                   compiler_options=compiler_options(mesh))
  return _in_context(jitted, mesh, rules)


def make_eval_step(model: nn.Module,
                   param_shardings,
                   mesh,
                   rules,
                   outputs: tuple[str, ...] = ("probs",)) -> Callable:
  """jit(eval_step(params, batch) -> {'probs': [..., tasks], 'insemb'?})."""

  def eval_step(params, batch: Batch):
    out = model.apply({"params": params}, batch, train=False)
    res = {"probs": jax.nn.sigmoid(out["logits"].astype(jnp.float32))}
    if "insemb" in outputs:
      res["insemb"] = out["insemb"].astype(jnp.float32)
    return res

  data = sharding.batch_sharding(mesh)
  return _in_context(
      jax.jit(eval_step,
              in_shardings=(param_shardings, data),
              out_shardings=data,
              compiler_options=compiler_options(mesh)), mesh, rules)


def compiler_options(mesh) -> dict[str, int]:
  """XLA options of the steps on `mesh` (`allocator.compiler_options`)."""
  return allocator.compiler_options(mesh.devices.flat[0].platform)


def _in_context(fn: Callable, mesh, rules) -> Callable:
  """Runs (and so traces) `fn` under the mesh and the logical axis rules."""

  def wrapped(*args):
    with sharding.mesh_context(mesh, rules):
      return fn(*args)

  def staged(stage: str) -> Callable:  # fn.lower / fn.trace in the context

    def run(*args):
      with sharding.mesh_context(mesh, rules):
        return getattr(fn, stage)(*args)

    return run

  wrapped.lower = staged("lower")
  wrapped.trace = staged("trace")
  return wrapped

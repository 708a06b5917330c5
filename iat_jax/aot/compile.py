"""Every pipeline stage compiled for a target slice before a job is launched.

`run(config, workdir)` (`--mode=compile`): for `--config.compile.target`
(`targets`), it builds the slice's compile-only devices, the config's mesh
over them (`mesh_shape` / `mesh_axes` / `logical_axis_rules`, as training
does), and for each stage of `config.pipeline.models` lowers and compiles,
with the functions training runs (`steps.make_train_step`,
`steps.make_eval_step`, `steps.abstract_state`; nothing is materialized):

  train  the train step on a train batch of the stage's order;
  eval   the evaluation step on an evaluation batch: predict, and for a
         source the export of its InsEmbs.

Batch shapes come from the batch-order table without data
(`orders.abstract_batch`; a downstream's deduplicated InsEmbs at their
largest); the schema from the source's knobs, or from the prepared dataset
for real data (`sources.schema`).

The report per stage x step (printed, and <workdir>/compile/<target>.json):
per-chip argument / output / temp bytes (XLA's memory analysis of the
executable) against the chip's memory; FLOPs and bytes accessed per chip
(XLA's cost analysis; a GPU compile has none, so there the FLOPs are those of
the same step lowered for one CPU device, divided by the data shards: the
default axis rules shard the tables over a model axis, not the dense layers); the
collectives of the compiled HLO and their bytes; the share of dot FLOPs in
bfloat16; a roofline lower bound on the step time, max(FLOPs / peak, bytes /
bandwidth), with the implied best-case instances/s and MFU bound.

Fit check: a step that needs more than the chip's memory raises ConfigError
naming the stage, the bytes needed and available and the flags that size
it; nothing is written then.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from iat_jax import errors
from iat_jax import pipeline
from iat_jax import sharding
from iat_jax import stages
from iat_jax import validation
from iat_jax import workdir as workdir_lib
from iat_jax.aot import hlo
from iat_jax.aot import targets as targets_lib
from iat_jax.data import orders
from iat_jax.data import schema as schema_lib
from iat_jax.data import sources
from iat_jax.train import memory
from iat_jax.train import steps

STEPS = ("train", "eval")


@dataclasses.dataclass
class Compiled:
  """One stage's step compiled for a target (see the module docstring)."""
  stage: str
  step: str
  instances: int
  compiled: jax.stages.Compiled
  lowered: jax.stages.Lowered
  seconds: float


def _abstract(batch: dict, mesh) -> dict:
  data = sharding.batch_sharding(mesh)
  return {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data)
      for k, v in steps.model_inputs(batch).items()
  }


def lower(config: ml_collections.ConfigDict,
          schema: schema_lib.Schema,
          stage: stages.Stage,
          step: str,
          mesh: jax.sharding.Mesh,
          num_steps: int | None = None):
  """(lowered step, instances per step) of `stage` on `mesh`: the train or
  eval step training builds, against abstract state and batches; the
  learning-rate schedule that of a run of `num_steps` (None: unknown, as
  without data; its constants only)."""
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  model = stage.model(config, schema)
  order = orders.get(stage.order)
  shards = mesh.shape["data"]
  train = _abstract(orders.abstract_batch(config, schema, stage.order, shards=shards),
                    mesh)
  state, shardings = steps.abstract_state(model,
                                          steps.make_optimizer(config, num_steps),
                                          train, mesh, rules)
  if step == "train":
    fn = steps.make_train_step(model, shardings, mesh, rules)
    return fn.lower(state, train), order.instances(config)
  batch = _abstract(
      orders.abstract_batch(config, schema, stage.order, train=False, shards=shards),
      mesh)
  outputs = ("probs", "insemb") if stage.exports else ("probs",)
  fn = steps.make_eval_step(model, shardings.params, mesh, rules, outputs=outputs)
  per_row = order.instances(config) // order.rows(config)  # user chunks: T
  return fn.lower(state.params, batch), order.eval_rows(config, shards) * per_row


def stage_configs(
    config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """{stage name: its run config} of the stages config.pipeline.models trains."""
  out = {}
  for model in pipeline.steps(config):
    out.setdefault(model.stage.name, pipeline.stage_config(config, model))
  return out


def compile_all(config: ml_collections.ConfigDict,
                schema: schema_lib.Schema,
                mesh: jax.sharding.Mesh,
                options: dict | None = None) -> list[Compiled]:
  """Every stage x step of the config compiled on `mesh` (with XLA compiler
  `options`)."""
  out = []
  for name, cfg in stage_configs(config).items():
    for step in STEPS:
      t0 = time.time()
      lowered, instances = lower(cfg, schema, stages.get(name), step, mesh)
      try:
        compiled = lowered.compile(compiler_options=options)
      except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        raise _no_fit(config, name, step, str(e).splitlines()[0]) from None
      logging.info("compiled %s %s in %.1f s", name, step, time.time() - t0)
      out.append(Compiled(name, step, instances, compiled, lowered, time.time() - t0))
  return out


def _no_fit(config, stage: str, step: str, what: str) -> errors.ConfigError:
  order = stages.get(stage).order
  return errors.ConfigError(
      "compile.target", f"{config.compile.target}: the {step} step of stage {stage} "
      f"does not fit: {what}; lower {memory.size_flags(order)}, the data's "
      f"vocabulary sizes (model.vocab_pad_multiple, hashing), or shard over more "
      f"chips (--config.mesh_shape={tuple(config.mesh_shape)}, "
      f"--config.logical_axis_rules)")


def _cpu_flops(config, schema, stage: str, step: str) -> float:
  """FLOPs of a step lowered for one CPU device (XLA's HLO cost analysis)."""
  axes = tuple(config.mesh_axes)
  mesh = sharding.make_mesh((1,) * len(axes), axes, devices=jax.devices("cpu")[:1])
  lowered, _ = lower(config, schema, stages.get(stage), step, mesh)
  return float((lowered.cost_analysis() or {}).get("flops", 0.0))


def arguments(compiled: jax.stages.Compiled) -> list[dict]:
  """Per argument of a compiled step: its path, global shape, partition spec
  and per-chip bytes as its sharding and the executable's layout imply (the
  shard's shape, dims in the layout's major-to-minor order, the minor ones
  padded to the layout's tile: TPU (8, 128) for 32-bit), largest first."""
  infos, _ = jax.tree_util.tree_flatten_with_path(compiled.args_info)
  shardings = jax.tree.leaves(compiled.input_shardings, is_leaf=lambda x: x is None)
  formats = jax.tree.leaves(compiled.input_formats, is_leaf=lambda x: x is None)
  out = []
  for (path, info), where, fmt in zip(infos, shardings, formats, strict=True):
    shape = info.shape if where is None else where.shard_shape(info.shape)
    layout = fmt.layout if fmt is not None else None
    dims = [shape[i] for i in layout.major_to_minor] if layout else list(shape)
    tile = layout.tiling[0] if layout and layout.tiling else ()
    for k, t in enumerate(reversed(tile)):
      if k < len(dims):
        dims[-1 - k] = -(-dims[-1 - k] // t) * t
    out.append({
        "path": jax.tree_util.keystr(path),
        "shape": list(info.shape),
        "spec": str(getattr(where, "spec", "replicated")),
        "chip_bytes": math.prod(dims) * np.dtype(info.dtype).itemsize
    })
  return sorted(out, key=lambda a: -a["chip_bytes"])


def report(c: Compiled, target: targets_lib.Target, config, schema,
           data_shards: int) -> dict:
  """The per-chip report of one compiled step on a mesh of `data_shards`
  data shards (see the module docstring)."""
  chip = target.chip
  m = c.compiled.memory_analysis()
  need = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
          m.alias_size_in_bytes)
  cost = c.compiled.cost_analysis() or {}
  if isinstance(cost, list):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  flops = float(cost.get("flops", 0.0))
  flops_from = "xla cost analysis"
  if not flops:
    # The batch splits over 'data'; a model axis shards the tables, and the
    # dense layers run on every chip of it (the default axis rules).
    flops = _cpu_flops(config, schema, c.stage, c.step) / data_shards
    flops_from = "one-CPU lowering / data shards"
  accessed = float(cost.get("bytes accessed", 0.0)) or float(need)
  text = c.compiled.as_text() or ""
  dots = hlo.dots(c.lowered.as_text())
  compute_s, memory_s = flops / chip.bf16_flops, accessed / chip.memory_bytes_per_s
  seconds = max(compute_s, memory_s)
  return {
      "stage": c.stage,
      "step": c.step,
      "instances_per_step": c.instances,
      "argument_bytes": m.argument_size_in_bytes,
      "largest_arguments": arguments(c.compiled)[:8],
      "output_bytes": m.output_size_in_bytes,
      "temp_bytes": m.temp_size_in_bytes,
      "alias_bytes": m.alias_size_in_bytes,
      "need_bytes": need,
      "chip_memory_bytes": chip.memory_bytes,
      "fits": need <= chip.memory_bytes,
      "flops_per_chip": flops,
      "flops_from": flops_from,
      "bytes_accessed_per_chip": accessed,
      "collectives": hlo.collectives(text),
      "dot_flops_by_dtype": dots,
      "bf16_dot_share": dots.get("bf16", 0.0) / max(sum(dots.values()), 1.0),
      "roofline_step_s": seconds,
      "bound": "compute" if compute_s >= memory_s else "memory",
      "instances_per_s_bound": c.instances / seconds if seconds else 0.0,
      "mfu_bound": compute_s / seconds if seconds else 0.0,
      "compile_s": c.seconds,
  }


def check_fit(config, rows: list[dict]) -> None:
  """ConfigError for the first step that needs more than a chip's memory."""
  for r in rows:
    if not r["fits"]:
      raise _no_fit(
          config, r["stage"], r["step"],
          f"{r['need_bytes'] / 2**30:.2f} GiB per chip needed (arguments "
          f"{r['argument_bytes'] / 2**30:.2f} + outputs {r['output_bytes'] / 2**30:.2f} "
          f"+ temporaries {r['temp_bytes'] / 2**30:.2f} - donated "
          f"{r['alias_bytes'] / 2**30:.2f}), "
          f"{r['chip_memory_bytes'] / 2**30:.2f} GiB available")


def table(result: dict) -> str:
  """The report as a printed table."""
  head = (f"{'stage':<16} {'step':<5} {'args MiB':>9} {'temp MiB':>9} {'need MiB':>9} "
          f"{'GFLOP':>9} {'coll.':>5} {'coll MiB':>9} {'bf16':>5} {'step ms':>8} "
          f"{'bound':>7} {'inst/s':>10} {'MFU<=':>6} {'comp s':>6}")
  lines = [
      f"target {result['target']} ({result['chips']} chips, mesh {result['mesh']}, "
      f"{result['chip_memory_bytes'] / 2**30:.1f} GiB per chip)", head
  ]
  for r in result["steps"]:
    coll = r["collectives"]
    lines.append(
        f"{r['stage']:<16} {r['step']:<5} {r['argument_bytes'] / 2**20:>9.1f} "
        f"{r['temp_bytes'] / 2**20:>9.1f} {r['need_bytes'] / 2**20:>9.1f} "
        f"{r['flops_per_chip'] / 1e9:>9.3g} {sum(v['count'] for v in coll.values()):>5} "
        f"{sum(v['bytes'] for v in coll.values()) / 2**20:>9.1f} "
        f"{r['bf16_dot_share']:>5.2f} {r['roofline_step_s'] * 1e3:>8.3f} "
        f"{r['bound']:>7} {r['instances_per_s_bound']:>10.3g} {r['mfu_bound']:>6.2f} "
        f"{r['compile_s']:>6.1f}")
  return "\n".join(lines)


def report_path(workdir: str, target: str) -> str:
  """<workdir>/compile/<target, with ':' as '_'>.json."""
  return os.path.join(workdir, "compile", re.sub(r"[^\w.-]", "_", target) + ".json")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Compiles the config's stages for config.compile.target; prints and
  writes the report; ConfigError (nothing written) if a step does not fit."""
  target = targets_lib.parse(config.compile.target)
  validation.validate_devices(config, target.num_devices)
  devices = target.devices()
  mesh = sharding.make_mesh(tuple(config.mesh_shape),
                            tuple(config.mesh_axes),
                            devices=devices)
  orders.check_shards(config, [stages.get(n).order for n in stage_configs(config)],
                      mesh.shape["data"], target.num_devices)
  schema = sources.schema(config, workdir)
  compiled = compile_all(config, schema, mesh, target.compiler_options)
  result = {
      "target":
          target.text,
      "chips":
          target.num_devices,
      "mesh":
          dict(mesh.shape),
      "chip_memory_bytes":
          target.chip.memory_bytes,
      "chip_bf16_flops":
          target.chip.bf16_flops,
      "chip_memory_bytes_per_s":
          target.chip.memory_bytes_per_s,
      "jax":
          jax.__version__,
      "steps": [
          report(c, target, config, schema, mesh.shape["data"]) for c in compiled
      ],
  }
  check_fit(config, result["steps"])
  print(table(result))
  path = report_path(workdir, target.text)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  workdir_lib.write_json(path, result)
  return result

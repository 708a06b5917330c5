"""Feature schema of a preprocessed instance dataset.

The schema is the contract between a data source (MovieLens, the synthetic
generator), the on-disk dataset (`iat_jax.data.dataset`), the Grain pipelines
and the models. It is stored as `schema.json` next to the columns.

Id conventions used by every column and every model:
  * categorical, multi-hot and behaviour-sequence ids are int32 in
    `[0, vocab_size)`; id 0 means "missing / padding" and is never a real value.
  * the behaviour sequence triple (item, category, action) of a past instance
    shares its vocabulary with the categorical fields named in
    `Schema.seq_item_field` and `Schema.seq_category_field`; actions have their
    own vocabulary of `Schema.num_actions` ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SPLITS = ("train", "valid", "test")
# Semantic feature groups, in token order: every field belongs to one of them
# (`Schema.field_groups`); RankMixer gives each group its own tokens.
GROUPS = ("user", "item", "context")


@dataclasses.dataclass(frozen=True)
class Categorical:
  """One categorical field, hashed into `vocab_size` ids (0 = missing)."""
  name: str
  vocab_size: int


@dataclasses.dataclass(frozen=True)
class MultiHot:
  """A multi-hot field: up to `max_len` ids per row, 0-padded."""
  name: str
  vocab_size: int
  max_len: int


@dataclasses.dataclass(frozen=True)
class Schema:
  """What one row of a dataset holds, and how big the dataset is.

  Fields filled by a data source: everything up to `sources`. Fields filled by
  the dataset writer: `num_rows` and below.
  """
  # Name of the data source, e.g. "movielens-100k" or "synthetic".
  dataset: str
  categorical: tuple[Categorical, ...]
  multi_hot: tuple[MultiHot, ...]
  # Names of the dense (float32) fields.
  dense: tuple[str, ...]
  # Names of the binary tasks, in `labels` column order; the first is the main
  # task (used for best-checkpoint selection).
  tasks: tuple[str, ...]
  # Length S of the hand-crafted behaviour sequence.
  seq_len: int
  # Categorical fields whose vocabularies the sequence item / category ids use.
  seq_item_field: str
  seq_category_field: str
  # Vocabulary size of the sequence action ids (0 = padding).
  num_actions: int
  # Field name (categorical, multi-hot or dense) -> its group in GROUPS.
  field_groups: dict[str, str]
  # Seconds from an instance's time until each task's label is known, in
  # `tasks` order; () = every label known at once (see `history.label_known`).
  label_delay: tuple[int, ...] = ()
  # Source file name -> sha256 (or generator settings for synthetic data).
  sources: dict[str, str] = dataclasses.field(default_factory=dict)
  # Filled by the writer.
  num_rows: int = 0
  num_users: int = 0
  # Instances per split, in SPLITS order; splits are contiguous in time order.
  split_sizes: tuple[int, int, int] = (0, 0, 0)
  # First (ts, ins_id) of the valid and of the test split (inclusive bounds).
  split_boundaries: tuple[tuple[int, int], ...] = ()
  # Hash of the inputs; a rebuild with the same fingerprint is a no-op.
  fingerprint: str = ""

  def __post_init__(self):
    names = self.field_names()
    dup = sorted({n for n in names if names.count(n) > 1})
    missing = [n for n in names if n not in self.field_groups]
    unknown = sorted(set(self.field_groups) - set(names))
    bad = {n: g for n, g in self.field_groups.items() if g not in GROUPS}
    if dup or missing or unknown or bad:
      raise ValueError(f"schema {self.dataset}: field_groups must give each field "
                       f"(uniquely named) one group of {GROUPS}; duplicate names: "
                       f"{dup}, fields without a group: {missing}, unknown fields: "
                       f"{unknown}, unknown groups: {bad}")
    delays = self.label_delay
    if delays and (len(delays) != self.num_tasks or min(delays) < 0):
      raise ValueError(f"schema {self.dataset}: label_delay {delays} must hold one "
                       f"delay >= 0 per task of {self.tasks}")

  def field_names(self) -> tuple[str, ...]:
    """Names of the feature tokens in order: categorical, multi-hot, dense."""
    return (tuple(f.name for f in self.categorical) +
            tuple(f.name for f in self.multi_hot) + self.dense)

  def group_fields(self) -> dict[str, tuple[int, ...]]:
    """Group -> positions of its fields in `field_names()`; GROUPS order, empty
    groups left out."""
    names = self.field_names()
    out = {
        g: tuple(i for i, n in enumerate(names) if self.field_groups[n] == g)
        for g in GROUPS
    }
    return {g: idx for g, idx in out.items() if idx}

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)

  @property
  def label_delays(self) -> tuple[int, ...]:
    """Per-task label delay in seconds: `label_delay`, or zeros if empty."""
    return self.label_delay or (0,) * self.num_tasks

  @property
  def action_delay(self) -> int:
    """When a row's behaviour action is known (seconds after its time).

    Every source derives the action from the row's labels, so it is known once
    all of them are. While it is not, the behaviour sequence shows the row's
    `action_now` column instead (required only when this is positive).
    """
    return max(self.label_delays)

  def categorical_index(self, name: str) -> int:
    """Column of field `name` in the `cat` array."""
    for i, f in enumerate(self.categorical):
      if f.name == name:
        return i
    raise KeyError(f"no categorical field {name!r} in schema {self.dataset}")

  def vocab_size(self, name: str) -> int:
    return self.categorical[self.categorical_index(name)].vocab_size

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> Schema:
    d = dict(d)
    d["categorical"] = tuple(Categorical(**f) for f in d["categorical"])
    d["multi_hot"] = tuple(MultiHot(**f) for f in d["multi_hot"])
    d["dense"] = tuple(d["dense"])
    d["tasks"] = tuple(d["tasks"])
    d["label_delay"] = tuple(d.get("label_delay", ()))
    d["split_sizes"] = tuple(d["split_sizes"])
    d["split_boundaries"] = tuple(tuple(b) for b in d["split_boundaries"])
    return cls(**d)

  def save(self, path: str) -> None:
    with open(path, "w") as f:
      json.dump(self.to_json(), f, indent=1, sort_keys=True)

  @classmethod
  def load(cls, path: str) -> Schema:
    with open(path) as f:
      return cls.from_json(json.load(f))


def schema_path(dataset_dir: str) -> str:
  return os.path.join(dataset_dir, "schema.json")

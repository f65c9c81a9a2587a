"""A 2-level coarse→fine tag tree, kept as data (SPEC §5).

Each fine tag has exactly one coarse parent. A hierarchy file maps every coarse tag to the list of its fine tags:

  {"strings": ["violin", "cello"], "keyboards": ["piano", "harpsichord"]}

as JSON (`.json`) or YAML (`.yaml`, `.yml`). When the dataset's fine tag order is given, the hierarchy follows it, so
that column i of the fine targets and fine tag i of the hierarchy are the same tag.

A hierarchy file may also name only some of a dataset's tags: `LabelSelection` says which label columns such a run
reads, and makes its coarse targets, OR'ing in a coarse tag that the dataset annotates itself (MTAT's `strings`).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import yaml

from flaxtag.errors import HierarchyError


@dataclasses.dataclass(frozen=True, eq=False)
class Hierarchy:
  """Coarse tags, fine tags, and the parent (coarse index) of every fine tag.

  Hashable and compared by value, so it can be a static argument of `jax.jit`.
  """
  coarse_tags: tuple[str, ...]
  fine_tags: tuple[str, ...]
  parent: np.ndarray  # (num_fine,) int32, index into coarse_tags.

  def __post_init__(self):
    object.__setattr__(self, "coarse_tags", tuple(self.coarse_tags))
    object.__setattr__(self, "fine_tags", tuple(self.fine_tags))
    parent = np.array(self.parent, dtype=np.int32).reshape(-1)
    if parent.shape != (len(self.fine_tags),):
      raise HierarchyError(f"parent has {parent.size} entries for {len(self.fine_tags)} fine tags")
    if parent.size and (parent.min() < 0 or parent.max() >= len(self.coarse_tags)):
      raise HierarchyError(f"parent indices must lie in [0, {len(self.coarse_tags)}), got {parent.tolist()}")
    parent.setflags(write=False)
    object.__setattr__(self, "parent", parent)

  def __eq__(self, other):
    if not isinstance(other, Hierarchy):
      return NotImplemented
    return (self.coarse_tags, self.fine_tags, tuple(self.parent.tolist())) == (
        other.coarse_tags, other.fine_tags, tuple(other.parent.tolist()))

  def __hash__(self):
    return hash((self.coarse_tags, self.fine_tags, tuple(self.parent.tolist())))

  @property
  def num_coarse(self) -> int:
    return len(self.coarse_tags)

  @property
  def num_fine(self) -> int:
    return len(self.fine_tags)

  @functools.cached_property
  def mask(self) -> np.ndarray:
    """(num_coarse, num_fine) float32 membership matrix M: M[j, i] = 1 iff fine tag i is a child of coarse tag j."""
    m = np.zeros((self.num_coarse, self.num_fine), np.float32)
    m[self.parent, np.arange(self.num_fine)] = 1.0
    m.setflags(write=False)
    return m

  def children(self, coarse_name: str) -> tuple[str, ...]:
    """Fine tags under `coarse_name`, in fine tag order."""
    if coarse_name not in self.coarse_tags:
      raise HierarchyError(f"unknown coarse tag {coarse_name!r}; coarse tags are {list(self.coarse_tags)}")
    j = self.coarse_tags.index(coarse_name)
    return tuple(t for t, p in zip(self.fine_tags, self.parent) if p == j)

  def coarse_targets(self, fine_targets, direct_coarse=None) -> np.ndarray:
    """Coarse targets (..., num_coarse) from fine targets (..., num_fine).

    A coarse tag is present iff any of its children is (the max over children, so soft targets keep their max),
    OR'ed (max) with `direct_coarse`, the coarse tags the data annotates directly, when given.
    """
    fine = np.asarray(fine_targets)
    if fine.shape[-1:] != (self.num_fine,):
      raise ValueError(f"fine targets have shape {fine.shape}, expected (..., {self.num_fine})")
    # A masked max over the trailing axis; every group has at least one child, so no -inf survives.
    member = self.mask.astype(bool)
    filled = np.where(member, fine[..., None, :].astype(np.float32), -np.inf)
    coarse = filled.max(axis=-1)
    if direct_coarse is not None:
      direct = np.asarray(direct_coarse, np.float32)
      if direct.shape != coarse.shape:
        raise ValueError(f"direct coarse targets have shape {direct.shape}, expected {coarse.shape}")
      coarse = np.maximum(coarse, direct)
    return coarse.astype(fine.dtype)

  @classmethod
  def from_mapping(cls, mapping, fine_tags: Sequence[str] | None = None, source: str = "hierarchy") -> Hierarchy:
    """Builds a hierarchy from `{coarse: [fine, ...]}`.

    Args:
      mapping: coarse tag name → list of its fine tag names.
      fine_tags: the dataset's fine tags in column order; when given, every one must have a parent, every fine tag
        of the mapping must be one of them, and the hierarchy's fine order follows them. When None, the fine order
        is the order of first appearance in the mapping.
      source: where the mapping comes from (a file path), named in error messages.
    """
    if not isinstance(mapping, Mapping) or not mapping:
      raise HierarchyError(
          f"{source}: expected a non-empty mapping of coarse tag → list of fine tags, e.g. "
          f'{{"strings": ["violin", "cello"]}}; got {type(mapping).__name__}')
    parent_of = {}
    for coarse, children in mapping.items():
      if not isinstance(coarse, str):
        raise HierarchyError(f"{source}: coarse tag {coarse!r} is not a string (quote it in YAML)")
      if isinstance(children, str) or not isinstance(children, Sequence):
        raise HierarchyError(f"{source}: coarse tag {coarse!r} must map to a list of fine tags, got {children!r}")
      if not children:
        raise HierarchyError(f"{source}: coarse tag {coarse!r} has no fine tags (empty group)")
      for fine in children:
        if not isinstance(fine, str):
          raise HierarchyError(f"{source}: fine tag {fine!r} under {coarse!r} is not a string (quote it in YAML)")
        if fine in parent_of:
          where = "twice" if parent_of[fine] == coarse else f"under both {parent_of[fine]!r} and {coarse!r}"
          raise HierarchyError(f"{source}: fine tag {fine!r} is listed {where}; each fine tag needs exactly one parent")
        parent_of[fine] = coarse

    if fine_tags is None:
      fine_order = tuple(parent_of)
    else:
      fine_order = tuple(fine_tags)
      if len(set(fine_order)) != len(fine_order):
        dupes = sorted({t for t in fine_order if fine_order.count(t) > 1})
        raise HierarchyError(f"{source}: the dataset's fine tags repeat {dupes}")
      known = set(fine_order)
      unknown = [t for t in parent_of if t not in known]
      if unknown:
        raise HierarchyError(
            f"{source}: fine tag {unknown[0]!r} is not a tag of the dataset"
            + (f" (nor are {unknown[1:]})" if len(unknown) > 1 else ""))
      orphans = [t for t in fine_order if t not in parent_of]
      if orphans:
        raise HierarchyError(
            f"{source}: the dataset's fine tag {orphans[0]!r} has no coarse parent; add it to one group"
            + (f" (so do {orphans[1:]})" if len(orphans) > 1 else ""))

    coarse_order = tuple(mapping)
    index = {c: j for j, c in enumerate(coarse_order)}
    return cls(coarse_order, fine_order, np.array([index[parent_of[t]] for t in fine_order], np.int32))

  @classmethod
  def from_json(cls, text: str, fine_tags: Sequence[str] | None = None, source: str = "hierarchy") -> Hierarchy:
    """Inverse of `to_json` (pass the same `fine_tags` to restore a fine order that is not group by group)."""
    try:
      mapping = json.loads(text)
    except json.JSONDecodeError as e:
      raise HierarchyError(f"{source}: malformed JSON: {e}") from None
    return cls.from_mapping(mapping, fine_tags=fine_tags, source=source)

  def to_mapping(self) -> dict[str, list[str]]:
    """`{coarse: [fine, ...]}` in coarse order, children in fine order: the hierarchy file format."""
    return {c: list(self.children(c)) for c in self.coarse_tags}

  def to_json(self) -> str:
    """The mapping as JSON, a valid hierarchy file (e.g. to save beside a checkpoint)."""
    return json.dumps(self.to_mapping(), indent=2, ensure_ascii=False)


@dataclasses.dataclass(frozen=True, eq=False)
class LabelSelection:
  """The dataset label columns a run trains and evaluates on, and how its coarse targets are made (SPEC §5).

  The run's fine tags are some (or all) of the dataset's tags, in the run's order; every other tag of the dataset
  is ignored. A coarse tag that is also a dataset tag is annotated directly: its target is the OR (max) of that
  column and its children. Pure data, applied to each batch of labels by the input pipeline, in training and
  evaluation alike.
  """
  tag_names: tuple[str, ...]
  columns: np.ndarray  # (num_fine,) int32: the dataset column of each fine tag
  hierarchy: Hierarchy | None  # over tag_names
  direct_coarse: np.ndarray  # (num_coarse,) int32: the dataset column annotating each coarse tag; -1 where none

  @classmethod
  def create(cls, dataset_tags: Sequence[str], tag_names: Sequence[str], hierarchy: Hierarchy | None = None,
             source: str = "hierarchy", dataset: str = "the dataset") -> LabelSelection:
    """The selection of `tag_names` (the hierarchy's fine tags, when it has one) among `dataset_tags`.

    Raises:
      HierarchyError: a tag that is not a dataset tag, named with the closest dataset tags; `source` (a file) and
        `dataset` (its name) say where.
    """
    dataset_tags, tag_names = tuple(dataset_tags), tuple(tag_names)
    if hierarchy is not None and hierarchy.fine_tags != tag_names:
      raise ValueError(f"the hierarchy's fine tags {hierarchy.fine_tags} are not the tags {tag_names}")
    column = {t: j for j, t in enumerate(dataset_tags)}
    unknown = [t for t in tag_names if t not in column]
    if unknown:
      close = difflib.get_close_matches(unknown[0], dataset_tags, n=3)
      raise HierarchyError(
          f"{source}: {unknown[0]!r} is not a tag of {dataset}"
          + (f" (nor are {unknown[1:]})" if len(unknown) > 1 else "")
          + (f"; closest: {', '.join(map(repr, close))}" if close else ""))
    direct = [column.get(c, -1) for c in hierarchy.coarse_tags] if hierarchy else []
    return cls(tag_names, np.array([column[t] for t in tag_names], np.int32), hierarchy, np.array(direct, np.int32))

  def apply(self, labels: np.ndarray) -> dict[str, np.ndarray]:
    """`{'labels': (..., num_fine)[, 'coarse_labels': (..., num_coarse)]}` from the dataset's labels (..., T)."""
    fine = labels[..., self.columns]
    if self.hierarchy is None:
      return {"labels": fine}
    direct = np.where(self.direct_coarse >= 0, labels[..., np.maximum(self.direct_coarse, 0)], 0)
    return {"labels": fine, "coarse_labels": self.hierarchy.coarse_targets(fine, direct)}


def load_hierarchy(path: str | os.PathLike, fine_tags: Sequence[str] | None = None) -> Hierarchy:
  """Reads a `{coarse: [fine, ...]}` hierarchy file, JSON or YAML by extension. See `Hierarchy.from_mapping`."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".json", ".yaml", ".yml"):
    raise HierarchyError(f"{path}: unknown hierarchy file type {ext!r}; use .json, .yaml or .yml")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise HierarchyError(f"{path}: cannot read hierarchy file ({e.strerror or e})") from None
  if ext == ".json":
    return Hierarchy.from_json(text, fine_tags=fine_tags, source=path)
  try:
    mapping = yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise HierarchyError(f"{path}: malformed YAML: {e}") from None
  return Hierarchy.from_mapping(mapping, fine_tags=fine_tags, source=path)

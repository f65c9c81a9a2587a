"""Your own data as a tfds builder: a folder of audio files and a CSV/TSV file of their tags.

The labels file has a `path` column (the audio file, relative to the manual dir) and the tags, either in one `tags`
column (names separated by `tag_separator`, default ';') or as one 0/1 column per tag. A `split` column (train, valid
or validation, test) sets the splits; without one, a seeded random split by fraction, which keeps every `group` (or
else `artist`) in one split. Audio is anything `flaxtag.audio.load_audio` reads (wav, flac, ogg, mp3, ...), stored as
16 kHz mono int16. Several such datasets live side by side as configs: `folder/<name>` (plain `folder` is
`folder/default`).
"""
import collections
import csv
import io
import os
import re
from typing import NamedTuple, Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_prep import common
from flaxtag.errors import ConfigError, DatasetError

PATH, TAGS, SPLIT, GROUP, ARTIST = "path", "tags", "split", "group", "artist"
RESERVED = (PATH, TAGS, SPLIT, GROUP, ARTIST)  # any other column is a 0/1 tag column
LABELS_FILES = ("labels.csv", "labels.tsv")
SPLIT_VALUES = {"train": "train", "valid": "valid", "validation": "valid", "test": "test"}
DEFAULT_SEPARATOR = ";"
DEFAULT_FRACTION = 0.1
CONFIG_NAME = re.compile(r"[a-z0-9][a-z0-9_]*\Z")
HOW_TO = ("Put a labels.csv (or labels.tsv, or pass --labels FILE) with a 'path' column and either a 'tags' column or "
          "one 0/1 column per tag beside your audio files. See data_prep/folder/README.md.")


class Row(NamedTuple):
  line: int  # in the labels file, for messages
  path: str  # relative to the manual dir, as written
  tags: frozenset[str]
  split: Optional[str]  # from a split column: train, valid, test
  group: Optional[str]  # from a group (or artist) column; None when absent or empty


class Labels(NamedTuple):
  """What a labels file says: the tag names in label order, the rows, and how it was read."""
  tags: list[str]
  rows: list[Row]
  tag_source: str  # e.g. "0/1 columns", "'tags' column, separated by ';'"
  group_column: Optional[str]
  has_split_column: bool


def delimiter(path: epath.PathLike, header_line: str) -> str:
  """Tab for .tsv/.tab files; otherwise whichever of ',', ';', tab the header line holds most (',' on a tie)."""
  if os.fspath(path).lower().endswith((".tsv", ".tab")):
    return "\t"
  return max((",", ";", "\t"), key=header_line.count)


def read_labels(path: epath.PathLike, tag_separator: str = DEFAULT_SEPARATOR) -> Labels:
  """Reads a labels file; raises DatasetError naming the line and column of the first thing wrong."""
  # Decoded here: epath's read_text ignores its encoding. utf-8-sig: a spreadsheet's BOM is no part of the first name.
  text = epath.Path(path).read_bytes().decode("utf-8-sig")
  reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter(path, text.split("\n", 1)[0]))
  header = [h.strip() for h in next(reader, [])]
  names = [h.lower() for h in header]
  if PATH not in names:
    raise DatasetError(f"{path}: no '{PATH}' column in the header {header}; the first column must be '{PATH}', the "
                       "audio file relative to the manual dir")
  repeated = sorted({h for h in names if names.count(h) > 1})
  if repeated:
    raise DatasetError(f"{path}: the header names the column(s) {', '.join(repeated)} more than once")
  column = {name: j for j, name in enumerate(names) if name in RESERVED}
  tag_columns = [j for j, name in enumerate(names) if name not in RESERVED]
  if (TAGS in column) == bool(tag_columns):
    raise DatasetError(f"{path}: give the tags either in one '{TAGS}' column or as 0/1 columns (one per tag), not "
                       f"{'both' if tag_columns else 'neither'}; the header is {header}")
  group_column = GROUP if GROUP in column else ARTIST if ARTIST in column else None
  rows, line_of = [], {}
  for row in reader:
    line = reader.line_num
    if not any(field.strip() for field in row):
      continue
    if len(row) != len(header):
      raise DatasetError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
    audio_path = row[column[PATH]].strip()
    if not audio_path:
      raise DatasetError(f"{path}:{line}: the '{PATH}' column is empty")
    if audio_path in line_of:
      raise DatasetError(f"{path}:{line}: {audio_path!r} is listed again (first on line {line_of[audio_path]})")
    line_of[audio_path] = line
    split = None
    if SPLIT in column:
      value = row[column[SPLIT]].strip()
      split = SPLIT_VALUES.get(value.lower())
      if split is None:
        raise DatasetError(f"{path}:{line}: column '{header[column[SPLIT]]}' holds {value!r}; a split is one of "
                           f"{', '.join(SPLIT_VALUES)}")
    if TAGS in column:
      tags = frozenset(t.strip() for t in row[column[TAGS]].split(tag_separator) if t.strip())
    else:
      tags = set()
      for j in tag_columns:
        value = row[j].strip()
        if value not in ("0", "1"):
          raise DatasetError(f"{path}:{line}: tag column {header[j]!r} holds {value!r}; tag columns hold 0 or 1")
        if value == "1":
          tags.add(header[j])
      tags = frozenset(tags)
    group = row[column[group_column]].strip() if group_column else ""
    rows.append(Row(line, audio_path, tags, split, group or None))
  if not rows:
    raise DatasetError(f"{path}: no rows under the header")
  if TAGS in column:
    return Labels(sorted(set().union(*(r.tags for r in rows))), rows,
                  f"'{TAGS}' column, separated by {tag_separator!r}", group_column, SPLIT in column)
  return Labels([header[j] for j in tag_columns], rows, "0/1 columns", group_column, SPLIT in column)


def random_split(rows: list[Row], valid_fraction: float, test_fraction: float, seed: int) -> list[str]:
  """The split of each row: groups (a row without one is its own) in a seeded random order fill test, then valid, up
  to their share of the rows (at least one group each when the share is above 0); the rest is train.

  Depends only on the set of rows and the seed, not on their order in the file.
  """
  size = collections.Counter((r.group is not None, r.group or r.path) for r in rows)
  keys = sorted(size)
  targets = [(split, max(1, round(fraction * len(rows))) if fraction > 0 else 0)
             for split, fraction in (("test", test_fraction), ("valid", valid_fraction))]
  filled = {split: 0 for split, _ in targets}
  split_of = {}
  for k in np.random.default_rng(seed).permutation(len(keys)):
    key = keys[k]
    split_of[key] = next((split for split, target in targets if filled[split] < target), "train")
    if split_of[key] != "train":
      filled[split_of[key]] += size[key]
  return [split_of[(r.group is not None, r.group or r.path)] for r in rows]


class Folder(common.Builder):
  """Audio files of any common format with the tags of a CSV/TSV file (16 kHz mono int16)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First flaxtag release."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default", description="A folder dataset named by no config.")]
  DEFAULT_BUILDER_CONFIG_NAME = "default"
  MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO
  BUILD_ARGS = ("labels", "tag_separator", "valid_fraction", "test_fraction", "split_seed", "max_seconds")
  _named_configs = {}  # any name the user gives (folder/<name>): one config object per name

  @classmethod
  def get_builder_config(cls, name, version=None):
    """The config `name`: every valid name is one, so that several folder datasets can share a data dir."""
    del version  # one version for every name
    if name == cls.DEFAULT_BUILDER_CONFIG_NAME:
      return cls.BUILDER_CONFIGS[0]
    if not CONFIG_NAME.match(name):
      raise ConfigError(f"folder/{name}: a dataset name is lowercase letters, digits and '_' (it names a directory)")
    return cls._named_configs.setdefault(name, tfds.core.BuilderConfig(name=name, description="A folder dataset."))

  def __init__(self, *, labels: Optional[str] = None, tag_separator: Optional[str] = None,
               valid_fraction: Optional[float] = None, test_fraction: Optional[float] = None,
               split_seed: Optional[int] = None, max_seconds: Optional[float] = None, **kwargs):
    common.check_max_seconds(max_seconds, "folder")
    if tag_separator == "":
      raise DatasetError("folder: --tag_separator must not be empty")
    self._labels_option = labels
    self._separator = tag_separator or DEFAULT_SEPARATOR
    self._random_options = {"valid_fraction": valid_fraction, "test_fraction": test_fraction, "split_seed": split_seed}
    self._max_seconds = max_seconds
    self._labels = None
    super().__init__(**kwargs)

  def labels_path(self) -> epath.Path:
    """--labels, or the one labels.csv / labels.tsv of the manual dir."""
    if self._labels_option:
      path = epath.Path(self._labels_option)
      if not path.is_file():
        raise DatasetError(f"folder: the labels file {path} does not exist.\n{HOW_TO}")
      return path
    root = self._root(self.manual_dir)
    found = [root / name for name in LABELS_FILES if (root / name).is_file()]
    if len(found) != 1:
      raise DatasetError(f"folder: expected one labels file in {root}, found {len(found)} of "
                         f"{', '.join(LABELS_FILES)}; name it with --labels FILE.\n{HOW_TO}")
    return found[0]

  def _root(self, manual_dir: Optional[epath.Path]) -> epath.Path:
    if manual_dir is None or not epath.Path(manual_dir).is_dir():
      raise DatasetError(f"folder needs --manual_dir, the folder that holds your audio files (paths in the labels "
                         f"file are relative to it); got {manual_dir}.\n{HOW_TO}")
    return epath.Path(manual_dir)

  def labels(self) -> Labels:
    if self._labels is None:
      self._labels = read_labels(self.labels_path(), self._separator)
    return self._labels

  def _info(self) -> tfds.core.DatasetInfo:
    return common.tagging_info(self, self.labels().tags,
                               "Audio files of a folder, 16 kHz mono, multi-hot tags from a CSV/TSV file.",
                               "the file's path relative to the manual dir, as the labels file writes it")

  def _split_rule(self) -> dict:
    """How rows get their split, the random split's options with their defaults filled in."""
    given = sorted(k for k, v in self._random_options.items() if v is not None)
    if self.labels().has_split_column:
      if given:
        raise DatasetError(f"folder: {', '.join('--' + k for k in given)} apply only to a labels file without a "
                           f"'{SPLIT}' column, and {self.labels_path()} has one")
      return {"split_rule": f"the '{SPLIT}' column"}
    valid = self._random_options["valid_fraction"]
    test = self._random_options["test_fraction"]
    valid = DEFAULT_FRACTION if valid is None else valid
    test = DEFAULT_FRACTION if test is None else test
    if not (0 <= valid < 1 and 0 <= test < 1 and valid + test < 1):
      raise DatasetError(f"folder: --valid_fraction ({valid}) and --test_fraction ({test}) must each lie in [0, 1) "
                         "and leave some rows for train")
    seed = self._random_options["split_seed"] or 0
    return {"split_rule": "random by fraction", "valid_fraction": valid, "test_fraction": test, "split_seed": seed,
            "group_column": self.labels().group_column}

  def build_options(self):
    return {"labels_sha256": common.file_sha256(self.labels_path()), "tag_separator": self._separator,
            "max_seconds": self._max_seconds, **self._split_rule()}

  def _split_items(self, manual_dir: Optional[epath.Path]):
    root = self._root(manual_dir)
    labels = self.labels()
    rule = self._split_rule()
    if labels.has_split_column:
      splits = [r.split for r in labels.rows]
    else:
      splits = random_split(labels.rows, rule["valid_fraction"], rule["test_fraction"], rule["split_seed"])
    column = {t: j for j, t in enumerate(labels.tags)}
    items = {split: [] for split in ("train", "valid", "test") if split in splits}
    missing = []
    for row, split in zip(labels.rows, splits):
      try:
        path = common.resolve_path_inside(root, row.path)
      except common.PathOutsideRootError as e:
        self.record_skipped(row.path, split, str(e))
        continue
      if not os.path.isfile(path):
        missing.append(row.path)
        self.record_skipped(row.path, split, common.MISSING)
        continue
      vector = np.zeros(len(column), common.LABEL_DTYPE)
      vector[[column[t] for t in row.tags]] = 1
      items[split].append(common.Item(row.path, path, (vector, row.path, self._max_seconds)))
    common.check_missing_audio(missing, len(labels.rows), "folder",
                               f"every '{PATH}' of {self.labels_path()} relative to {root}")
    labels_path = self.labels_path()
    self.info.metadata["provenance"] = {
        "dataset": f"folder/{self.builder_config.name}",
        "labels_file": labels_path.name,
        "tag_source": labels.tag_source,
        "tag_order": "sorted by name" if labels.tag_source.startswith(f"'{TAGS}'") else "column order",
        **self.build_options(),
    }
    return {split: (split_items, common.example_from_file) for split, split_items in items.items()}

"""MTG-Jamendo auto-tagging subsets (Bogdanov et al. 2019) as a tfds builder.

Configs `instrument` (default), `genre`, `moodtheme`, `top50tags`, `all`; build option `split` picks one of the
dataset's five official splits. Tags come from the dataset's own TSV files: for the single-category configs the bare
tag (`guitar` of `instrument---guitar`), for `top50tags` and `all` the full `category---tag` (categories share some
names); sorted by name. Tracks are whole songs, stored whole unless `max_seconds` asks for a centred excerpt.
"""
import csv
import dataclasses
import hashlib
import io
import os
from typing import NamedTuple, Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_prep import common
from flaxtag.errors import DatasetError

DATA_DIR, AUDIO_DIR = "data", "audio"
COLUMNS = ("TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION")  # then one column per tag of the track
TAG_SEPARATOR = "---"  # between category and tag: 'instrument---guitar'
NUM_SPLITS = 5
SPLITS = {"train": "train", "validation": "valid", "test": "test"}  # file suffix → split
LOW_QUALITY_SUFFIX = ".low.mp3"  # the low-quality download's name of NN/ID.mp3
HOW_TO_GET = ("Clone https://github.com/MTG/mtg-jamendo-dataset into the manual dir (or copy its data/ folder "
              "there) and download the audio with its scripts/download/download.py into <manual_dir>/audio "
              "(NN/ID.mp3, or NN/ID.low.mp3 for the low-quality set). See data_prep/mtg_jamendo/README.md.")


@dataclasses.dataclass
class JamendoConfig(tfds.core.BuilderConfig):
  stem: str = ""  # metadata files: data/<stem>.tsv and data/splits/split-K/<stem>-<split>.tsv
  category: Optional[str] = None  # tags are all of this category and named without it; None: full names


class Track(NamedTuple):
  track_id: str
  path: str  # relative to the audio root
  tags: tuple[str, ...]  # as written, 'category---tag'


def read_tracks(path: epath.PathLike) -> list[Track]:
  """The tracks of one of the dataset's TSV files (tab-separated, CRLF or LF line ends, a header row)."""
  text = epath.Path(path).read_text(encoding="utf-8")
  rows = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
  header = next(rows, None)
  if header is None or tuple(header[:len(COLUMNS)]) != COLUMNS:
    raise DatasetError(f"{path}: expected a tab-separated header starting {' '.join(COLUMNS)}, got {header}; is "
                       "this a file of the dataset's data/ folder?")
  tracks, seen = [], set()
  for line, row in enumerate(rows, start=2):
    if not row:
      continue
    if len(row) < len(COLUMNS):
      raise DatasetError(f"{path}:{line}: {len(row)} fields, expected at least {len(COLUMNS)} ({' '.join(COLUMNS)})")
    track_id, tags = row[0], tuple(t for t in row[len(COLUMNS):] if t)
    bad = [t for t in tags if TAG_SEPARATOR not in t]
    if bad:
      raise DatasetError(f"{path}:{line}: tag {bad[0]!r} is not written 'category{TAG_SEPARATOR}tag'")
    if track_id in seen:
      raise DatasetError(f"{path}:{line}: track {track_id} is listed twice")
    seen.add(track_id)
    tracks.append(Track(track_id, row[3], tags))
  return tracks


def tag_name(tag: str, category: Optional[str], where: str) -> str:
  """The name flaxtag gives a tag: the bare tag when the config is one category, else the tag as written."""
  if category is None:
    return tag
  tag_category, _, name = tag.partition(TAG_SEPARATOR)
  if tag_category != category:
    raise DatasetError(f"{where}: tag {tag!r} is not of the category {category!r} of this file's subset")
  return name


def sample_order(track_id: str) -> str:
  """Rank of a track in the `max_tracks` sample: the first N by this key, whatever the files' order or the library
  versions, and a larger N only adds tracks."""
  return hashlib.sha256(track_id.encode()).hexdigest()


def find_audio(audio_root: epath.PathLike, path: str) -> Optional[str]:
  """The file of a metadata PATH under the audio root, or its low-quality stand-in; None if neither is there.

  Raises:
    PathOutsideRootError: a candidate resolves outside the audio root.
  """
  candidates = [path]
  if path.endswith(".mp3"):
    candidates.append(path[:-len(".mp3")] + LOW_QUALITY_SUFFIX)
  for candidate in candidates:
    real = common.resolve_path_inside(audio_root, candidate)
    if os.path.isfile(real):
      return real
  return None


class MtgJamendo(common.Builder):
  """MTG-Jamendo whole tracks (16 kHz mono int16) with the tags of one auto-tagging subset."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First flaxtag release."}
  BUILDER_CONFIGS = [
      JamendoConfig(name="instrument", stem="autotagging_instrument", category="instrument",
                    description="41 instrument tags (25,135 tracks), named without 'instrument---'."),
      JamendoConfig(name="genre", stem="autotagging_genre", category="genre",
                    description="Genre tags, named without 'genre---'."),
      JamendoConfig(name="moodtheme", stem="autotagging_moodtheme", category="mood/theme",
                    description="Mood and theme tags, named without 'mood/theme---'."),
      JamendoConfig(name="top50tags", stem="autotagging_top50tags",
                    description="The 50 most frequent tags of all categories, named 'category---tag'."),
      JamendoConfig(name="all", stem="autotagging", description="Every tag of every category, 'category---tag'."),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "instrument"
  MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO_GET
  BUILD_ARGS = ("split", "max_tracks", "max_seconds")

  def __init__(self, *, split: int = 0, max_tracks: Optional[int] = None, max_seconds: Optional[float] = None,
               **kwargs):
    if split not in range(NUM_SPLITS):
      raise DatasetError(f"mtg_jamendo: --split must be one of the official splits 0-{NUM_SPLITS - 1}, got {split}")
    if max_tracks is not None and max_tracks < 1:
      raise DatasetError(f"mtg_jamendo: --max_tracks must be at least 1 (or left out for all), got {max_tracks}")
    common.check_max_seconds(max_seconds, "mtg_jamendo")
    self._split = split
    self._max_tracks = max_tracks
    self._max_seconds = max_seconds
    self._tags = None
    super().__init__(**kwargs)

  def metadata_files(self) -> dict[str, str]:
    """{'tags' or split: path relative to the manual dir} of the files this config and split read."""
    stem = self.builder_config.stem
    files = {"tags": f"{DATA_DIR}/{stem}.tsv"}
    for suffix, split in SPLITS.items():
      files[split] = f"{DATA_DIR}/splits/split-{self._split}/{stem}-{suffix}.tsv"
    return files

  def _root(self, manual_dir: Optional[epath.Path]) -> epath.Path:
    return common.require_manual_files(manual_dir, [*self.metadata_files().values(), AUDIO_DIR],
                                       "mtg_jamendo", HOW_TO_GET)

  def tags(self) -> list[str]:
    """Every tag of the config's subset, sorted by name (read once, from data/<stem>.tsv)."""
    if self._tags is None:
      path = self._root(self.manual_dir) / self.metadata_files()["tags"]
      category = self.builder_config.category
      self._tags = sorted({tag_name(t, category, os.fspath(path)) for track in read_tracks(path)
                           for t in track.tags})
    return self._tags

  def _info(self) -> tfds.core.DatasetInfo:
    return common.tagging_info(
        self, self.tags(), "MTG-Jamendo whole tracks (or centred excerpts), 16 kHz mono, multi-hot tags of one subset.",
        "TRACK_ID, e.g. track_0000382", homepage="https://mtg.github.io/mtg-jamendo-dataset/",
        citation="Bogdanov et al., The MTG-Jamendo dataset for automatic music tagging, ICML 2019 Workshop on "
                 "Machine Learning for Music Discovery.",
    )

  def build_options(self):
    return {"official_split": self._split, "max_tracks": self._max_tracks, "max_seconds": self._max_seconds}

  def _split_items(self, manual_dir: Optional[epath.Path]):
    root = self._root(manual_dir)
    files = self.metadata_files()
    column = {t: j for j, t in enumerate(self.tags())}
    category = self.builder_config.category
    tracks, split_of = {}, {}
    for split in SPLITS.values():
      path = root / files[split]
      tracks[split] = read_tracks(path)
      for track in tracks[split]:
        if track.track_id in split_of:
          raise DatasetError(f"mtg_jamendo: {track.track_id} is in both the {split_of[track.track_id]} and the "
                             f"{split} files of split-{self._split}")
        split_of[track.track_id] = split
        unknown = [t for t in track.tags if tag_name(t, category, os.fspath(path)) not in column]
        if unknown:
          raise DatasetError(f"{path}: {track.track_id} has the tag {unknown[0]!r}, which {files['tags']} does "
                             "not list; are the files of the same release?")
    chosen = None
    if self._max_tracks is not None:
      chosen = set(sorted(split_of, key=sample_order)[:self._max_tracks])
    audio_root = root / AUDIO_DIR
    items, missing, wanted = {}, [], 0
    for split, split_tracks in tracks.items():
      items[split] = []
      for track in split_tracks:
        if chosen is not None and track.track_id not in chosen:
          continue
        wanted += 1
        try:
          path = find_audio(audio_root, track.path)
        except common.PathOutsideRootError as e:
          self.record_skipped(track.path, split, str(e))
          continue
        if path is None:
          missing.append(track.path)
          self.record_skipped(track.path, split, common.MISSING)
          continue
        labels = np.zeros(len(column), common.LABEL_DTYPE)
        labels[[column[tag_name(t, category, "")] for t in track.tags]] = 1
        items[split].append(common.Item(track.track_id, path, (labels, track.track_id, self._max_seconds)))
    common.check_missing_audio(missing, wanted, "mtg_jamendo",
                               f"{audio_root}/NN/ID.mp3 (or NN/ID{LOW_QUALITY_SUFFIX}) for every PATH of the TSVs")
    self.info.metadata["provenance"] = {
        "dataset": "mtg_jamendo",
        "config": self.builder_config.name,
        **self.build_options(),
        "sample_rule": "all tracks" if chosen is None else "the max_tracks with the smallest sha256(TRACK_ID)",
        "tracks_in_split_files": {split: len(split_tracks) for split, split_tracks in tracks.items()},
        "metadata_files": {name: {"path": path, "sha256": common.file_sha256(root / path)}
                           for name, path in files.items()},
        "tag_names": "bare tag, category dropped" if category else "category---tag as written",
        "tag_order": "sorted by name",
    }
    return {split: (split_items, common.example_from_file) for split, split_items in items.items()}

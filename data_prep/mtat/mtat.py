"""MagnaTagATune, top-50 tags (SPEC §6), as a tfds builder.

Configs: `top50_clean` (default; only clips with at least one top-50 tag) and `top50_full`. The top 50 are computed
from annotations_final.csv (the 188 tags ranked by count over all rows, ties in column order) and, on the real file,
checked against the SPEC list. Split by the first character of mp3_path: 0–b train, c valid, d–f test.
"""
import csv
import dataclasses
import io
import os
import zipfile
import zlib
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_prep import common
from flaxtag import audio
from flaxtag.errors import AudioError, DatasetError

TOP50 = (
    "guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast", "piano", "ambient",
    "beat", "violin", "vocal", "synth", "female", "indian", "opera", "male", "singing", "vocals", "no vocals",
    "harpsichord", "loud", "quiet", "flute", "woman", "male vocal", "no vocal", "pop", "soft", "sitar", "solo", "man",
    "classic", "choir", "voice", "new age", "dance", "male voice", "female vocal", "beats", "harp", "cello",
    "no voice", "weird", "country", "metal", "female voice", "choral")
ANNOTATIONS = "annotations_final.csv"
ZIP_PARTS = ("mp3.zip.001", "mp3.zip.002", "mp3.zip.003")
FOLDERS = tuple("0123456789abcdef")
SPLIT_OF_FOLDER = {**{c: "train" for c in "0123456789ab"}, "c": "valid", **{c: "test" for c in "def"}}
# The real annotations file: its top 50 must be SPEC's list.
REAL_ROWS, REAL_TAGS = 25863, 188
HOW_TO_GET = ("Download mp3.zip.001, mp3.zip.002, mp3.zip.003 and annotations_final.csv from "
              "https://mirg.city.ac.uk/codeapps/the-magnatagatune-dataset into the manual dir (the zip parts may "
              "stay as they are, or be extracted to folders 0-f). See data_prep/mtat/README.md.")


@dataclasses.dataclass
class MtatConfig(tfds.core.BuilderConfig):
  clean: bool = True


def read_annotations(path: epath.PathLike) -> tuple[list[str], list[tuple[str, str, np.ndarray]]]:
  """(tag names, [(clip_id, mp3_path, 0/1 uint8 vector)]) from the tab-separated annotations file."""
  text = epath.Path(path).read_text(encoding="utf-8")
  rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))
  if not rows or len(rows[0]) < 3 or rows[0][0] != "clip_id" or rows[0][-1] != "mp3_path":
    raise DatasetError(f"{path}: expected a tab-separated header 'clip_id <tags...> mp3_path', got {rows[:1]}")
  names = rows[0][1:-1]
  clips = []
  for line, row in enumerate(rows[1:], start=2):
    if not row:
      continue
    if len(row) != len(rows[0]):
      raise DatasetError(f"{path}:{line}: {len(row)} fields, the header has {len(rows[0])}")
    try:
      labels = np.array([int(v) for v in row[1:-1]], np.uint8)
    except ValueError:
      raise DatasetError(f"{path}:{line}: tag columns must be 0 or 1") from None
    clips.append((row[0], row[-1], labels))
  return names, clips


def top_tags(names: list[str], labels: np.ndarray, k: int = 50) -> list[int]:
  """Column indices of the k most frequent tags, most frequent first, ties broken by column order."""
  counts = labels.sum(axis=0, dtype=np.int64)
  return sorted(range(len(names)), key=lambda j: (-counts[j], j))[:k]


class ConcatenatedFile(io.RawIOBase):
  """Consecutive files read as one seekable stream (the pieces of a split zip archive)."""

  def __init__(self, paths):
    super().__init__()
    self._paths = [os.fspath(p) for p in paths]
    sizes = [os.path.getsize(p) for p in self._paths]
    self._starts = np.cumsum([0] + sizes)
    self._files = [None] * len(self._paths)
    self._pos = 0

  def readable(self):
    return True

  def seekable(self):
    return True

  def tell(self):
    return self._pos

  def seek(self, offset, whence=io.SEEK_SET):
    base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: int(self._starts[-1])}[whence]
    self._pos = max(0, base + offset)
    return self._pos

  def readinto(self, buffer):
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view) and self._pos < self._starts[-1]:
      part = int(np.searchsorted(self._starts, self._pos, side="right")) - 1
      if self._files[part] is None:
        self._files[part] = open(self._paths[part], "rb")
      f = self._files[part]
      f.seek(self._pos - int(self._starts[part]))
      n = f.readinto(view[done:done + int(self._starts[part + 1]) - self._pos])
      if not n:
        break
      done += n
      self._pos += n
    return done

  def close(self):
    for f in self._files:
      if f is not None:
        f.close()
    super().close()


_ARCHIVES = {}  # parts → open ZipFile, one per process.


def _archive(parts: tuple[str, ...]) -> zipfile.ZipFile:
  if parts not in _ARCHIVES:
    stream = io.BufferedReader(ConcatenatedFile(parts), buffer_size=1 << 20)
    _ARCHIVES[parts] = zipfile.ZipFile(stream)
  return _ARCHIVES[parts]


def _member_index(archive: zipfile.ZipFile, name: str) -> tuple[dict[str, str], dict[str, str]]:
  """({'<folder>/<file>.mp3': member name}, {refused member: reason}), whatever prefix the archive puts before the
  folders (see common.index_archive_members)."""
  return common.index_archive_members(archive.namelist(), name, key=lambda path: "/".join(path.split("/")[-2:]))


def _example_from_zip(item: common.Item) -> dict:
  parts, member, labels, clip_id = item.payload
  try:
    data = _archive(parts).read(member)
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
    raise AudioError(f"cannot read {item.source} from the zip archive: {e}") from e
  return common.to_example(audio.decode_audio_bytes(data, name=item.source), labels, clip_id)


class Mtat(common.Builder):
  """MagnaTagATune clips (16 kHz mono int16) with their top-50 tags."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First flaxtag release."}
  BUILDER_CONFIGS = [
      MtatConfig(name="top50_clean", clean=True,
                 description="Clips with at least one top-50 tag (15,247 / 1,529 / 4,332 on the real data)."),
      MtatConfig(name="top50_full", clean=False, description="All clips (18,706 / 1,825 / 5,329 on the real data)."),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "top50_clean"
  MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO_GET

  def __init__(self, **kwargs):
    self._tags = list(TOP50)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return common.tagging_info(
        self, self._tags, "MagnaTagATune 29 s clips, 16 kHz mono, multi-hot top-50 tags.",
        "clip_id of annotations_final.csv", homepage="https://mirg.city.ac.uk/codeapps/the-magnatagatune-dataset",
        citation="Law et al., Evaluation of algorithms using games: the case of music tagging, ISMIR 2009.",
    )

  def _split_items(self, manual_dir: Optional[epath.Path]):
    root = common.require_manual_files(manual_dir, [ANNOTATIONS], "mtat", HOW_TO_GET)
    names, clips = read_annotations(root / ANNOTATIONS)
    order = top_tags(names, np.stack([c[2] for c in clips]) if clips else np.zeros((0, len(names))))
    tags = [names[j] for j in order]
    if len(clips) == REAL_ROWS and len(names) == REAL_TAGS and tuple(tags) != TOP50:
      raise DatasetError(f"{root / ANNOTATIONS} looks like the real file ({REAL_ROWS} rows) but its 50 most "
                         f"frequent tags are not SPEC's list: got {tags}")
    self._tags = tags
    self.info.metadata["tags"] = tags
    if self.builder_config.clean:
      clips = [c for c in clips if c[2][order].any()]
    locate, make_example, layout = self._audio_source(root)
    items = {split: [] for split in ("train", "valid", "test")}
    missing = []
    for clip_id, mp3_path, labels in clips:
      split = SPLIT_OF_FOLDER.get(mp3_path[:1])
      if split is None:
        raise DatasetError(f"{root / ANNOTATIONS}: clip {clip_id} has mp3_path {mp3_path!r}, not in folders 0-f")
      try:
        common.resolve_path_inside(root, mp3_path)  # in either layout, the path names a file of the manual dir
      except common.PathOutsideRootError as e:
        self.record_skipped(mp3_path, split, str(e))
        continue
      item = locate(mp3_path, labels[order], clip_id)
      if item is None:
        missing.append(mp3_path)
        self.record_skipped(mp3_path, split, common.MISSING)
        continue
      items[split].append(item)
    common.check_missing_audio(missing, len(clips), "mtat", layout)
    return {split: (split_items, make_example) for split, split_items in items.items()}

  def _audio_source(self, root: epath.Path):
    """(locate(mp3_path, labels, clip_id) -> Item or None if absent, make_example, layout description)."""
    if all((root / d).is_dir() for d in FOLDERS):
      def locate(mp3_path, labels, clip_id):
        path = root / mp3_path
        return common.Item(clip_id, os.fspath(path), (labels, clip_id, None)) if path.exists() else None
      return locate, common.example_from_file, f"{root}/<0-f>/<file>.mp3"
    present = [p for p in ZIP_PARTS if (root / p).exists()]
    if present or (root / "mp3.zip").exists():
      parts = tuple(os.fspath(root / p) for p in ZIP_PARTS) if present else (os.fspath(root / "mp3.zip"),)
      if present:
        common.require_manual_files(root, ZIP_PARTS, "mtat", HOW_TO_GET)
      try:
        members, refused = _member_index(_archive(parts), f"mtat: {', '.join(parts)}")
      except zipfile.BadZipFile as e:
        raise DatasetError(f"mtat: {', '.join(parts)} do not form a zip archive ({e}); re-download them.") from e
      for member, reason in refused.items():
        self.record_skipped(f"mp3.zip:{member}", "none", reason)  # feeds no split

      def locate(mp3_path, labels, clip_id):
        member = members.get(mp3_path)
        source = f"mp3.zip:{member or mp3_path}"
        return common.Item(clip_id, source, (parts, member, labels, clip_id)) if member else None
      return locate, _example_from_zip, "mp3.zip.001-003 holding <0-f>/<file>.mp3"
    folders = [d for d in FOLDERS if not (root / d).is_dir()]
    raise DatasetError(f"mtat: no audio in the manual dir {root}: expected the zip parts {', '.join(ZIP_PARTS)} "
                       f"or the extracted folders 0-f (missing: {', '.join(folders)}).\n{HOW_TO_GET}")

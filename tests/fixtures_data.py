"""Miniature raw datasets, laid out like the real ones, and a one-call build, for tests of data, training and eval.

  make_mtat_tree(root, n_per_folder)   MTAT: annotations_final.csv (188 real tag columns) + MP3s in 0-f or zip parts
  append_mtat_clip(root, id, path)     MTAT: one more annotation row, its mp3_path as given
  make_msd_tree(root, ...)             MSD: Python-2-protocol pickles + 22.05/44.1 kHz stereo MP3 previews
  write_msd_path_maps(root, paths)     MSD: the optional 7digital path maps, each track's path as given
  make_jamendo_tree(root, shared, ids) MTG-Jamendo: the real metadata (data/, linked or rewritten) + audio for `ids`
  make_folder_tree(root, ...)          folder: wav/flac/mp3 files + a labels CSV/TSV in either tag form
  build_dataset(name, manual_dir, data_dir, **flags) -> data_dir

The audio is small (a few seconds at 16 kHz) but tag-dependent (tones keyed to the tags), so that a model can learn
something from it. Each tree contains a few files that a build must skip and list: an empty and a corrupt MP3
(MTAT), a corrupt preview (MSD).
"""
import csv
import dataclasses
import io
import os
import pickle
import zipfile
from typing import Mapping, Optional, Sequence

import numpy as np
import soundfile

# MTAT's 188 tag columns, in the order of annotations_final.csv.
MTAT_TAGS = (
    "no voice", "singer", "duet", "plucking", "hard rock", "world", "bongos", "harpsichord", "female singing",
    "clasical", "sitar", "chorus", "female opera", "male vocal", "vocals", "clarinet", "heavy", "silence", "beats",
    "men", "woodwind", "funky", "no strings", "chimes", "foreign", "no piano", "horns", "classical", "female",
    "no voices", "soft rock", "eerie", "spacey", "jazz", "guitar", "quiet", "no beat", "banjo", "electric", "solo",
    "violins", "folk", "female voice", "wind", "happy", "ambient", "new age", "synth", "funk", "no singing",
    "middle eastern", "trumpet", "percussion", "drum", "airy", "voice", "repetitive", "birds", "space", "strings",
    "bass", "harpsicord", "medieval", "male voice", "girl", "keyboard", "acoustic", "loud", "classic", "string",
    "drums", "electronic", "not classical", "chanting", "no violin", "not rock", "no guitar", "organ", "no vocal",
    "talking", "choral", "weird", "opera", "soprano", "fast", "acoustic guitar", "electric guitar", "male singer",
    "man singing", "classical guitar", "country", "violin", "electro", "reggae", "tribal", "dark", "male opera",
    "no vocals", "irish", "electronica", "horn", "operatic", "arabic", "lol", "low", "instrumental", "trance",
    "chant", "strange", "drone", "synthesizer", "heavy metal", "modern", "disco", "bells", "man", "deep",
    "fast beat", "industrial", "hard", "harp", "no flute", "jungle", "pop", "lute", "female vocal", "oboe",
    "mellow", "orchestral", "viola", "light", "echo", "piano", "celtic", "male vocals", "orchestra", "eastern",
    "old", "flutes", "punk", "spanish", "sad", "sax", "slow", "male", "blues", "vocal", "indian", "no singer",
    "scary", "india", "woman", "woman singing", "rock", "dance", "piano solo", "guitars", "no drums", "jazzy",
    "singing", "cello", "calm", "female vocals", "voices", "different", "techno", "clapping", "house", "monks",
    "flute", "not opera", "not english", "oriental", "beat", "upbeat", "soft", "noise", "choir", "female singer",
    "rap", "metal", "hip hop", "quick", "water", "baroque", "women", "fiddle", "english")
MTAT_SPLIT = {**{c: "train" for c in "0123456789ab"}, "c": "valid", **{c: "test" for c in "def"}}


@dataclasses.dataclass(frozen=True)
class Clip:
  """One row of a miniature tree, and what a build should make of it."""
  clip_id: str
  path: str  # relative to the audio root
  split: str
  labels: np.ndarray  # 0/1 in the builder's tag order (SPEC order)
  broken: bool = False


def _tone(tag_indices, seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
  """A mix of tones, one per tag (so audio depends on tags), plus a little noise."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * rate)) / rate
  x = 0.02 * rng.standard_normal(t.shape)
  for k in list(tag_indices)[:6]:
    x += 0.1 * np.sin(2 * np.pi * (220.0 * 2 ** (k / 12)) * t + rng.uniform(0, 2 * np.pi))
  x = (0.8 * x / max(1.0, np.abs(x).max())).astype(np.float32)
  return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


def _write_mp3(path: str, x: np.ndarray, rate: int) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  soundfile.write(path, x, rate, format="MP3")


def _corrupt_bytes(seed: int) -> bytes:
  return np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def make_mtat_tree(root, n_per_folder: int = 4, layout: str = "folders", seconds=(2.5, 6.0),
                   extra_members: Optional[dict[str, bytes]] = None) -> list[Clip]:
  """Writes a miniature MagnaTagATune manual dir under `root`; returns its clips.

  Tag counts over the rows are chosen so that the 50 most frequent tags, in order, are SPEC's top 50 (which needs at
  least 51 rows, so n_per_folder >= 4); the last rows have no top-50 tag (they leave the clean config). One empty and
  one corrupt MP3 are included (clips with top-50 tags, in train and test). `layout`: 'folders' (0-f) or
  'zip_parts' (mp3.zip.001-003, consecutive pieces of one zip archive); `extra_members` (name → bytes) are added to
  the archive under exactly those names, after the clips.
  """
  from data_prep.mtat import mtat  # pylint: disable=g-import-not-at-top
  if n_per_folder < 4:
    raise ValueError("n_per_folder must be at least 4 for the top-50 counts to be unambiguous")
  os.makedirs(root, exist_ok=True)
  rows = 16 * n_per_folder
  column = {t: j for j, t in enumerate(MTAT_TAGS)}
  rank = np.random.default_rng(0).permutation(rows)  # row r is the rank[r]-th most tagged
  matrix = np.zeros((rows, len(MTAT_TAGS)), np.uint8)
  for k, tag in enumerate(mtat.TOP50):
    matrix[rank < 51 - k, column[tag]] = 1  # count 51 - k: strictly decreasing
  others = [j for j, t in enumerate(MTAT_TAGS) if t not in mtat.TOP50]
  for r in range(rows):
    matrix[r, others[r % len(others)]] = 1  # count 1 (rows < len(others)), below every top-50 count
  clips, files = [], {}
  for r in range(rows):
    folder = "0123456789abcdef"[r % 16]
    clip_id = str(2 + 3 * r)
    path = f"{folder}/artist_{r}-album-{r:02d}-track_{r}-{30 * r}-{30 * r + 29}.mp3"
    top = matrix[r, [column[t] for t in mtat.TOP50]]
    broken = r in (1, 13)  # folders 1 (train) and d (test)
    clips.append(Clip(clip_id, path, MTAT_SPLIT[folder], top, broken))
    if r == 1:
      files[path] = b""
    elif r == 13:
      files[path] = _corrupt_bytes(r)
    else:
      duration = seconds[0] + (seconds[1] - seconds[0]) * (r % 7) / 6
      buf = io.BytesIO()
      soundfile.write(buf, _tone(np.flatnonzero(top), duration, 16000, 1, r), 16000, format="MP3")
      files[path] = buf.getvalue()
  with open(os.path.join(root, "annotations_final.csv"), "w", newline="") as f:
    writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL)  # the real file quotes every field
    writer.writerow(["clip_id", *MTAT_TAGS, "mp3_path"])
    for clip, labels in zip(clips, matrix):
      writer.writerow([clip.clip_id, *map(str, labels), clip.path])
  if layout == "folders":
    for path, data in files.items():
      os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
      with open(os.path.join(root, path), "wb") as f:
        f.write(data)
  elif layout == "zip_parts":
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
      for path, data in {**files, **(extra_members or {})}.items():
        archive.writestr(path, data)
    data = buf.getvalue()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for i in range(3):
      with open(os.path.join(root, f"mp3.zip.00{i + 1}"), "wb") as f:
        f.write(data[cuts[i]:cuts[i + 1]])
  else:
    raise ValueError(f"unknown layout {layout!r}")
  return clips


def append_mtat_clip(root, clip_id: str, mp3_path: str) -> None:
  """Adds an annotation row for `mp3_path` (as given, not checked), tagged 'guitar' only: the most frequent tag, so
  the top 50 stay SPEC's and the clip stays in the clean config."""
  from data_prep.mtat import mtat  # pylint: disable=g-import-not-at-top
  labels = [int(t == mtat.TOP50[0]) for t in MTAT_TAGS]
  with open(os.path.join(root, "annotations_final.csv"), "a", newline="") as f:
    csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL).writerow([clip_id, *map(str, labels), mp3_path])


class NotAllowed:
  """A class that MSD's restricted unpickler must refuse."""


def msd_track_path(track_id: str) -> str:
  return f"{track_id[2]}/{track_id[3]}/{track_id[4]}/{track_id}.mp3"


def make_msd_tree(root, num_train: int = 6, num_valid: int = 2, num_test: int = 3, seconds: float = 2.0,
                  corrupt: Optional[int] = 1) -> list[Clip]:
  """Writes a miniature MSD manual dir: the three pickles (protocol 2, ids as bytes like Python 2's str, tag vectors
  as (50, 1) numpy columns) and previews under audio/<id[2]>/<id[3]>/<id[4]>/<id>.mp3, at 22.05 or 44.1 kHz,
  stereo or mono. Track `corrupt` of the train list (None: none) is not a decodable MP3.

  Build it with num_train=num_train (the first num_train ids of the train list are train, the rest valid).
  """
  rng = np.random.default_rng(1)
  letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
  n = num_train + num_valid + num_test
  ids = ["TR" + "".join(rng.choice(letters[:26], 3)) + "".join(rng.choice(letters, 13)) for _ in range(n)]
  vectors = (rng.random((n, 50)) < 0.15).astype(np.int64)
  vectors[np.arange(n), np.arange(n) % 50] = 1
  clips = []
  for i, track in enumerate(ids):
    split = "train" if i < num_train else "valid" if i < num_train + num_valid else "test"
    rate, channels = (22050, 2) if i % 2 else (44100, 2 if i % 3 else 1)
    path = os.path.join(root, "audio", msd_track_path(track))
    broken = corrupt is not None and i == corrupt
    if broken:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "wb") as f:
        f.write(_corrupt_bytes(i))
    else:
      _write_mp3(path, _tone(np.flatnonzero(vectors[i]), seconds, rate, channels, i), rate)
    clips.append(Clip(track, msd_track_path(track), split, vectors[i].astype(np.uint8), broken))
  as_bytes = [t.encode() for t in ids]
  _dump(os.path.join(root, "filtered_list_train.cP"), as_bytes[:num_train + num_valid])
  _dump(os.path.join(root, "filtered_list_test.cP"), as_bytes[num_train + num_valid:])
  _dump(os.path.join(root, "msd_id_to_tag_vector.cP"), {t: v.reshape(50, 1) for t, v in zip(as_bytes, vectors)})
  return clips


def write_msd_path_maps(root, paths: dict[str, str]) -> None:
  """Writes MSD_id_to_7D_id.pkl and 7D_id_to_path.pkl mapping each track id to its path (relative to audio/, as
  given, not checked) through an invented 7digital id."""
  seven_digital = {track.encode(): str(1000 + i).encode() for i, track in enumerate(paths)}
  _dump(os.path.join(root, "MSD_id_to_7D_id.pkl"), seven_digital)
  _dump(os.path.join(root, "7D_id_to_path.pkl"), {seven_digital[t.encode()]: p.encode() for t, p in paths.items()})


def _dump(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(pickle.dumps(obj, protocol=2))


def write_forbidden_pickle(path: str) -> None:
  """A protocol-2 pickle holding an instance of a class outside the allowed set."""
  _dump(path, {b"TRAAAAA000000000000": NotAllowed()})


JAMENDO_SPLIT_FILES = {"train": "train", "valid": "validation", "test": "test"}  # split → file suffix


def read_jamendo_tsv(path) -> dict[str, tuple[str, tuple[str, ...]]]:
  """{TRACK_ID: (PATH, tags as written)} of one of MTG-Jamendo's TSV files, read with plain csv."""
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter="\t"))
  return {row[0]: (row[3], tuple(row[5:])) for row in rows[1:] if row}


def jamendo_split_tracks(shared_dir, subset: str = "instrument", split: int = 0) -> dict[str, dict]:
  """{split: {TRACK_ID: (PATH, tags)}} of the official split files in `shared_dir` (the dataset's data/)."""
  return {s: read_jamendo_tsv(os.path.join(shared_dir, "splits", f"split-{split}",
                                           f"autotagging_{subset}-{suffix}.tsv"))
          for s, suffix in JAMENDO_SPLIT_FILES.items()}


def make_jamendo_tree(root, shared_dir, track_ids: Sequence[str], *, low_quality=(), broken=(), missing=(),
                      paths: Optional[Mapping[str, str]] = None) -> dict[str, Clip]:
  """Writes an MTG-Jamendo manual dir: data/ with the real metadata of `shared_dir` (linked, never copied into the
  project; copied with the PATH of the tracks in `paths` replaced, CRLF kept, when `paths` is given) and audio/ with
  a tone MP3 (1-2 s, keyed to the track's instrument tags) for each of `track_ids`, named NN/ID.low.mp3 for those in
  `low_quality`, corrupt for those in `broken`, absent for those in `missing`. Returns {TRACK_ID: Clip} with labels
  over the instrument tags sorted by name.
  """
  os.makedirs(root, exist_ok=True)
  data = os.path.join(root, "data")
  if paths is None:
    os.symlink(os.path.abspath(shared_dir), data)
  else:
    for folder, _, names in os.walk(shared_dir):
      for name in (n for n in names if n.endswith(".tsv")):
        target = os.path.join(data, os.path.relpath(os.path.join(folder, name), shared_dir))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(os.path.join(folder, name), newline="", encoding="utf-8") as f:
          lines = f.read().split("\r\n")
        for i, line in enumerate(lines):
          fields = line.split("\t")
          if fields[0] in paths:
            lines[i] = "\t".join([*fields[:3], paths[fields[0]], *fields[4:]])
        with open(target, "w", newline="", encoding="utf-8") as f:
          f.write("\r\n".join(lines))
  tags = sorted({t.split("---", 1)[1] for _, row_tags in read_jamendo_tsv(
      os.path.join(shared_dir, "autotagging_instrument.tsv")).values() for t in row_tags})
  split_of = {t: (s, row) for s, rows in jamendo_split_tracks(shared_dir).items() for t, row in rows.items()}
  clips = {}
  for i, track in enumerate(track_ids):
    split, (path, row_tags) = split_of[track]
    labels = np.array([f"instrument---{t}" in row_tags for t in tags], np.uint8)
    clips[track] = Clip(track, path, split, labels, broken=track in broken or track in missing)
    if track in missing:
      continue
    file = os.path.join(root, "audio", path[:-len(".mp3")] + ".low.mp3" if track in low_quality else path)
    if track in broken:
      os.makedirs(os.path.dirname(file), exist_ok=True)
      with open(file, "wb") as f:
        f.write(_corrupt_bytes(i))
    else:
      _write_mp3(file, _tone(np.flatnonzero(labels), 1.0 + 0.25 * (i % 5), 16000, 1, i), 16000)
  return clips


FOLDER_TAGS = ("piano", "drums", "guitar", "voice")  # the 0/1 columns' order; sorted for a 'tags' column


def make_folder_tree(root, n: int = 12, *, tag_form: str = "tags", split_column: bool = True,
                     group_column: Optional[str] = None, labels_name: str = "labels.csv",
                     corrupt: Optional[int] = None) -> list[Clip]:
  """Writes an audio folder for the `folder` builder: n tone files in wav, flac and mp3 (cycling; 22.05 kHz stereo
  or 16 kHz mono; 1-2 s), in sub-folders, and a labels file (comma-separated, or tab-separated for a .tsv name).

  tag_form 'tags' writes one `tags` column ('a;b'), 'columns' one 0/1 column per tag of FOLDER_TAGS. With
  split_column, rows cycle train, train, valid (written 'validation' every other time), test; with group_column
  ('artist' or 'group'), rows i and i + 1 (i even) share a group. File `corrupt` (an index) is not audio.
  Returns the clips (id = path) with labels in the builder's tag order.
  """
  rng = np.random.default_rng(3)
  order = sorted(FOLDER_TAGS) if tag_form == "tags" else list(FOLDER_TAGS)
  header = ["path", *(["split"] if split_column else []), *([group_column] if group_column else []),
            *(["tags"] if tag_form == "tags" else FOLDER_TAGS)]
  rows, clips = [], []
  for i in range(n):
    fmt = ("wav", "flac", "mp3")[i % 3]
    path = f"set{i % 2}/clip_{i:02d}.{fmt}"
    on = [t for j, t in enumerate(FOLDER_TAGS) if rng.random() < 0.4 or j == i % len(FOLDER_TAGS)]
    split = ("train", "train", "valid", "test")[i % 4]
    row = [path]
    if split_column:
      row.append("validation" if split == "valid" and i % 8 == 6 else split)
    if group_column:
      row.append(f"artist_{i // 2}")
    row += [";".join(on)] if tag_form == "tags" else ["1" if t in on else "0" for t in FOLDER_TAGS]
    rows.append(row)
    file = os.path.join(root, path)
    os.makedirs(os.path.dirname(file), exist_ok=True)
    if i == corrupt:
      with open(file, "wb") as f:
        f.write(_corrupt_bytes(i))
    else:
      rate, channels = (22050, 2) if i % 2 else (16000, 1)
      x = _tone([FOLDER_TAGS.index(t) for t in on], 1.0 + 0.25 * (i % 5), rate, channels, i)
      soundfile.write(file, x, rate, format=fmt.upper())
    clips.append(Clip(path, path, split, np.array([t in on for t in order], np.uint8), broken=i == corrupt))
  with open(os.path.join(root, labels_name), "w", newline="") as f:
    csv.writer(f, delimiter="\t" if labels_name.endswith(".tsv") else ",").writerows([header, *rows])
  return clips


def build_dataset(name: str, manual_dir, data_dir, **flags) -> str:
  """Builds `name` ('mtat/top50_clean', 'msd', 'synth_instruments', ...) into data_dir; returns data_dir.

  `flags` are those of `python -m data_prep.build` (num_train=..., seed=..., beam=True, num_workers=...).
  """
  from data_prep import build  # pylint: disable=g-import-not-at-top
  build.build(name, data_dir=data_dir, manual_dir=manual_dir, **flags)
  return os.fspath(data_dir)

"""What every flaxtag dataset builder shares.

A build (`Builder.prepare`) turns a manual dir into array_record files through tfds, then writes beside them:

  skipped_files.json   the manifest of input files that could not be used (empty, truncated, undecodable, missing)
  hierarchy.json       the coarse→fine tree, for hierarchical sets
  build_summary.json   written last: its presence marks the dataset complete (see `flaxtag.input_pipeline`)

Examples come from a list of `Item`s, one per clip, turned into tfds examples by a builder-specific function that
runs in this process, in a pool of worker processes, or on Apache Beam workers. An item whose audio cannot be used
is skipped and recorded, never fatal; a missing manual file is fatal at once (`DatasetError`).

A build reads nothing outside its manual dir: every audio path taken from a metadata file or path map goes through
`resolve_path_inside` and every archive's member names through `index_archive_members`; what they refuse is skipped
and recorded like unusable audio.
"""
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import re
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from etils import epath
from tensorflow_datasets.core import file_adapters

from flaxtag import audio
from flaxtag.errors import AudioError, DatasetError
from flaxtag.input_pipeline import BUILD_SUMMARY_FILE, SKIPPED_FILES_FILE

LABEL_DTYPE = np.uint8
# More missing audio files than this share of a split means a wrong layout, not a few lost files.
MAX_MISSING_FRACTION = 0.01
MISSING = "missing: not in the manual dir"  # the reason recorded for an audio file that is not there


def audio_feature() -> tfds.features.Tensor:
  """16 kHz mono int16 PCM, stored as raw bytes.

  The default encoding stores an int64 list (4x the size, slow to parse); ZLIB decodes at ~200 clips/s against
  ~1,600 for BYTES (29 s clips, one core), and audio hardly compresses anyway.
  """
  return tfds.features.Tensor(shape=(None,), dtype=np.int16, encoding=tfds.features.Encoding.BYTES,
                              doc=f"mono int16 PCM at {audio.SAMPLE_RATE} Hz; float = int16 / 32768")


def multi_hot_feature(num_tags: int, doc: str = "multi-hot tags, 0/1") -> tfds.features.Tensor:
  return tfds.features.Tensor(shape=(num_tags,), dtype=LABEL_DTYPE, doc=doc)


def tagging_info(builder: tfds.core.DatasetBuilder, tags: Sequence[str], description: str, id_doc: str,
                 **kwargs) -> tfds.core.DatasetInfo:
  """The DatasetInfo of a set of clips with one multi-hot label vector: features `audio`, `labels`, `id`, and the tag
  names in the metadata (`tags`); kwargs go to DatasetInfo (homepage, citation)."""
  return tfds.core.DatasetInfo(
      builder=builder,
      description=description,
      features=tfds.features.FeaturesDict({
          "audio": audio_feature(),
          "labels": multi_hot_feature(len(tags)),
          "id": tfds.features.Text(doc=id_doc),
      }),
      metadata=tfds.core.MetadataDict(tags=list(tags)),
      **kwargs)


class Item(NamedTuple):
  """One clip to build: its tfds key, the file (or archive member) it comes from, and what the builder needs."""
  key: str
  source: str
  payload: Any


def require_manual_files(manual_dir: Optional[epath.PathLike], names: Sequence[str], dataset: str,
                         how_to_get: str) -> epath.Path:
  """Returns manual_dir as a path; raises DatasetError naming every missing entry of `names` and where to get it."""
  if manual_dir is None:
    raise DatasetError(f"{dataset} needs --manual_dir, a folder holding: {', '.join(names)}.\n{how_to_get}")
  root = epath.Path(manual_dir)
  missing = [n for n in names if not (root / n).exists()]
  if missing:
    raise DatasetError(f"{dataset}: missing in the manual dir {root}: {', '.join(missing)}.\n{how_to_get}")
  return root


class PathOutsideRootError(DatasetError):
  """A path taken from a metadata file leads outside the directory it must stay in."""


def resolve_path_inside(root: epath.PathLike, path: str) -> str:
  """The real path of `path` (relative to `root`, unless absolute), with '..' and symlinks resolved
  (os.path.realpath); raises PathOutsideRootError when it does not lie under root's real path.

  Every audio path a builder takes from a metadata file or path map goes through here, so that no entry
  ('../../x.wav', '/abs/x.wav', a symlink out of the tree) makes a build read outside its manual dir (or the audio
  root inside it that the layout names). A symlinked root itself is fine: both sides are resolved.
  """
  real_root = os.path.realpath(root)
  real = os.path.realpath(os.path.join(real_root, path))
  if os.path.commonpath([real_root, real]) != real_root:
    raise PathOutsideRootError(f"refused: {path!r} resolves to {real}, outside {real_root}")
  return real


def index_archive_members(names: Sequence[str], archive: str,
                          key: Callable[[str], str] = lambda path: path) -> tuple[dict[str, str], dict[str, str]]:
  """({key of its path: member name}, {refused member name: reason}) for the file members of an archive.

  A member named by an absolute path or one with a '..' part is refused: it names no file of the archive's own tree
  and could stand in for one (a member '../../c/b.mp3' read as 'c/b.mp3'). Two members whose paths ('./c/b.mp3' and
  'c/b.mp3'), or keys of paths, are the same shadow each other: which one is meant cannot be known, so that is a
  DatasetError naming both. `key` maps a member's normalized path ('c/b.mp3') to what the builder looks it up by.
  """
  index, refused = {}, {}
  for name in names:
    path = name.replace("\\", "/")  # the separator of some Windows zip tools
    if path.endswith("/"):
      continue  # a directory entry
    parts = path.split("/")
    if path.startswith("/") or re.match(r"[A-Za-z]:", path) or ".." in parts:
      refused[name] = "refused archive member: an absolute path or one with '..'"
      continue
    path_key = key("/".join(p for p in parts if p not in ("", ".")))
    if path_key in index:
      raise DatasetError(f"{archive}: members {index[path_key]!r} and {name!r} both stand for {path_key!r}; which "
                         "one is meant cannot be known. Remove one of them from the archive.")
    index[path_key] = name
  return index, refused


def check_missing_audio(missing: Sequence[str], total: int, dataset: str, layout: str) -> None:
  """Fails when so many referenced audio files are absent that the layout must be wrong."""
  if total and len(missing) > MAX_MISSING_FRACTION * total:
    raise DatasetError(
        f"{dataset}: {len(missing)} of {total} audio files are missing (e.g. {', '.join(missing[:3])}). "
        f"Expected layout: {layout}")


class SkipLog:
  """Skipped inputs, one small JSON file each, so that worker processes and Beam workers can all record them."""

  def __init__(self, directory: epath.PathLike):
    self.directory = epath.Path(directory)

  def reset(self) -> None:
    if self.directory.exists():
      self.directory.rmtree()
    self.directory.mkdir(parents=True, exist_ok=True)

  def record(self, source: str, split: str, reason: str) -> None:
    name = hashlib.sha1(f"{split}/{source}".encode()).hexdigest()[:20] + ".json"
    (self.directory / name).write_text(json.dumps({"file": source, "split": split, "reason": reason}))

  def entries(self) -> list[dict[str, str]]:
    if not self.directory.exists():
      return []
    found = [json.loads(p.read_text()) for p in self.directory.glob("*.json")]
    return sorted(found, key=lambda e: (e["split"], e["file"]))


def process_or_skip(make_example: Callable[[Item], dict], skip_log: SkipLog, split: str,
                    item: Item) -> list[tuple[str, dict]]:
  """[(key, example)], or [] after recording why the item's audio cannot be used."""
  try:
    return [(item.key, make_example(item))]
  except AudioError as e:
    skip_log.record(item.source, split, str(e))
    return []


def example_source(items: Sequence[Item], make_example: Callable[[Item], dict], split: str, skip_log: SkipLog,
                   pool=None, beam: bool = False, desc: str = ""):
  """What `_generate_examples` returns: a generator of (key, example), or a Beam PTransform when `beam`."""
  work = functools.partial(process_or_skip, make_example, skip_log, split)
  if beam:
    import apache_beam as b  # pylint: disable=g-import-not-at-top
    return b.Create(list(items)) | f"Examples{split}" >> b.FlatMap(work)
  return _generate_locally(items, work, pool, desc or split)


def _generate_locally(items, work, pool, desc):
  mapped = pool.imap(work, items, chunksize=4) if pool is not None else map(work, items)
  for examples in tqdm.tqdm(mapped, total=len(items), desc=desc, unit="clip", smoothing=0.05):
    yield from examples


@contextlib.contextmanager
def worker_pool(num_workers: int):
  """A spawn-started process pool, or None (work in this process) for num_workers <= 1."""
  if num_workers <= 1:
    yield None
    return
  # spawn, not fork: the parent may already run JAX's threads, which fork would copy in a broken state.
  with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
    yield pool


@contextlib.contextmanager
def uncompressed_array_records():
  """Makes tfds write array_record files without compression while the block runs.

  tfds always writes zstd-compressed records; PCM audio shrinks by only ~3 % but a random read then costs 4x more
  (29 s clips, one core: ~700 records/s compressed against ~3,000 uncompressed), and the training pipeline reads
  whole records. Readers need no change: compression is recorded in the file. Applies to this process only (local
  builds, Beam's DirectRunner); workers of a remote Beam runner write tfds's default.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  adapter = file_adapters.ArrayRecordFileAdapter
  original = adapter.__dict__["write_examples"]

  def write_examples(cls, path, iterator):
    del cls
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1,uncompressed")
    for _, serialized in iterator:
      writer.write(serialized)
    writer.close()

  adapter.write_examples = classmethod(write_examples)
  try:
    yield
  finally:
    adapter.write_examples = original


def write_json_atomic(path: epath.Path, obj) -> None:
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
  tmp.rename(path)


def is_complete(dataset_dir: epath.PathLike) -> bool:
  return (epath.Path(dataset_dir) / BUILD_SUMMARY_FILE).exists()


def remove_partial(dataset_dir: epath.Path) -> None:
  """Removes dataset_dir and the temp dirs (incomplete.*) that killed tfds builds of it leave behind."""
  if dataset_dir.exists():
    dataset_dir.rmtree()
  if dataset_dir.parent.exists():
    for tmp in dataset_dir.parent.glob(f"incomplete.*_{dataset_dir.name}"):
      tmp.rmtree()


def format_summary(summary: Mapping[str, Any]) -> str:
  splits = ", ".join(f"{k} {v:,}" for k, v in summary["examples"].items())
  lines = [
      f"{summary['name']}: {splits} examples ({summary['total_examples']:,} in all)",
      f"skipped files: {summary['skipped']}" + (f" (listed in {summary['manifest']})" if summary["skipped"] else ""),
      f"time: {summary['seconds']:.1f} s, {summary['clips_per_second']:.1f} clips/s",
      f"written to: {summary['path']}",
  ]
  return "\n".join(lines)


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the flaxtag builders: worker processes or Beam, skipped-file manifest, completeness marker.

  Subclasses define `_info` and `_split_items(manual_dir) -> {split: (items, make_example)}`, where
  `make_example(item)` is a module-level function (it may run in another process) that returns the tfds example
  or raises AudioError. A set whose tag names come from its raw files reads them in `_info` from `self.manual_dir`.
  `build_options` names the options that shape the data, so that a build with other options is not reused.
  """

  BUILD_ARGS: tuple[str, ...] = ()  # options of data_prep.build this builder takes, as __init__ keywords

  def __init__(self, *, manual_dir: Optional[epath.PathLike] = None, num_workers: int = 1, beam: bool = False,
               **kwargs):
    # Set before tfds's __init__, which calls _info: builders whose tag names come from the raw files read them here.
    self.manual_dir = epath.Path(manual_dir) if manual_dir else None
    super().__init__(file_format=file_adapters.FileFormat.ARRAY_RECORD, **kwargs)
    self._num_workers = num_workers
    self._beam = beam
    self._pool = None
    self._plan = None
    self._skipped_while_planning = []  # (source, split, reason) of audio files found unusable before decoding
    self.skip_log = SkipLog(epath.Path(self.data_path).parent / f"skipped_parts_{self.version}")

  def _split_items(self, manual_dir: Optional[epath.Path]) -> Mapping[str, tuple[Sequence[Item], Callable]]:
    raise NotImplementedError

  def build_options(self) -> dict[str, Any]:
    """The options that decide the examples, recorded in the build summary: a complete build made with other options
    is refused rather than reused. Builders without any ({}) are reused whatever they were asked."""
    return {}

  def _check_reusable(self, path: epath.Path, summary: Mapping[str, Any]) -> None:
    recorded = summary.get("options")
    wanted = json.loads(json.dumps(self.build_options()))  # as read back from JSON: tuples become lists
    if recorded is None or recorded == wanted:
      return  # built before options were recorded, or the same build
    differ = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
    raise DatasetError(f"{path} was built with " + ", ".join(f"{k}={recorded.get(k)}" for k in differ) + "; this "
                       "build asks for " + ", ".join(f"{k}={wanted.get(k)}" for k in differ) + ". Pass --overwrite "
                       "to rebuild it, or another --data_dir.")

  def record_skipped(self, source: str, split: str, reason: str) -> None:
    """Notes, while planning, an audio file that is not there (reason MISSING) or refused: it is skipped and listed
    in the manifest."""
    self._skipped_while_planning.append((source, split, reason))

  def _split_generators(self, dl_manager):
    del dl_manager  # tfds's manual dir must exist even for sets that need none: prepare() plans from ours.
    if self._plan is None:
      raise DatasetError(f"build {self.name} with prepare() (python -m data_prep.build), not download_and_prepare()")
    # tfds cannot write a split without examples (a small sample may leave one empty): such a split is left out.
    return {split: self._generate_examples(items, make_example, split)
            for split, (items, make_example) in self._plan.items() if items}

  def _generate_examples(self, items, make_example, split):
    return example_source(items, make_example, split, self.skip_log, self._pool, self._beam,
                          desc=f"{self.name} {split}")

  def _extra_files(self) -> Mapping[str, Any]:
    """JSON files to write beside the dataset, name → content."""
    return {}

  def prepare(self, manual_dir: Optional[epath.PathLike] = None, overwrite: bool = False,
              beam_options: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Builds the dataset unless a complete one is there; returns the build summary.

    A dataset dir without the completeness marker (an interrupted build) is removed and built again.
    """
    path = epath.Path(self.data_path)
    if is_complete(path) and not overwrite:
      summary = json.loads((path / BUILD_SUMMARY_FILE).read_text())
      self._check_reusable(path, summary)
      # Where the dataset is now: a dataset dir moved since its build keeps its old paths in the summary file.
      summary.update(reused=True, path=os.fspath(path), manifest=os.fspath(path / SKIPPED_FILES_FILE))
      return summary
    # Every check of the raw data runs before anything is written.
    self._skipped_while_planning = []
    manual_dir = manual_dir or self.manual_dir
    self._plan = self._split_items(epath.Path(manual_dir) if manual_dir else None)
    remove_partial(path)
    self.skip_log.reset()
    for source, split, reason in self._skipped_while_planning:
      self.skip_log.record(source, split, reason)
    config = tfds.download.DownloadConfig(**self._beam_config(beam_options))
    start = time.time()
    with uncompressed_array_records(), worker_pool(0 if self._beam else self._num_workers) as pool:
      self._pool = pool
      try:
        self.download_and_prepare(download_config=config)
      finally:
        self._pool = None
    seconds = time.time() - start
    return self._finalize(path, seconds)

  def _beam_config(self, beam_options):
    if not self._beam:
      return {}
    try:
      from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise DatasetError("--beam needs Apache Beam: pip install 'flaxtag[beam]'") from None
    return {"beam_options": pipeline_options.PipelineOptions(list(beam_options or ["--runner=DirectRunner"]))}

  def _finalize(self, path: epath.Path, seconds: float) -> dict[str, Any]:
    skipped = self.skip_log.entries()
    write_json_atomic(path / SKIPPED_FILES_FILE, {"count": len(skipped), "files": skipped})
    for name, content in self._extra_files().items():
      write_json_atomic(path / name, content)
    examples = {name: split.num_examples for name, split in self.info.splits.items()}
    total = sum(examples.values())
    summary = {
        "name": self.name + (f"/{self.builder_config.name}" if self.builder_config else ""),
        "version": str(self.version),
        "path": os.fspath(path),
        "examples": examples,
        "total_examples": total,
        "skipped": len(skipped),
        "manifest": os.fspath(path / SKIPPED_FILES_FILE),
        "seconds": round(seconds, 2),
        "clips_per_second": round((total + len(skipped)) / max(seconds, 1e-9), 2),
        "options": self.build_options(),
    }
    write_json_atomic(path / BUILD_SUMMARY_FILE, summary)
    if self.skip_log.directory.exists():
      self.skip_log.directory.rmtree()
    return summary


def to_example(waveform: np.ndarray, labels: np.ndarray, clip_id: str, **extra) -> dict[str, Any]:
  """A tfds example from a float waveform at 16 kHz (stored as int16 PCM) and 0/1 labels."""
  return {"audio": audio.to_int16(waveform), "labels": np.asarray(labels, LABEL_DTYPE), "id": clip_id, **extra}


def centred_excerpt(waveform: np.ndarray, max_seconds: Optional[float]) -> np.ndarray:
  """The middle max_seconds of a 16 kHz waveform (all of it when shorter, or when max_seconds is None)."""
  if max_seconds is None:
    return waveform
  length = int(round(max_seconds * audio.SAMPLE_RATE))
  start = max(0, (len(waveform) - length) // 2)
  return waveform[start:start + length]


def example_from_file(item: Item) -> dict:
  """The example of an audio file (any format `audio.load_audio` reads); payload (labels, clip id, max seconds or
  None for the whole file)."""
  labels, clip_id, max_seconds = item.payload
  return to_example(centred_excerpt(audio.load_audio(item.source), max_seconds), labels, clip_id)


def check_max_seconds(max_seconds: Optional[float], dataset: str) -> None:
  if max_seconds is not None and not max_seconds > 0:
    raise DatasetError(f"{dataset}: --max_seconds must be positive (or left out to keep whole tracks), got "
                       f"{max_seconds}")


def file_sha256(path: epath.PathLike) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()



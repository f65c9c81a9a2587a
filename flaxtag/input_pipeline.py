"""Input pipeline: grain over the array_record datasets that `data_prep` builds (SPEC §1, §6).

A built dataset lives in `<data_dir>/<name>[/<config>]/<version>/`: tfds's files (tag names and hierarchy in its
metadata), `skipped_files.json`, and `build_summary.json`, written last, whose presence marks the build complete.

Training: every epoch is a permutation of the whole split drawn from (seed, epoch); step s of the run takes the
s-th block of `global batch` records of it, and process p of P takes the p-th contiguous slice of the block, so the
processes read disjoint shards that together cover the split. One crop per clip per step, at an offset drawn from
(seed, epoch, record index): the batches depend on the seed only, never on hidden RNG state, worker count or
timing, so a restored iterator state resumes exactly. Evaluation: 16 evenly spaced crops per clip, static batch
shapes, a validity mask and the clip's index, the same number of batches on every process. Where crops start and
how they are cut: `flaxtag.crops`.

A run whose tags are not the dataset's own (a hierarchy file over some of its tags) reads the dataset's labels
through a `LabelSelection`, applied to every batch, training and evaluation alike (`label_selection`).

Batches are dicts of numpy arrays, this process's part of the global batch, ready for
`jax.make_array_from_process_local_data`. Reading sets glibc's malloc thresholds for the process (see
`_keep_freed_buffers`).
"""
import ctypes
import dataclasses
import functools
import re
import sys
import warnings
from typing import Any, Mapping, Optional

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from etils import epath

from flaxtag import audio, crops
from flaxtag.errors import ConfigError, DatasetError
from flaxtag.hierarchy import Hierarchy, LabelSelection

BUILD_SUMMARY_FILE = "build_summary.json"
SKIPPED_FILES_FILE = "skipped_files.json"
HIERARCHY_FILE = "hierarchy.json"
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a built dataset."""
  name: str
  path: str  # the version directory
  tags: tuple[str, ...]  # fine tags, in label column order
  split_sizes: Mapping[str, int]
  hierarchy: Optional[Hierarchy] = None  # coarse tags and the parent of every fine tag, for hierarchical sets
  sample_rate: int = audio.SAMPLE_RATE
  builder: str = ""  # '<name>[/<config>]' of the build, from its directory
  version: str = ""
  provenance: Optional[Mapping[str, Any]] = None  # the builder's metadata["provenance"] (official split, ...)

  @property
  def num_tags(self) -> int:
    return len(self.tags)

  @property
  def coarse_tags(self) -> tuple[str, ...]:
    return self.hierarchy.coarse_tags if self.hierarchy else ()

  def describe(self, *splits: str) -> dict[str, Any]:
    """Which data a result comes from, for checkpoints and reports: the dataset's name, config and version, the
    clips of each of `splits`, and the builder's provenance (copied as it is) where it has one."""
    name, _, config = self.builder.partition("/")
    described = {"name": name, "config": config or None, "version": self.version,
                 "splits": {split: self.split_sizes[split] for split in splits}}
    if self.provenance:
      described["provenance"] = dict(self.provenance)
    return described


def _build_hint(name: str, data_dir) -> str:
  return f"Build it with: python -m data_prep.build {name} --data_dir {data_dir} [--manual_dir ...]"


def dataset_dir(data_dir, name: str) -> epath.Path:
  """The version directory of a complete build of `name` ('mtat/top50_clean', 'msd', ...) under data_dir.

  Raises:
    DatasetError: no such dataset, an ambiguous name (several configs built), or an incomplete build.
  """
  root = epath.Path(data_dir) / name
  if not root.is_dir():
    raise DatasetError(f"no dataset {name!r} in {data_dir}. {_build_hint(name, data_dir)}")
  subdirs = [d for d in root.iterdir() if d.is_dir()]
  versions = sorted((d for d in subdirs if _VERSION.match(d.name)), key=lambda d: tuple(map(int, d.name.split("."))))
  if not versions:
    configs = sorted(d.name for d in subdirs if any(_VERSION.match(v.name) for v in d.iterdir() if v.is_dir()))
    if len(configs) == 1:
      return dataset_dir(data_dir, f"{name}/{configs[0]}")
    if configs:
      raise DatasetError(f"{root} holds several configs; name one of: {', '.join(f'{name}/{c}' for c in configs)}")
    if any(d.name.startswith("incomplete.") for d in subdirs):
      raise DatasetError(f"the build of {name!r} in {data_dir} did not finish (only tfds's incomplete.* temp dir "
                         f"is there). {_build_hint(name, data_dir)}")
    raise DatasetError(f"no dataset {name!r} in {data_dir}. {_build_hint(name, data_dir)}")
  path = versions[-1]
  if not (path / BUILD_SUMMARY_FILE).exists():
    raise DatasetError(f"the dataset in {path} is incomplete: its build was interrupted or is still running (no "
                       f"{BUILD_SUMMARY_FILE}). Rebuild it; the build replaces the incomplete files. "
                       f"{_build_hint(name, data_dir)}")
  return path


def dataset_info(data_dir, name: str) -> DatasetInfo:
  """Tag names, hierarchy and split sizes of a built dataset, from its directory alone."""
  path = dataset_dir(data_dir, name)
  info = tfds.builder_from_directory(path).info
  metadata = info.metadata or {}
  if "tags" not in metadata:
    raise DatasetError(f"{path}: the dataset metadata has no tag names; was it built by data_prep?")
  tags = tuple(metadata["tags"])
  hierarchy = None
  if metadata.get("hierarchy"):
    hierarchy = Hierarchy.from_mapping(metadata["hierarchy"], fine_tags=tags, source=f"{path} metadata")
  sizes = {split: info.splits[split].num_examples for split in info.splits}
  return DatasetInfo(name=name, path=str(path), tags=tags, split_sizes=sizes, hierarchy=hierarchy,
                     builder=str(path.parent.relative_to(epath.Path(data_dir))), version=path.name,
                     provenance=metadata.get("provenance"))


def label_selection(info: DatasetInfo, tag_names, hierarchy: Optional[Hierarchy],
                    source: str = "hierarchy") -> Optional[LabelSelection]:
  """How a run with fine tags `tag_names` and `hierarchy` reads the labels of `info`'s dataset: None where they are
  the dataset's own (all its tags in its order, with its own hierarchy or none), read as stored, coarse labels
  included; else a `LabelSelection` (see it for the errors).
  """
  if tuple(tag_names) == info.tags and (hierarchy is None or hierarchy == info.hierarchy):
    return None
  return LabelSelection.create(info.tags, tag_names, hierarchy, source=source, dataset=info.name)


def epoch_permutation(num_records: int, seed: int, epoch: int) -> np.ndarray:
  """The order in which the whole split is read in `epoch`."""
  return np.random.default_rng([seed, epoch]).permutation(num_records)


def steps_per_epoch(num_clips: int, batch_size: int, process_count: int) -> int:
  """Training steps per epoch: full global batches only (the rest of each epoch's permutation is not used)."""
  return num_clips // (batch_size * process_count)


def num_eval_batches(num_clips: int, batch_size: int, process_count: int) -> int:
  """Evaluation batches per process (the same on every process)."""
  per_process = -(-num_clips // process_count)
  return -(-per_process // batch_size)


def _float_audio(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {**batch, "audio": np.multiply(batch["audio"], audio.INT16_SCALE, dtype=np.float32)}


def _keep_freed_buffers() -> None:
  """Lets glibc reuse freed record buffers instead of returning them to the system.

  Every record read allocates ~1 MB. glibc serves such blocks with mmap and unmaps them when freed, so each read
  page-faults a fresh megabyte: on 29 s clips that alone cut reading from ~1,500 to ~400 records/s per core.
  """
  try:
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 1 << 26)  # M_MMAP_THRESHOLD: heap, not mmap, below 64 MiB
    libc.mallopt(-1, 1 << 28)  # M_TRIM_THRESHOLD: keep up to 256 MiB of freed heap
  except (OSError, AttributeError):
    pass  # not glibc: nothing to tune


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = buf[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if byte < 0x80:
      return value, pos
    shift += 7


def _fields(buf: bytes, start: int, end: int):
  """(field number, start, end) of each length-delimited field of the protobuf message buf[start:end]."""
  pos = start
  while pos < end:
    key, pos = _varint(buf, pos)
    if key & 7 != 2:
      raise ValueError("not a length-delimited field")
    length, pos = _varint(buf, pos)
    yield key >> 3, pos, pos + length
    pos += length


def _feature_spans(record: bytes) -> dict[str, tuple[int, int, int]]:
  """name → (kind, start, end) of each feature of a serialized tf.train.Example.

  kind 1: bytes_list, [start, end) is its first value; kind 3: int64_list, [start, end) are its packed varints.
  """
  spans = {}
  for _, start, end in _fields(record, 0, len(record)):  # Example.features
    for _, entry_start, entry_end in _fields(record, start, end):  # Features.feature map entries
      name, value = None, (0, 0)
      for number, s, e in _fields(record, entry_start, entry_end):
        if number == 1:
          name = record[s:e].decode()
        else:
          value = (s, e)
      for kind, s, e in _fields(record, *value):  # Feature: the list it holds
        for _, vs, ve in _fields(record, s, e):
          spans[name] = (kind, vs, ve)
          break
  return spans


class _Reader:
  """Reads the audio and labels of a record, without copying the audio.

  The tfds data source is opened lazily, once in each worker process, and not pickled. Records are parsed here
  rather than by tfds: tfds copies the audio out of the record and builds every feature, which costs more than
  the read itself; a record this parser does not expect goes through tfds's decoder, with a warning the first
  time in each process.
  """

  def __init__(self, path: str, split: str, label_shapes: Mapping[str, int]):
    self._path = path
    self._split = split
    self._label_shapes = dict(label_shapes)
    self._source = self._features = None
    self._warned_fallback = False

  def __getstate__(self):
    return {**self.__dict__, "_source": None, "_features": None}

  def _open(self):
    _keep_freed_buffers()
    builder = tfds.builder_from_directory(self._path)
    self._features = builder.info.features
    self._source = builder.as_data_source(split=self._split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)

  def __len__(self) -> int:
    if self._source is None:
      self._open()
    return len(self._source)

  def record_bytes(self, index: int) -> bytes:
    if self._source is None:
      self._open()
    return self._source[int(index)]

  def __getitem__(self, index: int) -> dict[str, Any]:
    """{'audio': (L,) int16 (a view into the record), 'labels' (and 'coarse_labels'): uint8}."""
    record = self.record_bytes(index)
    try:
      spans = _feature_spans(record)
      kind, start, end = spans["audio"]
      example = {"audio": np.frombuffer(record, np.int16, (end - start) // 2, start) if kind == 1 else None}
      for key, n in self._label_shapes.items():
        kind, start, end = spans[key]
        values = np.frombuffer(record, np.uint8, end - start, start)
        # Packed varints below 128 are one byte each: the bytes are the values.
        example[key] = values if kind == 3 and values.shape == (n,) and values.max(initial=0) < 128 else None
      if all(v is not None for v in example.values()):
        return example
    except (ValueError, KeyError, IndexError):
      pass
    if not self._warned_fallback:
      self._warned_fallback = True
      warnings.warn(f"{self._path} ({self._split}): record {index} is not laid out as flaxtag's builders write it "
                    "(audio bytes, labels as packed ints below 128); it and any like it are decoded by tfds, which "
                    "is slower.")
    decoded = self._features.deserialize_example_np(record)
    return {k: decoded[k] for k in ("audio", *self._label_shapes)}


class _TrainBatches:
  """Random-access source whose element s is this process's part of training step s."""

  def __init__(self, reader: _Reader, num_records: int, num_steps: int, batch_size: int, crop_len: int,
               label_shapes: Mapping[str, int], seed: int, process_index: int, process_count: int,
               audio_dtype=np.float32, selection: Optional[LabelSelection] = None):
    self._reader = reader
    self._selection = selection
    self._audio_dtype = audio_dtype
    self._num_records = num_records
    self._num_steps = num_steps
    self._batch_size = batch_size
    self._crop_len = crop_len
    self._label_shapes = dict(label_shapes)
    self._seed = seed
    self._process_index = process_index
    self._process_count = process_count
    self._per_epoch = steps_per_epoch(num_records, batch_size, process_count) * batch_size
    self._permutation = (None, None)  # (epoch, permutation): one epoch cached per worker

  def __len__(self) -> int:
    return self._num_steps

  def _record(self, position: int) -> tuple[int, int]:
    """(epoch, record index) of this process's position-th record."""
    epoch, j = divmod(position, self._per_epoch)
    if self._permutation[0] != epoch:
      self._permutation = (epoch, epoch_permutation(self._num_records, self._seed, epoch))
    step, row = divmod(j, self._batch_size)
    # Process p takes the p-th contiguous slice of the step's global block, so the global batch has the same row
    # order for any number of processes (dropout masks are drawn per row of the global batch).
    return epoch, int(self._permutation[1][(step * self._process_count + self._process_index) * self._batch_size + row])

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    b = self._batch_size
    batch = {"audio": np.empty((b, self._crop_len), self._audio_dtype),
             **{k: np.empty((b, n), np.float32) for k, n in self._label_shapes.items()}}
    for row in range(b):
      epoch, record = self._record(step * b + row)
      example = self._reader[record]
      pcm = example["audio"]
      offset = crops.train_offset(pcm.shape[0], self._crop_len, self._seed, epoch, record)
      crops.copy(pcm, offset, batch["audio"][row])
      for key in self._label_shapes:
        batch[key][row] = example[key]
    return _selected(batch, self._selection)


class _EvalBatches:
  """Random-access source whose element i is this process's i-th evaluation batch, padded to a static shape."""

  def __init__(self, reader: _Reader, num_records: int, batch_size: int, crop_len: int, num_crops: int,
               label_shapes: Mapping[str, int], process_index: int, process_count: int, audio_dtype=np.float32,
               selection: Optional[LabelSelection] = None):
    self._reader = reader
    self._selection = selection
    self._audio_dtype = audio_dtype
    self._records = np.arange(process_index, num_records, process_count)
    self._num_batches = num_eval_batches(num_records, batch_size, process_count)
    self._batch_size = batch_size
    self._crop_len = crop_len
    self._num_crops = num_crops
    self._label_shapes = dict(label_shapes)

  def __len__(self) -> int:
    return self._num_batches

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    b = self._batch_size
    batch = {
        "audio": np.zeros((b, self._num_crops, self._crop_len), self._audio_dtype),
        **{k: np.zeros((b, n), np.float32) for k, n in self._label_shapes.items()},
        "mask": np.zeros((b,), bool),
        "clip_index": np.full((b,), -1, np.int32),
    }
    for row, record in enumerate(self._records[index * b:(index + 1) * b]):
      example = self._reader[record]
      pcm = example["audio"]
      for crop, offset in enumerate(crops.eval_offsets(pcm.shape[0], self._crop_len, self._num_crops)):
        crops.copy(pcm, int(offset), batch["audio"][row, crop])
      for key in self._label_shapes:
        batch[key][row] = example[key]
      batch["mask"][row] = True
      batch["clip_index"][row] = record
    return _selected(batch, self._selection)


def _selected(batch: dict[str, np.ndarray], selection: Optional[LabelSelection]) -> dict[str, np.ndarray]:
  """The batch with the run's labels in place of the dataset's (padding rows stay all-zero)."""
  return batch if selection is None else {**batch, **selection.apply(batch["labels"])}


def _processes(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ConfigError(f"process_index must lie in [0, process_count={count}), got {index}")
  return index, count


def _label_shapes(path: str, selection: Optional[LabelSelection]) -> dict[str, int]:
  """The label features to read: with a selection, the fine labels only (its coarse labels are made from them)."""
  features = tfds.builder_from_directory(path).info.features
  keys = ("labels",) if selection else ("labels", "coarse_labels")
  return {k: features[k].shape[0] for k in keys if k in features}


def check_split(info: DatasetInfo, split: str, why: str = "") -> int:
  """The number of clips in `split`; DatasetError (ending with `why`, where given) if the dataset has no such split."""
  if split not in info.split_sizes:
    raise DatasetError(f"{info.path} has no split {split!r}; its splits are {', '.join(sorted(info.split_sizes))}."
                       + (f" {why}" if why else ""))
  return info.split_sizes[split]


def _prefetched(make_source, worker_count: int, read_threads: int, prefetch: int) -> grain.IterDataset:
  """`make_source(audio_dtype)` read by `read_threads` threads, in this process or in `worker_count` processes.

  Worker processes hand over int16 audio, converted here: it halves what crosses process boundaries through
  shared memory, which costs more than the conversion (~1,100 → ~1,500 crops per CPU-second of the workers).
  """
  _keep_freed_buffers()
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
  if worker_count == 0:
    return grain.MapDataset.source(make_source(np.float32)).to_iter_dataset(options)
  # grain's worker processes read its absl flags, which a program that does not run under absl never parses.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  ds = grain.MapDataset.source(make_source(np.int16)).to_iter_dataset(options)
  ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=prefetch))
  return ds.map(_float_audio)


def train_iterator(data_dir, name: str, *, batch_size: int, crop_len: int, seed: int, split: str = "train",
                   num_epochs: Optional[int] = None, process_index: Optional[int] = None,
                   process_count: Optional[int] = None, worker_count: int = 0, read_threads: int = 2,
                   prefetch: int = 4, selection: Optional[LabelSelection] = None) -> grain.DatasetIterator:
  """Endless (or `num_epochs`-long) iterator of this process's training batches.

  Args:
    data_dir, name: where the dataset is, e.g. ('/data', 'mtat/top50_clean').
    batch_size: examples per batch on this process (the global batch is batch_size × process_count).
    crop_len: samples per crop: 65,280 for the Spec front-end, 65,610 for Raw.
    seed: fixes the order of every epoch and every crop offset.
    process_index, process_count: this process's shard; default jax.process_index() / jax.process_count().
    worker_count: worker processes; 0 reads in background threads of this process, the cheapest way (29 s clips,
      65,280-sample crops: ~2,200 crops per CPU-second here, ~1,300 in a worker process, which pays for the
      shared-memory hand-over). Add workers when one core cannot keep up with the accelerator.
    read_threads, prefetch: threads and batches read ahead, per worker (or in this process).
    selection: the run's labels where they are not the dataset's own (`label_selection`).

  Returns:
    A grain DatasetIterator of {'audio': (b, crop_len) float32, 'labels': (b, T) float32, and 'coarse_labels':
    (b, C) float32 for hierarchical sets or selections}. Its get_state() (a JSON-serialisable dict) and set_state()
    resume the exact sequence of batches.
  """
  info = dataset_info(data_dir, name)
  num_records = check_split(info, split)
  p, count = _processes(process_index, process_count)
  steps = steps_per_epoch(num_records, batch_size, count)
  if steps == 0:
    raise ConfigError(f"split {split!r} of {name} has {num_records} clips, fewer than one global batch of "
                      f"{batch_size} × {count} processes")
  num_steps = sys.maxsize if num_epochs is None else steps * num_epochs
  shapes = _label_shapes(info.path, selection)
  make_source = functools.partial(_TrainBatches, _Reader(info.path, split, shapes), num_records, num_steps,
                                  batch_size, crop_len, shapes, seed, p, count, selection=selection)
  return iter(_prefetched(make_source, worker_count, read_threads, prefetch))


def eval_batches(data_dir, name: str, *, split: str, batch_size: int, crop_len: int,
                 num_crops: int = crops.EVAL_CROPS, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, worker_count: int = 0, read_threads: int = 2,
                 prefetch: int = 2, selection: Optional[LabelSelection] = None) -> grain.IterDataset:
  """This process's evaluation batches of `split`, in record order; iterate it once per evaluation.

  Process p takes records p, p + P, ...; every process yields `num_eval_batches(...)` batches of static shape:
  {'audio': (b, num_crops, crop_len) float32, 'labels': (b, T) float32, ['coarse_labels': (b, C) float32,]
  'mask': (b,) bool (False on padding rows), 'clip_index': (b,) int32 (the record index in the split, -1 on
  padding rows)}. Average the sigmoid outputs over the crops, then use `mask` to drop padding rows. `selection`: as
  for `train_iterator`.
  """
  info = dataset_info(data_dir, name)
  num_records = check_split(info, split)
  p, count = _processes(process_index, process_count)
  shapes = _label_shapes(info.path, selection)
  make_source = functools.partial(_EvalBatches, _Reader(info.path, split, shapes), num_records, batch_size,
                                  crop_len, num_crops, shapes, p, count, selection=selection)
  return _prefetched(make_source, worker_count, read_threads, prefetch)


def clip_ids(data_dir, name: str, split: str) -> list[str]:
  """The id (MTAT clip_id, MSD track id, ...) of every record of `split`, by clip_index. Reads the whole split."""
  path = dataset_dir(data_dir, name)
  source = tfds.builder_from_directory(path).as_data_source(split=split)
  return [source[i]["id"].decode() for i in range(len(source))]

"""Inference API: a trained or converted model loaded from its workdir.

  tagger = flaxtag.Tagger.load("runs/spec_att")
  scores = tagger.tag_waveform(tagger.load_clip("song.mp3"))  # 16 evenly spaced crops, probabilities averaged
  scores.fine, scores.coarse                                  # (num_tags,), (num_coarse,) or None
  for result in tagger.iter_tag_files(paths):                 # files decoded in threads, a block at a time, as
    print(result.path, result.error or result.scores.fine)    # their crops are scored in fixed-size batches
  fine, coarse = tagger.predict(batch)                        # (B, samples), or (B, 96, frames) log-mel for Spec

Inference mode: dropout off, BatchNorm uses its running statistics. Every batch is split over all local devices
(`flaxtag.sharding`'s mesh over `jax.local_devices()`, the batch axis sharded over `data`, the variables
replicated; `Tagger._run` is the one place here that places arrays), with batch sizes rounded up to a multiple of
the device count. On a CPU, `use_every_cpu_core()` (the tag and explain commands call it) makes those devices one
per core.
"""
import dataclasses
import functools
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxtag import audio, checkpoint, sharding
from flaxtag.errors import AudioError, FlaxtagError
from flaxtag.hierarchy import Hierarchy
from flaxtag.models import heads, tagger

BATCH_SIZE = 16
# Threads decoding files while the model runs: decoding a 30-s MP3 takes a few per cent of the time the model takes to
# score its crops, so two keep the model fed whatever the mix of files.
DECODE_WORKERS = 2
# Batches of crops that may wait between the decoding threads and the model: the memory bound of `iter_tag_files`.
QUEUED_BATCHES = 2
# Shorter clips are refused: a crop would be mostly zero padding, and its tags mostly about the padding.
MIN_CLIP_SECONDS = 1.0


def use_every_cpu_core():
  """On a CPU, makes JAX start one device per core (unless the process chose a count): call before JAX starts.

  XLA:CPU runs many of one device's ops (softmax, GELU, the front-end's reductions) on one thread; a batch split
  over one device per core keeps every core busy: 1.5x the crops/s of one device on 2 cores (BENCHMARKS.md).
  """
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") or jax.config.jax_num_cpu_devices > 0:
    return
  try:
    jax.config.update("jax_num_cpu_devices", len(os.sched_getaffinity(0)))
  except RuntimeError:
    pass  # JAX has started already (this is a library call in someone's process): its devices stay as they are


@dataclasses.dataclass(frozen=True)
class Scores:
  """Tag probabilities of one clip.

  fine: (num_tags,) whole-clip probabilities (the mean over crops) or, for a timeline, (n, num_tags), one row a crop.
  coarse: the same for the coarse tags of a hierarchical model (derived by the max rule for a flat head that has a
    hierarchy); None for models without one.
  starts: (n,) start time in seconds of each crop scored.
  crop_seconds: length of one crop in seconds.
  duration: length of the clip in seconds.
  """
  fine: np.ndarray
  coarse: np.ndarray | None
  starts: np.ndarray
  crop_seconds: float
  duration: float

  @property
  def ends(self) -> np.ndarray:
    """(n,) end time of each crop in seconds; a crop zero-padded past the end of the clip ends with the clip."""
    return np.minimum(self.starts + self.crop_seconds, self.duration)


@dataclasses.dataclass(frozen=True)
class Inspection:
  """One forward pass of a batch, shown from inside (`Tagger.inspect`).

  fine, coarse: probabilities as `Tagger.predict` gives them.
  attention: for an attention back-end, every encoder layer's attention probabilities (after softmax, before
    dropout), (B, heads, T+1, T+1) each, token 0 being [CLS]; an empty list for CNN back-ends.
  head_attention: (B, num_coarse, num_fine), the coarse × fine map of a ResAtt (or GMP) head, else None.
  """
  fine: np.ndarray
  coarse: np.ndarray | None
  attention: list[np.ndarray]
  head_attention: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class FileResult:
  """What `tag_files` found for one file: scores, or the reason the file could not be tagged.

  warnings: what is suspect about the file's samples (clipping, a DC offset); it was tagged all the same.
  index: the file's position in the paths given.
  """
  path: str
  scores: Scores | None = None
  error: str | None = None
  warnings: tuple[str, ...] = ()
  index: int = 0


class Tagger:
  """A model with its variables, config and metadata (tag names, hierarchy), ready to tag audio."""

  def __init__(self, model: tagger.MusicTagger, variables, config: ml_collections.ConfigDict, metadata: dict,
               devices: Sequence[jax.Device] | None = None):
    self.model = model
    self.config = config
    self.metadata = metadata
    self.devices = list(devices) if devices else jax.local_devices()
    self.mesh = sharding.make_mesh(devices=self.devices)
    self._batch_sharding = sharding.batch_sharding(self.mesh)
    self.variables = jax.device_put(variables, sharding.replicated(self.mesh))
    self._outputs_fn = jax.jit(self._outputs_impl)
    self._probs_fn = jax.jit(self._probs_impl)
    self._inspect_fn = jax.jit(self._inspect_impl)

  @classmethod
  def load(cls, workdir, checkpoint_step: str | int = "best", devices: Sequence[jax.Device] | None = None
           ) -> "Tagger":
    """Loads `best` (by validation ROC-AUC), `latest`, or a step number from WORKDIR/checkpoints.

    `devices` (default: all local devices) are those batches are split over.
    """
    manager = checkpoint.open_manager(workdir, read_only=True)
    step = checkpoint.resolve_step(manager, checkpoint_step)
    config, metadata = checkpoint.load_config(manager, step)
    hierarchy = None
    if metadata.get("hierarchy"):
      hierarchy = Hierarchy.from_mapping(metadata["hierarchy"], fine_tags=metadata.get("tag_names"),
                                         source=f"{workdir} checkpoint metadata")
    model = tagger.build_model(config.model, hierarchy)
    variables = checkpoint.restore_variables(manager, step, tagger.abstract_variables(model))
    manager.close()
    return cls(model, variables, config, {**metadata, "step": step}, devices)

  # --------------------------------------------------------------------------------------------------------------------
  # What the model is.

  @property
  def tag_names(self) -> list[str]:
    """Fine tag names in output order (`tag_i` where the checkpoint names none)."""
    names = self.metadata.get("tag_names")
    return list(names) if names else [f"tag_{i}" for i in range(self.model.num_tags)]

  @property
  def hierarchy(self) -> Hierarchy | None:
    return self.model.hierarchy

  @property
  def coarse_tag_names(self) -> list[str] | None:
    """Coarse tag names of a model with a hierarchy, else None."""
    return list(self.hierarchy.coarse_tags) if self.hierarchy else None

  @property
  def has_attention(self) -> bool:
    return tagger.has_attention(self.model)

  @property
  def sample_rate(self) -> int:
    return self.model.mel.sample_rate

  @property
  def crop_samples(self) -> int:
    return tagger.crop_samples(self.model)

  @property
  def crop_seconds(self) -> float:
    return self.crop_samples / self.sample_rate

  def round_batch(self, batch_size: int) -> int:
    """`batch_size` rounded up to a multiple of the number of devices."""
    n = len(self.devices)
    return max(1, -(-batch_size // n)) * n

  # --------------------------------------------------------------------------------------------------------------------
  # Batches of crops.

  def outputs(self, batch) -> heads.HeadOutputs:
    """Head outputs (logits, numpy) for a batch of waveforms or, for Spec models, log-mel spectrograms.

    The head's coarse × fine attention map, where it has one, is broadcast to (B, C, F).
    """
    return self._run(self._outputs_fn, [batch])

  def predict(self, batch, forced_attention=None, batch_size: int | None = None
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """Fine (B, num_tags) and coarse (B, num_coarse) probabilities, coarse None for a model without a hierarchy.

    forced_attention: optional (B, tokens + 1), replaces the last encoder layer's attention (SPEC §8).
    batch_size: run in chunks of this many rows, the last one padded, so one compiled program serves every chunk;
      default one chunk of the whole batch.
    """
    arrays = [batch] if forced_attention is None else [batch, forced_attention]
    probs = self._run(self._probs_fn, arrays, batch_size)
    fine = probs[:, :self.model.num_tags]
    return fine, (probs[:, self.model.num_tags:] if self.hierarchy else None)

  def probs(self, batch) -> np.ndarray:
    """Sigmoid probabilities of the (fine) tags, (B, num_tags)."""
    return self.predict(batch)[0]

  def inspect(self, batch) -> Inspection:
    """One forward pass with what it can show: probabilities, every encoder layer's attention, the head's map."""
    probs, layers, head_attention = self._run(self._inspect_fn, [batch])
    fine = probs[:, :self.model.num_tags]
    return Inspection(fine, probs[:, self.model.num_tags:] if self.hierarchy else None, layers, head_attention)

  def _outputs_impl(self, variables, x):
    out = self.model.apply(variables, x, train=False)
    if out.attention is not None:
      out = out._replace(attention=jnp.broadcast_to(out.attention, (x.shape[0],) + out.attention.shape[1:]))
    return out

  def _probs_impl(self, variables, x, forced=None):
    return self._probabilities(self.model.apply(variables, x, train=False, forced_attention=forced))

  def _probabilities(self, out: heads.HeadOutputs):
    """Sigmoid of the fine logits, followed by the coarse ones where the model has a hierarchy."""
    logits = out.fine_logits
    if self.hierarchy is not None:
      coarse = out.coarse_logits
      if coarse is None:  # a flat head: coarse by the max rule (SPEC §5)
        coarse = heads.derive_coarse_logits(logits, self.hierarchy)
      logits = jnp.concatenate([logits, coarse], axis=-1)
    return jax.nn.sigmoid(logits)

  def _inspect_impl(self, variables, x):
    out, state = self.model.apply(variables, x, train=False, mutable=["intermediates"])
    layers = state.get("intermediates", {}).get("backend", {})
    attention = [layers[f"layer_{i}"]["attention"][0] for i in range(len(layers))]
    head_attention = None
    if out.attention is not None:
      head_attention = jnp.broadcast_to(out.attention, (x.shape[0],) + out.attention.shape[1:])
    return self._probabilities(out), attention, head_attention

  def _run(self, fn, arrays: Sequence, batch_size: int | None = None):
    """fn(variables, *chunks) over chunks of `batch_size` rows (rounded up to a multiple of the device count) of
    `arrays`, the batch axis sharded over the devices; the last chunk is zero-padded. Returns numpy, unpadded."""
    n = len(arrays[0])
    if n == 0:
      raise ValueError("an empty batch")
    size = self.round_batch(batch_size or n)
    results = []
    for start in range(0, n, size):
      chunks = []
      for a in arrays:
        chunk = np.asarray(a[start:start + size], np.float32)
        padding = [(0, size - len(chunk))] + [(0, 0)] * (chunk.ndim - 1)
        chunks.append(jax.device_put(np.pad(chunk, padding), self._batch_sharding))
      results.append((fn(self.variables, *chunks), min(size, n - start)))
    # Converted after the loop, so that host work on the next chunk overlaps the device's work on this one.
    results = [jax.tree_util.tree_map(lambda y, k=k: np.asarray(y)[:k], out) for out, k in results]
    return jax.tree_util.tree_map(lambda *ys: np.concatenate(ys), *results)

  # --------------------------------------------------------------------------------------------------------------------
  # Clips.

  def load_clip(self, path) -> np.ndarray:
    """Decodes an audio file (any format libsndfile reads, any rate and channel count) to mono at the model's rate.

    Raises AudioError if the file is unreadable, shorter than MIN_CLIP_SECONDS, or silent.
    """
    return self.check_clip(audio.load_audio(path, self.sample_rate), path)

  def check_clip(self, waveform, path=None) -> np.ndarray:
    """`waveform` as float32 if it is one mono clip the model can tag; else AudioError (too short, silent)."""
    waveform = np.asarray(waveform, np.float32)
    if waveform.ndim != 1:
      raise ValueError(f"expected one mono waveform (samples,), got shape {waveform.shape}")
    return audio.check_clip(waveform, int(MIN_CLIP_SECONDS * self.sample_rate), path, self.sample_rate)

  def crop_offsets(self, num_samples: int, num_crops: int = audio.EVAL_CROPS) -> np.ndarray:
    """Start samples of `num_crops` evenly spaced crops, offset step (L − crop)//num_crops (SPEC §1); [0] for a
    clip no longer than one crop."""
    if num_samples <= self.crop_samples:
      return np.zeros(1, np.int64)
    return audio.eval_crop_offsets(num_samples, self.crop_samples, num_crops)

  def timeline_offsets(self, num_samples: int, hop_seconds: float | None = None) -> np.ndarray:
    """Start samples of consecutive crops `hop_seconds` apart (default: one crop length, no overlap); a last crop
    ending at the end of the clip covers any remainder."""
    hop = self.crop_samples if hop_seconds is None else int(round(hop_seconds * self.sample_rate))
    if hop <= 0:
      raise ValueError(f"hop_seconds must be positive, got {hop_seconds}")
    last = max(num_samples - self.crop_samples, 0)
    offsets = np.arange(0, last + 1, hop)
    return offsets if offsets[-1] == last else np.append(offsets, last)

  def cut_crops(self, waveform: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(len(offsets), crop_samples) crops starting at `offsets`; a clip shorter than a crop is zero-padded."""
    if len(waveform) < self.crop_samples:
      waveform = np.pad(waveform, (0, self.crop_samples - len(waveform)))
    return np.stack([waveform[o:o + self.crop_samples] for o in offsets])

  def crops(self, waveform, num_crops: int = audio.EVAL_CROPS) -> np.ndarray:
    """(n, crop_samples) evaluation crops of one mono clip at the model's rate: `num_crops` evenly spaced crops, or
    one zero-padded crop for a clip shorter than a crop. Raises AudioError for a clip too short or silent."""
    waveform = self.check_clip(waveform)
    return self.cut_crops(waveform, self.crop_offsets(len(waveform), num_crops))

  def tag_waveform(self, waveform, num_crops: int = audio.EVAL_CROPS, batch_size: int = BATCH_SIZE) -> Scores:
    """Whole-clip probabilities of one mono clip at the model's rate: the mean over its evaluation crops."""
    waveform = self.check_clip(waveform)
    offsets = self.crop_offsets(len(waveform), num_crops)
    fine, coarse = self.predict(self.cut_crops(waveform, offsets), batch_size=batch_size)
    return self._scores(fine, coarse, offsets, len(waveform), average=True)

  def timeline(self, waveform, hop_seconds: float | None = None, batch_size: int = BATCH_SIZE) -> Scores:
    """Probabilities of consecutive crops `hop_seconds` apart (default one crop length), one row a crop."""
    waveform = self.check_clip(waveform)
    offsets = self.timeline_offsets(len(waveform), hop_seconds)
    fine, coarse = self.predict(self.cut_crops(waveform, offsets), batch_size=batch_size)
    return self._scores(fine, coarse, offsets, len(waveform), average=False)

  def _scores(self, fine, coarse, offsets, num_samples, average: bool) -> Scores:
    if average:
      fine, coarse = fine.mean(axis=0), (None if coarse is None else coarse.mean(axis=0))
    return Scores(fine, coarse, offsets / self.sample_rate, self.crop_seconds, num_samples / self.sample_rate)

  # --------------------------------------------------------------------------------------------------------------------
  # Files.

  def tag_files(self, paths: Iterable, num_crops: int = audio.EVAL_CROPS, timeline: bool = False,
                hop_seconds: float | None = None, batch_size: int = BATCH_SIZE,
                decode_workers: int = DECODE_WORKERS) -> list[FileResult]:
    """Tags many files; see `iter_tag_files`. The results are in the order of `paths`."""
    results = self.iter_tag_files(paths, num_crops, timeline, hop_seconds, batch_size, decode_workers)
    return sorted(results, key=lambda result: result.index)

  def iter_tag_files(self, paths: Iterable, num_crops: int = audio.EVAL_CROPS, timeline: bool = False,
                     hop_seconds: float | None = None, batch_size: int = BATCH_SIZE,
                     decode_workers: int = DECODE_WORKERS) -> Iterator[FileResult]:
    """Yields a FileResult per file as soon as all its crops are scored (not necessarily in the order given: see
    `FileResult.index`).

    Whole-file scores average `num_crops` evenly spaced crops; with `timeline`, every crop `hop_seconds` apart is
    kept. `decode_workers` threads decode files (`audio.AudioStream`, a block at a time) and cut their crops while
    the model runs; at most QUEUED_BATCHES batches of crops wait between them, so memory stays flat whatever the
    number and length of the files. Crops of consecutive files share batches of exactly `batch_size` rows (rounded
    up to a multiple of the device count; the last batch zero-padded), so the model compiles once. A file that
    cannot be used gets its error message, and the others are still tagged.
    """
    size = self.round_batch(batch_size)
    crops = queue.Queue(maxsize=QUEUED_BATCHES * size)
    stop = threading.Event()
    jobs, jobs_lock = enumerate(paths), threading.Lock()
    planner = functools.partial(self._plan_offsets, num_crops=num_crops, timeline=timeline, hop_seconds=hop_seconds)
    workers = [threading.Thread(target=self._decode_files, args=(jobs, jobs_lock, planner, crops, stop), daemon=True)
               for _ in range(max(1, decode_workers))]
    for worker in workers:
      worker.start()
    files: dict[int, _FileInProgress] = {}
    rows: list[tuple[_Crop, np.ndarray]] = []
    running = len(workers)
    try:
      while running:
        item = crops.get()
        if item is None:
          running -= 1
        elif isinstance(item, _Plan):
          files[item.index] = _FileInProgress(item)  # a second plan (the header's length was wrong) starts afresh
        elif isinstance(item, _Crop):
          rows.append((item, item.samples))
          if len(rows) == size:
            yield from self._score_rows(rows, size, files, timeline)
            rows = []
        elif isinstance(item, _Done):
          file = files.get(item.index)
          if file is not None and file.plan.attempt == item.attempt:
            file.warnings = item.warnings
            yield from self._finish_if_scored(files, item.index, timeline)
        elif isinstance(item, _Failed):
          files.pop(item.index, None)
          yield FileResult(item.path, error=item.error, index=item.index)
        else:  # an unexpected exception in a decoding thread
          raise item
      if rows:
        yield from self._score_rows(rows, size, files, timeline)
    finally:
      stop.set()
      for worker in workers:
        worker.join()

  def _plan_offsets(self, num_samples: int, num_crops: int, timeline: bool, hop_seconds: float | None) -> np.ndarray:
    if timeline:
      return self.timeline_offsets(num_samples, hop_seconds)
    return self.crop_offsets(num_samples, num_crops)

  def _decode_files(self, jobs, jobs_lock, planner, crops: queue.Queue, stop: threading.Event):
    """A decoding thread: takes (index, path) jobs and puts their plans, crops and ends on `crops`, then None."""

    def put(item):
      while not stop.is_set():
        try:
          crops.put(item, timeout=0.1)
          return
        except queue.Full:
          pass
      raise _Stopped()

    try:
      while not stop.is_set():
        with jobs_lock:
          index, path = next(jobs, (None, None))
        if path is None:
          break
        try:
          self._decode_file(index, os.fspath(path), planner, put)
        except FlaxtagError as e:
          put(_Failed(index, os.fspath(path), str(e)))
      put(None)
    except _Stopped:
      pass
    except Exception as e:  # pylint: disable=broad-except
      try:
        put(e)  # raised by the consumer
      except _Stopped:
        pass

  def _decode_file(self, index: int, path: str, planner, put):
    """Puts a file's plan, its crops one by one, and its end; raises AudioError for a file that cannot be used."""
    min_samples = int(MIN_CLIP_SECONDS * self.sample_rate)
    num_samples = None
    for attempt in range(2):
      with audio.AudioStream(path, self.sample_rate) as stream:
        planned = stream.num_samples if num_samples is None else num_samples
        audio.check_length(planned, min_samples, path, self.sample_rate)
        offsets = planner(planned)
        put(_Plan(index, path, attempt, offsets, planned))
        counted = _Counted(stream)
        for number, crop in enumerate(self._stream_crops(counted, offsets)):
          put(_Crop(index, attempt, number, crop))
        if counted.num_samples == planned:
          audio.check_peak(counted.peak, path)
          put(_Done(index, attempt, tuple(stream.warnings)))
          return
        num_samples = counted.num_samples  # the header's length was wrong (e.g. a truncated MP3): cut them again
    raise AudioError(f"audio file {path} decodes to a different length each time it is read; it cannot be tagged.")

  def _stream_crops(self, blocks: Iterable[np.ndarray], offsets: np.ndarray) -> Iterator[np.ndarray]:
    """`cut_crops` of a waveform given as consecutive blocks, holding at most a crop and a block of it."""
    crop = self.crop_samples
    held, held_start = np.zeros(0, np.float32), 0  # samples [held_start, held_start + len(held)) of the waveform
    i = 0
    for block in blocks:
      held = np.concatenate([held, block])
      while i < len(offsets) and offsets[i] + crop <= held_start + len(held):
        yield held[offsets[i] - held_start:offsets[i] - held_start + crop].copy()
        i += 1
      keep = (offsets[i] if i < len(offsets) else held_start + len(held)) - held_start
      held, held_start = held[max(keep, 0):], held_start + max(keep, 0)
    for offset in offsets[i:]:  # crops running past the end: zero-padded
      piece = held[max(offset - held_start, 0):max(offset - held_start + crop, 0)]
      yield np.pad(piece, (0, crop - len(piece)))

  def _score_rows(self, rows, size: int, files: dict, timeline: bool) -> Iterator[FileResult]:
    """Runs one batch of crops and files the probabilities; yields the files that are then complete."""
    probs = self._run(self._probs_fn, [np.stack([samples for _, samples in rows])], size)
    touched = set()
    for (crop, _), p in zip(rows, probs):
      file = files.get(crop.index)
      if file is not None and file.plan.attempt == crop.attempt:
        file.record(crop.number, p)
        touched.add(crop.index)
    for index in sorted(touched):
      yield from self._finish_if_scored(files, index, timeline)

  def _finish_if_scored(self, files: dict, index: int, timeline: bool) -> Iterator[FileResult]:
    file = files[index]
    if file.warnings is None or file.num_scored < len(file.plan.offsets):
      return
    del files[index]
    plan = file.plan
    if not np.isfinite(file.probs).all():
      yield FileResult(plan.path, error=f"the model's outputs for {plan.path} are not finite (NaN or infinity); "
                       "check the checkpoint.", warnings=file.warnings, index=index)
      return
    fine = file.probs[:, :self.model.num_tags]
    coarse = file.probs[:, self.model.num_tags:] if self.hierarchy else None
    scores = self._scores(fine, coarse, plan.offsets, plan.num_samples, average=not timeline)
    yield FileResult(plan.path, scores, warnings=file.warnings, index=index)


class _Stopped(Exception):
  """The consumer of a decoding thread's crops is gone."""


class _Plan(NamedTuple):
  """The crops a file will be cut into (sent again, with attempt 1, if its header announced a wrong length)."""
  index: int
  path: str
  attempt: int
  offsets: np.ndarray
  num_samples: int


class _Crop(NamedTuple):
  index: int
  attempt: int
  number: int
  samples: np.ndarray


class _Done(NamedTuple):
  """All crops of the file's attempt are sent."""
  index: int
  attempt: int
  warnings: tuple[str, ...]


class _Failed(NamedTuple):
  index: int
  path: str
  error: str


class _FileInProgress:
  """A file some of whose crops are scored."""

  def __init__(self, plan: _Plan):
    self.plan = plan
    self.probs = None
    self.num_scored = 0
    self.warnings: tuple[str, ...] | None = None  # set once all its crops are sent

  def record(self, number: int, probs: np.ndarray):
    if self.probs is None:
      self.probs = np.zeros((len(self.plan.offsets), len(probs)), np.float32)
    self.probs[number] = probs
    self.num_scored += 1


class _Counted:
  """Blocks of a waveform passed through, counting its samples and its largest |sample|."""

  def __init__(self, blocks: Iterable[np.ndarray]):
    self.blocks = blocks
    self.num_samples = 0
    self.peak = 0.0

  def __iter__(self):
    for block in self.blocks:
      self.num_samples += len(block)
      self.peak = max(self.peak, float(np.max(np.abs(block))))
      yield block

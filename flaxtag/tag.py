"""Tag audio files, or a whole library, with a trained model.

  python -m flaxtag.tag DIR_OR_FILE... --workdir W [--output tags.jsonl] [--checkpoint best|latest|STEP]
      [--top_k 10] [--format table|json|csv] [--timeline [--hop_seconds S]] [--num_crops 16] [--batch_size 16]

Directories are walked recursively for audio files (AUDIO_EXTENSIONS); files named on the command line are tagged
whatever their extension. Files of any length, sample rate, channel count and common format (wav, flac, ogg, mp3)
are decoded a block at a time, downmixed and resampled to the model's rate, in threads that run while the model
scores the crops already cut, so memory stays flat whatever the number and length of the files. Whole-file scores
are the sigmoid outputs of 16 evenly spaced crops, averaged (SPEC §1); a file shorter than one crop is zero-padded
to one. `--timeline` scores consecutive crops instead (`--hop_seconds` apart, default one crop length), each with
its start and end time.

`--output FILE`: one JSON object per line, appended to FILE as each file is done (`{"file", "tags", ...}`, or
`{"file", "error"}`); running the same command again skips the files FILE already holds, so an interrupted run
resumes. A progress bar on stderr shows files/s. Without it, results go to stdout: `table` (default) lists the top-k
tags of each file; `json` (one list, a file an element) and `csv` (a row per file, or per crop) give every tag.

A file that cannot be tagged (unreadable, too short, silent, NaN or infinite samples) is reported on stderr with
the reason, and as {"file", "error"} in JSON, and the others are still tagged; the exit status is then 1. A clipped
file or one with a DC offset is tagged with a warning (and "warnings" in JSON).

From Python, `tag_files(tagger, paths)` or `iter_tag_files` (the first section of this module: the decoding threads
and the batches of crops shared across files) give a `FileResult` per file; the second section is the command line's
walking of directories and its output formats.
"""
import csv
import dataclasses
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from absl import app
from absl import flags
import numpy as np
from tqdm import tqdm

from flaxtag import audio, cli, crops, sharding
from flaxtag.errors import AudioError, FlaxtagError
from flaxtag.inference import BATCH_SIZE, Scores, Tagger

FORMATS = ("table", "json", "csv")
# Walked directories yield files with these extensions (libsndfile's formats, case ignored).
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd",
                    ".caf", ".w64", ".rf64")
# Threads decoding files while the model runs: decoding a 30-s MP3 takes a few per cent of the time the model takes to
# score its crops, so two keep the model fed whatever the mix of files.
DECODE_WORKERS = 2
# Batches of crops that may wait between the decoding threads and the model: the memory bound of `iter_tag_files`.
QUEUED_BATCHES = 2


# ----------------------------------------------------------------------------------------------------------------------
# Many files: decoded in threads while the model scores the crops already cut, crops of consecutive files sharing
# batches.


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


def tag_files(tagger: Tagger, paths: Iterable, num_crops: int = crops.EVAL_CROPS, timeline: bool = False,
              hop_seconds: float | None = None, batch_size: int = BATCH_SIZE,
              decode_workers: int = DECODE_WORKERS) -> list[FileResult]:
  """Tags many files; see `iter_tag_files`. The results are in the order of `paths`."""
  results = iter_tag_files(tagger, paths, num_crops, timeline, hop_seconds, batch_size, decode_workers)
  return sorted(results, key=lambda result: result.index)


def iter_tag_files(tagger: Tagger, paths: Iterable, num_crops: int = crops.EVAL_CROPS, timeline: bool = False,
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
  size = tagger.round_batch(batch_size)
  pending = queue.Queue(maxsize=QUEUED_BATCHES * size)
  stop = threading.Event()
  jobs, jobs_lock = enumerate(paths), threading.Lock()

  def plan(num_samples: int) -> np.ndarray:
    if timeline:
      return crops.timeline_offsets(num_samples, tagger.crop_samples, hop_seconds, tagger.sample_rate)
    return crops.whole_clip_offsets(num_samples, tagger.crop_samples, num_crops)

  workers = [threading.Thread(target=_decode_files, args=(tagger, jobs, jobs_lock, plan, pending, stop), daemon=True)
             for _ in range(max(1, decode_workers))]
  for worker in workers:
    worker.start()
  files: dict[int, _FileInProgress] = {}
  rows: list[_Crop] = []
  running = len(workers)
  try:
    while running:
      item = pending.get()
      if item is None:
        running -= 1
      elif isinstance(item, _Plan):
        files[item.index] = _FileInProgress(item)  # a second plan (the header's length was wrong) starts afresh
      elif isinstance(item, _Crop):
        rows.append(item)
        if len(rows) == size:
          yield from _score_rows(tagger, rows, size, files, timeline)
          rows = []
      elif isinstance(item, _Done):
        file = files.get(item.index)
        if file is not None and file.plan.attempt == item.attempt:
          file.warnings = item.warnings
          yield from _finish_if_scored(tagger, files, item.index, timeline)
      elif isinstance(item, _Failed):
        files.pop(item.index, None)
        yield FileResult(item.path, error=item.error, index=item.index)
      else:  # an unexpected exception in a decoding thread
        raise item
    if rows:
      yield from _score_rows(tagger, rows, size, files, timeline)
  finally:
    stop.set()
    for worker in workers:
      worker.join()


def _decode_files(tagger: Tagger, jobs, jobs_lock, plan, pending: queue.Queue, stop: threading.Event):
  """A decoding thread: takes (index, path) jobs and puts their plans, crops and ends on `pending`, then None."""

  def put(item):
    while not stop.is_set():
      try:
        pending.put(item, timeout=0.1)
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
        _decode_file(tagger, index, os.fspath(path), plan, put)
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


def _decode_file(tagger: Tagger, index: int, path: str, plan, put):
  """Puts a file's plan, its crops one by one, and its end; raises AudioError for a file that cannot be used."""
  num_samples = None
  for attempt in range(2):
    with audio.AudioStream(path, tagger.sample_rate) as stream:
      planned = stream.num_samples if num_samples is None else num_samples
      audio.check_length(planned, tagger.min_clip_samples, path, tagger.sample_rate)
      offsets = plan(planned)
      put(_Plan(index, path, attempt, offsets, planned))
      counted = _Counted(stream)
      for number, crop in enumerate(crops.cut_blocks(counted, offsets, tagger.crop_samples)):
        put(_Crop(index, attempt, number, crop))
      if counted.num_samples == planned:
        audio.check_peak(counted.peak, path)
        put(_Done(index, attempt, tuple(stream.warnings)))
        return
      num_samples = counted.num_samples  # the header's length was wrong (e.g. a truncated MP3): cut them again
  raise AudioError(f"audio file {path} decodes to a different length each time it is read; it cannot be tagged.")


def _score_rows(tagger: Tagger, rows: list["_Crop"], size: int, files: dict, timeline: bool) -> Iterator[FileResult]:
  """Runs one batch of crops and files the probabilities; yields the files that are then complete."""
  fine, coarse = tagger.predict(np.stack([crop.samples for crop in rows]), batch_size=size)
  touched = set()
  for row, crop in enumerate(rows):
    file = files.get(crop.index)
    if file is not None and file.plan.attempt == crop.attempt:
      file.record(crop.number, fine[row], None if coarse is None else coarse[row])
      touched.add(crop.index)
  for index in sorted(touched):
    yield from _finish_if_scored(tagger, files, index, timeline)


def _finish_if_scored(tagger: Tagger, files: dict, index: int, timeline: bool) -> Iterator[FileResult]:
  file = files[index]
  if file.warnings is None or file.num_scored < len(file.plan.offsets):
    return
  del files[index]
  plan = file.plan
  if not all(np.isfinite(probs).all() for probs in (file.fine, file.coarse) if probs is not None):
    yield FileResult(plan.path, error=f"the model's outputs for {plan.path} are not finite (NaN or infinity); "
                     "check the checkpoint.", warnings=file.warnings, index=index)
    return
  scores = tagger.scores(file.fine, file.coarse, plan.offsets, plan.num_samples, average=not timeline)
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
    self.fine = None
    self.coarse = None
    self.num_scored = 0
    self.warnings: tuple[str, ...] | None = None  # set once all its crops are sent

  def record(self, number: int, fine: np.ndarray, coarse: np.ndarray | None):
    if self.fine is None:
      self.fine = np.zeros((len(self.plan.offsets), len(fine)), np.float32)
      self.coarse = None if coarse is None else np.zeros((len(self.plan.offsets), len(coarse)), np.float32)
    self.fine[number] = fine
    if coarse is not None:
      self.coarse[number] = coarse
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


# ----------------------------------------------------------------------------------------------------------------------
# The command line: which files, and their results as a table, JSON or CSV.


def audio_files(paths: Iterable[str]) -> list[str]:
  """`paths` with every directory replaced by the audio files under it (recursively, sorted); files as given."""
  found = []
  for path in paths:
    if not os.path.isdir(path):
      found.append(path)
      continue
    for folder, subfolders, names in os.walk(path):
      subfolders.sort()
      found += [os.path.join(folder, name) for name in sorted(names) if name.lower().endswith(AUDIO_EXTENSIONS)]
  return found


RESULT_LINE_START = '{"file": '  # how every line `to_json` gives starts, also one cut short


def done_files(output_path: str) -> set[str]:
  """Files already in a JSON-lines output (tagged or failed); a line cut short by an interrupted run is ignored.

  Raises FlaxtagError where the file is not such an output (an audio file or a document named by mistake), so
  that it is never appended to."""
  done = set()
  if not os.path.exists(output_path):
    return done
  refuse = (f"--output {output_path} is not a JSON-lines file of flaxtag.tag ({{}}); give a new file name, or the "
            "file an earlier run wrote, to resume it.")
  try:
    with open(output_path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        try:
          done.add(json.loads(line)["file"])
        except (ValueError, KeyError, TypeError):
          if line.strip() and not line.startswith(RESULT_LINE_START):
            raise FlaxtagError(refuse.format(f"line {number} is not a result")) from None
  except UnicodeDecodeError:
    raise FlaxtagError(refuse.format("it is not text")) from None
  return done


def _named(names, probs) -> dict[str, float]:
  return {name: round(float(p), 6) for name, p in zip(names, probs)}


def to_json(result: FileResult, tagger: Tagger, timeline: bool) -> dict:
  """One file as a JSON-able dict with every tag (and every coarse tag of a hierarchical model)."""
  if result.error:
    return {"file": result.path, "error": result.error}
  s = result.scores
  entry = {"file": result.path, "duration_seconds": round(s.duration, 3), "crop_seconds": round(s.crop_seconds, 3)}
  if result.warnings:
    entry["warnings"] = list(result.warnings)

  def scored(fine, coarse):
    out = {"tags": _named(tagger.tag_names, fine)}
    if coarse is not None:
      out["coarse_tags"] = _named(tagger.coarse_tag_names, coarse)
    return out

  if not timeline:
    return {**entry, "num_crops": len(s.starts), **scored(s.fine, s.coarse)}
  entry["timeline"] = [
      {"start_seconds": round(float(start), 3), "end_seconds": round(float(end), 3),
       **scored(s.fine[i], None if s.coarse is None else s.coarse[i])}
      for i, (start, end) in enumerate(zip(s.starts, s.ends))]
  return entry


def csv_header(tagger: Tagger, timeline: bool) -> list[str]:
  """Columns: file, duration (or a crop's start and end), every tag, then `coarse:<name>` for coarse tags."""
  times = ["start_seconds", "end_seconds"] if timeline else ["duration_seconds"]
  coarse = [f"coarse:{name}" for name in tagger.coarse_tag_names or []]
  return ["file", *times, *tagger.tag_names, *coarse]


def csv_rows(result: FileResult, timeline: bool) -> list[list]:
  """Rows of one scored file (none for a file that failed): one row, or one a crop with `timeline`."""
  s = result.scores
  if s is None:
    return []
  fine = s.fine if timeline else s.fine[None]
  coarse = None if s.coarse is None else (s.coarse if timeline else s.coarse[None])
  times = [[f"{a:.3f}", f"{b:.3f}"] for a, b in zip(s.starts, s.ends)] if timeline else [[f"{s.duration:.3f}"]]
  return [[result.path, *times[i], *(f"{p:.6f}" for p in fine[i]),
           *(() if coarse is None else (f"{p:.6f}" for p in coarse[i]))] for i in range(len(fine))]


def _top(names, probs, k) -> list[tuple[str, float]]:
  order = sorted(range(len(names)), key=lambda i: -probs[i])[:k]
  return [(names[i], float(probs[i])) for i in order]


def format_table(result: FileResult, tagger: Tagger, top_k: int, timeline: bool) -> str:
  """A readable block for one scored file: its top-k tags, then its top-k [coarse] tags for a hierarchical model;
  with `timeline`, a line per crop."""
  s = result.scores
  if not timeline:
    lines = [f"{result.path}  ({s.duration:.1f} s, mean of {len(s.starts)} crop{'s' * (len(s.starts) > 1)})"]
    rows = _top(tagger.tag_names, s.fine, top_k)
    if s.coarse is not None:
      rows += [(f"[{name}]", p) for name, p in _top(tagger.coarse_tag_names, s.coarse, top_k)]
    width = max(len(name) for name, _ in rows)
    lines += [f"  {name:<{width}}  {p:.3f}" for name, p in rows]
    return "\n".join(lines) + "\n"
  lines = [f"{result.path}  ({s.duration:.1f} s, {len(s.starts)} crops of {s.crop_seconds:.2f} s)",
           f"  {'start':>7} {'end':>7}  top {top_k} tags"]
  for i, (start, end) in enumerate(zip(s.starts, s.ends)):
    tags = ", ".join(f"{name} {p:.2f}" for name, p in _top(tagger.tag_names, s.fine[i], top_k))
    if s.coarse is not None:
      tags += "  | " + ", ".join(f"{name} {p:.2f}" for name, p in _top(tagger.coarse_tag_names, s.coarse[i], top_k))
    lines.append(f"  {start:7.2f} {end:7.2f}  {tags}")
  return "\n".join(lines) + "\n"


def _dumps(value, indent: int | None = None) -> str:
  # allow_nan=False: NaN and infinity are not JSON; scores are checked finite, so this raises only on a bug.
  return json.dumps(value, indent=indent, ensure_ascii=False, allow_nan=False)


def tag_paths(tagger: Tagger, paths: Sequence[str], output_format: str = "table", top_k: int = 10,
              timeline: bool = False, hop_seconds: float | None = None, num_crops: int = crops.EVAL_CROPS,
              batch_size: int = BATCH_SIZE, output: str | None = None, out=None, err=None) -> int:
  """Tags `paths` (files, and directories walked for audio files) and writes the results to `output` (JSON lines,
  appended; files it already holds are skipped) or else to `out` (stdout) in `output_format`; errors, warnings and
  the progress bar go to `err` (stderr).

  Returns the exit status: 1 if any file could not be tagged or no audio file was found, else 0.
  """
  out = out or sys.stdout
  err = err or sys.stderr
  if output_format not in FORMATS:
    raise ValueError(f"unknown output format {output_format!r}; use one of {FORMATS}")
  files = []
  for path in paths:
    found = audio_files([path])
    if not found:
      print(f"warning: no audio files under {path} (looked for {', '.join(AUDIO_EXTENSIONS)})", file=err)
    files += found
  skipped = 0
  if output:
    cli.make_output_folder(output)
    done = done_files(output)
    todo = [f for f in files if f not in done]
    skipped = len(files) - len(todo)
    files = todo
  writer = csv.writer(out, lineterminator="\n") if output_format == "csv" and not output else None
  if writer:
    writer.writerow(csv_header(tagger, timeline))
  lines = open(output, "a", encoding="utf-8") if output else None
  if lines and lines.tell() and not _ends_with_newline(output):
    lines.write("\n")  # after a line cut short by an interrupted run
  by_index, next_index, entries = {}, 0, []
  failed = 0
  started = time.perf_counter()
  progress = tqdm(total=len(files), unit="file", file=err, dynamic_ncols=True, disable=len(files) < 2)
  try:
    results = iter_tag_files(tagger, files, num_crops=num_crops, timeline=timeline, hop_seconds=hop_seconds,
                             batch_size=batch_size)
    for result in results:
      progress.update()
      if result.error:
        failed += 1
        # Decoding errors name the file already.
        reason = result.error if result.path in result.error else f"{result.path}: {result.error}"
        progress.write(f"error: {reason}", file=err)
      for warning in result.warnings:
        progress.write(f"warning: {warning}", file=err)
      if lines:
        lines.write(_dumps(to_json(result, tagger, timeline)) + "\n")
        lines.flush()
        continue
      # stdout keeps the order of the files given: results wait for those before them (scores only, small).
      by_index[result.index] = result
      while next_index in by_index:
        ready = by_index.pop(next_index)
        next_index += 1
        if output_format == "json":
          entries.append(to_json(ready, tagger, timeline))
        elif writer:
          writer.writerows(csv_rows(ready, timeline))
        elif ready.scores is not None:
          print(format_table(ready, tagger, top_k, timeline), file=out, flush=True)
  finally:
    progress.close()
    if lines:
      lines.close()
  if output_format == "json" and not output:
    out.write(_dumps(entries, indent=2) + "\n")
  seconds = time.perf_counter() - started
  summary = f"{len(files) - failed} of {len(files)} file{'s' * (len(files) != 1)} tagged in {seconds:.1f} s"
  if len(files) > 1:
    summary += f" ({len(files) / seconds:.2f} files/s)"
  if skipped:
    summary += f"; {skipped} skipped, already in {output}"
  if failed:
    summary += f"; {failed} could not be tagged"
  print(summary + ".", file=err)
  nothing_found = not files and not skipped
  return 1 if failed or nothing_found else 0


def _ends_with_newline(path: str) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def define_flags():
  """The command line's flags, defined only when run as a program: other modules define flags of the same names."""
  flags.DEFINE_string("workdir", None, "Run directory holding the checkpoints.", required=True)
  flags.DEFINE_string("checkpoint", "best", "'best' (by validation ROC-AUC), 'latest', or a step number.")
  flags.DEFINE_integer("top_k", 10, "Tags shown per file (or crop) in the table.", lower_bound=1)
  flags.DEFINE_enum("format", "table", FORMATS, "table: top-k tags, readable; json/csv: every tag.")
  flags.DEFINE_boolean("timeline", False, "Score consecutive crops over time instead of the whole file.")
  flags.DEFINE_float("hop_seconds", None, "With --timeline: seconds between crop starts (default: one crop).",
                     lower_bound=0.01)
  flags.DEFINE_integer("num_crops", crops.EVAL_CROPS, "Crops averaged for whole-file scores.", lower_bound=1)
  flags.DEFINE_integer("batch_size", BATCH_SIZE, "Crops per device batch (rounded up to a multiple of the device "
                       "count).", lower_bound=1)
  flags.DEFINE_string("output", None, "Append one JSON line per file here, skipping files it already holds "
                      "(resumable); default: results on stdout in --format.")


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("usage: python -m flaxtag.tag DIR_OR_FILE... --workdir W [--output tags.jsonl] "
                         "[--format table|json|csv] [--timeline]")
  f = flags.FLAGS
  # One device per core: XLA:CPU runs many of one device's ops on one thread (1.5x the crops/s on 2 cores).
  sharding.split_cpu()
  tagger = Tagger.load(f.workdir, f.checkpoint)
  return tag_paths(tagger, argv[1:], f.format, f.top_k, f.timeline, f.hop_seconds, f.num_crops, f.batch_size,
                   f.output)


if __name__ == "__main__":
  define_flags()
  cli.run(main)

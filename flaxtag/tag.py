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
"""
import csv
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence

from absl import app
from absl import flags
from tqdm import tqdm

from flaxtag import audio, cli, inference
from flaxtag.inference import BATCH_SIZE, FileResult, Tagger

FORMATS = ("table", "json", "csv")
# Walked directories yield files with these extensions (libsndfile's formats, case ignored).
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd",
                    ".caf", ".w64", ".rf64")


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


def done_files(output_path: str) -> set[str]:
  """Files already in a JSON-lines output (tagged or failed); a line cut short by an interrupted run is ignored."""
  done = set()
  if not os.path.exists(output_path):
    return done
  with open(output_path, encoding="utf-8") as f:
    for line in f:
      try:
        done.add(json.loads(line)["file"])
      except (ValueError, KeyError, TypeError):
        continue
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
              timeline: bool = False, hop_seconds: float | None = None, num_crops: int = audio.EVAL_CROPS,
              batch_size: int = BATCH_SIZE, output: str | None = None, out=None, err=None) -> int:
  """Tags `paths` (files, and directories walked for audio files) and writes the results to `output` (JSON lines,
  appended; files it already holds are skipped) or else to `out` (stdout) in `output_format`; errors, warnings and
  the progress bar go to `err` (stderr).

  Returns the exit status: 1 if any file could not be tagged, else 0.
  """
  out = out or sys.stdout
  err = err or sys.stderr
  if output_format not in FORMATS:
    raise ValueError(f"unknown output format {output_format!r}; use one of {FORMATS}")
  files = audio_files(paths)
  skipped = 0
  if output:
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
    results = tagger.iter_tag_files(files, num_crops=num_crops, timeline=timeline, hop_seconds=hop_seconds,
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
  return 1 if failed else 0


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
  flags.DEFINE_integer("num_crops", audio.EVAL_CROPS, "Crops averaged for whole-file scores.", lower_bound=1)
  flags.DEFINE_integer("batch_size", BATCH_SIZE, "Crops per device batch (rounded up to a multiple of the device "
                       "count).", lower_bound=1)
  flags.DEFINE_string("output", None, "Append one JSON line per file here, skipping files it already holds "
                      "(resumable); default: results on stdout in --format.")


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("usage: python -m flaxtag.tag DIR_OR_FILE... --workdir W [--output tags.jsonl] "
                         "[--format table|json|csv] [--timeline]")
  f = flags.FLAGS
  inference.use_every_cpu_core()
  tagger = Tagger.load(f.workdir, f.checkpoint)
  return tag_paths(tagger, argv[1:], f.format, f.top_k, f.timeline, f.hop_seconds, f.num_crops, f.batch_size,
                   f.output)


if __name__ == "__main__":
  define_flags()
  cli.run(main)

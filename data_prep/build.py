r"""Builds a flaxtag dataset: python -m data_prep.build NAME[/CONFIG] --data_dir D [--manual_dir M] [options].

  python -m data_prep.build mtat --manual_dir ~/raw/mtat --data_dir ~/data           # mtat/top50_clean
  python -m data_prep.build mtat/top50_full --manual_dir ~/raw/mtat --data_dir ~/data
  python -m data_prep.build msd --manual_dir ~/raw/msd --data_dir ~/data --beam --num_workers 8
  python -m data_prep.build synth_instruments --data_dir ~/data [--num_train 2000 --soundfont a.sf2,b.sf2]
  python -m data_prep.build mtg_jamendo/genre --manual_dir ~/raw/jamendo --data_dir ~/data [--split 2 --max_seconds 30]
  python -m data_prep.build folder/my_songs --manual_dir ~/my_songs --data_dir ~/data [--labels tags.csv]

Shows a progress bar per split and ends with a summary (examples per split, skipped files, time, clips/s). A
complete dataset is reused unless --overwrite; an interrupted one is rebuilt.
"""
import importlib
import os
from typing import Any, Optional, Sequence

import tensorflow_datasets as tfds
from absl import flags

from data_prep import common
from flaxtag import cli
from flaxtag.errors import ConfigError

BUILDERS = {
    "mtat": "data_prep.mtat.mtat:Mtat",
    "msd": "data_prep.msd.msd:Msd",
    "synth_instruments": "data_prep.synth_instruments.synth_instruments:SynthInstruments",
    "mtg_jamendo": "data_prep.mtg_jamendo.mtg_jamendo:MtgJamendo",
    "folder": "data_prep.folder.folder:Folder",
}
# Options a builder may take (each lists its own in BUILD_ARGS), with their help text.
BUILDER_ARGS = {
    "num_train": "train clips (synthetic sets) / ids of the train list that are train (msd; default 201680)",
    "num_valid": "valid clips (synthetic sets) / ids after num_train that are valid (msd; default: the rest)",
    "num_test": "test clips (synthetic sets) / first ids of the test list (msd; default: all)",
    "seed": "seed of a synthetic set",
    "clip_seconds": "clip length of a synthetic set, in seconds",
    "split": "mtg_jamendo: which of the dataset's five official splits, 0-4 (default 0)",
    "max_tracks": "mtg_jamendo: build only N tracks in all, always the same N (those with the smallest sha256 of "
                  "TRACK_ID), each in its official split (default: all)",
    "max_seconds": "mtg_jamendo, folder: keep the middle S seconds of each track (default: the whole track)",
    "labels": "folder: the CSV/TSV labels file (default: the labels.csv or labels.tsv in --manual_dir)",
    "tag_separator": "folder: what separates the tags in a 'tags' column (default ';')",
    "valid_fraction": "folder, without a 'split' column: share of rows drawn for valid (default 0.1)",
    "test_fraction": "folder, without a 'split' column: share of rows drawn for test (default 0.1)",
    "split_seed": "folder, without a 'split' column: seed of the random split (default 0)",
    "soundfont": "SoundFont(s) (.sf2) for synth_instruments, comma-separated: each part of a clip is rendered with one "
                 "drawn from them (default: pretty_midi's TimGM6mb.sf2)",
    "augment": "synth_instruments: detune, equalise and level each part, add a room and noise (default: true)",
}


def builder_class(name: str):
  dataset = name.split("/")[0]
  if dataset not in BUILDERS:
    raise ConfigError(f"unknown dataset {dataset!r}; choose one of {', '.join(BUILDERS)}")
  module, cls = BUILDERS[dataset].split(":")
  return getattr(importlib.import_module(module), cls)


def build(name: str, data_dir, manual_dir=None, *, overwrite: bool = False, beam: bool = False,
          beam_options: Optional[Sequence[str]] = None, num_workers: int = 1, verbose: bool = False,
          **builder_args: Any) -> dict[str, Any]:
  """Builds NAME[/CONFIG] into data_dir and returns the build summary (see data_prep.common)."""
  cls = builder_class(name)
  config = name.split("/", 1)[1] if "/" in name else None
  builder_args = {k: v for k, v in builder_args.items() if v is not None}
  unknown = sorted(set(builder_args) - set(getattr(cls, "BUILD_ARGS", ())))
  if unknown:
    raise ConfigError(f"{', '.join('--' + u for u in unknown)} does not apply to {name.split('/')[0]}")
  if config is not None and cls.get_builder_config(config) is None:
    raise ConfigError(f"{cls.name} has no config {config!r}; choose one of "
                      f"{', '.join(c.name for c in cls.BUILDER_CONFIGS) or '(none)'}")
  if not verbose:
    tfds.disable_progress_bar()  # our per-clip bars replace tfds's per-split ones
  builder = cls(data_dir=os.fspath(data_dir), config=config, manual_dir=manual_dir, num_workers=num_workers, beam=beam,
                **builder_args)
  return builder.prepare(manual_dir=manual_dir, overwrite=overwrite, beam_options=beam_options)


def define_flags() -> None:
  """The command's flags; defined only when run as a program, so importing `build` registers nothing."""
  flags.DEFINE_string("data_dir", None, "where datasets are written (and read by training)")
  flags.DEFINE_string("manual_dir", None, "the raw files (see data_prep/<NAME>/README.md)")
  flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                       "decoding processes (default: all cores); with --beam, DirectRunner workers")
  flags.DEFINE_bool("beam", False, "build with Apache Beam (DirectRunner unless --beam_options names another runner)")
  flags.DEFINE_string("beam_options", "",
                      "Beam pipeline options, space-separated, e.g. '--runner=DataflowRunner --project=...'")
  flags.DEFINE_bool("overwrite", False, "rebuild even if a complete dataset is there")
  flags.DEFINE_bool("tfds_progress", False, "show tfds's own progress bars too")
  flags.DEFINE_integer("num_train", None, BUILDER_ARGS["num_train"])
  flags.DEFINE_integer("num_valid", None, BUILDER_ARGS["num_valid"])
  flags.DEFINE_integer("num_test", None, BUILDER_ARGS["num_test"])
  flags.DEFINE_integer("seed", None, BUILDER_ARGS["seed"])
  flags.DEFINE_float("clip_seconds", None, BUILDER_ARGS["clip_seconds"])
  flags.DEFINE_string("soundfont", None, BUILDER_ARGS["soundfont"])
  flags.DEFINE_integer("split", None, BUILDER_ARGS["split"])
  flags.DEFINE_integer("max_tracks", None, BUILDER_ARGS["max_tracks"])
  flags.DEFINE_float("max_seconds", None, BUILDER_ARGS["max_seconds"])
  flags.DEFINE_string("labels", None, BUILDER_ARGS["labels"])
  flags.DEFINE_string("tag_separator", None, BUILDER_ARGS["tag_separator"])
  flags.DEFINE_float("valid_fraction", None, BUILDER_ARGS["valid_fraction"])
  flags.DEFINE_float("test_fraction", None, BUILDER_ARGS["test_fraction"])
  flags.DEFINE_integer("split_seed", None, BUILDER_ARGS["split_seed"])
  flags.DEFINE_bool("augment", None, BUILDER_ARGS["augment"])


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise ConfigError(f"usage: python -m data_prep.build NAME[/CONFIG] --data_dir D [--manual_dir M]; NAME is one "
                      f"of {', '.join(BUILDERS)}")
  if not flags.FLAGS.data_dir:
    raise ConfigError("--data_dir is required")
  beam_options = flags.FLAGS.beam_options.split()
  if flags.FLAGS.beam and not any(o.startswith("--runner") for o in beam_options):
    # Threads, not processes: decoding releases the GIL, and the records are then written by this process.
    beam_options = ["--runner=DirectRunner", "--direct_running_mode=multi_threading",
                    f"--direct_num_workers={flags.FLAGS.num_workers}", *beam_options]
  summary = build(argv[1], flags.FLAGS.data_dir, flags.FLAGS.manual_dir, overwrite=flags.FLAGS.overwrite, beam=flags.FLAGS.beam,
                  beam_options=beam_options, num_workers=flags.FLAGS.num_workers, verbose=flags.FLAGS.tfds_progress,
                  **{k: getattr(flags.FLAGS, k) for k in BUILDER_ARGS})
  if summary.get("reused"):
    print(f"{summary['name']} is already built in {summary['path']} (use --overwrite to rebuild)")
  print(common.format_summary(summary))


if __name__ == "__main__":
  define_flags()
  cli.run(main)

"""`make demo`: the whole workflow on the synthetic multi-instrument set, on whatever devices this machine has.

Builds the dataset (TimGM6mb and csound's General-MIDI bank, augmented), trains Spec+Att with the GMP hierarchical
head, evaluates the best checkpoint on the test split, then on the same test pieces rendered with a SoundFont it
never heard (FluidR3_GM, held out: never trained on, no setting chosen on it), tags a newly rendered clip, and draws
the attention heat maps, printing where each result is. Every step reuses what a previous run left in demo_out/ (a
complete dataset, a finished or interrupted training run).

  python -m flaxtag.demo [--out demo_out] [--num_train 1500 ...] [--config.train.num_epochs=...]
"""
import json
import os
from typing import Optional

from absl import flags
import jax
from ml_collections import config_flags
import soundfile

from data_prep import build
from data_prep.synth_instruments import render
from flaxtag import audio, cli, explain, sharding, tag, train
from flaxtag import eval as evaluation
from flaxtag.inference import Tagger

DEMO_SEED = 2023  # a seed the dataset does not use: the tagged clip is new to the model
# Training may use these two only (Debian packages timgm6mb-soundfont, here pretty_midi's copy, and csound-soundfont).
CSOUND_BANK = "sf_GMbank.sf2"
# For measuring only (fluid-soundfont-gm): never train on it or choose a setting on it. Neither on MuseScore's.
HELD_OUT_SOUNDFONT = "FluidR3_GM.sf2"


def step(title: str):
  print(f"\n== {title}", flush=True)


def training_soundfonts() -> list[str]:
  """TimGM6mb, and csound's General-MIDI bank when it is installed (with a note when it is not)."""
  csound = render.find_soundfont(CSOUND_BANK)
  if csound is None:
    print(f"note: {CSOUND_BANK} (apt-get install csound-soundfont) is not installed; the dataset is rendered with "
          f"TimGM6mb alone, so the model learns one SoundFont's samples")
    return [render.default_soundfont()]
  return [render.default_soundfont(), csound]


def _save(result: dict, path: str) -> None:
  with open(path, "w") as f:
    json.dump(result, f, indent=1, default=float)
  print(f"report: {path}")


def build_synth(data_dir: str, options: dict) -> dict:
  """Builds synth_instruments with `options` into `data_dir` on every core (a complete build with the same options is
  reused), says which, and returns the build summary."""
  summary = build.build("synth_instruments", data_dir, num_workers=os.cpu_count() or 1, **options)
  print(("reused " if summary.get("reused") else "built ") + summary["path"], flush=True)
  return summary


def build_held_out(data_dir: str, options: dict) -> Optional[str]:
  """Renders the test pieces of the dataset built with `options` (synth_instruments' build options) with the held-out
  SoundFont into `data_dir`; returns it, or None (with a note) where that SoundFont is not installed.

  The held-out build has the same options but for the SoundFont list, so its test split has the same notes,
  instruments, labels and augmentations (each drawn from a stream of its own, see render.py): only the SoundFont
  differs. Its train and valid splits are one clip each, never used.
  """
  soundfont = render.find_soundfont(HELD_OUT_SOUNDFONT)
  if soundfont is None:
    print(f"note: skipped: {HELD_OUT_SOUNDFONT} (apt-get install fluid-soundfont-gm) is not installed")
    return None
  build_synth(data_dir, {**options, "num_train": 1, "num_valid": 1, "soundfont": [soundfont]})
  return data_dir


def evaluate_held_out(workdir: str, out: str, options: dict) -> Optional[dict]:
  """The best checkpoint on the test pieces of the dataset built with `options`, rendered with the held-out
  SoundFont (`build_held_out`); None without it."""
  data_dir = build_held_out(os.path.join(out, "data_heldout"), options)
  if data_dir is None:
    return None
  result, _, _ = evaluation.evaluate_checkpoint(workdir, "best", "test", data_dir=data_dir)
  print(evaluation.format_report(result, per_tag=False))
  _save(result, os.path.join(out, "test_report_heldout.json"))
  return result


def compare(in_domain: dict, held_out: dict) -> str:
  """A table of macro scores: the test split as trained (in-domain) and with the held-out SoundFont."""
  lines = [f"{'test pieces rendered with':<36}{'fine ROC-AUC':>13}{'PR-AUC':>8}{'coarse ROC-AUC':>16}{'PR-AUC':>8}"]
  rows = (("the training SoundFonts (in-domain)", in_domain), (f"{HELD_OUT_SOUNDFONT} (held out)", held_out))
  for name, result in rows:
    fine, coarse = result["fine"], result["coarse"]
    lines.append(f"{name:<36}{fine['macro_roc_auc']:>13.4f}{fine['macro_pr_auc']:>8.4f}"
                 f"{coarse['macro_roc_auc']:>16.4f}{coarse['macro_pr_auc']:>8.4f}")
  return "\n".join(lines)


def run(config, out: str, sizes: dict) -> None:
  step(f"1/6 dataset: synth_instruments ({sizes['num_train']} / {sizes['num_valid']} / {sizes['num_test']} clips)")
  soundfonts = training_soundfonts()
  print(f"SoundFonts: {', '.join(os.path.basename(p) for p in soundfonts)}; augmented")
  options = {**sizes, "soundfont": soundfonts, "augment": True}
  build_synth(config.data.data_dir, options)

  workdir = os.path.join(out, "run")
  step(f"2/6 train: Spec+Att, {config.model.head} head, {jax.device_count()} {jax.devices()[0].platform} devices "
       f"→ {workdir}")
  train.train_and_evaluate(config, workdir)

  step("3/6 evaluate the best checkpoint on the test split")
  result, _, _ = evaluation.evaluate_checkpoint(workdir, "best", "test")
  print(evaluation.format_report(result, per_tag=False))
  report_path = os.path.join(out, "test_report.json")
  _save(result, report_path)

  step(f"4/6 the same test pieces rendered with a SoundFont the model never heard ({HELD_OUT_SOUNDFONT})")
  held_out = evaluate_held_out(workdir, out, options)
  if held_out is not None:
    print(compare(result, held_out))

  step("5/6 tag a clip the model has never heard")
  waveform, playing = render.render_clip(DEMO_SEED, "test", 0, seconds=10.0, soundfonts=soundfonts)
  clip_path = os.path.join(out, "new_clip.wav")
  soundfile.write(clip_path, waveform, audio.SAMPLE_RATE)
  tagger = Tagger.load(workdir)
  tag.tag_paths(tagger, [clip_path], top_k=len(playing) + 3)
  print(f"really playing: {', '.join(sorted(playing))}")

  step("6/6 explain: attention heat maps")
  figures = os.path.join(out, "figures")
  explanation = explain.explain(tagger, tagger.load_clip(clip_path))
  for path in explain.save(explanation, figures, "new_clip", title="demo clip"):
    print(f"wrote {path}")

  step("done")
  print(f"dataset {config.data.data_dir}, run {workdir} (tensorboard --logdir {workdir}), report {report_path}, "
        f"figures {figures}")


def main(argv):
  del argv
  # On a CPU-only machine JAX sees one device; split the CPU into 8 so the demo runs the data-parallel mesh a GPU
  # cluster would.
  sharding.split_cpu(8)
  f = flags.FLAGS
  config = f.config
  config.data.data_dir = os.path.join(f.out, "data")
  run(config, f.out, {"num_train": f.num_train, "num_valid": f.num_valid, "num_test": f.num_test})


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"),
                                  "Config of the demo run.", lock_config=True)
  flags.DEFINE_string("out", "demo_out", "Where the dataset, run, report and figures go.")
  flags.DEFINE_integer("num_train", 1500, "Training clips of the synthetic set.")
  flags.DEFINE_integer("num_valid", 100, "Validation clips.")
  flags.DEFINE_integer("num_test", 200, "Test clips.")
  cli.run(main)

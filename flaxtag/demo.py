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

from data_prep.synth_instruments import builds, render
from flaxtag import audio, cli, explain, sharding, tag, train
from flaxtag import eval as evaluation
from flaxtag.inference import Tagger

DEMO_SEED = 2023  # a seed the dataset does not use: the tagged clip is new to the model


def step(title: str):
  print(f"\n== {title}", flush=True)


def _save(result: dict, path: str) -> None:
  with open(path, "w") as f:
    json.dump(result, f, indent=1, default=float)
  print(f"report: {path}")


def evaluate_held_out(workdir: str, out: str, options: dict) -> Optional[dict]:
  """The best checkpoint on the test pieces of the dataset built with `options`, rendered with the held-out
  SoundFont (`builds.build_held_out`); None without it."""
  data_dir = builds.build_held_out(os.path.join(out, "data_heldout"), options)
  if data_dir is None:
    return None
  result, _, _ = evaluation.evaluate_checkpoint(workdir, "best", "test", data_dir=data_dir)
  print(evaluation.format_report(result, per_tag=False))
  _save(result, os.path.join(out, "test_report_heldout.json"))
  return result


def compare(in_domain: dict, held_out: dict) -> str:
  """A table of macro scores: the test split as trained (in-domain) and with the held-out SoundFont."""
  lines = [f"{'test pieces rendered with':<36}{'fine ROC-AUC':>13}{'PR-AUC':>8}{'coarse ROC-AUC':>16}{'PR-AUC':>8}"]
  rows = (("the training SoundFonts (in-domain)", in_domain), (f"{builds.HELD_OUT_SOUNDFONT} (held out)", held_out))
  for name, result in rows:
    fine, coarse = result["fine"], result["coarse"]
    lines.append(f"{name:<36}{fine['macro_roc_auc']:>13.4f}{fine['macro_pr_auc']:>8.4f}"
                 f"{coarse['macro_roc_auc']:>16.4f}{coarse['macro_pr_auc']:>8.4f}")
  return "\n".join(lines)


def run(config, out: str, sizes: dict) -> None:
  step(f"1/6 dataset: synth_instruments ({sizes['num_train']} / {sizes['num_valid']} / {sizes['num_test']} clips)")
  soundfonts = builds.training_soundfonts()
  print(f"SoundFonts: {', '.join(os.path.basename(p) for p in soundfonts)}; augmented")
  options = {**sizes, "soundfont": soundfonts, "augment": True}
  builds.build_set(config.data.data_dir, options)

  workdir = os.path.join(out, "run")
  step(f"2/6 train: Spec+Att, {config.model.head} head, {jax.device_count()} {jax.devices()[0].platform} devices "
       f"→ {workdir}")
  train.train_and_evaluate(config, workdir)

  step("3/6 evaluate the best checkpoint on the test split")
  result, _, _ = evaluation.evaluate_checkpoint(workdir, "best", "test")
  print(evaluation.format_report(result, per_tag=False))
  report_path = os.path.join(out, "test_report.json")
  _save(result, report_path)

  step(f"4/6 the same test pieces rendered with a SoundFont the model never heard ({builds.HELD_OUT_SOUNDFONT})")
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
  f = flags.FLAGS
  config = f.config
  # On a CPU-only machine JAX sees one device: one per core makes the steps data-parallel, as on a GPU cluster.
  sharding.split_cpu_for_training(config.train)
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

"""`make demo`: the whole workflow on the synthetic multi-instrument set, on whatever devices this machine has.

Builds the dataset, trains Spec+Att with the GMP hierarchical head, evaluates the best checkpoint on the test split,
tags a newly rendered clip, and draws the attention heat maps, printing where each result is. Every step reuses
what a previous run left in demo_out/ (a complete dataset, a finished or interrupted training run).

  python -m flaxtag.demo [--out demo_out] [--num_train 1000 ...] [--config.train.num_epochs=...]
"""
import json
import os

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


def step(title: str):
  print(f"\n== {title}", flush=True)


def run(config, out: str, sizes: dict) -> None:
  step(f"1/5 dataset: synth_instruments ({sizes['num_train']} / {sizes['num_valid']} / {sizes['num_test']} clips)")
  summary = build.build("synth_instruments", config.data.data_dir, num_workers=os.cpu_count() or 1, **sizes)
  print(("reused " if summary.get("reused") else "built ") + summary["path"])

  workdir = os.path.join(out, "run")
  step(f"2/5 train: Spec+Att, {config.model.head} head, {jax.device_count()} {jax.devices()[0].platform} devices "
       f"→ {workdir}")
  train.train_and_evaluate(config, workdir)

  step("3/5 evaluate the best checkpoint on the test split")
  result, _, _ = evaluation.evaluate_checkpoint(workdir, "best", "test")
  print(evaluation.format_report(result, per_tag=False))
  report_path = os.path.join(out, "test_report.json")
  with open(report_path, "w") as f:
    json.dump(result, f, indent=1, default=float)
  print(f"report: {report_path}")

  step("4/5 tag a clip the model has never heard")
  waveform, playing = render.render_clip(DEMO_SEED, "test", 0, seconds=10.0)
  clip_path = os.path.join(out, "new_clip.wav")
  soundfile.write(clip_path, waveform, audio.SAMPLE_RATE)
  tagger = Tagger.load(workdir)
  tag.tag_paths(tagger, [clip_path], top_k=len(playing) + 3)
  print(f"really playing: {', '.join(sorted(playing))}")

  step("5/5 explain: attention heat maps")
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
  flags.DEFINE_integer("num_train", 1000, "Training clips of the synthetic set.")
  flags.DEFINE_integer("num_valid", 100, "Validation clips.")
  flags.DEFINE_integer("num_test", 200, "Test clips.")
  cli.run(main)

"""The tiny training run shared by the training and evaluation tests, in-process or as a command."""
import json
import os
import pathlib
import sys

from configs import synth

REPO = pathlib.Path(__file__).resolve().parents[1]
# A tiny model and run: 16 train clips, batch 8 → 2 steps per epoch, 3 epochs.
OVERRIDES = {
    "model.conv_channels": 2, "model.encoder.width": 16, "model.encoder.num_heads": 2, "model.encoder.mlp_dim": 32,
    "train.batch_size": 8, "train.eval_batch_size": 8, "train.num_epochs": 3, "train.log_every_steps": 1,
    "data.worker_count": 0,
}


def run_config(data_dir, **extra):
  config = synth.get_config()
  config.update_from_flattened_dict({**OVERRIDES, "data.data_dir": str(data_dir), **extra})
  return config


def train_command(data_dir, workdir, *extra_flags):
  flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data.data_dir": data_dir}.items()]
  return [sys.executable, "-m", "flaxtag.train", "--config", str(REPO / "configs" / "synth_gmp.py"),
          "--workdir", str(workdir), *flags, *extra_flags]


def records(workdir, kind):
  """The metrics.jsonl records of one kind ('train' or 'valid')."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]

"""The tiny training run shared by the training, topology and SLURM tests, in-process or as a command, and what
those tests use to drive and compare runs."""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from configs import synth
from flaxtag import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
# A tiny model and run: 16 train clips, batch 8 → 2 steps per epoch, 3 epochs.
OVERRIDES = {
    "model.conv_channels": 2, "model.encoder.width": 16, "model.encoder.num_heads": 2, "model.encoder.mlp_dim": 32,
    "train.batch_size": 8, "train.eval_batch_size": 8, "train.num_epochs": 3, "train.log_every_steps": 1,
    "data.worker_count": 0,
}

# The runs that resume on other topologies train with SGD. Another device count sums gradients in another order,
# and where a gradient is zero in exact arithmetic (a conv bias before BatchNorm, attention's key bias) or nearly
# so, rounding noise is all there is: SGD keeps it at rounding size, Adam's normalised step turns it into ±lr.
# With SGD every variable of a resumed run equals the uninterrupted run's to rtol 1e-5. 12 steps: room for stops.
SGD = {"optim.switch": "step", "optim.switch_epoch": 0, "train.num_epochs": 6}
SGD_STEPS = 12


def run_config(data_dir, **extra):
  config = synth.get_config()
  config.update_from_flattened_dict({**OVERRIDES, "data.data_dir": str(data_dir), **extra})
  return config


def config_flags(data_dir, **extra) -> list[str]:
  return [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data.data_dir": data_dir, **extra}.items()]


def train_command(data_dir, workdir, *extra_flags, **extra):
  return [sys.executable, "-m", "flaxtag.train", "--config", f"{REPO / 'configs' / 'synth.py'}:gmp",
          "--workdir", str(workdir), *config_flags(data_dir, **extra), *extra_flags]


def start_two_processes(data_dir, workdir, log_dir, devices: int, **overrides):
  """Starts a run of 2 processes × `devices` CPU devices joined on 127.0.0.1: (processes, their stderr files)."""
  log_dir.mkdir()
  port = free_port()
  processes, logs = [], []
  for i in range(2):
    logs.append(log_dir / f"process{i}.log")
    with open(logs[-1], "w") as log:
      processes.append(subprocess.Popen(
          train_command(data_dir, workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                        f"--process_id={i}", **overrides), cwd=REPO, env=devices_env(devices), stderr=log, text=True))
  return processes, logs


def wait_for_processes(processes, logs, timeout: float):
  """Waits for every process of a run; asserts each exited with status 0, showing every process's log tail where
  one did not (a process that fails early often makes the other fail later, at a collective or at shutdown)."""
  codes = [p.wait(timeout=timeout) for p in processes]
  tails = "\n".join(f"--- process {i} (exit {c}): {log.read_text()[-2500:]}" for i, (c, log) in
                    enumerate(zip(codes, logs)))
  assert codes == [0] * len(processes), tails


def devices_env(devices: int) -> dict[str, str]:
  """The environment of a process with its own number of CPU devices."""
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"{xla_flags_without_device_count()} --xla_force_host_platform_device_count={devices}".strip()}


def xla_flags_without_device_count() -> str:
  """The tests' XLA flags (conftest) less the device count: for a command that chooses its own, or its launcher's."""
  return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f)


def records(workdir, kind):
  """The metrics.jsonl records of one kind ('train' or 'valid')."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def final_variables(workdir):
  """The model variables of the latest checkpoint, read into this process whatever topology wrote them."""
  manager = checkpoint.open_manager(workdir, read_only=True)
  step = manager.latest_step()
  return checkpoint.restore_variables(manager, step, checkpoint.item_shapes(manager, step, checkpoint.MODEL))


def assert_same_model(workdir, reference_workdir, rtol=1e-5):
  """The latest checkpoints of two runs hold the same variables (parameters and BatchNorm statistics)."""
  a, b = final_variables(workdir), final_variables(reference_workdir)
  flat_a, flat_b = (dict(jax.tree_util.tree_flatten_with_path(v)[0]) for v in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for path, x in flat_a.items():
    np.testing.assert_allclose(x, flat_b[path], rtol=rtol, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def last_logged_step(workdir) -> int:
  """The step of the last train record in metrics.jsonl (0 before the first)."""
  try:
    return records(workdir, "train")[-1]["step"]
  except (FileNotFoundError, IndexError):
    return 0


def wait_for(predicate, process, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert process.poll() is None, "the training process ended before the moment to stop it"
    assert time.time() < deadline, "timed out waiting for the training process"
    time.sleep(0.2)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]

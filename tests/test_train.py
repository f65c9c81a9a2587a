"""Training runs on a real (tiny) synthetic dataset: resumption, preemption, multi-process, divergence.

`trained_run` (conftest) is the uninterrupted reference: 1 process × 8 devices, 3 epochs of 2 steps.
"""
import os
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flaxtag import checkpoint, optim, train


from train_runs import REPO, records, run_config, train_command


def final_variables(workdir):
  manager = checkpoint.open_manager(workdir, read_only=True)
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(**{checkpoint.MODEL: ocp.args.StandardRestore()}))
  return step, restored[checkpoint.MODEL]


def wait_for(predicate, process, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert process.poll() is None, "the training process ended before the moment to stop it"
    assert time.time() < deadline, "timed out waiting for the training process"
    time.sleep(0.2)


def assert_same_variables(a, b, **tolerance):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(x, y, **tolerance)


def test_uninterrupted_run_writes_logs_and_keeps_latest_and_best(trained_run):
  workdir, scalars = trained_run
  valid = records(workdir, "valid")
  assert [r["epoch"] for r in valid] == [1, 2, 3]
  assert set(scalars) == {"roc_auc", "pr_auc", "coarse_roc_auc", "coarse_pr_auc", "violation_rate"}
  assert valid[-1]["roc_auc"] == pytest.approx(scalars["roc_auc"])
  assert all(np.isfinite(r["loss"]) and r["examples_per_second"] > 0 for r in records(workdir, "train"))
  assert os.listdir(workdir / "tensorboard")
  manager = checkpoint.open_manager(workdir, read_only=True)
  best = max(valid, key=lambda r: r["roc_auc"])["step"]
  assert checkpoint.resolve_step(manager, "best") == best
  assert set(manager.all_steps()) == {4, 6} | {best}  # the latest 2 and the best


def test_preempted_and_killed_run_resumes_to_the_same_parameters(synth_data_dir, trained_run, tmp_path):
  """SIGTERM mid-epoch saves and exits; a later SIGKILL loses only unsaved steps; the resumed run ends exactly
  where the uninterrupted one did."""
  workdir = tmp_path / "interrupted"
  first = subprocess.Popen(train_command(synth_data_dir, workdir), cwd=REPO, stderr=subprocess.PIPE, text=True)
  wait_for(lambda: os.path.exists(workdir / "metrics.jsonl") and records(workdir, "train")
           and records(workdir, "train")[-1]["step"] >= 3, first)
  first.send_signal(signal.SIGTERM)
  assert first.wait(timeout=120) == 0, first.stderr.read()
  last_logged = records(workdir, "train")[-1]["step"]
  assert checkpoint.open_manager(workdir, read_only=True).latest_step() == last_logged  # saved where it stopped

  second = subprocess.Popen(train_command(synth_data_dir, workdir), cwd=REPO, stderr=subprocess.PIPE, text=True)
  wait_for(lambda: records(workdir, "train")[-1]["step"] >= 5, second)
  second.kill()
  second.wait()

  train.train_and_evaluate(run_config(synth_data_dir), str(workdir))
  step, variables = final_variables(workdir)
  ref_step, ref_variables = final_variables(trained_run[0])
  assert step == ref_step == 6
  assert_same_variables(variables, ref_variables, rtol=1e-6, atol=1e-7)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_of_four_devices_match_one_process_of_eight(synth_data_dir, trained_run, tmp_path):
  workdir = tmp_path / "multiprocess"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  port = _free_port()
  processes = [
      subprocess.Popen(train_command(synth_data_dir, workdir, f"--coordinator_address=127.0.0.1:{port}",
                                     "--num_processes=2", f"--process_id={i}"),
                       cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  for p in processes:
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
  ref = records(trained_run[0], "valid")
  got = records(workdir, "valid")
  for key in ("roc_auc", "pr_auc", "coarse_roc_auc", "violation_rate"):
    np.testing.assert_allclose([r[key] for r in got], [r[key] for r in ref], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([r["loss"] for r in records(workdir, "train")],
                             [r["loss"] for r in records(trained_run[0], "train")], rtol=1e-5)


def test_diverging_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(synth_data_dir, tmp_path):
  config = run_config(synth_data_dir, **{"optim.adam_lr": 1e8, "train.num_epochs": 2})
  with pytest.raises(train.TrainingDiverged, match=r"at step \d+; stopped. The last good checkpoint is"):
    train.train_and_evaluate(config, str(tmp_path))


def test_config_errors_come_before_compilation(synth_data_dir, tmp_path):
  from flaxtag.errors import ConfigError
  with pytest.raises(ConfigError, match="model.num_tags=50 but synth_instruments has 25 tags"):
    train.setup(run_config(synth_data_dir, **{"model.num_tags": 50}))
  with pytest.raises(ConfigError, match="train.batch_size=12 must be divisible by the 8"):
    train.setup(run_config(synth_data_dir, **{"train.batch_size": 12}))
  with pytest.raises(ConfigError, match="optim.switch='sometimes'"):
    train.setup(run_config(synth_data_dir, **{"optim.switch": "sometimes"}))
  with pytest.raises(ConfigError, match="train.eval_every_epochs=0 must be at least 1"):
    train.setup(run_config(synth_data_dir, **{"train.eval_every_epochs": 0}))


@pytest.mark.parametrize("step,switch_count,expected", [
    (10, 10, True),  # the switch happened at the last update of this epoch
    (20, 10, False),  # ... of the previous epoch
    (80, 10, True),  # an SGD lr drop (boundary 80) within this epoch
    (10, -1, False),  # SWATS not switched yet: its lr drops do not count
])
def test_stage_change_detection(step, switch_count, expected):
  config = optim.default_optim_config(steps_per_epoch=1)  # boundaries at steps 80 and 100
  assert train.stage_changed_in_epoch(config, step, 10, switch_count) is expected

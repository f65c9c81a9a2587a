"""Training runs on a real (tiny) synthetic dataset: resumption, preemption, multi-process, divergence.

`trained_run` (conftest) is the uninterrupted reference: 1 process × 8 devices, 3 epochs of 2 steps.
"""
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from data_prep.synth_instruments.synth_instruments import SynthInstruments
from flaxtag import checkpoint, optim, sharding, train
from train_runs import (REPO, SGD, SGD_STEPS, assert_same_model, last_logged_step, records, run_config,
                        start_two_processes, train_command, wait_for, wait_for_processes,
                        xla_flags_without_device_count)


@pytest.mark.slow
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
  _, metadata = checkpoint.load_config(manager, 6)
  assert metadata["data"] == {"name": "synth_instruments", "config": None, "version": str(SynthInstruments.VERSION),
                              "splits": {"train": 16, "valid": 8}}  # what the run trained and selected on


def test_stop_request_to_one_or_both_processes_saves_one_step_for_all(synth_data_dir, sgd_run, tmp_path):
  """2 processes × 4 devices: SIGTERM to one process only, or to both at different moments, makes both save the
  same step and exit with status 0; resuming after each stop, once with one process stalled, ends where an
  uninterrupted run (1 × 8) does."""
  workdir = tmp_path / "stopped"
  # Which processes get SIGTERM, one step apart: the second process alone; then the coordinator, then the other
  # (whose signal may come after the run stopped).
  stops = [[1], [0, 1]]
  saved_steps, exit_seconds = [], []
  for n, signalled in enumerate(stops):
    before = records(workdir, "train")[-1]["step"] if saved_steps else 0
    processes, logs = start_two_processes(synth_data_dir, workdir, tmp_path / f"stop{n}", 4, **SGD)
    for k, i in enumerate(signalled):
      # The next signal goes one step after the last, unless the run has already stopped.
      deadline = time.time() + 300
      while last_logged_step(workdir) <= before + k and all(p.poll() is None for p in processes):
        assert time.time() < deadline, "timed out waiting for a training step"
        time.sleep(0.1)
      processes[i].send_signal(signal.SIGTERM)
    started = time.time()
    wait_for_processes(processes, logs, timeout=300)
    exit_seconds.append(time.time() - started)
    steps = [re.findall(r"saved step (\d+)", log.read_text()) for log in logs]
    assert all(len(s) == 1 for s in steps) and steps[0] == steps[1], steps  # both processes saved the same step
    saved_steps.append(int(steps[0][0]))
    assert checkpoint.open_manager(workdir, read_only=True).latest_step() == saved_steps[-1]
  print(f"stops saved steps {saved_steps}, both processes exited {exit_seconds} s after the last signal")
  assert saved_steps == sorted(saved_steps) and saved_steps[-1] < SGD_STEPS, saved_steps
  processes, logs = start_two_processes(synth_data_dir, workdir, tmp_path / "final", 4, **SGD)
  # Process 1 stalls for 35 s while both compile the train step (from a second after process 0 shows its progress
  # bar; the compile takes several seconds): more than gloo's 30 s to set up the communicator of the step's first
  # run, which the processes now start together (sharding.meet_before_first_run).
  wait_for(lambda: "train:" in logs[0].read_text(), processes[0])
  time.sleep(1)
  processes[1].send_signal(signal.SIGSTOP)
  time.sleep(35)
  processes[1].send_signal(signal.SIGCONT)
  wait_for_processes(processes, logs, timeout=600)
  assert_same_model(workdir, sgd_run)
  assert [r["step"] for r in records(workdir, "train")] == list(range(1, SGD_STEPS + 1))
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in records(workdir, "train")],
                               [r[key] for r in records(sgd_run, "train")], rtol=1e-5)
  for key in ("roc_auc", "pr_auc", "coarse_roc_auc", "violation_rate"):
    np.testing.assert_allclose([r[key] for r in records(workdir, "valid")],
                               [r[key] for r in records(sgd_run, "valid")], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_diverging_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(synth_data_dir, tmp_path):
  config = run_config(synth_data_dir, **{"optim.adam_lr": 1e8, "train.num_epochs": 2})
  with pytest.raises(train.TrainingDiverged, match=r"not finite at step (\d+) \(noticed at step \d+\); stopped. "
                     r"The last good checkpoint is") as error:
    train.train_and_evaluate(config, str(tmp_path))
  first_bad = int(re.search(r"at step (\d+)", str(error.value)).group(1))
  latest = checkpoint.open_manager(tmp_path, read_only=True).latest_step()
  assert latest is None or latest < first_bad  # nothing after the first bad step was saved


def test_early_stopping_counts_validations_since_a_strictly_better_roc_auc():
  records = [{"kind": "valid", "step": 2 * (i + 1), "roc_auc": r} for i, r in enumerate([0.6, 0.7, 0.7, None])]
  watch = train.EarlyStopping(2, records + [{"kind": "train", "step": 9, "loss": 1.0}])
  assert watch.best == (0.7, 4) and watch.since_best == 2 and watch.due()  # a tie and a non-finite do not count
  watch.validated(10, 0.71)
  assert watch.best == (0.71, 10) and not watch.due()
  assert not train.EarlyStopping(0, records).due()  # patience 0: never


@pytest.mark.slow
def test_a_run_stops_early_by_its_validations_and_stays_stopped(synth_data_dir, tmp_path, capsys):
  # A learning rate of ~0: only BatchNorm's running statistics move, so validation ROC-AUC soon stops improving.
  config = run_config(synth_data_dir, **{"optim.adam_lr": 1e-12, "train.num_epochs": 8,
                                         "train.early_stopping_patience": 2})
  scalars = train.train_and_evaluate(config, str(tmp_path))
  valid = records(tmp_path, "valid")
  # The rule, recomputed from the log: the first validation that is the 2nd in a row without a new best.
  best, since, expected_stop = -1.0, 0, None
  for r in valid:
    best, since = (r["roc_auc"], 0) if r["roc_auc"] > best else (best, since + 1)
    if since == 2:
      expected_stop = r["step"]
      break
  assert expected_stop is not None and expected_stop < 16, [r["roc_auc"] for r in valid]
  [stop] = records(tmp_path, "early_stop")
  assert stop["step"] == expected_stop == valid[-1]["step"] == max(r["step"] for r in records(tmp_path, "train"))
  assert checkpoint.open_manager(tmp_path, read_only=True).latest_step() == expected_stop
  assert scalars["roc_auc"] == valid[-1]["roc_auc"]
  assert "stopped early at step" in capsys.readouterr().err
  # The same command again trains nothing more.
  assert train.train_and_evaluate(config, str(tmp_path))["roc_auc"] == scalars["roc_auc"]
  assert "nothing more to train" in capsys.readouterr().err
  assert max(r["step"] for r in records(tmp_path, "train")) == expected_stop


def test_resuming_with_another_batch_size_or_seed_is_refused_and_more_epochs_extend_the_run(
    trained_run, synth_data_dir, tmp_path):
  from flaxtag.errors import ConfigError
  workdir = tmp_path / "run"
  shutil.copytree(trained_run[0], workdir)  # 3 epochs of batch 8, seed 0: saved steps 4 and 6
  logged = (workdir / "metrics.jsonl").read_text()
  for key, value, changes in (("train.batch_size", 16, "the steps of an epoch"), ("seed", 1, "the data order")):
    with pytest.raises(ConfigError, match=rf"trained with {key}=\S+ \(the config of its step 6\); resuming with "
                                          rf"{value} would change {changes}.*--config.{key}="):
      train.train_and_evaluate(run_config(synth_data_dir, **{key: value, "train.num_epochs": 4}), str(workdir))
  assert (workdir / "metrics.jsonl").read_text() == logged
  # The same run with a fourth epoch goes on from step 6.
  train.train_and_evaluate(run_config(synth_data_dir, **{"train.num_epochs": 4}), str(workdir))
  assert [r["step"] for r in records(workdir, "train")] == list(range(1, 9))


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


def test_one_process_on_a_cpu_trains_on_one_device_per_core_dividing_its_batches(synth_data_dir, tmp_path):
  """`python -m flaxtag.train` without a device count of its own: one CPU device per core, as many as divide the
  training batch (12 here) and the evaluation batch (8): gcd 4 on 4 or more cores, 2 on 2 or 3, 1 on one."""
  env = {**os.environ, "XLA_FLAGS": xla_flags_without_device_count()}  # not conftest's eight devices
  command = train_command(synth_data_dir, tmp_path / "run", **{"train.batch_size": 12, "train.eval_batch_size": 8})
  process = subprocess.Popen(command, cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"}, stderr=subprocess.PIPE,
                             text=True)
  try:
    line = next(line for line in process.stderr if line.startswith("process 0 of"))
  finally:
    process.kill()
    process.wait()
  expected = sharding.cpu_devices_dividing(4)
  assert line.strip() == f"process 0 of 1, {expected} devices ({expected} local)"


def test_a_hierarchy_file_over_some_synth_instruments_replaces_the_datasets_coarse_labels(synth_data_dir, tmp_path):
  """The dataset's own coarse labels are those of its own families (guitars, strings, woodwinds, ...); a run over
  some of its instruments in other families makes its coarse labels from the instruments it names."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from flaxtag import input_pipeline  # pylint: disable=g-import-not-at-top
  path = tmp_path / "subset.yaml"
  path.write_text("plucked: [distortion guitar, harp, nylon guitar]\nreeds: [saxophone, oboe]\n")
  run = train.setup(run_config(synth_data_dir, **{"model.hierarchy_file": str(path), "model.num_tags": 5}))
  assert run.tag_names == ("distortion guitar", "harp", "nylon guitar", "saxophone", "oboe")
  assert run.model.hierarchy.coarse_tags == ("plucked", "reeds")
  batch = next(input_pipeline.train_iterator(synth_data_dir, "synth_instruments", batch_size=8, crop_len=4096,
                                             seed=0, process_index=0, process_count=1, selection=run.selection))
  source = tfds.builder_from_directory(run.info.path).as_data_source("train")
  labels = np.stack([source[int(r)]["labels"] for r in input_pipeline.epoch_permutation(16, 0, 0)[:8]])
  fine = labels[:, [run.info.tags.index(t) for t in run.tag_names]]
  np.testing.assert_array_equal(batch["labels"], fine)
  np.testing.assert_array_equal(batch["coarse_labels"], np.stack([fine[:, :3].max(1), fine[:, 3:].max(1)], 1))
  assert fine[:, :3].sum() >= 2 and fine[:, 3:].sum() >= 2  # these 8 clips have some of both families


@pytest.mark.parametrize("step,switch_count,expected", [
    (10, 10, True),  # the switch happened at the last update of this epoch
    (20, 10, False),  # ... of the previous epoch
    (80, 10, True),  # an SGD lr drop (boundary 80) within this epoch
    (10, -1, False),  # SWATS not switched yet: its lr drops do not count
])
def test_stage_change_detection(step, switch_count, expected):
  config = optim.in_steps(optim.recipe_config(), steps_per_epoch=1)  # boundaries at steps 80 and 100
  assert train.stage_changed_in_epoch(config, step, 10, switch_count) is expected

"""Checkpoints do not depend on the topology that wrote them.

Each program runs in its own process with its own device count (`--xla_force_host_platform_device_count`) or
number of processes, as a user's would: the `trained_run` checkpoint (1 process × 8 devices) is evaluated, used to
tag and explained on 1 device and on 2; a run stopped on 8 devices resumes on 4 and on 2 processes × 2 devices, and
one stopped on 1 device resumes on 8, each ending with the parameters of the uninterrupted 8-device run.The resumed runs train with SGD (`train_runs.SGD` says why) and are compared with `sgd_run` (conftest).
"""
import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from flaxtag import checkpoint
from flaxtag import eval as evaluation
from flaxtag import explain, train
from flaxtag.errors import CheckpointError
from flaxtag.inference import Tagger

from train_runs import (REPO, SGD, SGD_STEPS, assert_same_model, devices_env, last_logged_step, records, run_config,
                        start_two_processes, train_command, wait_for, wait_for_processes)

pytestmark = pytest.mark.slow  # every test trains, or runs commands in processes of their own


def run(args, devices, timeout=600):
  done = subprocess.run(args, cwd=REPO, env=devices_env(devices), capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stderr[-4000:]}"
  return done


@pytest.fixture(scope="module")
def song(tmp_path_factory):
  """12 s of stereo 22.05 kHz audio: rising tones over noise."""
  rng = np.random.default_rng(0)
  t = np.arange(12 * 22050) / 22050
  tone = 0.3 * np.sin(2 * np.pi * (330 + 30 * t) * t)
  path = tmp_path_factory.mktemp("song") / "song.wav"
  soundfile.write(path, np.stack([tone, tone + 0.05 * rng.normal(size=t.size)], 1).astype(np.float32), 22050)
  return path


@pytest.mark.parametrize("devices", [1, 2])
def test_eval_tag_explain_read_an_eight_device_checkpoint(trained_run, song, tmp_path, devices):
  workdir = trained_run[0]
  reference_report = evaluation.evaluate_checkpoint(workdir, "best", "test")[0]
  reference_tagger = Tagger.load(workdir)
  reference_scores = reference_tagger.tag_waveform(reference_tagger.load_clip(song))

  report_path = tmp_path / "report.json"
  run([sys.executable, "-m", "flaxtag.eval", "--workdir", workdir, "--output", report_path], devices)
  report = json.loads(report_path.read_text())
  assert report["num_clips"] == reference_report["num_clips"] == 8
  for level in ("fine", "coarse"):
    np.testing.assert_allclose(report[level]["macro_roc_auc"], reference_report[level]["macro_roc_auc"], rtol=1e-6)
    np.testing.assert_allclose(report[level]["macro_pr_auc"], reference_report[level]["macro_pr_auc"], rtol=1e-6)

  tagged = run([sys.executable, "-m", "flaxtag.tag", song, "--workdir", workdir, "--format", "json"], devices)
  (entry,) = json.loads(tagged.stdout)
  np.testing.assert_allclose([entry["tags"][t] for t in reference_tagger.tag_names], reference_scores.fine, atol=2e-6)

  out = tmp_path / "figures"
  run([sys.executable, "-m", "flaxtag.explain", song, "--workdir", workdir, "--out", out], devices)
  arrays = np.load(out / "song_explain.npz")
  reference = explain.explain(reference_tagger, reference_tagger.load_clip(song)).arrays()
  assert set(arrays.files) == set(reference)
  for name, value in reference.items():
    if np.issubdtype(np.asarray(value).dtype, np.floating):
      np.testing.assert_allclose(arrays[name], value, atol=1e-5, err_msg=name)
    else:
      np.testing.assert_array_equal(arrays[name], value, err_msg=name)


def _stop_with_sigterm(command, devices, workdir, at_step):
  """Runs `command` until it has logged `at_step`, then SIGTERM: it must save and exit with status 0."""
  process = subprocess.Popen(command, cwd=REPO, env=devices_env(devices), stderr=subprocess.PIPE, text=True)
  wait_for(lambda: last_logged_step(workdir) >= at_step, process)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]
  saved = checkpoint.open_manager(workdir, read_only=True).latest_step()
  assert saved == records(workdir, "train")[-1]["step"]  # saved where it stopped
  return saved


def assert_logged_once(workdir, steps=range(1, SGD_STEPS + 1), epochs=range(1, SGD_STEPS // 2 + 1)):
  """A resumed run logs every step once: records of redone steps were dropped before training went on."""
  assert [r["step"] for r in records(workdir, "train")] == list(steps)
  assert [r["epoch"] for r in records(workdir, "valid")] == list(epochs)


def test_stopped_on_eight_devices_resumes_on_four_and_on_two_processes(synth_data_dir, sgd_run, tmp_path):
  workdir = tmp_path / "eight"
  stopped_at = _stop_with_sigterm(train_command(synth_data_dir, workdir, **SGD), 8, workdir, at_step=3)
  assert 3 <= stopped_at < SGD_STEPS
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)

  run(train_command(synth_data_dir, workdir, **SGD), 4)
  assert_same_model(workdir, sgd_run)
  assert_logged_once(workdir)

  processes, logs = start_two_processes(synth_data_dir, copy, tmp_path / "two_processes", 2, **SGD)
  wait_for_processes(processes, logs, timeout=600)
  assert_same_model(copy, sgd_run)
  assert_logged_once(copy)


def test_stopped_on_one_device_resumes_on_eight_and_survives_a_kill(synth_data_dir, sgd_run, tmp_path):
  """1 device → SIGTERM; 8 devices → SIGKILL (loses only unsaved steps); the rest in this process (8 devices)."""
  workdir = tmp_path / "one"
  _stop_with_sigterm(train_command(synth_data_dir, workdir, **SGD), 1, workdir, at_step=2)
  second = subprocess.Popen(train_command(synth_data_dir, workdir, **SGD), cwd=REPO, env=devices_env(8),
                            stderr=subprocess.PIPE, text=True)
  wait_for(lambda: last_logged_step(workdir) >= 5, second)
  second.kill()
  second.wait()
  train.train_and_evaluate(run_config(synth_data_dir, **SGD), str(workdir))
  assert_same_model(workdir, sgd_run)
  assert_logged_once(workdir)


def test_unreadable_checkpoints_are_one_clear_error(trained_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained_run[0], workdir)
  manager = checkpoint.open_manager(workdir, read_only=True)
  latest = manager.latest_step()
  shutil.rmtree(workdir / "checkpoints" / str(latest) / "metadata")
  # Asked for by number: an error ('latest' and 'best' use the newest intact step, test_checkpoint_integrity).
  with pytest.raises(CheckpointError, match=rf"step {latest} is damaged: it has no metadata item"):
    Tagger.load(workdir, latest)
  done = subprocess.run([sys.executable, "-m", "flaxtag.eval", "--workdir", workdir, "--checkpoint", str(latest)],
                        cwd=REPO, env=devices_env(1), capture_output=True, text=True, timeout=300)
  assert done.returncode == 2
  assert done.stderr.strip().count("\n") == 0 and "has no metadata item" in done.stderr

"""How a training run meets what goes wrong around it: a full disk, a second run in its workdir, a kill before its
first log record, and a run that diverges without ever becoming non-finite. Runs are real commands where what the
user sees (stderr, exit status) is the point."""
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from flaxtag import checkpoint, train
from flaxtag.inference import Tagger
from train_runs import REPO, records, run_config, train_command, wait_for


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def small_disk(tmp_path):
  """Mounts a tmpfs of the given size (KiB) and returns its path; skips where this user cannot mount one."""
  mounted = []

  def mount(kib: int):
    path = tmp_path / f"disk{kib}k"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
      pytest.skip(f"cannot mount a small tmpfs to fill: {done.stderr.strip() or done.returncode}")
    mounted.append(path)
    return path

  yield mount
  for path in mounted:
    subprocess.run(["umount", str(path)], check=False)


def _disk_use(path) -> tuple[int, int]:
  """(apparent bytes, allocated KiB) of the files under `path`: the run checks for room with the first (file sizes);
  a tmpfs fills by the second (blocks)."""
  files = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
  return sum(os.path.getsize(f) for f in files), sum(os.stat(f).st_blocks for f in files) // 2


def _saved_step_dirs(workdir) -> list[str]:
  manager = checkpoint.open_manager(workdir, read_only=True)
  return [os.path.join(checkpoint.checkpoint_dir(workdir), str(s)) for s in manager.all_steps()]


def test_a_save_that_cannot_fit_is_refused_and_keeps_the_saved_steps(trained_run, synth_data_dir, small_disk):
  """The finished run, copied to a disk then filled to half a step's room and resumed for one more epoch: the run
  refuses to start the save it cannot finish, in one line, and keeps what it had."""
  saved = checkpoint.open_manager(trained_run[0], read_only=True).all_steps()
  step_bytes = max(_disk_use(step_dir)[0] for step_dir in _saved_step_dirs(trained_run[0]))
  disk = small_disk((_disk_use(trained_run[0])[1] + 2 * step_bytes // 1024) + 1024)
  workdir = disk / "run"
  shutil.copytree(trained_run[0], workdir)
  with open(disk / "filler", "wb") as filler:  # leaves half a step free
    os.posix_fallocate(filler.fileno(), 0, shutil.disk_usage(disk).free - step_bytes // 2)
  done = subprocess.run(train_command(synth_data_dir, workdir, **{"train.num_epochs": 4}), cwd=REPO,
                        capture_output=True, text=True, check=False)
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  [error] = _error_lines(done.stderr)
  listed = ", ".join(map(str, saved))
  assert re.fullmatch(
      rf"error: saving checkpoint step 8 to .*/run/checkpoints failed: not enough free space to start it\. A step "
      rf"needs about \d+\.\d MB \(the size of step \d+\); \d+\.\d MB free there\. The saved steps \({listed}\) are "
      rf"untouched: free space and rerun the same command to resume from step {saved[-1]}\.", error), error
  manager = checkpoint.open_manager(workdir, read_only=True)
  assert manager.all_steps() == saved
  checkpoint.verify(manager, saved[-1])
  assert sorted(os.listdir(workdir / "checkpoints")) == sorted(map(str, saved))  # no partial step left
  # The validation of the step that could not be saved is marked.
  assert [r["step"] for r in records(workdir, "valid") if r.get("checkpoint_saved") is False] == [8]


def test_a_full_disk_during_the_first_save_is_one_error(trained_run, synth_data_dir, small_disk):
  """A disk too small for the first step: orbax's write fails, and is reported in one line."""
  # A fresh run's first step has measured from well under 0.8 to over 1.5 of the finished run's steps (its compressed
  # arrays differ): a tenth of one never holds it; the 64 KiB are for the logs written before it.
  step_kib = max(_disk_use(step_dir)[1] for step_dir in _saved_step_dirs(trained_run[0]))
  workdir = small_disk(int(step_kib * 0.1) + 64) / "run"
  done = subprocess.run(train_command(synth_data_dir, workdir), cwd=REPO, capture_output=True, text=True,
                        check=False)
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  [error] = _error_lines(done.stderr)
  assert re.fullmatch(r"error: saving checkpoint step 2 to .*/run/checkpoints failed: no space left on device\. "
                      r"\d+\.\d MB free there\. No earlier step was saved\.", error), error
  assert os.listdir(workdir / "checkpoints") == []  # no partial step left
  # The validations after the last step saved are marked: the failed step's, and any logged before the failure of
  # an asynchronous save showed.
  assert [r["step"] for r in records(workdir, "valid") if "checkpoint_saved" not in r] == []
  assert [r["step"] for r in records(workdir, "valid") if r.get("checkpoint_saved") is False][0] == 2


def test_a_second_run_in_the_same_workdir_stops_at_once_naming_the_first(synth_data_dir, tmp_path):
  workdir = tmp_path / "run"
  lock = workdir / "train.lock"
  with open(tmp_path / "first.log", "w") as log:
    first = subprocess.Popen(train_command(synth_data_dir, workdir), cwd=REPO, stderr=log, text=True)
  try:
    wait_for(lambda: lock.exists() and lock.read_text().strip(), first)
    holder = json.loads(lock.read_text())
    assert holder["pid"] == first.pid
    started = time.time()
    second = subprocess.run(train_command(synth_data_dir, workdir), cwd=REPO, capture_output=True, text=True,
                            check=False)
    assert first.poll() is None, "the first run ended before the second was refused"
    assert second.returncode == 2, second.stderr[-3000:]
    assert _error_lines(second.stderr) == [
        f"error: {workdir} is in use by another training run (pid {first.pid} on {holder['host']} since "
        f"{holder['since']}; {lock}). Wait for it to end or stop it, or use another --workdir."], second.stderr
    assert len(second.stderr.strip().splitlines()) == 2, second.stderr  # and "process 0 of 1, 8 devices"
    print(f"the second run was refused {time.time() - started:.1f} s after it started")
    # Readers need no lock: the latest checkpoint loads while the run trains.
    wait_for(lambda: checkpoint.open_manager(workdir, read_only=True).latest_step() if (
        workdir / "checkpoints").exists() else None, first)
    assert Tagger.load(workdir, "latest").metadata["step"] >= 2
    assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
  finally:
    first.kill()
  assert not lock.exists()
  assert [r["step"] for r in records(workdir, "train")] == list(range(1, 7))  # one run's records, not interleaved


def test_a_killed_run_leaves_a_stale_lock_that_blocks_nothing_and_no_empty_tensorboard_file(synth_data_dir,
                                                                                            tmp_path):
  """Killed (SIGKILL) after it opened its logs but before its first step: the next run starts and finishes."""
  workdir = tmp_path / "run"
  with open(tmp_path / "killed.log", "w") as log:
    killed = subprocess.Popen(train_command(synth_data_dir, workdir), cwd=REPO, stderr=log, text=True)
  try:
    wait_for(lambda: (workdir / "metrics.jsonl").exists(), killed)
  finally:
    killed.send_signal(signal.SIGKILL)
    killed.wait()
  assert json.loads((workdir / "train.lock").read_text())["pid"] == killed.pid
  assert not records(workdir, "train"), "killed too late: the first step was logged"
  assert not (workdir / "tensorboard").exists() or not os.listdir(workdir / "tensorboard")
  done = subprocess.run(train_command(synth_data_dir, workdir), cwd=REPO, capture_output=True, text=True,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert len(os.listdir(workdir / "tensorboard")) == 1


def test_a_diverging_run_is_warned_about_once(synth_data_dir, trained_run, tmp_path, capsys):
  """adam_lr=1e3: huge but finite losses and ROC-AUC at chance for 3 validations in a row."""
  train.train_and_evaluate(run_config(synth_data_dir, **{"optim.adam_lr": 1e3}), str(tmp_path))
  warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1, warnings
  assert re.fullmatch(r"warning: training looks diverged: over the last 3 validations \(steps 2, 4, 6\), the mean "
                      r"training loss stayed above 10× its first value \(\S+ at step 1; now \S+\)( and validation "
                      r"ROC-AUC stayed within 0.02 of chance \(now 0\.\d{4}\))?\. Lower the learning rate "
                      r"\(config\.optim\.adam_lr\) or check the data\.", warnings[0]), warnings[0]
  [record] = records(tmp_path, "warning")
  assert record["step"] == 6 and record["warning"] == "diverged" and warnings[0] == "warning: " + record["message"]
  assert not records(trained_run[0], "warning")  # a run that learns is not warned about


def test_a_resumed_run_continues_the_divergence_count_and_warns_once(synth_data_dir, tmp_path):
  """The count is rebuilt from metrics.jsonl: resumed after 2 high validations, the 3rd warns; after the warning,
  none again."""
  diverging = [{"step": 1, "kind": "train", "loss": 1.0}, {"step": 2, "kind": "train", "loss": 5e3},
               {"step": 2, "kind": "valid", "roc_auc": 0.5}, {"step": 4, "kind": "train", "loss": 5e3},
               {"step": 4, "kind": "valid", "roc_auc": 0.5}]
  watch = train.DivergenceWatch(diverging)
  watch.train_loss(6, 5e3)
  assert watch.validated(6, 0.5).startswith("training looks diverged: over the last 3 validations (steps 2, 4, 6)")
  warned = train.DivergenceWatch(diverging + [{"step": 6, "kind": "warning", "warning": "diverged"}])
  warned.train_loss(8, 5e3)
  assert warned.validated(8, 0.5) is None

"""A real one-node SLURM cluster: `launch/slurm.sbatch` submitted as a user would, stopped by `scontrol requeue`
and by `scancel --signal=TERM`, resumed, and compared with the uninterrupted 1 × 8-device run (`sgd_run`).

The cluster (slurmctld, slurmd, munged on 127.0.0.1) is brought up by tests/slurm/setup.sh, which needs root and
apt (or SLURM already installed), and stopped at the end. Elsewhere the test is skipped with the reason.
"""
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from train_runs import (REPO, SGD, SGD_STEPS, assert_same_model, config_flags, last_logged_step, records,
                        xla_flags_without_device_count)

pytestmark = pytest.mark.slow  # a SLURM cluster and trainings under it

SLURM_DIR = REPO / "tests" / "slurm"


def _sh(*args, timeout=60, **kwargs) -> str:
  return subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout, **kwargs).stdout.strip()


@pytest.fixture(scope="module")
def slurm_cluster():
  if os.geteuid() != 0:
    pytest.skip("the SLURM test brings up its own cluster, which needs root")
  if not shutil.which("slurmctld") and not shutil.which("apt-get"):
    pytest.skip("SLURM is not installed and apt-get is not available to install it")
  setup = subprocess.run(["bash", SLURM_DIR / "setup.sh"], capture_output=True, text=True, timeout=600)
  if setup.returncode == 3:
    pytest.skip(setup.stderr.strip())
  assert setup.returncode == 0, setup.stdout[-2000:] + setup.stderr[-2000:]
  print(setup.stdout.splitlines()[-1])
  yield
  subprocess.run(["bash", SLURM_DIR / "teardown.sh"], capture_output=True, timeout=120)


def _job_state(job_id) -> str:
  return _sh("squeue", "-h", "-j", job_id, "-o", "%T") or _sacct_state(job_id)


def _sacct_state(job_id) -> str:
  # Without accounting, a finished job leaves the queue; scontrol remembers it for MinJobAge (300 s).
  out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
  match = re.search(r"JobState=(\w+)", out)
  return match.group(1) if match else "GONE"


def _wait(predicate, what, timeout=600):
  deadline = time.time() + timeout
  while not predicate():
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.5)


def _saved_steps(log: str) -> list[tuple[str, str]]:
  return re.findall(r"process (\d): stop requested \(SIGTERM\); saved step (\d+)", log)


def test_sbatch_two_tasks_requeue_and_scancel_resume_exactly(slurm_cluster, synth_data_dir, sgd_run, tmp_path):
  workdir = tmp_path / "run"
  submit = ["sbatch", "--parsable", "--ntasks=2", str(REPO / "launch" / "slurm.sbatch"),
            f"{REPO / 'configs' / 'synth.py'}:gmp", str(workdir), *config_flags(synth_data_dir, **SGD)]
  # As a user would: the project's environment active, 4 CPU devices per task.
  env = {**os.environ, "FLAXTAG_CPU_DEVICES": "4", "JAX_PLATFORMS": "cpu",
         "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
         "XLA_FLAGS": xla_flags_without_device_count()}
  started = time.time()
  job = _sh(*submit, env=env, cwd=tmp_path).split(";")[0]
  log_path = tmp_path / f"flaxtag-{job}.out"

  # 1. scontrol requeue: both tasks save one step and exit; SLURM starts the job again and it resumes.
  # After the first validation (step 2, the epoch's end) and its save: a stop that lands in the first validation
  # waits for the eval step's compile, which on a slow machine outlasts SLURM's 32 s between SIGTERM and SIGKILL.
  _wait(lambda: last_logged_step(workdir) >= 3, "the first training steps after the first validation")
  _sh("scontrol", "requeue", job)
  _wait(lambda: len(_saved_steps(log_path.read_text())) == 2, "both tasks to save after the requeue", timeout=300)
  first_stop = _saved_steps(log_path.read_text())
  # Released at once: SLURM holds a requeued job back for a while before it may start again.
  _wait(lambda: _job_state(job) == "PENDING", "the job to be requeued", timeout=300)
  subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], capture_output=True)
  saved = int(first_stop[0][1])
  _wait(lambda: last_logged_step(workdir) > saved, "the requeued job to resume")

  # 2. scancel --signal=TERM: both tasks save one step and exit 0; resubmitting finishes the run.
  _sh("scancel", "--signal=TERM", job)
  _wait(lambda: _job_state(job) not in ("RUNNING", "COMPLETING", "PENDING"), "the job to end", timeout=300)
  log = log_path.read_text()
  assert _job_state(job) == "COMPLETED", log[-3000:]
  second_stop = _saved_steps(log)[2:]
  for stop in (first_stop, second_stop):
    assert sorted(p for p, _ in stop) == ["0", "1"] and stop[0][1] == stop[1][1], log[-3000:]
  final_job = _sh(*submit[:2], "--wait", *submit[2:], timeout=900, env=env, cwd=tmp_path).split(";")[0]
  wall = time.time() - started

  log = log_path.read_text()
  # jax.distributed.initialize() found both tasks by itself; --open-mode=append kept the log of every start.
  assert "process 0 of 2, 8 devices (4 local)" in log
  assert re.search(rf"job {job}, restart 0,.*job {job}, restart 1,", log, re.S), log[-3000:]
  assert "restart 0, 2 task(s)" in (tmp_path / f"flaxtag-{final_job}.out").read_text()
  reference = sgd_run
  assert [r["step"] for r in records(workdir, "train")] == list(range(1, SGD_STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in records(workdir, "train")],
                             [r["loss"] for r in records(reference, "train")], rtol=1e-5)
  for key in ("roc_auc", "pr_auc", "coarse_roc_auc", "violation_rate"):
    np.testing.assert_allclose([r[key] for r in records(workdir, "valid")],
                               [r[key] for r in records(reference, "valid")], rtol=1e-5, atol=1e-6)
  assert_same_model(workdir, reference)
  print(f"SLURM: stops at steps {first_stop[0][1]} (requeue) and {second_stop[0][1]} (scancel); "
        f"{wall:.0f} s from the first submission to the end of the resubmitted job")

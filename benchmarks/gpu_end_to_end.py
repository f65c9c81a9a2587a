"""A run end to end with the real commands on another machine (a lent GPU), and its checkpoint checked back here.

There: `python -m flaxtag.train` on a tiny synthetic set (configs/synth.py:gmp,runlocal for 3 epochs of 2 steps),
stopped by SIGTERM once its first validation is written and resumed by the same command to the end; then
`python -m flaxtag.eval` of its best checkpoint on the test split. The run directory is packed into one file
beside the reports, so that it comes back from a machine that returns a few files.

Here: `--compare DIR` unpacks that run, evaluates the same checkpoint on this machine's devices (another platform and
device count) and compares the two reports' per-clip probabilities and headline metrics.

  # where FluidSynth is (here): the tiny set, as the tests build it (16 / 8 / 8 clips of 5 s, TimGM6mb, dry)
  python -m data_prep.build synth_instruments --data_dir build/gpu_e2e/data --num_train 16 --num_valid 8 \\
      --num_test 8 --clip_seconds 5 --seed 1 --num_workers 1 --noaugment
  # on the GPU machine, from the repository root (gpu_check.sh --e2e-data runs this first)
  python3 benchmarks/gpu_end_to_end.py --data_dir build/gpu_e2e/data --out OUT
  # back here, with OUT's files in DIR
  .venv/bin/python benchmarks/gpu_end_to_end.py --data_dir build/gpu_e2e/data --compare DIR
"""
import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
# The laptop-sized run (the demo's model, batch 8) for 3 epochs: on 16 clips, 6 steps, validated after each epoch.
CONFIG = "synth.py:gmp,runlocal"
OVERRIDES = {"train.num_epochs": 3, "train.log_every_steps": 1, "data.worker_count": 0}
RUN_ARCHIVE, REPORT, PREDICTIONS, SUMMARY, TRAIN_LOG = (
    "run.tar.gz", "eval.json", "predictions.npz", "end_to_end.json", "train.log")


def records(workdir: pathlib.Path, kind: str) -> list[dict]:
  """metrics.jsonl's records of one kind, read while the run may be writing: a line not yet ended is left out."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  with open(path) as f:
    return [r for r in (json.loads(line) for line in f if line.endswith("\n")) if r["kind"] == kind]


def train(data_dir: str, workdir: pathlib.Path, log: pathlib.Path, stop_after_validation: bool,
          timeout: float) -> int:
  """Runs `python -m flaxtag.train`, its output appended to `log`; with stop_after_validation, sends SIGTERM once a
  validation is recorded."""
  command = [sys.executable, "-m", "flaxtag.train", "--config", f"{REPO / 'configs' / CONFIG}",
             "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
             *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
  with open(log, "a") as err:
    err.write(f"$ {' '.join(command)}\n")
    err.flush()
    process = subprocess.Popen(command, cwd=REPO, stderr=err, stdout=err, text=True)
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
      if stop_after_validation and records(workdir, "valid"):
        process.send_signal(signal.SIGTERM)
        stop_after_validation = False
      time.sleep(0.2)
    if process.poll() is None:
      process.kill()
      raise TimeoutError(f"flaxtag.train did not finish within {timeout:.0f} s; its log: {log}")
  return process.returncode


def headline(report: dict) -> dict:
  return {f"{level} {metric}": report[level][metric] for level in ("fine", "coarse")
          for metric in ("macro_roc_auc", "macro_pr_auc")}


def evaluate(workdir: pathlib.Path, data_dir: str, report: pathlib.Path, predictions: pathlib.Path) -> dict:
  subprocess.run([sys.executable, "-m", "flaxtag.eval", "--workdir", str(workdir), "--data_dir", data_dir,
                  "--output", str(report), "--predictions", str(predictions)], cwd=REPO, check=True)
  with open(report) as f:
    return json.load(f)


def run_there(data_dir: str, out: pathlib.Path, timeout: float):
  import jax  # pylint: disable=g-import-not-at-top
  out.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(tmp) / "run"
    started = time.perf_counter()
    log = out / TRAIN_LOG
    log.unlink(missing_ok=True)
    first = train(data_dir, workdir, log, stop_after_validation=True, timeout=timeout)
    stopped_at = max((r["step"] for r in records(workdir, "train")), default=0)
    second = train(data_dir, workdir, log, stop_after_validation=False, timeout=timeout)
    trained_s = time.perf_counter() - started
    if first or second:
      raise SystemExit(f"flaxtag.train exited with {first} (stopped) and {second} (resumed); its log: {log}")
    report = evaluate(workdir, data_dir, out / REPORT, out / PREDICTIONS)
    with tarfile.open(out / RUN_ARCHIVE, "w:gz") as archive:
      archive.add(workdir, arcname="run")
    device = jax.devices()[0]
    summary = {
        "device": device.device_kind, "platform": device.platform,
        "jax": jax.__version__, "stopped_at_step": stopped_at,
        "last_step": records(workdir, "train")[-1]["step"],
        "validations": [(r["epoch"], r["roc_auc"]) for r in records(workdir, "valid")],
        "test": headline(report), "train_s": trained_s}
  with open(out / SUMMARY, "w") as f:
    json.dump(summary, f, indent=1)
  print(json.dumps(summary, indent=1))


def compare_here(data_dir: str, there: pathlib.Path, tolerance: float):
  import jax  # pylint: disable=g-import-not-at-top
  with open(there / REPORT) as f:
    their_report = json.load(f)
  theirs = np.load(there / PREDICTIONS)
  with tempfile.TemporaryDirectory() as tmp:
    with tarfile.open(there / RUN_ARCHIVE) as archive:
      archive.extractall(tmp, filter="data")
    workdir = pathlib.Path(tmp) / "run"
    report = evaluate(workdir, data_dir, pathlib.Path(tmp) / REPORT, pathlib.Path(tmp) / PREDICTIONS)
    ours = np.load(pathlib.Path(tmp) / PREDICTIONS)
    if not np.array_equal(ours["clip_index"], theirs["clip_index"]):
      raise SystemExit(f"the two evaluations scored other clips: is {data_dir} the data set the run was trained on?")
    difference = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in ("fine_probs", "coarse_probs"))
  theirs_, ours_ = headline(their_report), headline(report)
  print(f"the run trained there, evaluated there and here ({jax.default_backend()}): largest probability "
        f"difference {difference:.2e}; " + ", ".join(f"{k} {theirs_[k]:.4f} / {ours_[k]:.4f}" for k in ours_))
  if difference > tolerance:
    raise SystemExit(f"the probabilities differ by {difference:.2e}, more than {tolerance:.0e}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", required=True, help="the tiny synthetic set's data dir")
  parser.add_argument("--out", type=pathlib.Path, help="there: where the reports and the packed run go")
  parser.add_argument("--compare", type=pathlib.Path, help="here: the folder of the files --out wrote there")
  parser.add_argument("--timeout", type=float, default=300, help="seconds for each training command")
  parser.add_argument("--tolerance", type=float, default=1e-3,
                      help="largest probability difference --compare accepts (a GPU's fp32 may be TF32)")
  args = parser.parse_args(argv)
  if (args.out is None) == (args.compare is None):
    parser.error("give --out (run there) or --compare (check here), one of them")
  data_dir = os.path.abspath(args.data_dir)
  if args.out is not None:
    run_there(data_dir, args.out, args.timeout)
  else:
    compare_here(data_dir, args.compare, args.tolerance)


if __name__ == "__main__":
  main()

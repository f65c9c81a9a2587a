"""benchmarks/gpu_check.sh on the CPU (no GPU here): its runs of the training and inference throughput scripts, in both
precisions, end in one JSON file; runs its time budget leaves out are listed, not lost; and its end-to-end run
(benchmarks/gpu_end_to_end.py) trains, stops, resumes and evaluates, and its checkpoint is evaluated again alike."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_end_to_end  # noqa: E402

pytestmark = pytest.mark.slow  # the whole benchmark script, four runs

REPO = pathlib.Path(__file__).resolve().parents[1]


def gpu_check(tmp_path, *flags):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, not conftest's eight
  env["JAX_PLATFORMS"] = "cpu"
  out = tmp_path / "check.json"
  done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--skip-install", "--allow-cpu",
                         "--python", sys.executable, "--out", str(out), "--models", "raw_cnnl", *flags],
                        capture_output=True, text=True, cwd=tmp_path, env=env, check=False)
  assert done.returncode == 0, done.stdout + done.stderr
  with open(out) as f:
    return json.load(f)


def test_every_mode_and_precision_in_one_file(tmp_path):
  # --wheels (for offline GPU machines) installs only what the Python lacks: nothing here, so the empty folder
  # (pip would fail on it) is never read.
  report = gpu_check(tmp_path, "--batch-sizes", "4", "--steps", "1", "--wheels", str(tmp_path / "no_wheels"))
  assert "failed" not in report and "skipped" not in report
  runs = {(run["mode"], run["half_precision"]): run for run in report["runs"]}
  assert sorted(runs) == [("infer", False), ("infer", True), ("train", False), ("train", True)]
  for run in runs.values():
    assert run["platform"] == "cpu" and run["kernels"] == "cpu"
    assert {(r["model"], r["mode"], r["batch_size"]) for r in run["results"]} == {("raw_cnnl", run["mode"], 4)}
  [train] = runs["train", False]["results"]
  assert train["samples_per_s"] > 0 and 0 < train["mfu"] < 1
  # Inference: the batch on one device and split over both (this machine's cores), each with its share of peak.
  infer = runs["infer", False]["results"]
  assert [r["devices"] for r in infer] == sorted({1, len(os.sched_getaffinity(0))})
  assert all(r["crops_per_s"] > 0 and 0 < r["peak_share"] < 1 for r in infer)
  # Inference counts the forward once, training forward and backward: three times as many FLOPs.
  assert train["gflop_per_sample"] == pytest.approx(3 * infer[0]["gflop_per_crop"])


def test_a_run_the_time_budget_stops_is_reported_as_stopped_and_those_it_leaves_out_as_skipped(tmp_path):
  # Far more steps than the budget allows: the first run is stopped, the rest are skipped, and the report says why.
  report = gpu_check(tmp_path, "--budget", "35", "--batch-sizes", "4 8", "--steps", "100000")
  assert report["runs"] == []
  assert list(report["failed"]) == ["train-fp32-4"]
  assert report["failed"]["train-fp32-4"].startswith("stopped after 3")
  assert sorted(report["skipped"]) == sorted(["train-bf16-4", "infer-fp32-4", "infer-bf16-4", "train-bf16-8",
                                              "infer-bf16-8", "train-fp32-8", "infer-fp32-8"])


def test_the_end_to_end_run_trains_stops_resumes_evaluates_and_its_checkpoint_is_evaluated_alike_here(
    tmp_path, synth_data_dir, capsys):
  # A budget that leaves out every timing run: only the end-to-end phase, which has its own.
  report = gpu_check(tmp_path, "--budget", "1", "--e2e-data", synth_data_dir, "--e2e-budget", "400")
  assert "end_to_end" not in report.get("failed", {}), report["failed"]
  run = report["end_to_end"]
  assert run["platform"] == "cpu"
  # Stopped by SIGTERM after its first validation (epoch 1 of 3, step 2 of 6), resumed, and finished.
  assert 2 <= run["stopped_at_step"] < run["last_step"] == 6
  assert [epoch for epoch, _ in run["validations"]] == [1, 2, 3]
  files = tmp_path / "end_to_end"
  assert "stop requested (SIGTERM); saved step" in (files / "train.log").read_text()
  assert f"from step {run['stopped_at_step']}" in (files / "train.log").read_text()
  # Evaluated again from the packed run directory, in this process's environment: the same probabilities.
  gpu_end_to_end.main(["--data_dir", synth_data_dir, "--compare", str(files), "--tolerance", "1e-6"])
  assert "largest probability difference" in capsys.readouterr().out

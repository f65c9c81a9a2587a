"""benchmarks/spec_frontend_parts.py on the CPU: every part of the Spec front-end SPEC §2 names is timed, in the
timbre convs' formulation asked for, and the JSON keeps them all."""
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import spec_frontend_parts  # noqa: E402

pytestmark = pytest.mark.slow  # thirteen compiles


def test_every_branch_and_the_whole_front_end_are_timed(tmp_path):
  out = tmp_path / "parts.json"
  # The banded timbre convs alone, as GPUs and TPUs run them (the CPU's own formulations are the default here).
  spec_frontend_parts.main(["--batch_size", "2", "--steps", "1", "--kernels", "banded", "--json", str(out)])
  report = json.loads(out.read_text())
  assert report["kernels"] == "banded" and report["batch_size"] == 2
  names = [r["part"] for r in report["results"]]
  # 96 mel bands: timbre kernels 0.9 × 96 = 86 and 0.4 × 96 = 38 bands tall, of widths 7, 3, 1 (SPEC §2, branches
  # 1-6); temporal kernels of 165, 129, 65 and 33 frames (branches 7-10).
  assert names == ["log-mel (forward)", "front-end from waveforms", "front-end from log-mels",
                   "timbre 86×7, 16 filters", "timbre 86×3, 32 filters", "timbre 86×1, 64 filters",
                   "timbre 38×7, 16 filters", "timbre 38×3, 32 filters", "timbre 38×1, 64 filters",
                   "temporal 165, 16 filters", "temporal 129, 32 filters", "temporal 65, 64 filters",
                   "temporal 33, 128 filters"]
  assert all(0 < r["ms_min"] <= r["ms"] <= r["ms_max"] and r["compile_s"] > 0 for r in report["results"])

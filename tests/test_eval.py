"""`flaxtag.eval` on a trained tiny model: metrics equal scikit-learn's, predictions equal a direct 16-crop pass."""
import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as sk_metrics
import tensorflow_datasets as tfds

from data_prep.synth_instruments.synth_instruments import SynthInstruments
from flaxtag import audio, crops, eval as evaluation, input_pipeline
from flaxtag.inference import Tagger

from train_runs import REPO

pytestmark = pytest.mark.slow  # every test reads the session's trained run (a training) or runs the command


@pytest.fixture(scope="module")
def test_split_evaluation(trained_run):
  workdir, _ = trained_run
  return evaluation.evaluate_checkpoint(workdir, "best", "test")


def test_metrics_equal_scikit_learn_per_tag_and_level(test_split_evaluation):
  result, predictions, tagger = test_split_evaluation
  assert result["num_clips"] == 8 and result["split"] == "test"
  for level, labels, probs, names in [
      ("fine", predictions["labels"], predictions["fine_probs"], tagger.tag_names),
      ("coarse", predictions["coarse_labels"], predictions["coarse_probs"], tagger.coarse_tag_names)]:
    m = result[level]
    evaluated = [i for i in range(labels.shape[1]) if 0 < labels[:, i].sum() < len(labels)]
    assert m["evaluated"] == [names[i] for i in evaluated]
    assert set(m["left_out"]) == set(names) - set(m["evaluated"])  # tags without positives or negatives: named
    for i in evaluated:
      assert m["roc_auc"][names[i]] == pytest.approx(sk_metrics.roc_auc_score(labels[:, i], probs[:, i]), abs=1e-12)
      assert m["pr_auc"][names[i]] == pytest.approx(
          sk_metrics.average_precision_score(labels[:, i], probs[:, i]), abs=1e-12)
    assert m["macro_roc_auc"] == pytest.approx(np.mean([m["roc_auc"][names[i]] for i in evaluated]))
  violations = predictions["fine_probs"] > predictions["coarse_probs"][:, tagger.hierarchy.parent] + 1e-6
  assert result["violation_rate"] == pytest.approx(violations.mean()) == 0.0  # GMP: a parent is its largest child


def test_predictions_equal_a_direct_sixteen_crop_pass(test_split_evaluation, synth_data_dir):
  result, predictions, tagger = test_split_evaluation
  source = tfds.builder_from_directory(str(input_pipeline.dataset_dir(synth_data_dir, "synth_instruments"))
                                       ).as_data_source("test")
  for row in (0, 5):
    record = source[int(predictions["clip_index"][row])]
    waveform = audio.from_int16(record["audio"])
    offsets = crops.whole_clip_offsets(len(waveform), tagger.crop_samples, 16)
    direct = tagger.probs(crops.cut(waveform, offsets, tagger.crop_samples)).mean(0)
    np.testing.assert_allclose(predictions["fine_probs"][row], direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(predictions["labels"][row], record["labels"])


def test_batch_size_is_rounded_up_to_the_devices_with_the_same_predictions(trained_run, test_split_evaluation):
  """--batch_size 9 on 8 devices runs one batch of 16 rows, 8 of them padding, masked out: the same predictions."""
  workdir, _ = trained_run
  _, rounded, _ = evaluation.evaluate_checkpoint(workdir, "best", "test", batch_size=9)
  _, expected, _ = test_split_evaluation
  assert sorted(rounded) == sorted(expected)
  for key in expected:
    np.testing.assert_allclose(rounded[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_eval_command_writes_report_and_predictions(trained_run, tmp_path):
  workdir, _ = trained_run
  report, preds = tmp_path / "new" / "report.json", tmp_path / "preds.npz"  # folders are made as needed
  command = [sys.executable, "-m", "flaxtag.eval", "--workdir", str(workdir), "--checkpoint", "latest", "--split",
             "valid", "--output", str(report), "--predictions", str(preds)]
  # A path that cannot be written fails before the evaluation, not after it.
  (tmp_path / "a_file").write_text("")
  failed = subprocess.run([*command[:-1], str(tmp_path / "a_file" / "preds.npz")], cwd=REPO, capture_output=True,
                          text=True, check=False)
  assert failed.returncode == 2 and failed.stdout == "", failed.stderr[-3000:]
  assert failed.stderr == f"error: cannot write {tmp_path / 'a_file' / 'preds.npz'}: {tmp_path / 'a_file'} is a " \
      "file, not a folder.\n"
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "macro ROC-AUC" in done.stdout and "hierarchy violation rate" in done.stdout
  saved = json.loads(report.read_text())
  assert saved["split"] == "valid" and saved["num_clips"] == 8 and saved["checkpoint_step"] == 6
  # Which data: the dataset, its config (none here) and version, the split and its clips (no provenance here).
  version = str(SynthInstruments.VERSION)
  assert saved["data"] == {"name": "synth_instruments", "config": None, "version": version, "splits": {"valid": 8}}
  assert done.stdout.startswith(f"synth_instruments {version}, split valid: 8 clips; checkpoint step 6 of ")
  arrays = np.load(preds)
  assert arrays["fine_probs"].shape == (8, 25) and list(arrays["tag_names"]) == Tagger.load(workdir).tag_names


def test_unknown_split_is_a_clear_error(trained_run):
  from flaxtag.errors import DatasetError
  with pytest.raises(DatasetError, match=r"has no split 'dev'"):
    evaluation.evaluate_checkpoint(trained_run[0], "best", "dev")

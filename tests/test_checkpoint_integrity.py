"""Damaged checkpoints: every reader (eval/tag/explain through `Tagger.load`, and `train` resuming) checks a step
against the checksums saved with it, names a damaged step in one message and, for 'best' and 'latest', uses the
newest intact step; a damaged step asked for by number is an error. Each test damages a copy of `trained_run`
(steps 4 and 6; 6 is both the latest and the best)."""
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from flaxtag import checkpoint, train
from flaxtag.errors import CheckpointError
from flaxtag.inference import Tagger
from train_runs import REPO, final_variables, run_config

DAMAGED, INTACT = 6, 4


def _largest_array_file(step_dir):
  # The model's array data, as orbax reads it: the files of the merged OCDBT database in model/d.
  data_dir = os.path.join(step_dir, checkpoint.MODEL, "d")
  return max((os.path.join(data_dir, name) for name in os.listdir(data_dir)), key=os.path.getsize)


def truncate(step_dir):
  path = _largest_array_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def overwrite_part(step_dir):
  path = _largest_array_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 3)
    f.write(b"\xaa" * 256)


def flip_one_byte(step_dir):
  path = _largest_array_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x01]))


def remove_metadata(step_dir):
  shutil.rmtree(os.path.join(step_dir, checkpoint.METADATA))


DAMAGES = {
    truncate: r"model/d/\w+ has \d+ bytes, \d+ were saved",
    overwrite_part: r"model/d/\w+ differs from the file saved \(sha256 mismatch\)",
    flip_one_byte: r"model/d/\w+ differs from the file saved \(sha256 mismatch\)",
    remove_metadata: r"it has no metadata item",
}


def damaged_copy(trained_run, tmp_path, damage, step=DAMAGED):
  workdir = tmp_path / "run"
  shutil.copytree(trained_run[0], workdir)
  damage(os.path.join(checkpoint.checkpoint_dir(workdir), str(step)))
  return workdir


@pytest.fixture(scope="module")
def intact_variables(trained_run):
  manager = checkpoint.open_manager(trained_run[0], read_only=True)
  assert sorted(manager.all_steps()) == [INTACT, DAMAGED] and checkpoint.resolve_step(manager, "best") == DAMAGED
  return {step: checkpoint.restore_variables(manager, step, checkpoint.item_shapes(manager, step, checkpoint.MODEL))
          for step in (INTACT, DAMAGED)}


def assert_same_variables(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("which", ["latest", "best"])
@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_readers_fall_back_to_the_newest_intact_step(trained_run, intact_variables, tmp_path, capsys, damage,
                                                     which):
  workdir = damaged_copy(trained_run, tmp_path, damage)
  tagger = Tagger.load(workdir, which)
  assert tagger.metadata["step"] == INTACT
  message = capsys.readouterr().err.strip()
  assert len(message.splitlines()) == 1
  assert re.fullmatch(rf"step {DAMAGED} is damaged: {DAMAGES[damage]}; using step {INTACT}", message), message
  assert_same_variables(jax.device_get(tagger.variables), intact_variables[INTACT])


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_a_damaged_step_asked_for_by_number_is_an_error(trained_run, tmp_path, damage):
  workdir = damaged_copy(trained_run, tmp_path, damage)
  with pytest.raises(CheckpointError, match=rf"^step {DAMAGED} is damaged: {DAMAGES[damage]} \(.*/checkpoints/6\)\. "
                     r"Use another step \(steps are \[4, 6\]\) or --checkpoint latest\.$"):
    Tagger.load(workdir, DAMAGED)


def test_a_step_without_checksums_that_orbax_cannot_read_is_damaged_too(trained_run, intact_variables, tmp_path,
                                                                          capsys):
  def truncate_unchecked(step_dir):  # as a step saved before flaxtag wrote checksums
    os.remove(os.path.join(step_dir, checkpoint.CHECKSUMS))
    truncate(step_dir)

  workdir = damaged_copy(trained_run, tmp_path, truncate_unchecked)
  assert Tagger.load(workdir, "latest").metadata["step"] == INTACT
  assert re.fullmatch(rf"step {DAMAGED} is damaged: orbax cannot read its model item \(ValueError: OUT_OF_RANGE: "
                      rf".+\); using step {INTACT}", capsys.readouterr().err.strip())


def test_no_intact_step_is_one_error_naming_each(trained_run, tmp_path):
  workdir = damaged_copy(trained_run, tmp_path, flip_one_byte)
  remove_metadata(os.path.join(checkpoint.checkpoint_dir(workdir), str(INTACT)))
  with pytest.raises(CheckpointError, match=r"no intact checkpoint under .*: step 6 is damaged: .*sha256 mismatch\); "
                     r"step 4 is damaged: it has no metadata item\."):
    Tagger.load(workdir, "best")


def test_eval_command_names_the_damaged_step_and_uses_the_intact_one(trained_run, tmp_path):
  workdir = damaged_copy(trained_run, tmp_path, truncate)
  command = [sys.executable, "-m", "flaxtag.eval", "--workdir", str(workdir), "--split", "valid"]
  done = subprocess.run(command + ["--checkpoint", "latest"], cwd=REPO, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert re.search(rf"^step 6 is damaged: {DAMAGES[truncate]}; using step 4$", done.stderr, re.M), done.stderr
  assert "checkpoint step 4 of" in done.stdout
  done = subprocess.run(command + ["--checkpoint", "6"], cwd=REPO, capture_output=True, text=True, check=False)
  assert done.returncode == 2 and done.stderr.startswith("error: step 6 is damaged:"), done.stderr[-3000:]
  assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_train_resumes_from_the_newest_intact_step(trained_run, synth_data_dir, intact_variables, tmp_path, capsys,
                                                   damage):
  """Resuming sets the damaged step 6 aside, restores step 4, and redoes steps 5 and 6 exactly."""
  workdir = damaged_copy(trained_run, tmp_path, damage)
  train.train_and_evaluate(run_config(synth_data_dir), str(workdir))
  err = capsys.readouterr().err
  assert re.search(rf"^step 6 is damaged: {DAMAGES[damage]}; using step 4$", err, re.M), err
  assert re.search(r"^moved the damaged step\(s\) 6 to .*/damaged_checkpoints$", err, re.M), err
  assert re.search(r"^resuming .* from step 4 ", err, re.M), err
  assert os.listdir(workdir / "damaged_checkpoints") == ["6"]
  # Steps 5 and 6 redone from the restored step 4 give the step 6 of the uninterrupted run.
  assert_same_variables(final_variables(workdir), intact_variables[DAMAGED])

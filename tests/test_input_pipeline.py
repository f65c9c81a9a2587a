"""The grain input pipeline over a miniature MTAT build: shards, crops, eval batches, exact resume."""
import json
import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds

import fixtures_data
from flaxtag import crops
from flaxtag import input_pipeline as ip
from flaxtag.errors import ConfigError, DatasetError

pytestmark = pytest.mark.filterwarnings("ignore:label\\(\\) is deprecated:DeprecationWarning")
NAME = "mtat/top50_full"
CROP = 16000  # 1 s: shorter than every clip (2.5-6 s) of the fixture


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  raw = tmp_path_factory.mktemp("pipeline_raw")
  fixtures_data.make_mtat_tree(raw, n_per_folder=4)
  return fixtures_data.build_dataset(NAME, raw, tmp_path_factory.mktemp("pipeline_data"))


@pytest.fixture(scope="session")
def records(data_dir):
  """{split: [(int16 audio, uint8 labels)]} read with tfds, by record index."""
  path = ip.dataset_dir(data_dir, NAME)
  out = {}
  for split in ("train", "test"):
    source = tfds.builder_from_directory(path).as_data_source(split=split)
    out[split] = [(r["audio"], r["labels"]) for r in source]
  return out


def _expected_train_batch(records, step, batch_size, crop, seed, p, count):
  """The batch the docs promise: rows step*b.. of this process's stream of epoch permutations."""
  n = len(records)
  per_epoch = ip.steps_per_epoch(n, batch_size, count) * batch_size
  audio, labels, used = [], [], []
  for position in range(step * batch_size, (step + 1) * batch_size):
    epoch, j = divmod(position, per_epoch)
    step_in_epoch, row = divmod(j, batch_size)
    record = int(ip.epoch_permutation(n, seed, epoch)[(step_in_epoch * count + p) * batch_size + row])
    pcm, tags = records[record]
    offset = crops.train_offset(len(pcm), crop, seed, epoch, record)
    segment = pcm[offset:offset + crop].astype(np.float32) / 32768
    audio.append(np.pad(segment, (0, crop - len(segment))))
    labels.append(tags.astype(np.float32))
    used.append((epoch, record))
  return {"audio": np.stack(audio), "labels": np.stack(labels)}, used


def test_dataset_info(data_dir, records):
  info = ip.dataset_info(data_dir, "mtat")  # the only config built
  assert info.num_tags == 50 and info.tags[:3] == ("guitar", "classical", "slow")
  assert info.split_sizes["train"] == len(records["train"]) and info.hierarchy is None and info.coarse_tags == ()
  with pytest.raises(DatasetError, match="no dataset 'msd'"):
    ip.dataset_info(data_dir, "msd")


def test_train_batches_are_seeded_crops(data_dir, records):
  it = ip.train_iterator(data_dir, NAME, batch_size=4, crop_len=CROP, seed=5, process_index=0, process_count=1,
                         worker_count=0)
  steps = ip.steps_per_epoch(len(records["train"]), 4, 1)
  for step in range(steps + 2):  # across an epoch boundary
    batch = next(it)
    assert batch["audio"].dtype == np.float32 and batch["labels"].dtype == np.float32
    expected, _ = _expected_train_batch(records["train"], step, 4, CROP, 5, 0, 1)
    np.testing.assert_array_equal(batch["audio"], expected["audio"])
    np.testing.assert_array_equal(batch["labels"], expected["labels"])
  other = next(ip.train_iterator(data_dir, NAME, batch_size=4, crop_len=CROP, seed=6, process_index=0,
                                 process_count=1, worker_count=0))
  assert not np.array_equal(other["audio"], _expected_train_batch(records["train"], 0, 4, CROP, 5, 0, 1)[0]["audio"])


def test_short_clips_are_zero_padded(data_dir, records):
  crop = 65280  # Spec front-end crop, longer than the fixture's 2.5-4.1 s clips
  batch = next(ip.train_iterator(data_dir, NAME, batch_size=4, crop_len=crop, seed=0, process_index=0,
                                 process_count=1, worker_count=0))
  expected, used = _expected_train_batch(records["train"], 0, 4, crop, 0, 0, 1)
  np.testing.assert_array_equal(batch["audio"], expected["audio"])
  short = [row for row, (_, r) in enumerate(used) if len(records["train"][r][0]) < crop]
  assert short, "the fixture should have clips shorter than the crop"
  for row in short:
    n = len(records["train"][used[row][1]][0])
    assert not batch["audio"][row, n:].any() and batch["audio"][row, :n].any()


def test_two_processes_read_disjoint_shards_covering_each_epoch(data_dir, records):
  n, b = len(records["train"]), 3
  steps = ip.steps_per_epoch(n, b, 2)
  seen = []
  for p in range(2):
    it = ip.train_iterator(data_dir, NAME, batch_size=b, crop_len=CROP, seed=1, process_index=p, process_count=2,
                           worker_count=0)
    for step in range(2 * steps):
      batch = next(it)
      expected, used = _expected_train_batch(records["train"], step, b, CROP, 1, p, 2)
      np.testing.assert_array_equal(batch["audio"], expected["audio"])
      seen += [(p, e, r) for e, r in used]
  for epoch in range(2):
    shards = [{r for q, e, r in seen if q == p and e == epoch} for p in range(2)]
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(ip.epoch_permutation(n, 1, epoch)[:steps * b * 2].tolist())
  assert not np.array_equal(ip.epoch_permutation(n, 1, 0), ip.epoch_permutation(n, 1, 1))  # reshuffled each epoch


def test_processes_together_give_the_single_process_global_batch(data_dir, records):
  """Row order of the global batch does not depend on the process count (dropout masks are drawn per row)."""
  single = ip.train_iterator(data_dir, NAME, batch_size=6, crop_len=CROP, seed=2, process_index=0, process_count=1,
                             worker_count=0)
  halves = [ip.train_iterator(data_dir, NAME, batch_size=3, crop_len=CROP, seed=2, process_index=p, process_count=2,
                              worker_count=0) for p in range(2)]
  for _ in range(3):
    whole = next(single)
    parts = [next(it) for it in halves]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key])


def test_num_epochs_ends_the_iterator(data_dir, records):
  it = ip.train_iterator(data_dir, NAME, batch_size=8, crop_len=CROP, seed=0, num_epochs=2, process_index=0,
                         process_count=1, worker_count=0)
  assert len(list(it)) == 2 * ip.steps_per_epoch(len(records["train"]), 8, 1)
  with pytest.raises(ConfigError, match="fewer than one global batch"):
    ip.train_iterator(data_dir, NAME, batch_size=64, crop_len=CROP, seed=0, process_index=0, process_count=1)
  with pytest.raises(DatasetError, match="no split 'dev'"):
    ip.train_iterator(data_dir, NAME, split="dev", batch_size=4, crop_len=CROP, seed=0, process_index=0,
                      process_count=1)


@pytest.mark.parametrize("worker_count", [0, pytest.param(2, marks=pytest.mark.slow)])  # 2: spawned workers
def test_resume_gives_the_batches_of_an_uninterrupted_run(data_dir, worker_count):
  def make():
    return ip.train_iterator(data_dir, NAME, batch_size=4, crop_len=CROP, seed=3, process_index=0,
                             process_count=1, worker_count=worker_count)

  run = make()
  for _ in range(3):
    next(run)
  state = json.loads(json.dumps(run.get_state()))  # what a checkpoint stores
  uninterrupted = [next(run) for _ in range(4)]
  resumed = make()
  resumed.set_state(state)
  for expected in uninterrupted:
    batch = next(resumed)
    np.testing.assert_array_equal(batch["audio"], expected["audio"])
    np.testing.assert_array_equal(batch["labels"], expected["labels"])
  for it in (run, resumed):
    if hasattr(it, "close"):
      it.close()


def test_eval_crops_are_evenly_spaced(data_dir, records):
  batches = list(ip.eval_batches(data_dir, NAME, split="test", batch_size=2, crop_len=CROP, process_index=0,
                                 process_count=1))
  batch = batches[0]
  assert batch["audio"].shape == (2, crops.EVAL_CROPS, CROP) and batch["audio"].dtype == np.float32
  for row in range(2):
    pcm, labels = records["test"][batch["clip_index"][row]]
    step = (len(pcm) - CROP) // 16
    assert step > 0
    for k in range(16):
      np.testing.assert_array_equal(batch["audio"][row, k], pcm[k * step:k * step + CROP] / np.float32(32768))
    np.testing.assert_array_equal(batch["labels"][row], labels)
  np.testing.assert_array_equal(crops.eval_offsets(100, 60, 4), [0, 10, 20, 30])
  np.testing.assert_array_equal(crops.eval_offsets(50, 60, 4), [0, 0, 0, 0])


def test_eval_batches_have_static_shapes_and_masks(data_dir, records):
  n, b, count = len(records["test"]), 3, 2
  num_batches = ip.num_eval_batches(n, b, count)
  assert n % (b * count) != 0, "the fixture should leave a partial last batch"
  indices = []
  for p in range(count):
    batches = list(ip.eval_batches(data_dir, NAME, split="test", batch_size=b, crop_len=CROP, process_index=p,
                                   process_count=count))
    assert len(batches) == num_batches
    for batch in batches:
      assert batch["audio"].shape == (b, 16, CROP) and batch["mask"].dtype == bool
      assert batch["clip_index"].dtype == np.int32 and batch["labels"].shape == (b, 50)
      padding = ~batch["mask"]
      assert (batch["clip_index"][padding] == -1).all() and not batch["audio"][padding].any()
      indices += batch["clip_index"][batch["mask"]].tolist()
  assert sorted(indices) == list(range(n))
  ids = ip.clip_ids(data_dir, NAME, "test")
  assert len(ids) == n and all(i.isdigit() for i in ids)


def test_reader_parses_records_like_tfds(data_dir, records, monkeypatch):
  path = str(ip.dataset_dir(data_dir, NAME))
  reader = ip._Reader(path, "train", {"labels": 50})  # pylint: disable=protected-access
  for index, (pcm, labels) in enumerate(records["train"]):
    example = reader[index]
    np.testing.assert_array_equal(example["audio"], pcm)
    np.testing.assert_array_equal(example["labels"], labels)

  def unexpected(record):
    raise ValueError("unexpected layout")

  monkeypatch.setattr(ip, "_feature_spans", unexpected)  # falls back to tfds's decoder
  with pytest.warns(UserWarning, match="record 0 is not laid out as flaxtag's builders write it"):
    np.testing.assert_array_equal(reader[0]["audio"], records["train"][0][0])
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # said once, not for every record
    np.testing.assert_array_equal(reader[1]["audio"], records["train"][1][0])


def test_incomplete_dataset_is_refused(data_dir, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  copy = tmp_path / "copy"
  shutil.copytree(data_dir, copy)
  (ip.dataset_dir(copy, NAME) / ip.BUILD_SUMMARY_FILE).unlink()
  with pytest.raises(DatasetError, match="incomplete: its build was interrupted"):
    ip.train_iterator(copy, NAME, batch_size=4, crop_len=CROP, seed=0, process_index=0, process_count=1)

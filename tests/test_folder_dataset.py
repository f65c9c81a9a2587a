"""The folder builder (your own audio + a CSV/TSV of tags): both tag forms, split column or seeded grouped random
split, wav/flac/mp3 input, skipped files, and one-line errors for bad labels files."""
import hashlib
import json
import os

import numpy as np
import pytest
import soundfile
import tensorflow_datasets as tfds

import fixtures_data
from data_prep.folder import folder
from flaxtag import input_pipeline
from flaxtag.errors import ConfigError, DatasetError

pytestmark = pytest.mark.filterwarnings("ignore:label\\(\\) is deprecated:DeprecationWarning")
SAMPLE_RATE = 16000


def _records(data_dir, name):
  """{id: (split, audio, labels)} over every split of a built folder dataset."""
  path = input_pipeline.dataset_dir(data_dir, name)
  found = {}
  for split in input_pipeline.dataset_info(data_dir, name).split_sizes:
    for r in tfds.builder_from_directory(path).as_data_source(split=split):
      found[r["id"].decode()] = (split, r["audio"], r["labels"])
  return found


def _metadata(data_dir, name):
  return tfds.builder_from_directory(input_pipeline.dataset_dir(data_dir, name)).info.metadata


@pytest.fixture(scope="module")
def tags_tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder_raw")
  return root, fixtures_data.make_folder_tree(root, 12, tag_form="tags", corrupt=5)


@pytest.fixture(scope="module")
def tags_data(tags_tree, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("folder_data")
  fixtures_data.build_dataset("folder", tags_tree[0], data_dir)
  return data_dir


def test_tags_column_split_column_and_formats(tags_tree, tags_data):
  root, clips = tags_tree
  info = input_pipeline.dataset_info(tags_data, "folder")
  assert info.tags == tuple(sorted(fixtures_data.FOLDER_TAGS))
  assert info.split_sizes == {s: sum(c.split == s and not c.broken for c in clips) for s in ("train", "valid", "test")}
  records = _records(tags_data, "folder")
  assert set(records) == {c.clip_id for c in clips if not c.broken}
  assert {os.path.splitext(p)[1] for p in records} == {".wav", ".flac", ".mp3"}
  for i, clip in enumerate(clips):
    if clip.broken:
      continue
    split, pcm, labels = records[clip.clip_id]
    assert split == clip.split
    np.testing.assert_array_equal(labels, clip.labels)
    # 1-2 s at 16 kHz mono or 22.05 kHz stereo become 16 kHz mono (MP3 adds a little padding).
    assert len(pcm) == pytest.approx((1.0 + 0.25 * (i % 5)) * SAMPLE_RATE, abs=0.1 * SAMPLE_RATE)
    assert np.abs(pcm).max() > 1000
  provenance = _metadata(tags_data, "folder")["provenance"]
  with open(root / "labels.csv", "rb") as f:
    assert provenance["labels_sha256"] == hashlib.sha256(f.read()).hexdigest()
  assert provenance["labels_file"] == "labels.csv" and provenance["split_rule"] == "the 'split' column"
  assert provenance["tag_source"] == "'tags' column, separated by ';'" and provenance["tag_order"] == "sorted by name"


def test_corrupt_file_is_skipped_and_listed(tags_tree, tags_data):
  root, clips = tags_tree
  with open(os.path.join(input_pipeline.dataset_dir(tags_data, "folder"), input_pipeline.SKIPPED_FILES_FILE)) as f:
    manifest = json.load(f)
  [broken] = [c for c in clips if c.broken]
  assert [(e["file"], e["split"]) for e in manifest["files"]] == [(str(root / broken.path), broken.split)]
  assert "cannot decode" in manifest["files"][0]["reason"]


def test_tag_columns_and_grouped_random_split(tmp_path):
  """0/1 columns in a TSV, no split column: the split is drawn by fraction, an artist's rows stay together, the same
  seed gives the same split, and two folder datasets live side by side as configs."""
  raw = tmp_path / "raw"
  clips = fixtures_data.make_folder_tree(raw, 20, tag_form="columns", split_column=False, group_column="artist",
                                         labels_name="labels.tsv")
  data = tmp_path / "data"
  fixtures_data.build_dataset("folder/mine", raw, data, valid_fraction=0.2, test_fraction=0.2, split_seed=3)
  fixtures_data.build_dataset("folder/again", raw, data, valid_fraction=0.2, test_fraction=0.2, split_seed=3)
  info = input_pipeline.dataset_info(data, "folder/mine")
  assert info.tags == fixtures_data.FOLDER_TAGS  # column order
  records = _records(data, "folder/mine")
  by_id = {c.clip_id: c for c in clips}
  for clip_id, (_, _, labels) in records.items():
    np.testing.assert_array_equal(labels, by_id[clip_id].labels)
  split_of = {clip_id: split for clip_id, (split, _, _) in records.items()}
  artist_splits = {}
  for i, clip in enumerate(clips):
    artist_splits.setdefault(i // 2, set()).add(split_of[clip.clip_id])
  assert all(len(s) == 1 for s in artist_splits.values())  # no artist in two splits
  assert info.split_sizes == {"train": 12, "valid": 4, "test": 4}  # 2-row groups fill the 20 % shares exactly
  assert {k: s for k, (s, _, _) in _records(data, "folder/again").items()} == split_of  # same seed, same split
  provenance = _metadata(data, "folder/mine")["provenance"]
  assert provenance["dataset"] == "folder/mine" and provenance["group_column"] == "artist"
  assert provenance["split_seed"] == 3 and provenance["tag_order"] == "column order"


def test_random_split_depends_on_the_seed_and_rows_not_their_order():
  rows = [folder.Row(i, f"f{i}.wav", frozenset(), None, f"g{i // 3}" if i % 4 else None) for i in range(40)]
  first = folder.random_split(rows, 0.1, 0.2, seed=0)
  assert first == folder.random_split(rows, 0.1, 0.2, seed=0)
  assert first != folder.random_split(rows, 0.1, 0.2, seed=1)
  assert dict(zip([r.path for r in rows[::-1]], folder.random_split(rows[::-1], 0.1, 0.2, seed=0))) == \
      dict(zip([r.path for r in rows], first))
  groups = {}
  for row, split in zip(rows, first):
    if row.group:
      groups.setdefault(row.group, set()).add(split)
  assert all(len(s) == 1 for s in groups.values())
  assert first.count("test") >= 8 and first.count("valid") >= 4 and "train" in first
  assert "valid" not in folder.random_split(rows, 0.0, 0.2, seed=0)


@pytest.mark.parametrize("text, message", [
    ("file,tags\na.wav,x\n", r"labels.csv: no 'path' column in the header \['file', 'tags'\]"),
    ("path,split,tags\na.wav,train,x\nb.wav,dev,y\n",
     r"labels.csv:3: column 'split' holds 'dev'; a split is one of train, valid, validation, test"),
    ("path\tpiano\tdrums\na.wav\t1\t0\nb.wav\t0\tyes\n", r"labels.csv:3: tag column 'drums' holds 'yes'; tag columns"),
    ("path,tags,piano\na.wav,x,1\n", r"labels.csv: give the tags either in one 'tags' column or as 0/1 columns"),
    ("path,tags\na.wav,x\na.wav,y\n", r"labels.csv:3: 'a.wav' is listed again \(first on line 2\)"),
    ("path,tags\na.wav,x,y\n", r"labels.csv:2: 3 fields, the header has 2"),
])
def test_bad_labels_files_are_one_line_errors(tmp_path, text, message):
  (tmp_path / "labels.csv").write_text(text)
  with pytest.raises(DatasetError, match=message) as error:
    fixtures_data.build_dataset("folder", tmp_path, tmp_path / "data")
  assert "\n" not in str(error.value)
  assert not (tmp_path / "data").exists()


def test_a_spreadsheets_labels_file_reads_as_a_plain_one(tmp_path):
  """Excel's "CSV UTF-8": a byte-order mark before the header, CRLF line ends, a quoted field holding the delimiter."""
  plain = 'path,split,tags\n"live, 1979/a.wav",train,piano;drums\nb.flac,test,piano\n'
  (tmp_path / "plain.csv").write_text(plain, encoding="utf-8")
  (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbf" + plain.replace("\n", "\r\n").encode("utf-8"))
  expected = folder.read_labels(tmp_path / "plain.csv")
  assert expected.tags == ["drums", "piano"] and expected.rows[0].path == "live, 1979/a.wav"
  assert folder.read_labels(tmp_path / "excel.csv") == expected


def test_training_refuses_a_dataset_without_a_valid_split_before_any_step(tmp_path):
  from configs import mtat  # pylint: disable=g-import-not-at-top
  from flaxtag import train  # pylint: disable=g-import-not-at-top
  for name in ("a.wav", "b.wav"):
    soundfile.write(tmp_path / name, np.random.default_rng(0).standard_normal(SAMPLE_RATE * 4) * 0.1, SAMPLE_RATE)
  (tmp_path / "labels.csv").write_text("path,split,tags\na.wav,train,x\nb.wav,test,y\n")
  fixtures_data.build_dataset("folder/no_valid", tmp_path, tmp_path / "data")
  config = mtat.get_config("spec_att,runlocal")
  config.data.update(name="folder/no_valid", data_dir=str(tmp_path / "data"))
  with pytest.raises(DatasetError, match=r"folder/no_valid/.* has no split 'valid'; its splits are test, train\. "
                                         r"Training needs a 'train' and a 'valid' split"):
    train.setup(config)


def test_bad_options_and_names(tags_tree, tmp_path):
  root = tags_tree[0]
  with pytest.raises(DatasetError, match="--valid_fraction apply only to a labels file without a 'split' column"):
    fixtures_data.build_dataset("folder", root, tmp_path, valid_fraction=0.3)
  with pytest.raises(ConfigError, match="folder/My-Set: a dataset name is lowercase letters, digits and '_'"):
    fixtures_data.build_dataset("folder/My-Set", root, tmp_path)
  with pytest.raises(DatasetError, match="expected one labels file in .*, found 0 of labels.csv, labels.tsv"):
    fixtures_data.build_dataset("folder", tmp_path, tmp_path / "data")
  with pytest.raises(DatasetError, match="folder needs --manual_dir"):
    fixtures_data.build_dataset("folder", None, tmp_path / "data")


def test_labels_option_delimiter_sniffing_and_paths_outside(tags_tree, tmp_path):
  """--labels names a file anywhere; a ';'-delimited CSV is read by its header; a path out of the root is refused."""
  root, clips = tags_tree
  good = next(c for c in clips if not c.broken and c.split == "train")
  labels = tmp_path / "my_tags.txt"
  labels.write_text(f"path;split;tags\n{good.path};train;a|b\n../outside.wav;test;a\n")
  fixtures_data.build_dataset("folder/other", root, tmp_path / "data", labels=str(labels), tag_separator="|")
  info = input_pipeline.dataset_info(tmp_path / "data", "folder/other")
  assert info.tags == ("a", "b") and info.split_sizes == {"train": 1}
  with open(os.path.join(info.path, input_pipeline.SKIPPED_FILES_FILE)) as f:
    [entry] = json.load(f)["files"]
  assert entry["file"] == "../outside.wav" and entry["reason"].startswith("refused: '../outside.wav' resolves to")

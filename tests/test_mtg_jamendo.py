"""The mtg_jamendo builder on the dataset's real metadata (../shared/mtg_jamendo, the instrument subset, split 0) with
generated audio for a sample of its tracks. Expected numbers are computed here from the TSVs with plain csv."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

import fixtures_data
from data_prep import common
from data_prep.mtg_jamendo import mtg_jamendo
from flaxtag import input_pipeline
from flaxtag.errors import DatasetError

SHARED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                                       "mtg_jamendo"))
pytestmark = [
    pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"the MTG-Jamendo metadata is not in {SHARED} (the "
                       "project's shared folder, beside the repository)"),
    pytest.mark.filterwarnings("ignore:label\\(\\) is deprecated:DeprecationWarning"),
]
SAMPLE = 60
SPLITS = ("train", "valid", "test")


def _records(data_dir, name, split):
  source = tfds.builder_from_directory(input_pipeline.dataset_dir(data_dir, name)).as_data_source(split=split)
  return {r["id"].decode(): (r["audio"], r["labels"]) for r in source}


def _all_records(data_dir):
  """{id: (audio, labels)} over every split the build wrote (tfds writes no empty split)."""
  return {t: r for s in input_pipeline.dataset_info(data_dir, "mtg_jamendo").split_sizes
          for t, r in _records(data_dir, "mtg_jamendo", s).items()}


def _manifest(data_dir, name="mtg_jamendo"):
  with open(os.path.join(input_pipeline.dataset_dir(data_dir, name), input_pipeline.SKIPPED_FILES_FILE)) as f:
    return json.load(f)["files"]


def _sample(n):
  """The documented sample: the n tracks of the split files with the smallest sha256 of their TRACK_ID."""
  ids = [t for rows in fixtures_data.jamendo_split_tracks(SHARED).values() for t in rows]
  return sorted(ids, key=lambda t: hashlib.sha256(t.encode()).hexdigest())[:n]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("jamendo_raw")
  ids = _sample(SAMPLE)
  clips = fixtures_data.make_jamendo_tree(root, SHARED, ids, low_quality=ids[10:13], broken=ids[-1:])
  return root, ids, clips


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("jamendo_data")
  fixtures_data.build_dataset("mtg_jamendo", tree[0], data_dir, max_tracks=SAMPLE)
  return data_dir


def test_tags_split_sizes_and_provenance_follow_the_real_files(tree, built):
  _, ids, clips = tree
  info = input_pipeline.dataset_info(built, "mtg_jamendo")
  all_tags = {t for _, tags in fixtures_data.read_jamendo_tsv(os.path.join(SHARED, "autotagging_instrument.tsv"))
              .values() for t in tags}
  assert len(all_tags) == 41 and all(t.startswith("instrument---") for t in all_tags)
  assert info.tags == tuple(sorted(t[len("instrument---"):] for t in all_tags))
  assert "guitar" in info.tags and "electricguitar" in info.tags
  assert info.split_sizes == {s: sum(c.split == s and not c.broken for c in clips.values()) for s in SPLITS}
  assert sum(info.split_sizes.values()) == SAMPLE - 1 and min(info.split_sizes.values()) > 0
  provenance = tfds.builder_from_directory(info.path).info.metadata["provenance"]
  split_files = fixtures_data.jamendo_split_tracks(SHARED)
  assert provenance["tracks_in_split_files"] == {s: len(split_files[s]) for s in SPLITS}
  assert provenance["tracks_in_split_files"] == {"train": 14395, "valid": 5466, "test": 5115}  # SHARED's README
  assert provenance["official_split"] == 0 and provenance["max_tracks"] == SAMPLE
  assert provenance["max_seconds"] is None and provenance["config"] == "instrument"
  assert provenance["metadata_files"]["valid"]["path"] == "data/splits/split-0/autotagging_instrument-validation.tsv"
  with open(os.path.join(SHARED, "autotagging_instrument.tsv"), "rb") as f:
    assert provenance["metadata_files"]["tags"]["sha256"] == hashlib.sha256(f.read()).hexdigest()


def test_labels_and_tag_counts_equal_the_split_files(tree, built):
  _, ids, clips = tree
  counts = np.zeros(41, np.int64)
  for split in SPLITS:
    records = _records(built, "mtg_jamendo", split)
    assert set(records) == {t for t, c in clips.items() if c.split == split and not c.broken}
    for track, (pcm, labels) in records.items():
      np.testing.assert_array_equal(labels, clips[track].labels)
      i = ids.index(track)
      assert len(pcm) == pytest.approx((1.0 + 0.25 * (i % 5)) * 16000, abs=0.1 * 16000)  # whole track kept
      counts += labels
  # Independently: the tags of the built tracks, as the split files write them.
  expected = {}
  for rows in fixtures_data.jamendo_split_tracks(SHARED).values():
    for track, (_, tags) in rows.items():
      if track in ids[:-1]:
        for tag in tags:
          expected[tag[len("instrument---"):]] = expected.get(tag[len("instrument---"):], 0) + 1
  tags = input_pipeline.dataset_info(built, "mtg_jamendo").tags
  assert {t: int(c) for t, c in zip(tags, counts) if c} == expected


def test_low_quality_files_stand_in_and_unreadable_audio_is_listed(tree, built):
  root, ids, clips = tree
  low = ids[10:13]
  assert all(not (root / "audio" / clips[t].path).exists() for t in low)
  assert set(low) <= set(_all_records(built))
  [entry] = _manifest(built)
  assert entry["file"] == str(root / "audio" / clips[ids[-1]].path) and entry["split"] == clips[ids[-1]].split
  assert "cannot decode" in entry["reason"]


def test_max_seconds_keeps_the_centred_excerpt(tree, built, tmp_path):
  ids = tree[1]
  fixtures_data.build_dataset("mtg_jamendo", tree[0], tmp_path, max_tracks=5, max_seconds=0.5)
  whole = _all_records(built)
  sizes = input_pipeline.dataset_info(tmp_path, "mtg_jamendo").split_sizes
  assert sizes == {"train": 2, "valid": 3}  # tfds writes no empty split: this sample has no test track
  excerpts = _all_records(tmp_path)
  assert set(excerpts) == set(ids[:5])  # the sample of 5 is the start of the sample of 60
  for track, (pcm, labels) in excerpts.items():
    full = whole[track][0]
    start = (len(full) - 8000) // 2
    np.testing.assert_array_equal(pcm, full[start:start + 8000])
    np.testing.assert_array_equal(labels, whole[track][1])


def test_missing_audio_is_listed_or_stops_the_build_when_too_much_is_missing(tree, tmp_path, monkeypatch):
  root, ids, clips = tree
  raw = tmp_path / "raw"
  shutil.copytree(root, raw, symlinks=True)
  (raw / "audio" / clips[ids[2]].path).unlink()
  with pytest.raises(DatasetError, match=r"mtg_jamendo: 1 of 20 audio files are missing \(e\.g\. "
                                         + clips[ids[2]].path):
    fixtures_data.build_dataset("mtg_jamendo", raw, tmp_path / "data", max_tracks=20)
  monkeypatch.setattr(common, "MAX_MISSING_FRACTION", 0.1)
  data = fixtures_data.build_dataset("mtg_jamendo", raw, tmp_path / "data", max_tracks=20)
  assert _manifest(data) == [{"file": clips[ids[2]].path, "split": clips[ids[2]].split, "reason": common.MISSING}]
  assert sum(input_pipeline.dataset_info(data, "mtg_jamendo").split_sizes.values()) == 19


def test_paths_outside_the_audio_root_are_refused(tree, tmp_path):
  """A PATH with '..' and an audio file that is a symlink out of the tree both name a decodable file outside."""
  root, ids, clips = tree
  outside = tmp_path / "outside.mp3"
  shutil.copy(root / "audio" / clips[ids[0]].path, outside)
  raw = tmp_path / "raw"
  fixtures_data.make_jamendo_tree(raw, SHARED, ids[:4], paths={ids[0]: "../../outside.mp3"})
  linked = raw / "audio" / clips[ids[1]].path
  linked.unlink()
  linked.symlink_to(outside)
  fixtures_data.build_dataset("mtg_jamendo", raw, tmp_path / "data", max_tracks=4)
  assert set(_all_records(tmp_path / "data")) == set(ids[2:4])
  audio_root = raw / "audio"
  assert _manifest(tmp_path / "data") == sorted([
      {"file": "../../outside.mp3", "split": clips[ids[0]].split,
       "reason": f"refused: '../../outside.mp3' resolves to {outside}, outside {audio_root}"},
      {"file": clips[ids[1]].path, "split": clips[ids[1]].split,
       "reason": f"refused: '{clips[ids[1]].path}' resolves to {outside}, outside {audio_root}"},
  ], key=lambda e: (e["split"], e["file"]))


def test_crlf_and_lf_files_read_alike(tmp_path):
  lines = ["TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS", "track_1\ta\tb\t01/1.mp3\t12.5\tgenre---rock\t"
           "instrument---guitar", "track_2\ta\tb\t02/2.mp3\t3.0\tmood/theme---happy"]
  (tmp_path / "crlf.tsv").write_bytes("\r\n".join(lines).encode() + b"\r\n")
  (tmp_path / "lf.tsv").write_bytes("\n".join(lines).encode())
  crlf, lf = mtg_jamendo.read_tracks(tmp_path / "crlf.tsv"), mtg_jamendo.read_tracks(tmp_path / "lf.tsv")
  assert crlf == lf == [mtg_jamendo.Track("track_1", "01/1.mp3", ("genre---rock", "instrument---guitar")),
                        mtg_jamendo.Track("track_2", "02/2.mp3", ("mood/theme---happy",))]
  assert mtg_jamendo.tag_name("mood/theme---happy", None, "x") == "mood/theme---happy"
  assert mtg_jamendo.tag_name("instrument---guitar", "instrument", "x") == "guitar"
  with pytest.raises(DatasetError, match="x: tag 'genre---rock' is not of the category 'instrument'"):
    mtg_jamendo.tag_name("genre---rock", "instrument", "x")


def test_missing_metadata_and_bad_options_stop_the_build(tree, built, tmp_path):
  root = tree[0]
  with pytest.raises(DatasetError, match="missing in the manual dir .*: data/splits/split-1/autotagging_instrument-"
                                         "train.tsv, .*-validation.tsv, .*-test.tsv\\.\n.*mtg-jamendo-dataset"):
    fixtures_data.build_dataset("mtg_jamendo", root, tmp_path, split=1)
  with pytest.raises(DatasetError, match="missing in the manual dir .*: data/autotagging_genre.tsv, "):
    fixtures_data.build_dataset("mtg_jamendo/genre", root, tmp_path)
  with pytest.raises(DatasetError, match="--split must be one of the official splits 0-4, got 5"):
    fixtures_data.build_dataset("mtg_jamendo", root, tmp_path, split=5)
  with pytest.raises(DatasetError, match="--max_seconds must be positive"):
    fixtures_data.build_dataset("mtg_jamendo", root, tmp_path, max_seconds=0)
  assert not list(tmp_path.iterdir())
  # A complete build is reused only for the same options.
  with pytest.raises(DatasetError, match="was built with max_tracks=60; this build asks for max_tracks=59. Pass --overwrite"):
    fixtures_data.build_dataset("mtg_jamendo", root, built, max_tracks=59)


@pytest.mark.slow
def test_method_b_trains_and_evaluates_on_the_jamendo_instrument_families(tree, built, tmp_path):
  """configs/jamendo_instruments.py on the built sample: one epoch of a tiny GMP model, then eval on the test split."""
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
  from flaxtag import checkpoint, train  # pylint: disable=g-import-not-at-top
  from flaxtag import eval as evaluation  # pylint: disable=g-import-not-at-top
  from flaxtag.hierarchy import load_hierarchy  # pylint: disable=g-import-not-at-top
  from train_runs import OVERRIDES, REPO  # pylint: disable=g-import-not-at-top
  _, _, clips = tree
  config = config_flags.ConfigFileFlagParser(name="config").parse(f"{REPO / 'configs' / 'jamendo_instruments.py'}:gmp")
  config.update_from_flattened_dict({**OVERRIDES, "data.data_dir": str(built), "train.num_epochs": 1})
  train.train_and_evaluate(config, str(tmp_path))
  families = load_hierarchy(REPO / "data_prep" / "hierarchies" / "mtg_jamendo_instruments.yaml").to_mapping()
  fine = [t for children in families.values() for t in children]
  manager = checkpoint.open_manager(tmp_path, read_only=True)
  _, metadata = checkpoint.load_config(manager, manager.latest_step())
  assert metadata["tag_names"] == fine and metadata["hierarchy"] == families
  data = metadata["data"]
  assert (data["name"], data["config"], data["provenance"]["official_split"]) == ("mtg_jamendo", "instrument", 0)

  result, predictions, tagger = evaluation.evaluate_checkpoint(tmp_path, "latest", "test")
  assert tagger.tag_names == fine and tagger.coarse_tag_names == list(families)
  # Expected targets from the builder's 41 columns (tags sorted by name), computed here: a family is present where
  # the track is tagged with it (guitar, bass, strings, ...) or with one of its children.
  tags = input_pipeline.dataset_info(built, "mtg_jamendo").tags
  test_ids = input_pipeline.clip_ids(built, "mtg_jamendo", "test")
  labels = [dict(zip(tags, clips[test_ids[i]].labels)) for i in predictions["clip_index"]]
  np.testing.assert_array_equal(predictions["labels"], [[row[t] for t in fine] for row in labels])
  expected_coarse = [[max([row.get(c, 0)] + [row[t] for t in children]) for c, children in families.items()]
                     for row in labels]
  np.testing.assert_array_equal(predictions["coarse_labels"], expected_coarse)
  # The sample has test tracks where only the track's own family annotation makes the family present.
  assert any(row[c] and not any(row[t] for t in children) for row in labels for c, children in families.items()
             if c in row)
  assert result["data"]["splits"] == {"test": len(test_ids)}

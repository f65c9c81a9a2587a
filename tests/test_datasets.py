"""Dataset builders on miniature raw trees: MTAT (folders and zip parts), MSD (pickles, Beam), synth_instruments."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import fixtures_data
from data_prep import build, common
from data_prep.msd import msd
from data_prep.mtat import mtat
from flaxtag import audio, input_pipeline
from flaxtag.errors import ConfigError, DatasetError

pytestmark = pytest.mark.filterwarnings("ignore:label\\(\\) is deprecated:DeprecationWarning")
SAMPLE_RATE = 16000


def _records(data_dir, name, split):
  """{id: (audio int16, labels, coarse labels or None)} of a built split, read with tfds."""
  source = tfds.builder_from_directory(input_pipeline.dataset_dir(data_dir, name)).as_data_source(split=split)
  return {r["id"].decode(): (r["audio"], r["labels"], r.get("coarse_labels")) for r in source}


def _manifest(data_dir, name):
  with open(os.path.join(input_pipeline.dataset_dir(data_dir, name), input_pipeline.SKIPPED_FILES_FILE)) as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------------------------------------
# MTAT


@pytest.fixture(scope="session")
def mtat_tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("mtat_raw")
  return root, fixtures_data.make_mtat_tree(root, n_per_folder=4)


@pytest.fixture(scope="session")
def mtat_data(mtat_tree, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("mtat_data")
  fixtures_data.build_dataset("mtat/top50_clean", mtat_tree[0], data_dir)
  return data_dir


def test_mtat_tags_and_clean_split_sizes(mtat_tree, mtat_data):
  _, clips = mtat_tree
  info = input_pipeline.dataset_info(mtat_data, "mtat")
  assert info.tags == mtat.TOP50
  assert info.hierarchy is None
  expected = {s: sum(c.split == s and c.labels.any() and not c.broken for c in clips) for s in ("train", "valid", "test")}
  assert info.split_sizes == expected
  assert sum(not c.labels.any() for c in clips) >= 10  # the clean config really drops clips


def test_mtat_examples_match_annotations(mtat_tree, mtat_data):
  _, clips = mtat_tree
  by_id = {c.clip_id: c for c in clips}
  for split in ("train", "valid", "test"):
    for clip_id, (pcm, labels, _) in _records(mtat_data, "mtat/top50_clean", split).items():
      clip = by_id[clip_id]
      assert clip.split == split
      np.testing.assert_array_equal(labels, clip.labels)
      assert pcm.dtype == np.int16 and 2.4 * SAMPLE_RATE < len(pcm) < 6.2 * SAMPLE_RATE
      assert np.abs(pcm).max() > 1000


def test_mtat_empty_and_corrupt_files_are_skipped_and_listed(mtat_tree, mtat_data):
  _, clips = mtat_tree
  manifest = _manifest(mtat_data, "mtat")
  broken = sorted((c.split, c.path) for c in clips if c.broken)
  assert manifest["count"] == 2
  assert sorted((e["split"], os.path.relpath(e["file"], mtat_tree[0])) for e in manifest["files"]) == broken
  assert all("decode" in e["reason"] or "empty" in e["reason"] for e in manifest["files"])
  with open(os.path.join(input_pipeline.dataset_dir(mtat_data, "mtat"), input_pipeline.BUILD_SUMMARY_FILE)) as f:
    assert json.load(f)["skipped"] == 2


def test_mtat_full_config_and_zip_parts(mtat_tree, mtat_data, tmp_path):
  """The zip parts, read as one stream, give the same examples as the extracted folders."""
  _, clips = mtat_tree
  raw = tmp_path / "raw"
  fixtures_data.make_mtat_tree(raw, n_per_folder=4, layout="zip_parts")
  assert sorted(os.listdir(raw)) == ["annotations_final.csv", "mp3.zip.001", "mp3.zip.002", "mp3.zip.003"]
  fixtures_data.build_dataset("mtat/top50_full", raw, tmp_path / "data")
  info = input_pipeline.dataset_info(tmp_path / "data", "mtat/top50_full")
  assert info.split_sizes == {s: sum(c.split == s and not c.broken for c in clips) for s in ("train", "valid", "test")}
  assert _manifest(tmp_path / "data", "mtat/top50_full")["count"] == 2
  clean = _records(mtat_data, "mtat/top50_clean", "test")
  full = _records(tmp_path / "data", "mtat/top50_full", "test")
  assert set(clean) < set(full)
  for clip_id, (pcm, labels, _) in clean.items():
    np.testing.assert_array_equal(full[clip_id][0], pcm)
    np.testing.assert_array_equal(full[clip_id][1], labels)


def test_mtat_annotation_paths_outside_the_manual_dir_are_refused_and_listed(mtat_tree, tmp_path):
  """'0/../../x.mp3', and a symlink in the tree that points out of it, name a decodable file outside: not read."""
  _, clips = mtat_tree
  raw = tmp_path / "raw"
  fixtures_data.make_mtat_tree(raw, n_per_folder=4)
  (tmp_path / "outside.mp3").write_bytes((raw / clips[0].path).read_bytes())
  (raw / "0" / "linked.mp3").symlink_to(tmp_path / "outside.mp3")
  fixtures_data.append_mtat_clip(raw, "escapes", "0/../../outside.mp3")
  fixtures_data.append_mtat_clip(raw, "linked", "0/linked.mp3")
  fixtures_data.build_dataset("mtat/top50_full", raw, tmp_path / "data")
  built = _records(tmp_path / "data", "mtat/top50_full", "train")
  assert clips[0].clip_id in built and not {"escapes", "linked"} & set(built)
  refused = [e for e in _manifest(tmp_path / "data", "mtat/top50_full")["files"] if "outside" in e["reason"]]
  assert refused == [
      {"file": "0/../../outside.mp3", "split": "train",
       "reason": f"refused: '0/../../outside.mp3' resolves to {tmp_path / 'outside.mp3'}, outside {raw}"},
      {"file": "0/linked.mp3", "split": "train",
       "reason": f"refused: '0/linked.mp3' resolves to {tmp_path / 'outside.mp3'}, outside {raw}"}]


def _valid_clip_and_another(mtat_tree):
  root, clips = mtat_tree
  real = next(c for c in clips if c.split == "valid" and c.labels.any() and not c.broken)
  other = next(c for c in clips if c.split == "train" and not c.broken)
  return real, (root / other.path).read_bytes()


def test_mtat_zip_members_with_absolute_or_dotdot_paths_are_refused_and_listed(mtat_tree, mtat_data, tmp_path):
  """A member '../../c/<file>' used to replace the real 'c/<file>' silently."""
  real, other_audio = _valid_clip_and_another(mtat_tree)
  raw = tmp_path / "raw"
  fixtures_data.make_mtat_tree(raw, n_per_folder=4, layout="zip_parts",
                               extra_members={f"../../{real.path}": other_audio, "/abs/x.mp3": other_audio})
  fixtures_data.build_dataset("mtat/top50_clean", raw, tmp_path / "data")
  built = _records(tmp_path / "data", "mtat/top50_clean", "valid")[real.clip_id][0]
  np.testing.assert_array_equal(built, _records(mtat_data, "mtat/top50_clean", "valid")[real.clip_id][0])
  manifest = _manifest(tmp_path / "data", "mtat/top50_clean")
  reason = "refused archive member: an absolute path or one with '..'"
  assert [e for e in manifest["files"] if e["split"] == "none"] == [
      {"file": "mp3.zip:../../" + real.path, "split": "none", "reason": reason},
      {"file": "mp3.zip:/abs/x.mp3", "split": "none", "reason": reason}]
  assert manifest["count"] == 4  # and the two broken clips


def test_mtat_zip_member_that_shadows_another_is_an_error(mtat_tree, tmp_path):
  real, other_audio = _valid_clip_and_another(mtat_tree)
  raw = tmp_path / "raw"
  fixtures_data.make_mtat_tree(raw, n_per_folder=4, layout="zip_parts", extra_members={f"mp3/{real.path}": other_audio})
  with pytest.raises(DatasetError, match=f"mp3.zip.003: members '{real.path}' and 'mp3/{real.path}' both stand for "
                                         f"'{real.path}'; which one is meant cannot be known"):
    fixtures_data.build_dataset("mtat/top50_clean", raw, tmp_path / "data")
  assert not (tmp_path / "data").exists()


def test_archive_member_names_are_normalized_before_they_are_compared():
  index, refused = common.index_archive_members(
      ["a/", "a/b.mp3", "./c//d.mp3", "e\\f.mp3", "C:/g.mp3", "h/../../i.mp3", "..\\j.mp3"], "x.zip")
  assert index == {"a/b.mp3": "a/b.mp3", "c/d.mp3": "./c//d.mp3", "e/f.mp3": "e\\f.mp3"}
  assert list(refused) == ["C:/g.mp3", "h/../../i.mp3", "..\\j.mp3"]
  with pytest.raises(DatasetError, match="x.zip: members 'c/d.mp3' and './c/d.mp3' both stand for 'c/d.mp3'"):
    common.index_archive_members(["c/d.mp3", "./c/d.mp3"], "x.zip")


def test_top_tags_rank_by_count_then_column():
  labels = np.array([[1, 1, 0, 1], [0, 1, 1, 1], [0, 0, 1, 0]])
  assert mtat.top_tags(["a", "b", "c", "d"], labels, k=3) == [1, 2, 3]  # b=2, c=2, d=2 before a=1; ties by column


def test_mtat_real_annotations_must_give_spec_top50(mtat_tree, monkeypatch, tmp_path):
  root, clips = mtat_tree
  monkeypatch.setattr(mtat, "REAL_ROWS", len(clips))  # make the fixture count as "the real file"
  builder = mtat.Mtat(data_dir=tmp_path)
  assert [len(items) for items, _ in builder._split_items(root).values()]  # the fixture's top 50 are SPEC's
  monkeypatch.setattr(mtat, "TOP50", mtat.TOP50[::-1])
  with pytest.raises(DatasetError, match="not SPEC's list"):
    mtat.Mtat(data_dir=tmp_path)._split_items(root)


def test_missing_manual_files_are_listed(mtat_tree, tmp_path):
  with pytest.raises(DatasetError, match=r"annotations_final\.csv.*\n.*magnatagatune"):
    build.build("mtat", tmp_path / "data", tmp_path)
  (tmp_path / "annotations_final.csv").write_text(open(mtat_tree[0] / "annotations_final.csv").read())
  with pytest.raises(DatasetError, match="zip parts mp3.zip.001, mp3.zip.002, mp3.zip.003 or the extracted folders"):
    build.build("mtat", tmp_path / "data", tmp_path)
  (tmp_path / "mp3.zip.001").write_bytes(b"")
  with pytest.raises(DatasetError, match="missing in the manual dir .*: mp3.zip.002, mp3.zip.003"):
    build.build("mtat", tmp_path / "data", tmp_path)
  with pytest.raises(DatasetError, match="filtered_list_train.cP, filtered_list_test.cP, msd_id_to_tag_vector.cP, "
                                         "audio.*\n.*sota-music-tagging-models"):
    build.build("msd", tmp_path / "data", tmp_path)
  with pytest.raises(DatasetError, match="needs --manual_dir"):
    build.build("msd", tmp_path / "data")
  assert not (tmp_path / "data").exists()  # nothing written


@pytest.mark.slow
def test_cli_reports_user_errors_without_traceback(tmp_path):
  result = subprocess.run([sys.executable, "-m", "data_prep.build", "mtat", f"--data_dir={tmp_path}",
                           f"--manual_dir={tmp_path}"], capture_output=True, text=True, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 2, result.stderr
  assert "error: mtat: missing in the manual dir" in result.stderr and "Traceback" not in result.stderr


def test_build_rejects_unknown_names_and_options(tmp_path):
  with pytest.raises(ConfigError, match="unknown dataset"):
    build.build("mtt", tmp_path)
  with pytest.raises(ConfigError, match="no config 'top10'"):
    build.build("mtat/top10", tmp_path)
  with pytest.raises(ConfigError, match="--soundfont does not apply to mtat"):
    build.build("mtat", tmp_path, soundfont="x.sf2")


# ---------------------------------------------------------------------------------------------------------------------
# MSD


@pytest.fixture(scope="session")
def msd_tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("msd_raw")
  return root, fixtures_data.make_msd_tree(root, num_train=6, num_valid=2, num_test=3)


@pytest.fixture(scope="session")
def msd_data(msd_tree, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("msd_data")
  fixtures_data.build_dataset("msd", msd_tree[0], data_dir, num_train=6)
  return data_dir


def test_msd_splits_labels_and_resampled_audio(msd_tree, msd_data):
  _, clips = msd_tree
  info = input_pipeline.dataset_info(msd_data, "msd")
  assert info.tags == msd.TAGS
  assert info.split_sizes == {"train": 5, "valid": 2, "test": 3}
  by_id = {c.clip_id: c for c in clips}
  for split in ("train", "valid", "test"):
    for track, (pcm, labels, _) in _records(msd_data, "msd", split).items():
      assert by_id[track].split == split and not by_id[track].broken
      np.testing.assert_array_equal(labels, by_id[track].labels)
      # 2 s previews at 44.1 / 22.05 kHz, mono or stereo, become 16 kHz mono (MP3 adds up to ~0.1 s of padding).
      assert 1.95 * SAMPLE_RATE < len(pcm) < 2.15 * SAMPLE_RATE
  manifest = _manifest(msd_data, "msd")
  assert [(e["split"], os.path.basename(e["file"])) for e in manifest["files"]] == [
      ("train", c.clip_id + ".mp3") for c in clips if c.broken]


def test_msd_path_map_entries_outside_the_audio_dir_are_refused_and_listed(tmp_path):
  """Paths of 7D_id_to_path.pkl are relative to audio/: '../../x.mp3' and '/abs/x.mp3' name a file outside."""
  raw = tmp_path / "raw"
  clips = fixtures_data.make_msd_tree(raw, num_train=6, num_valid=2, num_test=3)
  outside = tmp_path / "outside.mp3"
  outside.write_bytes((raw / "audio" / clips[0].path).read_bytes())
  escaping, absolute = clips[8].clip_id, clips[9].clip_id  # two test tracks
  paths = {c.clip_id: c.path for c in clips}
  paths.update({escaping: "../../outside.mp3", absolute: str(outside)})
  fixtures_data.write_msd_path_maps(raw, paths)
  fixtures_data.build_dataset("msd", raw, tmp_path / "data", num_train=6)
  assert set(_records(tmp_path / "data", "msd", "test")) == {clips[10].clip_id}
  audio_root = raw / "audio"
  refused = [e for e in _manifest(tmp_path / "data", "msd")["files"] if "outside" in e["reason"]]
  assert sorted(refused, key=lambda e: e["file"]) == sorted([
      {"file": str(audio_root / "../../outside.mp3"), "split": "test",
       "reason": f"refused: '../../outside.mp3' resolves to {outside}, outside {audio_root}"},
      {"file": str(outside), "split": "test",
       "reason": f"refused: '{outside}' resolves to {outside}, outside {audio_root}"},
  ], key=lambda e: e["file"])


def test_msd_restricted_unpickler(tmp_path, msd_tree):
  assert len(msd.load_pickle(msd_tree[0] / "msd_id_to_tag_vector.cP")) == 11
  fixtures_data.write_forbidden_pickle(tmp_path / "bad.cP")
  with pytest.raises(DatasetError, match="refusing to unpickle fixtures_data.NotAllowed"):
    msd.load_pickle(tmp_path / "bad.cP")

  class Exploit:

    def __reduce__(self):
      return (os.system, ("echo pwned",))

  (tmp_path / "exploit.cP").write_bytes(__import__("pickle").dumps([Exploit()], protocol=2))
  with pytest.raises(DatasetError, match=r"refusing to unpickle (posix|os)\.system"):
    msd.load_pickle(tmp_path / "exploit.cP")


def test_msd_python2_bytes_pickles(tmp_path):
  """What Python 2's cPickle writes: str as SHORT_BINSTRING (bytes here), numpy arrays with str (bytes) state."""
  vector = np.arange(3, dtype=np.int64).reshape(3, 1)
  dtype = b"cnumpy\ndtype\nU\x02i8K\x00K\x01\x87R(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
  array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01K\x03K\x01\x86"
           + dtype + b"\x89U\x18" + vector.tobytes() + b"tb")
  (tmp_path / "py2.cP").write_bytes(b"\x80\x02}U\x12TRAAAAK128F9318786" + array + b"s.")
  loaded = msd.load_pickle(tmp_path / "py2.cP")
  assert list(loaded) == [b"TRAAAAK128F9318786"]
  np.testing.assert_array_equal(loaded[b"TRAAAAK128F9318786"], vector)


@pytest.mark.slow
def test_msd_beam_build_equals_local_build(msd_tree, msd_data, tmp_path):
  pytest.importorskip("apache_beam", reason="apache-beam is not installed (pip install 'flaxtag[beam]')")
  fixtures_data.build_dataset("msd", msd_tree[0], tmp_path, num_train=6, beam=True)
  for split in ("train", "valid", "test"):
    local, beam = _records(msd_data, "msd", split), _records(tmp_path, "msd", split)
    assert local.keys() == beam.keys()
    for track in local:
      np.testing.assert_array_equal(local[track][0], beam[track][0])
  assert _manifest(tmp_path, "msd") == _manifest(msd_data, "msd")


@pytest.mark.slow
def test_worker_processes_build_the_same_dataset(msd_tree, msd_data, tmp_path):
  fixtures_data.build_dataset("msd", msd_tree[0], tmp_path, num_train=6, num_workers=2)
  local, pooled = _records(msd_data, "msd", "train"), _records(tmp_path, "msd", "train")
  assert local.keys() == pooled.keys()
  assert all(np.array_equal(local[t][0], pooled[t][0]) for t in local)
  assert _manifest(tmp_path, "msd")["count"] == 1


def test_interrupted_build_is_refused_then_rebuilt(msd_tree, tmp_path, monkeypatch):
  original = common.example_from_file
  calls = []

  def fail_on_third(item):
    calls.append(item)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return original(item)

  monkeypatch.setattr(common, "example_from_file", fail_on_third)
  with pytest.raises(KeyboardInterrupt):
    build.build("msd", tmp_path, msd_tree[0], num_train=6)
  assert not (tmp_path / "msd" / "1.0.0").exists()  # tfds wrote into a temp dir, removed on the exception
  with pytest.raises(DatasetError, match="no dataset 'msd'"):
    input_pipeline.dataset_info(tmp_path, "msd")
  # What a killed build leaves: tfds's temp dir, never renamed.
  (tmp_path / "msd" / "incomplete.ABC123_1.0.0").mkdir()
  (tmp_path / "msd" / "incomplete.ABC123_1.0.0" / "msd-train.array_record-00000-of-00001").write_bytes(b"x")
  with pytest.raises(DatasetError, match="did not finish"):
    input_pipeline.dataset_info(tmp_path, "msd")
  monkeypatch.setattr(common, "example_from_file", original)
  summary = build.build("msd", tmp_path, msd_tree[0], num_train=6)
  assert summary["examples"] == {"train": 5, "valid": 2, "test": 3}
  assert not list((tmp_path / "msd").glob("incomplete.*"))
  # A dataset dir without the completeness marker (killed after tfds's rename) is refused, then rebuilt.
  (tmp_path / "msd" / "1.0.0" / input_pipeline.BUILD_SUMMARY_FILE).unlink()
  with pytest.raises(DatasetError, match="incomplete"):
    input_pipeline.dataset_info(tmp_path, "msd")
  assert not build.build("msd", tmp_path, msd_tree[0], num_train=6).get("reused")
  assert build.build("msd", tmp_path, msd_tree[0], num_train=6).get("reused")


def test_summary_lists_counts_and_speed():
  text = common.format_summary({"name": "msd", "examples": {"train": 5, "valid": 2}, "total_examples": 7,
                                "skipped": 1, "manifest": "/d/skipped_files.json", "seconds": 2.0,
                                "clips_per_second": 4.0, "path": "/d"})
  assert "train 5, valid 2" in text and "skipped files: 1 (listed in /d/skipped_files.json)" in text
  assert "4.0 clips/s" in text


# ---------------------------------------------------------------------------------------------------------------------
# synth_instruments


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
  pytest.importorskip("pretty_midi")
  try:
    import fluidsynth  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    pytest.skip(f"FluidSynth is not available ({e}); apt-get install libfluidsynth3")
  data_dir = tmp_path_factory.mktemp("synth_data")
  fixtures_data.build_dataset("synth_instruments", None, data_dir, num_train=5, num_valid=1, num_test=1, seed=7,
                              clip_seconds=2.0)
  return data_dir


def test_synth_hierarchy_is_shipped_and_consistent(synth_data):
  from data_prep.synth_instruments import render  # pylint: disable=import-outside-toplevel
  info = input_pipeline.dataset_info(synth_data, "synth_instruments")
  mapping = render.hierarchy()
  assert len(info.tags) >= 20 and len(info.coarse_tags) >= 7
  assert set(info.tags) == set(render.INSTRUMENTS)
  assert info.hierarchy.to_mapping() == mapping
  with open(os.path.join(info.path, input_pipeline.HIERARCHY_FILE)) as f:
    assert json.load(f) == mapping
  assert info.split_sizes == {"train": 5, "valid": 1, "test": 1}


def test_synth_labels_are_what_was_rendered(synth_data):
  from data_prep.synth_instruments import render  # pylint: disable=import-outside-toplevel
  info = input_pipeline.dataset_info(synth_data, "synth_instruments")
  records = _records(synth_data, "synth_instruments", "train")
  for index in range(5):
    pcm, fine, coarse = records[f"train_{index:06d}"]
    plan, _ = render.plan_clip(7, "train", index)
    assert 1 <= len(plan.instruments) <= render.MAX_INSTRUMENTS
    assert [t for t, on in zip(info.tags, fine) if on] == [t for t in info.tags if t in plan.instruments]
    np.testing.assert_array_equal(coarse, info.hierarchy.coarse_targets(fine))
    assert len(pcm) == 2 * SAMPLE_RATE and np.abs(pcm).max() > 3000
  # Deterministic from the seed: re-rendering gives the stored clip; another seed another clip.
  again, instruments = render.render_clip(7, "train", 3, seconds=2.0)
  np.testing.assert_array_equal(records["train_000003"][0], audio.to_int16(again))
  assert render.plan_clip(8, "train", 3)[0] != render.plan_clip(7, "train", 3)[0]
  assert instruments == render.plan_clip(7, "train", 3)[0].instruments


def test_synth_instrument_parts_stay_in_register():
  from data_prep.synth_instruments import render  # pylint: disable=import-outside-toplevel
  for index in range(20):
    plan, rng = render.plan_clip(0, "valid", index)
    for part in plan.parts:
      notes = render.part_notes(plan, part, 10.0, rng)
      inst = render.INSTRUMENTS[part.name]
      pitches = [p for _, _, p, _ in notes]
      assert inst.low <= min(pitches) and max(pitches) <= inst.high + 12, part
      starts = sorted(s for s, _, _, _ in notes)
      assert starts[0] < 0.5 and max(np.diff(starts + [10.0])) < 3.0, part  # playing all through the clip

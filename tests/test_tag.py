"""Tagging files: crops (SPEC §1), batching over devices, per-file errors, and the flaxtag.tag command line."""
import csv
import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile

from flaxtag import crops, tag
from flaxtag.errors import AudioError, FlaxtagError
from flaxtag.inference import Tagger

import tiny_models

REPO = pathlib.Path(__file__).resolve().parents[1]
# name → (seconds, sample rate, channels); a.wav is shorter than one crop (4.08 s).
FILES = {"a.wav": (3.7, 8000, 1), "b.flac": (31.0, 22050, 1), "c.ogg": (6.0, 44100, 2), "d.mp3": (5.0, 44100, 2)}
CORRUPT = "corrupt.mp3"


def _music(seconds, rate, channels=1, seed=0):
  """Notes of changing pitch over noise: something that varies between crops."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(round(seconds * rate))) / rate
  pitch = 220.0 * 2 ** (np.floor(t * 2) % 12 / 12)
  x = 0.3 * np.sin(2 * np.pi * np.cumsum(pitch) / rate) * (0.5 + 0.5 * np.sin(np.pi * t) ** 2)
  x = x + 0.03 * rng.normal(size=t.size)
  return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("audio")
  paths = []
  for i, (name, (seconds, rate, channels)) in enumerate(FILES.items()):
    soundfile.write(folder / name, _music(seconds, rate, channels, seed=i), rate)
    paths.append(str(folder / name))
  (folder / CORRUPT).write_bytes(np.random.default_rng(0).bytes(4000))
  paths.insert(1, str(folder / CORRUPT))
  return paths


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("spec_att")
  tiny_models.save_tiny_model(path, "spec", "attention")
  return path


@pytest.fixture(scope="module")
def tagger(workdir):
  return Tagger.load(workdir)


@pytest.fixture(scope="module")
def hierarchical(tmp_path_factory):
  path = tmp_path_factory.mktemp("raw_att_gmp")
  tiny_models.save_tiny_model(path, "raw", "attention", head="gmp", hierarchy=tiny_models.HIERARCHY)
  return Tagger.load(path)


def test_crops_are_evenly_spaced_and_short_clips_padded(tagger):
  crop = tagger.crop_samples
  wave = np.random.default_rng(0).normal(0, 0.1, crop + 16 * 1000 + 7).astype(np.float32)
  cut = crops.cut(wave, crops.whole_clip_offsets(len(wave), crop), crop)
  assert cut.shape == (16, crop)
  for i in (0, 5, 15):
    np.testing.assert_array_equal(cut[i], wave[i * 1000:i * 1000 + crop])
  assert crops.cut(wave, crops.whole_clip_offsets(len(wave), crop, num_crops=4), crop).shape == (4, crop)
  np.testing.assert_array_equal(crops.whole_clip_offsets(len(wave), crop, 4), [0, 4001, 8002, 12003])  # 16007//4

  short = wave[:2 * 16000]
  padded = crops.cut(short, crops.whole_clip_offsets(len(short), crop), crop)
  assert padded.shape == (1, crop)
  np.testing.assert_array_equal(padded[0, :len(short)], short)
  assert not padded[0, len(short):].any()


def test_clips_too_short_or_silent_are_refused(tagger):
  with pytest.raises(AudioError, match="too short: 0.50 s"):
    tagger.tag_waveform(np.full(8000, 0.1, np.float32))
  with pytest.raises(AudioError, match="digitally silent"):
    tagger.tag_waveform(np.zeros(3 * 16000, np.float32))


def test_whole_file_scores_are_the_mean_of_crop_probabilities(tagger, files):
  path = files[2]  # b.flac, 31 s at 22.05 kHz
  wave = tagger.load_clip(path)
  assert abs(len(wave) - 31 * 16000) <= 1
  scores = tagger.tag_waveform(wave)
  crop = tagger.crop_samples
  expected = tagger.probs(crops.cut(wave, crops.whole_clip_offsets(len(wave), crop), crop)).mean(axis=0)
  np.testing.assert_allclose(scores.fine, expected, atol=1e-6)
  assert scores.coarse is None and len(scores.starts) == 16
  (result,) = tag.tag_files(tagger, [path])
  np.testing.assert_allclose(result.scores.fine, expected, atol=1e-6)


def test_tag_files_reports_the_corrupt_file_and_tags_the_rest(tagger, files):
  results = tag.tag_files(tagger, files)
  assert [r.path for r in results] == files
  bad = results[1]
  assert bad.scores is None and "cannot decode" in bad.error and CORRUPT in bad.error
  good = [r for r in results if r.error is None]
  assert len(good) == 4
  for result, (seconds, _, _) in zip(good, FILES.values()):
    assert result.scores.fine.shape == (5,)
    assert np.all((result.scores.fine > 0) & (result.scores.fine < 1))
    assert abs(result.scores.duration - seconds) < 1e-3
  assert len(good[0].scores.starts) == 1  # a.wav: shorter than a crop, padded
  assert all(len(r.scores.starts) == 16 for r in good[1:])


@pytest.mark.slow
def test_batch_size_and_device_count_do_not_change_results(tagger, workdir, files):
  one_device = Tagger.load(workdir, devices=jax.local_devices()[:1])
  assert one_device.round_batch(1) == 1 and tagger.round_batch(1) == 8 and tagger.round_batch(20) == 24
  reference = [r.scores for r in tag.tag_files(one_device, files, batch_size=1) if r.scores]
  for batch_size in (8, 16):  # batches cross file boundaries; the last one is padded (49 crops)
    got = [r.scores for r in tag.tag_files(tagger, files, batch_size=batch_size) if r.scores]
    for a, b in zip(reference, got):
      np.testing.assert_allclose(a.fine, b.fine, atol=1e-5)
  timeline = tag.tag_files(one_device, files[2:3], timeline=True, batch_size=1)[0].scores
  np.testing.assert_allclose(tagger.timeline(tagger.load_clip(files[2])).fine, timeline.fine, atol=1e-5)


def test_timeline_scores_consecutive_crops(tagger, files):
  wave = tagger.load_clip(files[2])
  scores = tagger.timeline(wave, hop_seconds=2.0)
  last = (len(wave) - tagger.crop_samples) / 16000
  np.testing.assert_allclose(scores.starts, [*np.arange(0, last, 2.0), last])  # a last crop ends with the clip
  assert scores.fine.shape == (len(scores.starts), 5)
  assert scores.ends[-1] == pytest.approx(31.0, abs=1e-3)
  offsets = np.round(scores.starts * 16000).astype(int)
  np.testing.assert_allclose(scores.fine, tagger.probs(crops.cut(wave, offsets, tagger.crop_samples)), atol=1e-6)
  assert np.ptp(scores.fine, axis=0).max() > 1e-4  # crops differ
  short = tagger.timeline(tagger.load_clip(files[0]))
  assert short.fine.shape == (1, 5) and short.ends[0] == pytest.approx(3.7, abs=1e-3)


def test_hierarchical_models_give_coarse_probabilities(hierarchical):
  wave = _music(9.0, 16000).astype(np.float32)
  scores = hierarchical.timeline(wave)
  assert hierarchical.coarse_tag_names == ["strings", "keys", "percussion"]
  assert scores.coarse.shape == (len(scores.starts), 3)
  mask = hierarchical.hierarchy.mask.astype(bool)
  for j in range(3):  # GMP: a family's probability is its most probable member's
    np.testing.assert_allclose(scores.coarse[:, j], scores.fine[:, mask[j]].max(axis=1), atol=1e-6)
  whole = hierarchical.tag_waveform(wave)
  assert whole.coarse.shape == (3,)


def _tag(tagger, paths, fmt, **kwargs):
  out, err = io.StringIO(), io.StringIO()
  status = tag.tag_paths(tagger, paths, fmt, out=out, err=err, **kwargs)
  return status, out.getvalue(), err.getvalue()


def test_table_and_csv_outputs(tagger, hierarchical, files):
  status, table, err = _tag(tagger, files, "table", top_k=3)
  assert status == 1
  assert f"error: cannot decode audio file {files[1]}" in err and "5/5" in err and "file/s" in err
  assert "b.flac  (31.0 s, mean of 16 crops)" in table and CORRUPT not in table
  assert len(table.strip().split("\n\n")) == 4 and len(table.strip().split("\n\n")[0].splitlines()) == 4

  status, text, _ = _tag(tagger, files, "csv")
  rows = list(csv.DictReader(io.StringIO(text)))
  assert status == 1 and [r["file"] for r in rows] == files[:1] + files[2:]
  assert all(set(tiny_models.TAG_NAMES) <= set(r) and 0 < float(r["guitar"]) < 1 for r in rows)

  status, text, _ = _tag(hierarchical, files[2:3], "csv", timeline=True)
  rows = list(csv.DictReader(io.StringIO(text)))
  assert status == 0 and len(rows) == 8  # 31 s in crops of 4.1 s: 7, and one ending at 31 s
  assert list(rows[0])[:3] == ["file", "start_seconds", "end_seconds"]
  assert "coarse:percussion" in rows[0] and float(rows[-1]["end_seconds"]) == pytest.approx(31.0, abs=1e-3)

  status, table, _ = _tag(hierarchical, files[2:3], "table", timeline=True, top_k=2)
  assert status == 0 and len(table.strip().splitlines()) == 2 + 8 and "|" in table


def test_json_timeline_lists_every_tag_per_crop(hierarchical, files):
  status, text, _ = _tag(hierarchical, files[:2], "json", timeline=True, hop_seconds=1.0)
  entries = json.loads(text)
  assert status == 1 and entries[1] == {"file": files[1], "error": entries[1]["error"]}
  crops = entries[0]["timeline"]
  assert [c["start_seconds"] for c in crops] == [0.0]  # 3.7 s: one padded crop
  assert set(crops[0]["tags"]) == set(tiny_models.HIERARCHICAL_TAGS)
  assert set(crops[0]["coarse_tags"]) == set(tiny_models.HIERARCHY)


@pytest.mark.slow
def test_command_line_tags_files_and_reports_the_corrupt_one(tagger, workdir, files):
  result = subprocess.run(
      [sys.executable, "-m", "flaxtag.tag", *files, "--workdir", str(workdir), "--format", "json", "--batch_size",
       "4"], capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr
  assert f"error: cannot decode audio file {files[1]}" in result.stderr
  entries = json.loads(result.stdout)
  assert [e["file"] for e in entries] == files and "error" in entries[1]
  for entry in entries[:1] + entries[2:]:
    assert list(entry["tags"]) == list(tiny_models.TAG_NAMES)
    assert all(0 < p < 1 for p in entry["tags"].values())
  assert entries[2]["num_crops"] == 16 and entries[2]["duration_seconds"] == 31.0
  # The same scores as the API here (8 devices), from a process on one device.
  scores = tag.tag_files(tagger, files[2:3])[0].scores
  np.testing.assert_allclose(list(entries[2]["tags"].values()), scores.fine, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# A library: directories, JSON lines, resuming, values at the door.


def _strict_json(text):
  """json.loads that refuses NaN and infinity (Python's json accepts them; JSON does not)."""
  def refuse(constant):
    raise ValueError(f"{constant} is not JSON")
  return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
  """A tree of several formats, nested, with a corrupt MP3, a float WAV holding NaN, an inf file, a clipped file, a
  DC-offset file and a file that is not audio."""
  root = tmp_path_factory.mktemp("library")
  (root / "rock" / "live").mkdir(parents=True)
  (root / "jazz").mkdir()
  soundfile.write(root / "rock" / "a.flac", _music(6.0, 22050, seed=1), 22050)
  soundfile.write(root / "rock" / "live" / "b.mp3", _music(5.0, 44100, channels=2, seed=2), 44100)
  soundfile.write(root / "jazz" / "c.ogg", _music(5.0, 48000, seed=3), 48000)
  soundfile.write(root / "jazz" / "d.WAV", _music(5.0, 16000, seed=4), 16000)
  nan = _music(5.0, 16000, seed=5)
  nan[3 * 16000 + 5] = np.nan
  soundfile.write(root / "jazz" / "nan.wav", nan, 16000, subtype="FLOAT")
  inf = _music(5.0, 16000, seed=6)
  inf[:10] = np.inf
  soundfile.write(root / "jazz" / "inf.wav", inf, 16000, subtype="FLOAT")
  soundfile.write(root / "rock" / "clipped.wav", np.clip(8 * _music(5.0, 16000, seed=7), -1, 1), 16000)
  soundfile.write(root / "rock" / "dc.wav", _music(5.0, 16000, seed=8) * 0.5 + 0.3, 16000)
  (root / "rock" / "corrupt.mp3").write_bytes(np.random.default_rng(0).bytes(4000))
  (root / "jazz" / "notes.txt").write_text("not audio")
  return root


LIBRARY_FILES = ["jazz/c.ogg", "jazz/d.WAV", "jazz/inf.wav", "jazz/nan.wav", "rock/a.flac", "rock/clipped.wav",
                 "rock/corrupt.mp3", "rock/dc.wav", "rock/live/b.mp3"]
FAILING = {"jazz/inf.wav": "non-finite samples (NaN or infinity), the first at 0.00 s",
           "jazz/nan.wav": "non-finite samples (NaN or infinity), the first at 3.00 s",
           "rock/corrupt.mp3": "cannot decode audio file"}


def _lines(path):
  return [_strict_json(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_directories_are_walked_for_audio_files(library):
  assert tag.audio_files([str(library)]) == [str(library / f) for f in LIBRARY_FILES]
  # A file named explicitly is taken whatever its extension.
  assert tag.audio_files([str(library / "jazz" / "notes.txt")]) == [str(library / "jazz" / "notes.txt")]


def test_a_folder_without_audio_files_is_named_and_fails_the_run(tagger, library, tmp_path):
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "readme.txt").write_text("no audio here")
  status, stdout, err = _tag(tagger, [str(tmp_path / "notes")], "table")
  assert status == 1 and stdout == ""
  assert f"warning: no audio files under {tmp_path / 'notes'} (looked for .wav, .flac," in err
  assert "0 of 0 files tagged" in err
  # Beside a folder that has some, the run goes on.
  status, _, err = _tag(tagger, [str(tmp_path / "notes"), str(library / "jazz" / "d.WAV")], "table")
  assert status == 0 and "warning: no audio files under" in err and "1 of 1 file tagged" in err


def test_a_library_is_tagged_into_json_lines_and_resumed(tagger, library, tmp_path):
  output = tmp_path / "new" / "folder" / "tags.jsonl"  # made as needed
  status, stdout, err = _tag(tagger, [str(library)], "table", output=str(output))
  assert status == 1 and stdout == ""
  entries = {os.path.relpath(e["file"], library): e for e in _lines(output)}
  assert sorted(entries) == LIBRARY_FILES
  for name, entry in entries.items():
    if name in FAILING:
      assert set(entry) == {"file", "error"} and FAILING[name] in entry["error"] and "\n" not in entry["error"]
      assert f"error: {entry['error']}" in err
    else:
      assert list(entry["tags"]) == list(tiny_models.TAG_NAMES) and entry["num_crops"] == 16
  assert "clipped: " in entries["rock/clipped.wav"]["warnings"][0] and "DC offset of 0.30" in \
      entries["rock/dc.wav"]["warnings"][0]
  assert "warnings" not in entries["jazz/d.WAV"]
  assert "warning: audio file" in err and "9/9" in err and "6 of 9 files tagged" in err
  # The same scores as one file at a time through the whole-file path.
  whole = tagger.tag_waveform(tagger.load_clip(library / "rock" / "live" / "b.mp3"))
  np.testing.assert_allclose(list(entries["rock/live/b.mp3"]["tags"].values()), whole.fine, atol=1e-5)

  # Run again: nothing to do, nothing written twice.
  before = output.read_text()
  status, _, err = _tag(tagger, [str(library)], "table", output=str(output))
  assert status == 0 and output.read_text() == before and "9 skipped, already in" in err

  # Interrupted: two lines lost and the last one cut short. Only those three files are tagged again.
  lines = before.splitlines(keepends=True)
  output.write_text("".join(lines[:-3]) + lines[-3][:25])
  status, _, err = _tag(tagger, [str(library)], "table", output=str(output))
  again = _lines_skipping_cut(output)
  assert sorted(os.path.relpath(e["file"], library) for e in again) == LIBRARY_FILES
  assert "6 skipped" in err
  # The cut line, now between whole ones, is still no obstacle.
  assert _tag(tagger, [str(library)], "table", output=str(output))[0] == 0

  with pytest.raises(FlaxtagError, match=rf"cannot write {library}: it is a folder; give a file name"):
    _tag(tagger, [str(library / "jazz" / "d.WAV")], "table", output=str(library))
  # A file that no run wrote is never appended to: an audio file, or a document named by mistake.
  for victim, reason in ((library / "rock" / "a.flac", "it is not text"), (tmp_path / "notes.txt", "line 2 is not")):
    if victim.suffix == ".txt":
      victim.write_text("\nmy notes\n")
    before = victim.read_bytes()
    with pytest.raises(FlaxtagError, match=rf"--output {victim} is not a JSON-lines file of flaxtag.tag \({reason}"):
      _tag(tagger, [str(library / "jazz" / "d.WAV")], "table", output=str(victim))
    assert victim.read_bytes() == before


def _lines_skipping_cut(path):
  """The entries of a JSON-lines file whose one line may have been cut short by an interrupted run."""
  entries = []
  for line in pathlib.Path(path).read_text().splitlines():
    try:
      entries.append(_strict_json(line))
    except ValueError:
      continue
  return entries


def test_non_finite_audio_is_an_error_and_json_stays_json(tagger, library):
  paths = [str(library / "jazz" / "nan.wav"), str(library / "jazz" / "d.WAV")]
  status, text, err = _tag(tagger, paths, "json")
  entries = _strict_json(text)
  assert status == 1 and [e["file"] for e in entries] == paths
  assert "non-finite samples" in entries[0]["error"] and "tags" in entries[1]
  assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
  status, text, _ = _tag(tagger, paths[:1], "json")
  assert status == 1 and _strict_json(text) == [{"file": paths[0], "error": entries[0]["error"]}]


@pytest.mark.slow
def test_command_line_tags_a_directory_into_json_lines(workdir, library, tmp_path):
  output = tmp_path / "tags.jsonl"
  command = [sys.executable, "-m", "flaxtag.tag", str(library / "rock"), "--workdir", str(workdir), "--output",
             str(output)]
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
  assert result.stdout == "" and "file/s" in result.stderr
  names = sorted(os.path.relpath(e["file"], library) for e in _lines(output))
  assert names == [f for f in LIBRARY_FILES if f.startswith("rock/")]
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 0 and len(_lines(output)) == len(names) and "5 skipped" in result.stderr

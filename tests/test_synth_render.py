"""synth_instruments' timbre diversity: several SoundFonts, augmentations, and the held-out SoundFont's build."""
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

import fixtures_data
from data_prep import build
from data_prep.synth_instruments import augmentations, render
from flaxtag import input_pipeline
from flaxtag.errors import DatasetError

pytestmark = pytest.mark.filterwarnings("ignore:label\\(\\) is deprecated:DeprecationWarning")
SAMPLE_RATE = 16000
CSOUND_BANK = "/usr/share/sounds/sf2/sf_GMbank.sf2"  # Debian's csound-soundfont (make test installs it as root)
FLUID_R3 = "/usr/share/sounds/sf2/FluidR3_GM.sf2"  # fluid-soundfont-gm: held out, for measuring only


def _needs_fluidsynth():
  pytest.importorskip("pretty_midi")
  try:
    import fluidsynth  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    pytest.skip(f"FluidSynth is not available ({e}); apt-get install libfluidsynth3")


def _needs(path: str, package: str) -> str:
  if not os.path.isfile(path):
    pytest.skip(f"{path} is not installed; apt-get install {package}")
  return path


def _two_soundfonts() -> list[str]:
  _needs_fluidsynth()
  return [render.default_soundfont(), _needs(CSOUND_BANK, "csound-soundfont")]


def _records(data_dir, split):
  source = tfds.builder_from_directory(input_pipeline.dataset_dir(data_dir, "synth_instruments")).as_data_source(
      split=split)
  return {r["id"].decode(): (r["audio"], r["labels"], r["coarse_labels"]) for r in source}


def _music(seed: int = 0, seconds: float = 1.0) -> np.ndarray:
  """A chord with a decaying envelope and a little noise: something to augment."""
  t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
  rng = np.random.default_rng(seed)
  chord = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6, 1760.0))
  return 0.2 * chord * np.exp(-2 * t) + 0.01 * rng.standard_normal(len(t))


# ---------------------------------------------------------------------------------------------------------------------
# Augmentations, one by one


@pytest.mark.parametrize("augment", [
    lambda x, rng: augmentations.equalize(x, rng, SAMPLE_RATE),
    augmentations.change_level,
    lambda x, rng: augmentations.reverberate(x, rng, SAMPLE_RATE),
    lambda x, rng: augmentations.add_noise(x, rng, SAMPLE_RATE),
], ids=["equalize", "change_level", "reverberate", "add_noise"])
def test_augmentations_change_audio_reproducibly_and_stay_bounded(augment):
  x = _music()
  a = augment(x, np.random.default_rng(1))
  assert a.shape == x.shape and np.isfinite(a).all()
  assert np.sqrt(np.mean((a - x) ** 2)) > 1e-3 * np.sqrt(np.mean(x**2))  # it changes the audio
  np.testing.assert_array_equal(a, augment(x, np.random.default_rng(1)))  # the same seed, the same audio
  assert not np.allclose(a, augment(x, np.random.default_rng(2)))  # another seed, other audio
  # Bounded: at most three 6 dB bands stacked (augmentations.py's ranges); render_clip then normalises the mix.
  assert np.sqrt(np.mean(a**2)) < 10 ** (18.5 / 20) * np.sqrt(np.mean(x**2))


def test_pitch_bends_detune_by_a_few_cents_reproducibly():
  bends = augmentations.pitch_bends(2.0, np.random.default_rng(3))
  times, values = np.array(bends).T
  assert times[0] == 0.0 and times[-1] < 2.0 and np.all(np.diff(times) > 0)
  cents = values / 8192 * augmentations.BEND_RANGE_CENTS
  limit = augmentations.DETUNE_CENTS + augmentations.VIBRATO_CENTS[1]
  assert np.abs(cents).max() <= limit + 0.05 and np.ptp(cents) > 0
  assert bends == augmentations.pitch_bends(2.0, np.random.default_rng(3))
  assert bends != augmentations.pitch_bends(2.0, np.random.default_rng(4))


def test_pitch_bends_change_the_rendered_part():
  _needs_fluidsynth()
  notes = [(0.0, 0.9, 69, 100)]
  plain = render.render_part(notes, 73, 1.0, render.default_soundfont())
  bent = render.render_part(notes, 73, 1.0, render.default_soundfont(), [(0.0, 410)])  # +10 cents
  assert plain.shape == bent.shape and not np.allclose(plain, bent)


# ---------------------------------------------------------------------------------------------------------------------
# Clips


def test_augmented_clip_is_in_range_and_reproducible():
  _needs_fluidsynth()
  x, playing = render.render_clip(3, "train", 1, seconds=1.5)
  assert x.dtype == np.float32 and np.isfinite(x).all() and 0.0 < np.abs(x).max() <= 0.95
  assert 0.03 < np.sqrt(np.mean(x.astype(np.float64) ** 2)) <= 0.1 + 1e-6  # -20 dBFS unless peaks ask for less
  np.testing.assert_array_equal(x, render.render_clip(3, "train", 1, seconds=1.5)[0])
  dry, dry_playing = render.render_clip(3, "train", 1, seconds=1.5, augment=False)
  assert dry_playing == playing and not np.allclose(dry, x)
  assert not np.allclose(render.render_clip(3, "train", 2, seconds=1.5)[0], x)


def test_every_soundfont_of_the_list_is_drawn_and_notes_do_not_depend_on_it():
  soundfonts = _two_soundfonts()
  drawn = {sf for index in range(6) for sf in render.part_soundfonts(0, "train", index, 3, soundfonts)}
  assert drawn == set(soundfonts)
  assert render.part_soundfonts(0, "train", 0, 3, soundfonts) == render.part_soundfonts(0, "train", 0, 3, soundfonts)
  # A clip one of whose parts draws the csound bank sounds different from TimGM6mb alone, with the same labels.
  index = next(i for i in range(20) if CSOUND_BANK in render.part_soundfonts(
      0, "train", i, len(render.plan_clip(0, "train", i)[0].parts), soundfonts))
  mixed, playing = render.render_clip(0, "train", index, 1.5, soundfonts, augment=False)
  alone, playing_alone = render.render_clip(0, "train", index, 1.5, soundfonts[:1], augment=False)
  assert playing == playing_alone and not np.allclose(mixed, alone)


def test_missing_soundfont_is_named(tmp_path):
  _needs_fluidsynth()
  missing = str(tmp_path / "nowhere.sf2")
  with pytest.raises(DatasetError, match="nowhere.sf2 does not exist"):
    fixtures_data.build_dataset("synth_instruments", None, tmp_path, num_train=1, num_valid=1, num_test=1,
                                soundfont=f"{render.default_soundfont()},{missing}")


# ---------------------------------------------------------------------------------------------------------------------
# Builds


@pytest.mark.slow
def test_multi_soundfont_build_is_the_same_for_any_worker_count(tmp_path):
  soundfonts = _two_soundfonts()
  sizes = {"num_train": 4, "num_valid": 1, "num_test": 1, "seed": 5, "clip_seconds": 1.0}
  one = fixtures_data.build_dataset("synth_instruments", None, tmp_path / "one", num_workers=1,
                                    soundfont=",".join(soundfonts), **sizes)  # the command line's form
  two = fixtures_data.build_dataset("synth_instruments", None, tmp_path / "two", num_workers=2, soundfont=soundfonts,
                                    **sizes)
  for split in ("train", "valid", "test"):
    a, b = _records(one, split), _records(two, split)
    assert a.keys() == b.keys()
    for key, (pcm, fine, coarse) in a.items():
      np.testing.assert_array_equal(pcm, b[key][0])
      np.testing.assert_array_equal(fine, b[key][1])
      np.testing.assert_array_equal(coarse, b[key][2])
  builder = tfds.builder_from_directory(input_pipeline.dataset_dir(one, "synth_instruments"))
  assert builder.info.metadata["soundfonts"] == [os.path.basename(p) for p in soundfonts]
  assert builder.info.metadata["augment"] is True


@pytest.mark.slow
def test_held_out_soundfont_build_has_the_same_pieces(tmp_path):
  soundfonts = _two_soundfonts()
  held_out = _needs(FLUID_R3, "fluid-soundfont-gm")
  sizes = {"num_train": 1, "num_valid": 1, "num_test": 4, "seed": 9, "clip_seconds": 1.0, "num_workers": 1}
  in_domain = fixtures_data.build_dataset("synth_instruments", None, tmp_path / "in", soundfont=soundfonts, **sizes)
  other = fixtures_data.build_dataset("synth_instruments", None, tmp_path / "out", soundfont=[held_out], **sizes)
  a, b = _records(in_domain, "test"), _records(other, "test")
  assert a.keys() == b.keys() and len(a) == 4
  for key, (pcm, fine, coarse) in a.items():
    np.testing.assert_array_equal(fine, b[key][1])
    np.testing.assert_array_equal(coarse, b[key][2])
    assert not np.array_equal(pcm, b[key][0])  # the same piece, another timbre


def test_a_build_with_other_options_is_not_reused(tmp_path):
  _needs_fluidsynth()
  sizes = {"num_train": 1, "num_valid": 1, "num_test": 1, "seed": 2, "clip_seconds": 0.5, "num_workers": 1}
  assert not build.build("synth_instruments", tmp_path, **sizes).get("reused")
  assert build.build("synth_instruments", tmp_path, **sizes).get("reused")
  moved = tmp_path.with_name(tmp_path.name + "_moved")  # a reused build says where it is now, not where it was built
  shutil.move(tmp_path, moved)
  summary = build.build("synth_instruments", moved, **sizes)
  assert summary["reused"] and summary["path"].startswith(os.fspath(moved) + os.sep)
  assert os.path.isfile(summary["manifest"])
  shutil.move(moved, tmp_path)
  with pytest.raises(DatasetError, match=r"was built with augment=True; this build asks for augment=False\. Pass "
                                         r"--overwrite"):
    build.build("synth_instruments", tmp_path, augment=False, **sizes)
  summary = build.build("synth_instruments", tmp_path, augment=False, overwrite=True, **sizes)
  assert not summary.get("reused") and summary["options"]["augment"] is False

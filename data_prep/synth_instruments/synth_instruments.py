"""Synthetic hierarchical instrument tagging (SPEC §6): fine labels are instruments, coarse labels their families.

Clips are rendered from generated General-MIDI parts (see render.py), each part with a SoundFont drawn from a list,
then augmented (augmentations.py); nothing is downloaded. Every clip follows from (seed, split, index), so a build is
reproducible whatever the number of worker processes.
"""
import os
from typing import Optional, Sequence, Union

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_prep import common
from data_prep.synth_instruments import render
from flaxtag.errors import DatasetError
from flaxtag.input_pipeline import HIERARCHY_FILE

HOW_TO_GET = ("synth_instruments needs the 'synth' extra and the FluidSynth library: pip install 'flaxtag[synth]' "
              "and apt-get install libfluidsynth3 (Debian/Ubuntu; brew install fluid-synth on macOS).")


def _example(item: common.Item) -> dict:
  seed, split, index, seconds, soundfonts, augment = item.payload
  waveform, instruments = render.render_clip(seed, split, index, seconds, soundfonts, augment)
  fine = np.array([t in instruments for t in render.fine_tags()], common.LABEL_DTYPE)
  coarse = np.array([any(t in instruments for t in children) for children in render.hierarchy().values()],
                    common.LABEL_DTYPE)
  return common.to_example(waveform, fine, item.key, coarse_labels=coarse)


class SynthInstruments(common.Builder):
  """1–5 General-MIDI instruments per clip, 16 kHz mono int16, instrument and family labels."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "First flaxtag release: 25 instruments in 8 families.",
      "1.1.0": "Several SoundFonts (one drawn per part); augmentations: detuning and vibrato, equalisation and level "
               "per part, room reverb and noise per clip. The same seed gives the same notes and labels as 1.0.0.",
  }
  BUILD_ARGS = ("num_train", "num_valid", "num_test", "seed", "clip_seconds", "soundfont", "augment")

  def __init__(self, *, num_train: int = 2000, num_valid: int = 300, num_test: int = 300, seed: int = 0,
               clip_seconds: float = 10.0, soundfont: Union[str, Sequence[str], None] = None, augment: bool = True,
               **kwargs):
    """`soundfont`: one .sf2 path, several (a list, or one string separated by commas), or None for TimGM6mb."""
    self._sizes = {"train": num_train, "valid": num_valid, "test": num_test}
    self._seed = seed
    self._seconds = clip_seconds
    paths = soundfont.split(",") if isinstance(soundfont, str) else soundfont or []
    self._soundfonts = ([os.path.abspath(os.path.expanduser(p.strip())) for p in paths if p.strip()]
                        or [render.default_soundfont()])
    self._augment = augment
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    fine, mapping = render.fine_tags(), render.hierarchy()
    return tfds.core.DatasetInfo(
        builder=self,
        description="General-MIDI parts rendered with FluidSynth; labels: instruments (fine) and families (coarse).",
        features=tfds.features.FeaturesDict({
            "audio": common.audio_feature(),
            "labels": common.multi_hot_feature(len(fine), "instruments playing (fine tags)"),
            "coarse_labels": common.multi_hot_feature(len(mapping), "families playing (coarse tags)"),
            "id": tfds.features.Text(doc="<split>_<index>"),
        }),
        metadata=tfds.core.MetadataDict(
            tags=fine, coarse_tags=list(mapping), hierarchy=mapping, seed=self._seed, clip_seconds=self._seconds,
            soundfonts=[os.path.basename(p) for p in self._soundfonts], augment=self._augment),
    )

  def build_options(self):
    return {"sizes": self._sizes, "seed": self._seed, "clip_seconds": self._seconds,
            "soundfonts": [os.path.basename(p) for p in self._soundfonts], "augment": self._augment}

  def _split_items(self, manual_dir: Optional[epath.Path]):
    del manual_dir  # nothing to download
    try:
      import fluidsynth  # pylint: disable=g-import-not-at-top,unused-import
      import pretty_midi  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise DatasetError(f"{HOW_TO_GET} ({e})") from None
    for soundfont in self._soundfonts:
      if not os.path.isfile(soundfont):
        raise DatasetError(f"synth_instruments: the SoundFont {soundfont} does not exist; pass --soundfont "
                           f"PATH[,PATH...] of .sf2 files, or leave it out to use pretty_midi's TimGM6mb.sf2.")
    if self._seconds <= 0 or min(self._sizes.values()) < 1:
      raise DatasetError(f"synth_instruments: clip_seconds and the split sizes must be positive, got "
                         f"{self._seconds} and {self._sizes}")
    return {
        split: ([common.Item(f"{split}_{i:06d}", f"{split}/{i}",
                             (self._seed, split, i, self._seconds, self._soundfonts, self._augment))
                 for i in range(n)], _example)
        for split, n in self._sizes.items()
    }

  def _extra_files(self):
    return {HIERARCHY_FILE: render.hierarchy()}

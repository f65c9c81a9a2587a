"""The builds of the synthetic set that `make demo` and `make study` share: the set, rendered with the SoundFonts
training may use, and its test pieces rendered with the held-out SoundFont (README.md: the held-out rule)."""
import os
from typing import Optional

from data_prep import build
from data_prep.synth_instruments import render

# Training may use these two only (Debian packages timgm6mb-soundfont, here pretty_midi's copy, and csound-soundfont).
CSOUND_BANK = "sf_GMbank.sf2"
# For measuring only (fluid-soundfont-gm): never train on it or choose a setting on it. Neither on MuseScore's.
HELD_OUT_SOUNDFONT = "FluidR3_GM.sf2"


def training_soundfonts() -> list[str]:
  """TimGM6mb, and csound's General-MIDI bank when it is installed (with a note when it is not)."""
  csound = render.find_soundfont(CSOUND_BANK)
  if csound is None:
    print(f"note: {CSOUND_BANK} (apt-get install csound-soundfont) is not installed; the dataset is rendered with "
          f"TimGM6mb alone, so the model learns one SoundFont's samples")
    return [render.default_soundfont()]
  return [render.default_soundfont(), csound]


def build_set(data_dir: str, options: dict) -> dict:
  """Builds synth_instruments with `options` into `data_dir` on every core (a complete build with the same options is
  reused), says which, and returns the build summary."""
  summary = build.build("synth_instruments", data_dir, num_workers=os.cpu_count() or 1, **options)
  print(("reused " if summary.get("reused") else "built ") + summary["path"], flush=True)
  return summary


def build_held_out(data_dir: str, options: dict) -> Optional[str]:
  """Renders the test pieces of the set built with `options` (synth_instruments' build options) with the held-out
  SoundFont into `data_dir`; returns it, or None (with a note) where that SoundFont is not installed.

  The held-out build has the same options but for the SoundFont list, so its test split has the same notes,
  instruments, labels and augmentations (each drawn from a stream of its own, see render.py): only the SoundFont
  differs. Its train and valid splits are one clip each, never used.
  """
  soundfont = render.find_soundfont(HELD_OUT_SOUNDFONT)
  if soundfont is None:
    print(f"note: skipped: {HELD_OUT_SOUNDFONT} (apt-get install fluid-soundfont-gm) is not installed")
    return None
  build_set(data_dir, {**options, "num_train": 1, "num_valid": 1, "soundfont": [soundfont]})
  return data_dir

"""Multi-instrument clips from generated General-MIDI parts, rendered with FluidSynth through pretty_midi.

A clip is a short piece in one key and tempo over a repeating 4-chord progression. Each of its 1–5 instruments
plays a part typical of it (bass line, chords, arpeggios, melody or sustained pad) in its natural register for the
whole clip, so that every crop hears every labelled instrument. Parts are rendered one by one, each with a SoundFont
drawn from a list, normalised to equal loudness, and mixed at levels 0 to -6 dB: nothing is buried. Augmentations
(augmentations.py) then vary what recordings vary: tuning, equalisation and level per part, room and noise per clip.

A clip depends on (seed, split, index) alone, not on the worker that renders it (the synthesizer is reset before
every part). Its notes come from `np.random.default_rng([seed, split, index])`; the SoundFont of each part and the
augmentations come from generators of their own (that key plus a stream number), so that changing the SoundFont
list or turning augmentation off changes no note, and the same augmentations are drawn whatever the SoundFonts.
"""
import dataclasses
import functools
import json
import os
from typing import Optional, Sequence

import numpy as np
import soxr

from data_prep.synth_instruments import augmentations

SAMPLE_RATE = 16000
# FluidSynth does not band-limit when it resamples instrument samples, so we render at twice the rate and let soxr
# filter out what would alias at 16 kHz.
RENDER_RATE = 32000
MAX_INSTRUMENTS = 5
HIERARCHY_PATH = os.path.join(os.path.dirname(__file__), "hierarchy.json")
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
# Where distributions install SoundFonts: Debian/Ubuntu, then Arch/Fedora.
SOUNDFONT_DIRS = ("/usr/share/sounds/sf2", "/usr/share/soundfonts")
# Streams of random numbers of a clip besides its plan: appended to (seed, split, index).
SOUNDFONT_STREAM, PART_STREAM, MIX_STREAM = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Instrument:
  program: int  # General MIDI program, 0-based
  low: int  # natural register, MIDI pitches
  high: int
  role: str  # bass, chords, strum, power, arpeggio, melody, pad


INSTRUMENTS = {
    "piano": Instrument(0, 45, 84, "chords"),
    "electric piano": Instrument(4, 48, 79, "chords"),
    "harpsichord": Instrument(6, 48, 84, "arpeggio"),
    "vibraphone": Instrument(11, 53, 89, "arpeggio"),
    "marimba": Instrument(12, 45, 84, "arpeggio"),
    "glockenspiel": Instrument(9, 79, 105, "arpeggio"),
    "church organ": Instrument(19, 36, 72, "pad"),
    "drawbar organ": Instrument(16, 48, 79, "chords"),
    "accordion": Instrument(21, 53, 81, "chords"),
    "nylon guitar": Instrument(24, 40, 76, "arpeggio"),
    "steel guitar": Instrument(25, 40, 72, "strum"),
    "distortion guitar": Instrument(30, 40, 64, "power"),
    "acoustic bass": Instrument(32, 28, 50, "bass"),
    "electric bass": Instrument(33, 28, 52, "bass"),
    "synth bass": Instrument(38, 28, 52, "bass"),
    "violin": Instrument(40, 55, 91, "melody"),
    "cello": Instrument(42, 36, 67, "melody"),
    "harp": Instrument(46, 36, 88, "arpeggio"),
    "trumpet": Instrument(56, 55, 82, "melody"),
    "trombone": Instrument(57, 40, 70, "melody"),
    "french horn": Instrument(60, 41, 72, "pad"),
    "flute": Instrument(73, 60, 93, "melody"),
    "clarinet": Instrument(71, 50, 84, "melody"),
    "saxophone": Instrument(66, 44, 75, "melody"),  # tenor: the alto of TimGM6mb has no sample at E4
    "oboe": Instrument(68, 58, 88, "melody"),
}
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
PROGRESSIONS = ((0, 5, 3, 4), (0, 3, 4, 0), (0, 4, 5, 3), (5, 3, 0, 4), (0, 3, 0, 4), (1, 4, 0, 0))
WINDOW = 19  # semitones of register a part uses, placed at random inside the instrument's range


@functools.lru_cache(maxsize=None)
def hierarchy() -> dict[str, list[str]]:
  """coarse family → [fine instrument], the label hierarchy shipped with the dataset."""
  with open(HIERARCHY_PATH, encoding="utf-8") as f:
    return json.load(f)


def fine_tags() -> list[str]:
  return [fine for children in hierarchy().values() for fine in children]


@dataclasses.dataclass(frozen=True)
class Part:
  name: str
  window: tuple[int, int]  # lowest and highest pitch of this part
  velocity: int
  gain_db: float
  pattern: int  # which rhythm of its role


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything that decides a clip."""
  tempo: float
  root: int
  scale: str
  progression: tuple[int, ...]
  parts: tuple[Part, ...]

  @property
  def instruments(self) -> list[str]:
    return [p.name for p in self.parts]


def plan_clip(seed: int, split: str, index: int) -> tuple[Plan, np.random.Generator]:
  """The clip's plan, and the generator (left where the plan stopped) that then draws its notes."""
  rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
  names = fine_tags()
  chosen = rng.choice(len(names), size=rng.integers(1, MAX_INSTRUMENTS + 1), replace=False)
  parts = []
  for i in sorted(chosen):
    inst = INSTRUMENTS[names[i]]
    width = min(WINDOW, inst.high - inst.low)
    low = int(rng.integers(inst.low, inst.high - width + 1))
    parts.append(Part(names[i], (low, low + width), int(rng.integers(72, 116)), float(rng.uniform(-6.0, 0.0)),
                      int(rng.integers(0, 3))))
  plan = Plan(tempo=float(rng.uniform(72, 150)), root=int(rng.integers(0, 12)),
              scale=str(rng.choice(list(SCALES))), progression=PROGRESSIONS[rng.integers(len(PROGRESSIONS))],
              parts=tuple(parts))
  return plan, rng


def _chord_classes(plan: Plan, degree: int) -> list[int]:
  scale = SCALES[plan.scale]
  return [(plan.root + scale[(degree + k) % 7]) % 12 for k in (0, 2, 4)]


def _pitches(classes, window) -> list[int]:
  """Every pitch of the given pitch classes inside the window, ascending."""
  return [p for p in range(window[0], window[1] + 1) if p % 12 in classes]


def _nearest(pitch_class: int, target: float, window) -> int:
  candidates = _pitches([pitch_class], window) or [window[0] + (pitch_class - window[0]) % 12]
  return min(candidates, key=lambda p: abs(p - target))


def part_notes(plan: Plan, part: Part, seconds: float, rng: np.random.Generator) -> list[tuple[float, float, int, int]]:
  """(start, end, pitch, velocity) of every note of `part`, covering [0, seconds)."""
  beat = 60.0 / plan.tempo
  role = INSTRUMENTS[part.name].role
  low, high = part.window
  middle = (low + high) / 2
  notes = []

  def add(start_beats, length_beats, pitch, accent=0):
    start = start_beats * beat
    if start < seconds:
      velocity = int(np.clip(part.velocity + accent + rng.integers(-8, 9), 30, 127))
      notes.append((start, min(start + length_beats * beat, seconds + 0.5), int(pitch), velocity))

  bars = int(np.ceil(seconds / (4 * beat))) + 1
  # Melodies walk the scale by steps, from a degree inside the window.
  scale = SCALES[plan.scale]
  base = plan.root + 12 * int((middle - plan.root) // 12)
  degree_pitch = lambda d: base + scale[d % 7] + 12 * (d // 7)  # pylint: disable=unnecessary-lambda-assignment
  degree = int(rng.choice([d for d in range(-14, 14) if low <= degree_pitch(d) <= high]))
  melody_lengths = (0.5, 1.0, 1.0, 2.0) if part.pattern else (1.0, 2.0, 2.0, 1.0)
  for bar in range(bars):
    classes = _chord_classes(plan, plan.progression[bar % len(plan.progression)])
    t0 = 4.0 * bar
    if role == "bass":
      step = (1.0, 2.0, 0.5)[part.pattern]
      for k in range(int(4 / step)):
        pc = classes[0] if (part.pattern != 1 or k % 2 == 0) else classes[2]
        add(t0 + k * step, 0.9 * step, _nearest(pc, low + 7, part.window), accent=8 if k == 0 else 0)
    elif role in ("chords", "strum", "power"):
      step = (1.0, 2.0, 0.5)[part.pattern]
      if role == "power":
        root = _nearest(classes[0], low + 5, part.window)
        voicing = [root, root + 7, root + 12]
      else:
        voicing = [_nearest(pc, middle, part.window) for pc in classes]
        if role == "strum":
          voicing = sorted(voicing + [min(voicing) + 12])
      for k in range(int(4 / step)):
        for j, pitch in enumerate(voicing):
          stagger = 0.03 * j / beat if role == "strum" else 0.0  # a strum: lowest string first
          add(t0 + k * step + stagger, 0.85 * step, pitch, accent=6 if k == 0 else 0)
    elif role == "arpeggio":
      step = (0.5, 0.25, 0.5)[part.pattern]
      tones = _pitches(classes, part.window) or [_nearest(classes[0], middle, part.window)]
      sequence = tones + tones[-2:0:-1] if part.pattern == 2 else tones
      for k in range(int(4 / step)):
        add(t0 + k * step, 1.5 * step, sequence[k % len(sequence)], accent=6 if k == 0 else 0)
    elif role == "pad":
      for pitch in sorted({_nearest(pc, middle, part.window) for pc in classes}):
        add(t0, 3.9, pitch)
    elif role == "melody":
      t = t0
      while t < t0 + 4.0:
        length = min(float(rng.choice(melody_lengths)), t0 + 4.0 - t)
        step = int(rng.choice((-2, -1, -1, 0, 1, 1, 2)))
        if not low <= degree_pitch(degree + step) <= high:
          step = -step
        degree += step
        add(t, 0.95 * length, degree_pitch(degree), accent=4 if t == t0 else 0)
        t += length
    else:
      raise ValueError(f"unknown role {role!r} of {part.name}")
  return notes


@functools.lru_cache(maxsize=None)
def _synth_class():
  """fluidsynth.Synth reading float samples.

  Its 16-bit output is dithered from a table read at a position that carries over from call to call: the same part
  would not render to the same samples twice.
  """
  import ctypes  # pylint: disable=g-import-not-at-top
  import fluidsynth  # pylint: disable=g-import-not-at-top
  write_float = fluidsynth.cfunc("fluid_synth_write_float", ctypes.c_int, ("synth", ctypes.c_void_p, 1),
                                 ("len", ctypes.c_int, 1), ("lout", ctypes.c_void_p, 1), ("loff", ctypes.c_int, 1),
                                 ("lincr", ctypes.c_int, 1), ("rout", ctypes.c_void_p, 1), ("roff", ctypes.c_int, 1),
                                 ("rincr", ctypes.c_int, 1))

  class FloatSynth(fluidsynth.Synth):

    def get_samples(self, len=1024):  # pylint: disable=redefined-builtin
      out = np.empty(2 * len, np.float32)
      write_float(self.synth, len, out.ctypes.data, 0, 2, out.ctypes.data, 1, 2)
      return out

  return FloatSynth


def _stream(seed: int, split: str, index: int, *stream: int) -> np.random.Generator:
  return np.random.default_rng([seed, SPLIT_CODES[split], index, *stream])


def part_soundfonts(seed: int, split: str, index: int, num_parts: int, soundfonts: Sequence[str]) -> list[str]:
  """The SoundFont each part of clip `index` of `split` is rendered with, drawn uniformly from `soundfonts`."""
  draws = _stream(seed, split, index, SOUNDFONT_STREAM).integers(len(soundfonts), size=num_parts)
  return [soundfonts[i] for i in draws]


def default_soundfont() -> str:
  import pretty_midi  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(pretty_midi.__file__), "TimGM6mb.sf2")


def find_soundfont(filename: str) -> Optional[str]:
  """The path of an installed SoundFont (e.g. 'sf_GMbank.sf2' of Debian's csound-soundfont), or None."""
  for directory in SOUNDFONT_DIRS:
    path = os.path.join(directory, filename)
    if os.path.isfile(path):
      return path
  return None


def render_part(notes, program: int, seconds: float, soundfont: str,
                pitch_bends: Sequence[tuple[float, int]] = ()) -> np.ndarray:
  """One part at RENDER_RATE, exactly `seconds` long; `pitch_bends` are (time, MIDI pitch-bend value) messages."""
  import pretty_midi  # pylint: disable=g-import-not-at-top
  # A fresh synthesizer per part: one that has played keeps state (effect tails, voice filters, 64-frame block
  # phase) that would make a part depend on what was rendered before it. Loading samples on demand makes it cheap
  # (~10 ms against ~35 ms for the whole SoundFont). Dry: reverb and chorus would add ~35 % to the rendering time.
  synth = _synth_class()(gain=0.5, samplerate=RENDER_RATE, **{"synth.dynamic-sample-loading": 1,
                                                               "synth.reverb.active": 0, "synth.chorus.active": 0})
  try:
    sfid = synth.sfload(soundfont)
    if sfid < 0:
      raise RuntimeError(f"FluidSynth cannot load the SoundFont {soundfont}")
    instrument = pretty_midi.Instrument(program=program)
    instrument.notes = [pretty_midi.Note(velocity=v, pitch=p, start=s, end=e) for s, e, p, v in notes]
    instrument.pitch_bends = [pretty_midi.PitchBend(pitch=v, time=t) for t, v in pitch_bends]
    y = instrument.fluidsynth(fs=RENDER_RATE, synthesizer=synth, sfid=sfid)
  finally:
    synth.delete()
  n = int(round(seconds * RENDER_RATE))
  return np.pad(y[:n], (0, max(0, n - len(y))))


def render_clip(seed: int, split: str, index: int, seconds: float = 10.0, soundfonts: Optional[Sequence[str]] = None,
                augment: bool = True) -> tuple[np.ndarray, list[str]]:
  """(16 kHz mono float32 waveform, instruments playing in it) of clip `index` of `split`.

  Each part is rendered with a SoundFont drawn from `soundfonts` (default: pretty_midi's TimGM6mb.sf2); `augment`
  detunes, equalises and levels each part and adds a room and noise to the mix.
  """
  soundfonts = list(soundfonts or [default_soundfont()])
  plan, rng = plan_clip(seed, split, index)
  chosen = part_soundfonts(seed, split, index, len(plan.parts), soundfonts)
  mix = np.zeros(int(round(seconds * RENDER_RATE)))
  for k, (part, soundfont) in enumerate(zip(plan.parts, chosen)):
    notes = part_notes(plan, part, seconds, rng)
    part_rng = _stream(seed, split, index, PART_STREAM, k)
    program = INSTRUMENTS[part.name].program
    y = render_part(notes, program, seconds, soundfont,
                    augmentations.pitch_bends(seconds, part_rng) if augment else ())
    if augment:
      y = augmentations.equalize(y, part_rng, RENDER_RATE)
    rms = np.sqrt(np.mean(y**2))
    if rms < 1e-6:
      raise RuntimeError(f"{part.name} (program {program}) renders silent with {soundfont}")
    y = y * (10 ** (part.gain_db / 20) / rms)
    mix += augmentations.change_level(y, part_rng) if augment else y
  x = soxr.resample(mix, RENDER_RATE, SAMPLE_RATE, quality="VHQ") if RENDER_RATE != SAMPLE_RATE else mix
  if augment:
    mix_rng = _stream(seed, split, index, MIX_STREAM)
    x = augmentations.add_noise(augmentations.reverberate(x, mix_rng, SAMPLE_RATE), mix_rng, SAMPLE_RATE)
  x *= 0.1 / max(np.sqrt(np.mean(x**2)), 1e-9)  # -20 dBFS RMS
  x *= min(1.0, 0.95 / max(np.abs(x).max(), 1e-9))  # and peaks within int16 range
  return x.astype(np.float32), plan.instruments

"""What real recordings vary and a SoundFont does not: tuning, equalisation, part levels, room, noise.

Each augmentation is a pure function of (audio or duration, generator): it draws its own parameters from the
generator, so a clip's augmentations follow from the generators render.py derives from its seed. Ranges are kept
small enough that no instrument stops sounding like itself (a few cents, ±6 dB bands, ±3 dB levels, a room's reverb
under the direct sound, noise 30 dB or more below the music).
"""
import numpy as np
from scipy import signal

# Detuning and vibrato, in cents. Recordings differ in reference pitch (A = 440 vs 442 Hz is 8 cents) and players
# add vibrato; a few cents change neither the note nor the register.
DETUNE_CENTS = 6.0
VIBRATO_CENTS = (0.0, 5.0)  # peak deviation
VIBRATO_HZ = (4.0, 7.0)
BEND_STEP_SECONDS = 0.025  # 40 pitch-bend messages a second follow a 7 Hz vibrato smoothly enough at 5 cents
BEND_RANGE_CENTS = 200.0  # FluidSynth's default pitch-wheel sensitivity: ±2 semitones over ±8192
# Equalisation (RBJ biquads): microphones, placement and mixing tilt and colour a part by a few dB.
EQ_GAIN_DB = 6.0
LOW_SHELF_HZ = (80.0, 400.0)
HIGH_SHELF_HZ = (2000.0, 7000.0)
PEAK_HZ = (200.0, 5000.0)
PEAK_Q = (0.7, 2.0)
# Part levels on top of the plan's 0 to -6 dB: still within 12 dB of each other, so nothing is buried.
LEVEL_DB = 3.0
# Room: dry (a studio booth) to a hall. Reverberant-to-direct energy ratio, dB: the direct sound stays on top.
RT60_SECONDS = (0.2, 1.5)
WET_DB = (-20.0, -3.0)
# Background noise: hiss (white) to rumble-heavy (1/f^1.5) at a signal-to-noise ratio of a decent recording.
SNR_DB = (30.0, 60.0)
NOISE_SLOPE = (0.0, 1.5)


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
  return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))


def _rms(x: np.ndarray) -> float:
  return float(np.sqrt(np.mean(x**2)))


def pitch_bends(seconds: float, rng: np.random.Generator) -> list[tuple[float, int]]:
  """(time, MIDI pitch-bend value) messages detuning a part by a constant offset plus a slow sinusoidal vibrato."""
  detune = rng.uniform(-DETUNE_CENTS, DETUNE_CENTS)
  depth, rate, phase = rng.uniform(*VIBRATO_CENTS), rng.uniform(*VIBRATO_HZ), rng.uniform(0.0, 2 * np.pi)
  times = np.arange(0.0, seconds, BEND_STEP_SECONDS)
  cents = detune + depth * np.sin(2 * np.pi * rate * times + phase)
  values = np.round(cents / BEND_RANGE_CENTS * 8192).astype(int)
  return list(zip(times.tolist(), values.tolist()))


def _shelf_or_peak(kind: str, freq: float, gain_db: float, q: float, sample_rate: int) -> np.ndarray:
  """One second-order section (b0, b1, b2, 1, a1, a2) of the Audio EQ Cookbook (R. Bristow-Johnson)."""
  a = 10 ** (gain_db / 40)
  w = 2 * np.pi * freq / sample_rate
  cos, alpha = np.cos(w), np.sin(w) / (2 * q)
  if kind == "peak":
    b = [1 + alpha * a, -2 * cos, 1 - alpha * a]
    den = [1 + alpha / a, -2 * cos, 1 - alpha / a]
  else:
    s = -1 if kind == "high" else 1  # the high shelf is the low shelf with the sign of cos flipped
    k = 2 * np.sqrt(a) * alpha
    b = [a * ((a + 1) - s * (a - 1) * cos + k), s * 2 * a * ((a - 1) - s * (a + 1) * cos),
         a * ((a + 1) - s * (a - 1) * cos - k)]
    den = [(a + 1) + s * (a - 1) * cos + k, -s * 2 * ((a - 1) + s * (a + 1) * cos), (a + 1) + s * (a - 1) * cos - k]
  return np.array(b + den) / den[0]


def equalize(audio: np.ndarray, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
  """A random low shelf, high shelf and peaking band (each ±EQ_GAIN_DB) applied to `audio`."""
  sections = [
      _shelf_or_peak("low", _log_uniform(rng, LOW_SHELF_HZ), rng.uniform(-EQ_GAIN_DB, EQ_GAIN_DB), 0.7071,
                     sample_rate),
      _shelf_or_peak("high", _log_uniform(rng, HIGH_SHELF_HZ), rng.uniform(-EQ_GAIN_DB, EQ_GAIN_DB), 0.7071,
                     sample_rate),
      _shelf_or_peak("peak", _log_uniform(rng, PEAK_HZ), rng.uniform(-EQ_GAIN_DB, EQ_GAIN_DB), rng.uniform(*PEAK_Q),
                     sample_rate),
  ]
  return signal.sosfilt(np.stack(sections), audio)


def change_level(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """`audio` louder or softer by up to LEVEL_DB."""
  return audio * 10 ** (rng.uniform(-LEVEL_DB, LEVEL_DB) / 20)


def reverberate(audio: np.ndarray, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
  """`audio` plus its convolution with a synthetic room: exponentially decaying noise, random RT60 and wet level.

  The output keeps the input's length (the tail past the clip's end is dropped, as a crop of a recording would).
  """
  rt60 = rng.uniform(*RT60_SECONDS)
  wet_db = rng.uniform(*WET_DB)
  t = np.arange(int(rt60 * sample_rate)) / sample_rate
  response = rng.standard_normal(len(t)) * 10 ** (-3 * t / rt60)  # -60 dB at rt60
  wet = signal.fftconvolve(audio, response)[:len(audio)]
  return audio + wet * (10 ** (wet_db / 20) * _rms(audio) / max(_rms(wet), 1e-12))


def add_noise(audio: np.ndarray, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
  """`audio` plus coloured noise (power ∝ 1/f^slope) at a random signal-to-noise ratio."""
  snr_db, slope = rng.uniform(*SNR_DB), rng.uniform(*NOISE_SLOPE)
  spectrum = rng.standard_normal(len(audio) // 2 + 1) + 1j * rng.standard_normal(len(audio) // 2 + 1)
  freqs = np.fft.rfftfreq(len(audio), 1 / sample_rate)
  spectrum[0] = 0.0
  spectrum[1:] *= freqs[1:] ** (-slope / 2)
  noise = np.fft.irfft(spectrum, len(audio))
  return audio + noise * (_rms(audio) * 10 ** (-snr_db / 20) / max(_rms(noise), 1e-12))

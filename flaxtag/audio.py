"""Audio: decoding, resampling, and log-mel features in JAX.

Decoding runs on the host in numpy (soundfile + soxr) and yields 16 kHz mono float32 in [-1, 1]. Features are
computed in JAX from raw waveform batches, inside the model's forward pass, so they run on the accelerator and can
be jitted. Conventions (SPEC §1): periodic Hann window, centred frames with reflect padding, power spectrogram,
Slaney (librosa default) or HTK (torchaudio default) mel filterbank, 10·log10 or A's 20·log10 conversion to dB,
clipped `top_db` below each example's maximum.
"""
from collections.abc import Iterator
import dataclasses
import io
import os
from typing import Optional, Union
import warnings

import jax.numpy as jnp
import numpy as np
import soundfile
import soxr

from flaxtag.errors import AudioError, ConfigError

SAMPLE_RATE = 16000
MEL_SCALES = ("slaney", "htk")
DB_SCALES = ("power", "amplitude")
# Below this peak a clip is digitally silent: one int16 step is 3e-5, so nothing audible is left.
SILENCE_PEAK = 1e-6

PathLike = Union[str, os.PathLike]

# ----------------------------------------------------------------------------------------------------------------------
# Decoding.


# Values at the door: checked on the decoded samples, before downmixing and resampling.
FULL_SCALE = 32767 / 32768  # the largest int16 sample; a clipped int16 file holds it (or -1), a clipped float file more
CLIPPING_SHARE = 0.01  # a file with at least this share of samples at full scale is clipped, not merely loud
DC_OFFSET = 0.1  # a channel mean beyond this (of full scale 1) is an offset; music averages to within ~0.01 of 0
STREAM_BLOCK_FRAMES = 1 << 16  # frames decoded at a time by `AudioStream` (1.5 s at 44.1 kHz)

# What libsndfile raises for a file it cannot decode (corrupt, truncated, an unknown format); anything else, say a
# TypeError, is a bug here and no reason to blame the file.
_DECODE_ERRORS = soundfile.SoundFileError


class AudioWarning(UserWarning):
  """A decoded file's values are suspect (clipped, a DC offset); it is still used."""


def _decode_error(name: str, e: Exception) -> AudioError:
  # libsndfile's own reason is often misleading (e.g. "does not exist" for a corrupt mp3), so it comes last.
  return AudioError(
      f"cannot decode audio file {name}: it is corrupt, truncated, or not in a format libsndfile reads "
      f"(libsndfile says: {str(e).rstrip('.')}). Check the file is complete, or convert it to wav/flac/mp3.")


def _empty_error(name: str) -> AudioError:
  return AudioError(f"audio file {name} is empty (0 frames). Check the file is not truncated.")


class SampleCheck:
  """Running checks of a file's decoded samples, block by block.

  Non-finite samples (NaN, infinity) are an AudioError as soon as they are seen; clipping (at least CLIPPING_SHARE
  of the samples at FULL_SCALE) and a DC offset (a channel mean beyond DC_OFFSET) are `warnings()` once all blocks
  are seen.
  """

  def __init__(self, name: str, rate: int):
    self.name, self.rate = name, rate
    self.frames = 0
    self.clipped = 0
    self.sums = 0.0

  def update(self, block: np.ndarray):
    """Checks (frames, channels) samples, the next ones of the file."""
    if not np.isfinite(block).all():
      first = (self.frames + int(np.argmin(np.isfinite(block).all(axis=1)))) / self.rate
      raise AudioError(f"audio file {self.name} holds non-finite samples (NaN or infinity), the first at "
                       f"{first:.2f} s; it cannot be tagged. Re-export it from its source.")
    self.clipped += int(np.count_nonzero(np.abs(block) >= FULL_SCALE))
    # A column at a time: numpy reduces the short rows of a (frames, channels) array 10x slower.
    self.sums = self.sums + np.array([block[:, c].sum(dtype=np.float64) for c in range(block.shape[1])])
    self.frames += len(block)

  def warnings(self) -> list[str]:
    """What is suspect in the samples seen so far, one message each."""
    found = []
    if not self.frames:
      return found
    channels = np.size(self.sums)
    share = self.clipped / (self.frames * channels)
    if share >= CLIPPING_SHARE:
      found.append(f"audio file {self.name} is clipped: {100 * share:.1f} % of its samples are at full scale; its "
                   "tags may be unreliable.")
    offset = float(np.max(np.abs(self.sums))) / self.frames
    if offset > DC_OFFSET:
      found.append(f"audio file {self.name} has a DC offset of {offset:.2f} (full scale is 1); its tags may be "
                   "unreliable. A high-pass filter removes it.")
    return found


def _downmix(data: np.ndarray) -> np.ndarray:
  """(frames, channels) → (frames,): the mean of the channels, as data.mean(axis=1) gives it, 20x faster (numpy
  reduces short rows slowly)."""
  mono = data[:, 0].copy()
  for c in range(1, data.shape[1]):
    mono += data[:, c]
  mono /= data.shape[1]
  return mono


def _decode(source, name: str, sample_rate: int) -> np.ndarray:
  """Decodes `source` (a path or a file object) to mono float32 at `sample_rate`; `name` is used in messages."""
  try:
    data, rate = soundfile.read(source, dtype="float32", always_2d=True)
  except _DECODE_ERRORS as e:
    raise _decode_error(name, e) from e
  if data.shape[0] == 0:
    raise _empty_error(name)
  check = SampleCheck(name, rate)
  check.update(data)
  for message in check.warnings():
    warnings.warn(message, AudioWarning, stacklevel=3)
  mono = _downmix(data)
  if rate != sample_rate:
    mono = soxr.resample(mono, rate, sample_rate, quality="VHQ")
  # Decoders and the resampler can overshoot full scale slightly; int16 storage would clip there anyway.
  return np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False)


def _check_is_file(name: str):
  if not os.path.isfile(name):
    raise AudioError(f"audio file {name} does not exist (or is not a regular file). Check the path.")


def load_audio(path: PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Reads an audio file (wav, flac, ogg, mp3, ...) as mono float32 in [-1, 1] at `sample_rate`.

  Channels are averaged, then the signal is resampled with soxr when the file's rate differs. A clipped file or one
  with a DC offset is used, with an AudioWarning.

  Raises:
    AudioError: the file does not exist, cannot be decoded, has no frames, or holds NaN or infinite samples.
  """
  name = os.fspath(path)
  _check_is_file(name)
  return _decode(name, name, sample_rate)


def decode_audio_bytes(data: bytes, sample_rate: int = SAMPLE_RATE, name: str = "<bytes>") -> np.ndarray:
  """Like `load_audio`, for the content of an audio file held in memory (e.g. read from a zip archive).

  `name` identifies the file in error messages, e.g. "magnatagatune.zip:f/track.mp3".
  """
  return _decode(io.BytesIO(data), name, sample_rate)


def resampled_length(frames: int, rate: int, sample_rate: int) -> int:
  """Samples soxr makes of `frames` at `rate` resampled to `sample_rate`: frames·sample_rate/rate, rounded half up."""
  return (2 * frames * sample_rate + rate) // (2 * rate)


class _SequentialSoundFile(soundfile.SoundFile):
  """A SoundFile read front to back. soundfile's read() seeks to its own position after every call to keep count,
  and a seek restarts libsndfile's MP3 decoder: ~1,200 wrong samples after every block. Not seekable, it never
  seeks."""

  def seekable(self):
    return False


class AudioStream:
  """An audio file decoded a block at a time: the samples `load_audio` gives, without holding the whole file.

    with AudioStream("set.mp3") as stream:
      stream.num_samples      # the length at `sample_rate` the file's header announces
      for block in stream:    # mono float32 blocks at `sample_rate`, in order
        ...
      stream.warnings         # once all blocks are read: clipping, DC offset (see SampleCheck)

  soxr's streaming resampler gives exactly its one-shot output. The header's length can be wrong (a truncated MP3):
  count the samples. Raises AudioError (unreadable, empty, NaN or infinite samples) on opening or while iterating.
  """

  def __init__(self, path: PathLike, sample_rate: int = SAMPLE_RATE, block_frames: int = STREAM_BLOCK_FRAMES):
    self.name = os.fspath(path)
    _check_is_file(self.name)
    try:
      self._file = _SequentialSoundFile(self.name)
    except _DECODE_ERRORS as e:
      raise _decode_error(self.name, e) from e
    self.sample_rate = sample_rate
    self.block_frames = block_frames
    self.num_samples = resampled_length(self._file.frames, self._file.samplerate, sample_rate)
    self.warnings: list[str] = []

  def __iter__(self) -> Iterator[np.ndarray]:
    rate = self._file.samplerate
    check = SampleCheck(self.name, rate)
    resampler = None
    if rate != self.sample_rate:
      resampler = soxr.ResampleStream(rate, self.sample_rate, 1, dtype="float32", quality="VHQ")
    while True:
      try:
        block = self._file.read(self.block_frames, dtype="float32", always_2d=True)
      except _DECODE_ERRORS as e:
        raise _decode_error(self.name, e) from e
      check.update(block)
      mono = _downmix(block)
      if resampler is not None:
        mono = resampler.resample_chunk(mono, last=not len(block))
      if len(mono):
        yield np.clip(mono, -1.0, 1.0)
      if not len(block):
        break
    if not check.frames:
      raise _empty_error(self.name)
    self.warnings = check.warnings()

  def close(self):
    self._file.close()

  def __enter__(self) -> "AudioStream":
    return self

  def __exit__(self, *exc_info):
    self.close()


INT16_SCALE = np.float32(1.0 / 32768.0)  # int16 PCM sample → float in [-1, 1)


def to_int16(x: np.ndarray) -> np.ndarray:
  """Float samples in [-1, 1] to int16 PCM (x·32768, rounded, clipped to the int16 range)."""
  return np.clip(np.round(np.asarray(x, np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def from_int16(x: np.ndarray) -> np.ndarray:
  """int16 PCM to float32 samples in [-1, 1): x / 32768."""
  return np.asarray(x, np.float32) * INT16_SCALE


def check_clip(waveform: np.ndarray,
               min_samples: int,
               path: Optional[PathLike] = None,
               sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Returns `waveform` if a model can use it; raises AudioError if it is too short, not finite or digitally
  silent."""
  n = np.shape(waveform)[-1]
  check_length(n, min_samples, path, sample_rate)
  if not np.isfinite(waveform).all():
    raise AudioError(f"{_where(path)} holds non-finite samples (NaN or infinity); it cannot be tagged.")
  check_peak(float(np.max(np.abs(waveform))) if n else 0.0, path)
  return waveform


def _where(path: Optional[PathLike]) -> str:
  return f"audio file {os.fspath(path)}" if path is not None else "audio clip"


def check_length(num_samples: int, min_samples: int, path: Optional[PathLike] = None,
                 sample_rate: int = SAMPLE_RATE):
  """Raises AudioError if a clip of `num_samples` is shorter than `min_samples`."""
  if num_samples < min_samples:
    raise AudioError(f"{_where(path)} is too short: {num_samples / sample_rate:.2f} s ({num_samples} samples at "
                     f"{sample_rate} Hz), but the model needs at least {min_samples / sample_rate:.2f} s "
                     f"({min_samples} samples).")


def check_peak(peak: float, path: Optional[PathLike] = None):
  """Raises AudioError if a clip whose largest |sample| is `peak` is digitally silent."""
  if peak < SILENCE_PEAK:
    raise AudioError(f"{_where(path)} is digitally silent (all samples are zero); it cannot be tagged.")


# ----------------------------------------------------------------------------------------------------------------------
# Features.


def _hz_to_mel(f: np.ndarray, mel_scale: str) -> np.ndarray:
  f = np.asarray(f, np.float64)
  if mel_scale == "htk":
    return 2595.0 * np.log10(1.0 + f / 700.0)
  # Slaney: linear at 200/3 Hz per mel up to 1 kHz (15 mel), logarithmic above with 27 mel per factor 6.4.
  return np.where(f < 1000.0, f * 3.0 / 200.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * 27.0 / np.log(6.4))


def _mel_to_hz(m: np.ndarray, mel_scale: str) -> np.ndarray:
  m = np.asarray(m, np.float64)
  if mel_scale == "htk":
    return 700.0 * (10.0**(m / 2595.0) - 1.0)
  return np.where(m < 15.0, m * 200.0 / 3.0, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0))


def mel_filterbank(sample_rate: int = SAMPLE_RATE,
                   n_fft: int = 512,
                   n_mels: int = 96,
                   f_min: float = 0.0,
                   f_max: float = 8000.0,
                   mel_scale: str = "slaney") -> np.ndarray:
  """Triangular mel filterbank, (n_fft//2 + 1, n_mels) float32, to right-multiply a power spectrogram.

  'slaney': Slaney mel scale, each triangle scaled to unit area in Hz (= librosa's default).
  'htk': HTK mel scale, triangles of peak 1 (= torchaudio's default).
  """
  if mel_scale not in MEL_SCALES:
    raise ConfigError(f"unknown mel_scale {mel_scale!r}; valid values are {', '.join(MEL_SCALES)}.")
  fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
  edges = _mel_to_hz(np.linspace(_hz_to_mel(f_min, mel_scale), _hz_to_mel(f_max, mel_scale), n_mels + 2), mel_scale)
  lo, centre, hi = edges[:-2], edges[1:-1], edges[2:]
  rising = (fft_hz[:, None] - lo) / (centre - lo)
  falling = (hi - fft_hz[:, None]) / (hi - centre)
  weights = np.maximum(0.0, np.minimum(rising, falling))
  if mel_scale == "slaney":
    weights *= 2.0 / (hi - lo)
  return weights.astype(np.float32)


def num_frames(num_samples: int, hop_length: int = 256) -> int:
  """Number of centred STFT frames of a signal of `num_samples` samples."""
  return 1 + num_samples // hop_length


def _frames(x: jnp.ndarray, n_fft: int, hop_length: int) -> jnp.ndarray:
  """(..., N) -> (..., 1 + N // hop_length, n_fft) centred frames, reflect-padded by n_fft//2 on both sides."""
  pad = n_fft // 2
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
  t = num_frames(x.shape[-1] - 2 * pad, hop_length)
  if n_fft % hop_length:
    return x[..., hop_length * np.arange(t)[:, None] + np.arange(n_fft)]
  # Frames are r consecutive hop-sized blocks: slicing a reshape is cheaper than a gather.
  r = n_fft // hop_length
  blocks = x[..., :(t + r - 1) * hop_length].reshape(*x.shape[:-1], t + r - 1, hop_length)
  return jnp.concatenate([blocks[..., i:i + t, :] for i in range(r)], axis=-1)


def power_spectrogram(waveform: jnp.ndarray, n_fft: int = 512, hop_length: int = 256) -> jnp.ndarray:
  """|STFT|², (..., N) -> (..., 1 + N // hop_length, n_fft//2 + 1) float32.

  Periodic Hann window of length n_fft, centred frames, reflect padding. Computed in float32 whatever the input
  dtype (a log-mel from bf16 is too coarse).
  """
  # rfft beats a real-DFT matmul (precision HIGHEST) on CPU, jit, (16, 65280) float32, 2 cores, median of 10 runs:
  # rfft 4.0-4.1 ms (4.3-7.6 ms with gather framing), matmul 15.9-16.2 ms; the matmul is also less accurate.
  x = jnp.asarray(waveform).astype(jnp.float32)
  window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
  spec = jnp.fft.rfft(_frames(x, n_fft, hop_length) * window.astype(np.float32), axis=-1)
  return spec.real**2 + spec.imag**2


def to_decibels(s: jnp.ndarray, scale: str = "power", top_db: Optional[float] = 80.0) -> jnp.ndarray:
  """Power spectrogram (..., mel, frames) to dB, clipped `top_db` below each example's maximum.

  scale='power': 10·log10(max(S, 1e-10)). scale='amplitude': A's convention, 20·log10(max(S, 1e-5)) applied to the
  power spectrogram as is. The maximum is taken over the last two axes (one example), never across the batch;
  `top_db=None` disables clipping.
  """
  if scale == "power":
    db = 10.0 * jnp.log10(jnp.maximum(s, 1e-10))
  elif scale == "amplitude":
    db = 20.0 * jnp.log10(jnp.maximum(s, 1e-5))
  else:
    raise ConfigError(f"unknown dB scale {scale!r}; valid values are {', '.join(DB_SCALES)}.")
  if top_db is not None:
    db = jnp.maximum(db, jnp.max(db, axis=(-2, -1), keepdims=True) - top_db)
  return db


@dataclasses.dataclass(frozen=True)
class MelConfig:
  """Log-mel front-end settings (SPEC §1); the defaults are the method-A recipe with power-to-dB."""
  sample_rate: int = SAMPLE_RATE
  n_fft: int = 512
  hop_length: int = 256
  n_mels: int = 96
  f_min: float = 0.0
  f_max: float = 8000.0
  mel_scale: str = "slaney"
  db_scale: str = "power"
  top_db: Optional[float] = 80.0

  def __post_init__(self):
    if self.mel_scale not in MEL_SCALES:
      raise ConfigError(f"unknown mel_scale {self.mel_scale!r}; valid values are {', '.join(MEL_SCALES)}.")
    if self.db_scale not in DB_SCALES:
      raise ConfigError(f"unknown db_scale {self.db_scale!r}; valid values are {', '.join(DB_SCALES)}.")
    for field in ("sample_rate", "n_fft", "hop_length", "n_mels"):
      if getattr(self, field) <= 0:
        raise ConfigError(f"{field} must be positive, got {getattr(self, field)}.")
    if not 0.0 <= self.f_min < self.f_max <= self.sample_rate / 2:
      raise ConfigError(f"need 0 <= f_min < f_max <= sample_rate/2 = {self.sample_rate / 2:g} Hz, got "
                        f"f_min={self.f_min}, f_max={self.f_max}.")
    if self.top_db is not None and self.top_db <= 0:
      raise ConfigError(f"top_db must be positive or None (no clipping), got {self.top_db}.")


def log_mel_spectrogram(waveform: jnp.ndarray, config: MelConfig = MelConfig()) -> jnp.ndarray:
  """Raw waveforms (B, N) -> log-mel (B, n_mels, 1 + N // hop_length) float32 in dB."""
  power = power_spectrogram(waveform, config.n_fft, config.hop_length)
  fb = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels, config.f_min, config.f_max, config.mel_scale)
  # HIGHEST: TPUs and GPUs would otherwise multiply float32 in bf16/tf32, too coarse for 80 dB of dynamic range.
  mel = jnp.einsum("...tf,fm->...mt", power, fb, precision="highest")
  return to_decibels(mel, config.db_scale, config.top_db)

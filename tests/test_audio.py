"""Tests of flaxtag.audio against independent references (librosa, numpy in float64, known signals)."""
import warnings

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import soundfile

from flaxtag import audio
from flaxtag.errors import AudioError, ConfigError

SR = audio.SAMPLE_RATE
# Not a multiple of the hop: librosa (0.11) builds the last frame of a length that is a multiple of the hop from a
# too-short tail segment whose reflect padding wraps around, so it differs from a true reflect padding there.
N = 16123


def _sine(freq, seconds, rate, amplitude=0.5):
  t = np.arange(int(round(seconds * rate))) / rate
  return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _noise(seed, n=N, scale=0.3):
  return (scale * np.random.RandomState(seed).randn(n)).astype(np.float32)


def _librosa_mel(x, mel_scale):
  return librosa.feature.melspectrogram(y=x, sr=SR, n_fft=512, hop_length=256, window="hann", center=True,
                                        pad_mode="reflect", power=2.0, n_mels=96, fmin=0.0, fmax=8000.0,
                                        htk=mel_scale == "htk", norm="slaney" if mel_scale == "slaney" else None)


# ----------------------------------------------------------------------------------------------------------------------
# Features.


@pytest.mark.parametrize("mel_scale", ["slaney", "htk"])
@pytest.mark.parametrize("sr,n_fft,n_mels,f_min,f_max", [(16000, 512, 96, 0.0, 8000.0), (22050, 1024, 128, 30.0, 9000.0)])
def test_mel_filterbank_matches_librosa(mel_scale, sr, n_fft, n_mels, f_min, f_max):
  ours = audio.mel_filterbank(sr, n_fft, n_mels, f_min, f_max, mel_scale)
  ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max, htk=mel_scale == "htk",
                            norm="slaney" if mel_scale == "slaney" else None).T
  assert ours.shape == (n_fft // 2 + 1, n_mels) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6 * ref.max())


@pytest.mark.parametrize("signal", ["noise", "sine"])
def test_power_spectrogram_matches_librosa(signal):
  x = _noise(0) if signal == "noise" else _sine(440.0, N / SR, SR) + 1e-3 * _noise(1)
  ours = np.asarray(audio.power_spectrogram(jnp.asarray(x[None])))[0]
  ref = np.abs(librosa.stft(x.astype(np.float64), n_fft=512, hop_length=256, window="hann", center=True,
                            pad_mode="reflect"))**2
  ref = ref.T
  assert ours.shape == ref.shape == (audio.num_frames(N, 256), 257)
  # A float32 FFT has an absolute error of a few ulp of the frame's norm: compare bins within 40 dB of their frame's
  # peak relatively, and all bins against the frame's peak.
  peak = ref.max(axis=1, keepdims=True)
  meaningful = ref > 1e-4 * peak
  assert meaningful.mean() > 0.01
  np.testing.assert_allclose(ours[meaningful], ref[meaningful], rtol=1e-4)
  assert np.all(np.abs(ours - ref) <= 1e-6 * peak)


def test_power_spectrogram_sine_peak_bin():
  x = _sine(1000.0, 1.0, SR)  # 1 kHz is exactly bin 32 of a 512-point FFT at 16 kHz.
  p = np.asarray(audio.power_spectrogram(jnp.asarray(x[None])))[0]
  assert np.all(p[1:-1].argmax(axis=1) == 32)


@pytest.mark.parametrize("mel_scale", ["slaney", "htk"])
def test_log_mel_matches_librosa_per_example(mel_scale):
  batch = np.stack([_noise(2), _sine(440.0, N / SR, SR, 0.01) + 1e-4 * _noise(3)])
  ours = np.asarray(audio.log_mel_spectrogram(jnp.asarray(batch), audio.MelConfig(mel_scale=mel_scale)))
  assert ours.shape == (2, 96, audio.num_frames(N, 256)) and ours.dtype == np.float32
  ref = np.stack([
      librosa.power_to_db(_librosa_mel(x.astype(np.float64), mel_scale), ref=1.0, amin=1e-10, top_db=80.0)
      for x in batch
  ])
  # A float32 STFT errs by ~1 ulp of the frame's largest bin, i.e. ~eps·10^(depth/20) relative at a bin `depth` dB
  # below it: 1e-3 dB is attainable down to 60 dB below the example's maximum, a few 1e-3 dB at 60-80 dB.
  deep = ref < ref.max(axis=(1, 2), keepdims=True) - 60.0
  assert (~deep).sum() > 1000 and deep.sum() > 1000
  np.testing.assert_allclose(ours[~deep], ref[~deep], rtol=0, atol=1e-3)
  np.testing.assert_allclose(ours[deep], ref[deep], rtol=0, atol=5e-3)


def test_amplitude_db_convention():
  batch = np.stack([_noise(4), _noise(5, scale=0.003)])
  config = audio.MelConfig(db_scale="amplitude", top_db=80.0)
  ours = np.asarray(audio.log_mel_spectrogram(jnp.asarray(batch), config))
  for i, x in enumerate(batch):
    db = 20.0 * np.log10(np.maximum(_librosa_mel(x.astype(np.float64), "slaney"), 1e-5))
    ref = np.maximum(db, db.max() - 80.0)
    np.testing.assert_allclose(ours[i], ref, rtol=0, atol=1e-3)


def test_top_db_is_per_example():
  # Sines over faint noise span more than 80 dB, so that clipping applies, at levels 34 dB apart.
  loud = _sine(440.0, N / SR, SR, 0.5) + 1e-5 * _noise(6)
  quiet = _sine(440.0, N / SR, SR, 0.01) + 1e-8 * _noise(7)
  config = audio.MelConfig()
  both = np.asarray(audio.log_mel_spectrogram(jnp.asarray(np.stack([loud, quiet])), config))
  alone = [np.asarray(audio.log_mel_spectrogram(jnp.asarray(x[None]), config))[0] for x in (loud, quiet)]
  np.testing.assert_allclose(both[0], alone[0], atol=1e-4)
  np.testing.assert_allclose(both[1], alone[1], atol=1e-4)
  # Each example spans exactly 80 dB: the quiet one is not clipped against the loud one's maximum.
  for example in both:
    assert example.max() - example.min() == pytest.approx(80.0, abs=1e-3)


def test_top_db_none_disables_clipping():
  s = jnp.asarray([[[1.0, 1e-12], [1e-3, 1e-20]]])
  np.testing.assert_allclose(audio.to_decibels(s, "power", None), [[[0.0, -100.0], [-30.0, -100.0]]], atol=1e-4)
  np.testing.assert_allclose(audio.to_decibels(s, "power", 50.0), [[[0.0, -50.0], [-30.0, -50.0]]], atol=1e-4)
  np.testing.assert_allclose(audio.to_decibels(s, "amplitude", None), [[[0.0, -100.0], [-60.0, -100.0]]], atol=1e-4)


def test_crop_of_65280_samples_gives_256_frames():
  assert audio.num_frames(65280, 256) == 256
  out = jax.eval_shape(lambda x: audio.log_mel_spectrogram(x, audio.MelConfig()),
                       jax.ShapeDtypeStruct((3, 65280), jnp.float32))
  assert out.shape == (3, 96, 256)


def test_bf16_waveform_is_computed_in_float32_and_jits():
  x = jnp.asarray(np.stack([_noise(8), _noise(9)])).astype(jnp.bfloat16)
  config = audio.MelConfig(mel_scale="htk")
  jitted = jax.jit(audio.log_mel_spectrogram, static_argnums=1)(x, config)
  assert jitted.dtype == jnp.float32
  ref = audio.log_mel_spectrogram(x.astype(jnp.float32), config)
  np.testing.assert_allclose(jitted, ref, atol=1e-3)


@pytest.mark.parametrize("kwargs,words", [
    (dict(mel_scale="mel"), ["mel_scale", "slaney", "htk"]),
    (dict(db_scale="log"), ["db_scale", "power", "amplitude"]),
    (dict(f_max=9000.0), ["f_max", "8000"]),
    (dict(f_min=8000.0), ["f_min"]),
    (dict(n_mels=0), ["n_mels"]),
    (dict(top_db=-1.0), ["top_db"]),
])
def test_mel_config_validation(kwargs, words):
  with pytest.raises(ConfigError) as e:
    audio.MelConfig(**kwargs)
  for word in words:
    assert word in str(e.value)


# ----------------------------------------------------------------------------------------------------------------------
# Decoding.


def _dominant_frequency(x, rate):
  spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
  return np.fft.rfftfreq(len(x), 1.0 / rate)[spectrum.argmax()]


@pytest.mark.parametrize("fmt,rate,channels,subtype,expected_peak", [
    ("WAV", 44100, 2, "PCM_16", 0.25),  # left = sine, right = silence: the downmix halves the amplitude.
    ("FLAC", 22050, 1, "PCM_16", 0.5),
    ("OGG", 44100, 1, "VORBIS", 0.5),
    ("MP3", 44100, 1, "MPEG_LAYER_III", 0.5),
])
def test_load_audio_resamples_and_downmixes(tmp_path, fmt, rate, channels, subtype, expected_peak):
  sine = _sine(440.0, 1.0, rate)
  data = sine if channels == 1 else np.stack([sine, np.zeros_like(sine)], axis=1)
  path = tmp_path / f"tone.{fmt.lower()}"
  soundfile.write(path, data, rate, format=fmt, subtype=subtype)
  x = audio.load_audio(path)
  assert x.dtype == np.float32 and x.ndim == 1
  assert abs(len(x) - SR) <= (0 if fmt in ("WAV", "FLAC") else 0.1 * SR)  # Lossy codecs add encoder delay/padding.
  assert abs(_dominant_frequency(x, SR) - 440.0) <= 1.0
  middle = x[len(x) // 4:3 * len(x) // 4]
  assert np.abs(middle).max() == pytest.approx(expected_peak, rel=0.03)
  if fmt in ("WAV", "FLAC"):  # Lossless: the resampled sine itself, up to int16 quantisation and soxr's ripple.
    np.testing.assert_allclose(middle, expected_peak / 0.5 * _sine(440.0, 1.0, SR)[len(x) // 4:3 * len(x) // 4],
                               atol=1e-3)


def test_decode_audio_bytes_matches_load_audio(tmp_path):
  path = tmp_path / "tone.mp3"
  soundfile.write(path, _sine(440.0, 1.0, 22050), 22050, format="MP3")
  np.testing.assert_array_equal(audio.decode_audio_bytes(path.read_bytes()), audio.load_audio(path))


def test_load_audio_keeps_16khz_samples(tmp_path):
  pcm = audio.to_int16(_noise(10, 4000))
  path = tmp_path / "pcm.wav"
  soundfile.write(path, pcm, SR, subtype="PCM_16")
  np.testing.assert_array_equal(audio.load_audio(path), audio.from_int16(pcm))


def test_int16_round_trip():
  everything = np.arange(-32768, 32768).astype(np.int16)
  np.testing.assert_array_equal(audio.to_int16(audio.from_int16(everything)), everything)
  assert audio.from_int16(everything).dtype == np.float32
  assert audio.from_int16(everything).min() == -1.0
  x = np.random.RandomState(11).uniform(-1.0, 1.0 - 1.0 / 32768, 10000).astype(np.float32)
  assert np.abs(audio.from_int16(audio.to_int16(x)) - x).max() <= 0.5 / 32768 + 1e-9
  np.testing.assert_array_equal(audio.to_int16(np.array([1.0, 1.5, -1.0, -1.5, 0.0])),
                                [32767, 32767, -32768, -32768, 0])


def _assert_audio_error(fn, name, *words):
  with pytest.raises(AudioError) as e:
    fn()
  for word in (name,) + words:
    assert word in str(e.value)


def test_missing_file_raises(tmp_path):
  path = tmp_path / "missing.wav"
  _assert_audio_error(lambda: audio.load_audio(path), "missing.wav", "does not exist")


def test_undecodable_file_raises(tmp_path):
  path = tmp_path / "noise.mp3"
  path.write_bytes(np.random.RandomState(12).bytes(4000))
  _assert_audio_error(lambda: audio.load_audio(path), "noise.mp3", "cannot decode", "convert")
  _assert_audio_error(lambda: audio.decode_audio_bytes(path.read_bytes(), name="a.zip:noise.mp3"), "a.zip:noise.mp3")


def test_a_bug_in_decoding_is_not_blamed_on_the_file(tmp_path, monkeypatch):
  path = tmp_path / "fine.wav"
  soundfile.write(path, np.zeros((100, 1), np.int16), 16000, subtype="PCM_16")

  def buggy_read(*args, **kwargs):
    raise TypeError("read() got an unexpected keyword argument")

  monkeypatch.setattr(soundfile, "read", buggy_read)
  with pytest.raises(TypeError, match="unexpected keyword"):
    audio.load_audio(path)


def test_empty_file_raises(tmp_path):
  path = tmp_path / "empty.wav"
  soundfile.write(path, np.zeros((0, 2), np.int16), 44100, subtype="PCM_16")
  _assert_audio_error(lambda: audio.load_audio(path), "empty.wav", "0 frames")


def test_short_clip_raises(tmp_path):
  path = tmp_path / "short.wav"
  soundfile.write(path, _sine(440.0, 0.5, SR), SR, subtype="PCM_16")
  x = audio.load_audio(path)
  _assert_audio_error(lambda: audio.check_clip(x, 65280, path), "short.wav", "too short", "0.50 s", "4.08 s")
  assert audio.check_clip(x, 8000, path) is x


def test_silent_clip_raises(tmp_path):
  path = tmp_path / "silent.flac"
  soundfile.write(path, np.zeros(SR, np.int16), SR, subtype="PCM_16")
  x = audio.load_audio(path)
  _assert_audio_error(lambda: audio.check_clip(x, 8000, path), "silent.flac", "silent")
  _assert_audio_error(lambda: audio.check_clip(np.zeros(100), 10), "audio clip", "silent")


# ----------------------------------------------------------------------------------------------------------------------
# Values at the door.


@pytest.mark.parametrize("value,where", [(np.nan, 0.25), (np.inf, 0.5), (-np.inf, 0.0)])
def test_non_finite_samples_are_an_error(tmp_path, value, where):
  x = np.stack([_noise(13, SR), _noise(14, SR)], axis=1)
  x[int(where * SR), 1] = value
  path = tmp_path / "bad.wav"
  soundfile.write(path, x, SR, subtype="FLOAT")
  _assert_audio_error(lambda: audio.load_audio(path), "bad.wav", "non-finite samples (NaN or infinity)",
                      f"the first at {where:.2f} s")
  with pytest.raises(AudioError) as e:
    with audio.AudioStream(path, block_frames=1000) as stream:
      list(stream)
  assert f"the first at {where:.2f} s" in str(e.value) and "\n" not in str(e.value)
  _assert_audio_error(lambda: audio.check_clip(x[:, 1], 100), "audio clip", "non-finite samples")


def test_clipping_and_dc_offset_are_warnings(tmp_path):
  loud = np.clip(6 * _noise(15, SR), -1, 1)  # a third of the samples at full scale
  soundfile.write(tmp_path / "clipped.wav", loud, SR, subtype="PCM_16")
  soundfile.write(tmp_path / "dc.flac", 0.5 * _noise(16, SR) - 0.25, SR, subtype="PCM_24")
  soundfile.write(tmp_path / "fine.wav", _noise(17, SR), SR, subtype="PCM_16")
  with pytest.warns(audio.AudioWarning, match=r"clipped.wav is clipped: \d+\.\d % of its samples"):
    x = audio.load_audio(tmp_path / "clipped.wav")
  np.testing.assert_allclose(x, loud, atol=1 / 32768)  # used all the same
  with pytest.warns(audio.AudioWarning, match="dc.flac has a DC offset of 0.25"):
    audio.load_audio(tmp_path / "dc.flac")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    audio.load_audio(tmp_path / "fine.wav")
  with audio.AudioStream(tmp_path / "clipped.wav", block_frames=999) as stream:
    list(stream)
  assert len(stream.warnings) == 1 and "is clipped" in stream.warnings[0]

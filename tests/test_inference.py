"""The inference forward and the file pipeline: the same outputs as the plain model, streamed files scored as whole
ones, and decoding kept a bounded distance ahead of the model."""
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile

from flaxtag import audio, tag
from flaxtag.inference import Tagger
from flaxtag.models import frontends, tagger
from flaxtag.tag import DECODE_WORKERS, QUEUED_BATCHES

import tiny_models

MODELS = [("spec", "attention"), ("raw", "attention"), ("spec", "cnn_p"), ("raw", "cnn_l")]


def _music(seconds, rate, channels=1, seed=0):
  """Notes of changing pitch and loudness over noise: crops differ from one another."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(round(seconds * rate))) / rate
  pitch = 220.0 * 2 ** (np.floor(t * 3) % 12 / 12)
  x = 0.3 * np.sin(2 * np.pi * np.cumsum(pitch) / rate) * (0.5 + 0.5 * np.sin(0.7 * t) ** 2)
  x = (x + 0.03 * rng.normal(size=t.size)).astype(np.float32)
  return np.stack([x, 0.6 * x], axis=1) if channels == 2 else x


def _tiny_tagger(frontend, backend, devices=None, seed=1):
  config = tiny_models.tiny_config(frontend, backend)
  model = tagger.build_model(config.model)
  return Tagger(model, tiny_models.random_variables(model, seed), config, {}, devices)


@pytest.fixture(scope="module")
def spec_att():
  return _tiny_tagger("spec", "attention")


@pytest.mark.parametrize("frontend,backend", MODELS)
@pytest.mark.slow
def test_inference_forward_equals_the_plain_model(frontend, backend):
  """Tagger's forward (eval-mode attention without probabilities, max/min extremes, batch split over 8 devices and
  padded) against the model as training computes it: one device, softmax probabilities, argmax extremes."""
  t = _tiny_tagger(frontend, backend)
  rng = np.random.default_rng(0)
  crops = np.stack([_music(t.crop_seconds, 16000, seed=i) * rng.uniform(0.2, 2) for i in range(11)])

  def plain(variables, x):
    # Under jax.vjp, custom-VJP functions (take_extreme) run their forward rule; 'intermediates' asks for the
    # attention probabilities, so the encoder computes them.
    forward = lambda x: t.model.apply(variables, x, train=False, mutable=["intermediates"])[0].fine_logits
    return jax.nn.sigmoid(jax.vjp(forward, x)[0])

  expected = np.asarray(jax.jit(plain)(jax.device_get(t.variables), crops))  # on the default device alone
  got = t.probs(crops)
  assert np.ptp(expected, axis=0).max() > 2e-4  # crops differ: not a saturated comparison
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_load_computes_in_the_runs_precision(tmp_path):
  """A run trained with half_precision is loaded to compute in bfloat16, as it was validated; others in float32."""
  tiny_models.save_tiny_model(tmp_path / "fp32")
  tiny_models.save_tiny_model(tmp_path / "bf16", half_precision=True)
  full, half = Tagger.load(tmp_path / "fp32"), Tagger.load(tmp_path / "bf16")
  assert full.model.dtype == jnp.float32 and half.model.dtype == jnp.bfloat16
  crops = np.stack([_music(full.crop_seconds, 16000, seed=i) for i in range(2)])
  np.testing.assert_allclose(half.probs(crops), full.probs(crops), atol=0.05)


def test_take_extreme_value_equals_its_forward_rule():
  y = jax.random.normal(jax.random.key(0), (3, 5, 7, 6))
  largest = np.array([True, False, True, False, False, True])
  np.testing.assert_array_equal(frontends.take_extreme(y, largest), frontends._take_extreme_fwd(y, largest)[0])


@pytest.fixture(scope="module")
def long_files(tmp_path_factory):
  """A 70-s stereo 44.1-kHz MP3 (~47 blocks), a FLAC at 22.05 kHz, and the MP3 truncated to two thirds (its header
  still announces 70 s)."""
  folder = tmp_path_factory.mktemp("long")
  soundfile.write(folder / "long.mp3", _music(70.0, 44100, channels=2), 44100)
  soundfile.write(folder / "long.flac", _music(40.0, 22050, seed=1), 22050)
  data = (folder / "long.mp3").read_bytes()
  (folder / "truncated.mp3").write_bytes(data[:len(data) * 2 // 3])
  return {name: str(folder / name) for name in ("long.mp3", "long.flac", "truncated.mp3")}


@pytest.mark.parametrize("name", ["long.mp3", "long.flac", "truncated.mp3"])
@pytest.mark.slow
def test_streamed_files_score_as_the_whole_file(spec_att, long_files, name):
  path = long_files[name]
  wave = spec_att.load_clip(path)
  if name == "truncated.mp3":
    assert soundfile.info(path).frames > len(wave) * 44100 / 16000 + 44100  # the header's length is wrong
  whole = spec_att.tag_waveform(wave)
  timeline = spec_att.timeline(wave, hop_seconds=3.0)
  (streamed,) = tag.tag_files(spec_att, [path])
  (streamed_timeline,) = tag.tag_files(spec_att, [path], timeline=True, hop_seconds=3.0)
  assert streamed.error is None and streamed.scores.duration == whole.duration
  np.testing.assert_array_equal(streamed.scores.starts, whole.starts)
  np.testing.assert_allclose(streamed.scores.fine, whole.fine, atol=1e-6)
  np.testing.assert_array_equal(streamed_timeline.scores.starts, timeline.starts)
  np.testing.assert_allclose(streamed_timeline.scores.fine, timeline.fine, atol=1e-6)
  assert np.ptp(timeline.fine, axis=0).max() > 1e-3


def test_a_file_failing_midway_is_reported_and_the_others_scored(spec_att, tmp_path):
  good = _music(12.0, 16000)
  bad = _music(30.0, 16000, seed=2)
  bad[20 * 16000] = np.nan  # seen only after crops of the file are queued
  soundfile.write(tmp_path / "good.wav", good, 16000, subtype="FLOAT")
  soundfile.write(tmp_path / "bad.wav", bad, 16000, subtype="FLOAT")
  paths = [str(tmp_path / n) for n in ("bad.wav", "good.wav", "bad.wav", "missing.wav")]
  results = tag.tag_files(spec_att, paths)
  assert [r.index for r in results] == [0, 1, 2, 3] and [r.path for r in results] == paths
  for r in (results[0], results[2]):
    assert r.scores is None and "non-finite samples (NaN or infinity), the first at 20.00 s" in r.error
  assert "does not exist" in results[3].error
  np.testing.assert_allclose(results[1].scores.fine, spec_att.tag_waveform(good).fine, atol=1e-6)


@pytest.mark.slow
def test_decoding_stays_a_bounded_distance_ahead_of_the_model(spec_att, tmp_path):
  """Whatever the number of files, decoders take a file only when few crops are waiting: at every file taken, the
  files taken but not yet handed out are within the queue's bound, plus a batch being filled, a batch being handed
  out and one file per thread."""
  soundfile.write(tmp_path / "clip.wav", _music(1.5, 16000), 16000)  # one crop each
  num_files, size = 60, spec_att.round_batch(1)
  handed_out, ahead = [0], []
  lock = threading.Lock()

  def paths():
    for i in range(num_files):
      with lock:
        ahead.append(i - handed_out[0])
      yield str(tmp_path / "clip.wav")

  for _ in tag.iter_tag_files(spec_att, paths(), batch_size=1):
    time.sleep(0.02)  # a slow consumer: the decoders would run ahead if nothing held them back
    with lock:
      handed_out[0] += 1
  bound = QUEUED_BATCHES * size + 2 * size + DECODE_WORKERS + 1
  assert handed_out[0] == num_files and len(ahead) == num_files
  assert size < max(ahead) <= bound < num_files - 1  # they do run ahead, as far as the bound


def test_stopping_early_stops_the_decoding_threads(spec_att, long_files):
  before = threading.active_count()
  results = tag.iter_tag_files(spec_att, [long_files["long.flac"]] * 20)
  next(results)
  results.close()
  assert threading.active_count() == before


def test_audio_stream_equals_load_audio(long_files, tmp_path):
  """Blocks of every size give load_audio's samples: resampled by soxr's stream, and MP3 read without the seek
  after every block that soundfile's read() makes (it restarts libsndfile's MP3 decoder)."""
  soundfile.write(tmp_path / "c.ogg", _music(9.0, 48000, channels=2), 48000)
  for path in [*long_files.values(), str(tmp_path / "c.ogg")]:
    whole = audio.load_audio(path)
    for block_frames in (1000, 4096, audio.STREAM_BLOCK_FRAMES):
      with audio.AudioStream(path, block_frames=block_frames) as stream:
        streamed = np.concatenate(list(stream))
      np.testing.assert_array_equal(streamed, whole)
    if not path.endswith("truncated.mp3"):
      assert stream.num_samples == len(whole)


def test_resampled_length_is_soxr_s():
  rng = np.random.default_rng(0)
  for n in (7, 1000, 1001, 44099, 100003):
    for rate in (8000, 11025, 22050, 44100, 48000):
      expected = len(audio.soxr.resample(rng.normal(size=n).astype(np.float32), rate, 16000, quality="VHQ"))
      assert audio.resampled_length(n, rate, 16000) == expected

"""Attention strips, tag-wise contribution maps and ResAtt maps (SPEC §8), checked against direct forward passes."""
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile
from matplotlib import image as mpimg

from flaxtag import crops, explain, plots
from flaxtag.inference import Tagger

import tiny_models

pytestmark = pytest.mark.slow  # every test builds and explains a model, or runs the command

REPO = pathlib.Path(__file__).resolve().parents[1]
SR = 16000


def _music(seconds, seed=0):
  """A tone that gets louder towards 6 s, over noise: the loudest crop is not the first."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * SR)) / SR
  x = 0.4 * np.exp(-((t - 6.0) / 2.0) ** 2) * np.sin(2 * np.pi * (220 + 40 * t) * t) + 0.02 * rng.normal(size=t.size)
  return x.astype(np.float32)


@pytest.fixture(scope="module")
def spec_tagger(tmp_path_factory):
  path = tmp_path_factory.mktemp("spec_att")
  tiny_models.save_tiny_model(path, "spec", "attention")
  return Tagger.load(path)


@pytest.fixture(scope="module")
def spec_explanation(spec_tagger):
  return explain.explain(spec_tagger, _music(10.0))


def _sown(tagger, crop):
  """Attention of every layer of one crop, (heads, T+1, T+1) each, straight from the model."""
  _, state = jax.jit(lambda v, x: tagger.model.apply(v, x, mutable="intermediates"))(tagger.variables, crop[None])
  layers = state["intermediates"]["backend"]
  return [np.asarray(layers[f"layer_{i}"]["attention"][0][0]) for i in range(len(layers))]


def _crop(tagger, e, wave):
  start = int(round(e.offset_seconds * SR))
  return crops.cut(wave, [start], tagger.crop_samples)[0]


def test_figures_and_arrays_are_written(spec_explanation, tmp_path):
  paths = explain.save(spec_explanation, tmp_path / "out", "clip", title="clip.wav")
  names = [pathlib.Path(p).name for p in paths]
  assert names == ["clip_attention.png", "clip_contribution.png", "clip_explain.npz"]
  for path, size in zip(paths, (plots.ATTENTION_SIZE, plots.CONTRIBUTION_SIZE)):
    pixels = mpimg.imread(path)
    assert pixels.shape[:2] == (size[1] * plots.DPI, size[0] * plots.DPI)
    assert pixels[..., :3].std() > 0.1
  arrays = np.load(paths[-1])  # no pickle needed: names are unicode arrays
  tokens = 256
  expected = {"spectrogram": (96, 256), "frame_seconds": (256,), "token_seconds": (tokens,),
              "last_layer_cls": (tokens,), "first_layer_received": (tokens,), "contribution": (tokens + 1, 5),
              "chosen_contribution": (tokens, 5), "probabilities": (5,), "tag_names": (5,), "chosen_tags": (5,)}
  assert {k: arrays[k].shape for k in expected} == expected
  assert "resatt_attention" not in arrays and "contribution_coarse" not in arrays
  probabilities = arrays["probabilities"]
  assert list(arrays["chosen_tags"]) == [tiny_models.TAG_NAMES[i] for i in np.argsort(-probabilities)]


def test_the_loudest_crop_is_explained_unless_an_offset_is_given(spec_tagger, spec_explanation):
  wave = _music(10.0)
  offsets = crops.whole_clip_offsets(len(wave), spec_tagger.crop_samples)
  loudness = np.sqrt(np.mean(crops.cut(wave, offsets, spec_tagger.crop_samples) ** 2, axis=1))
  assert spec_explanation.offset_seconds == offsets[np.argmax(loudness)] / SR > 0
  crop, start = explain.select_crop(spec_tagger, wave, offset_seconds=2.0)
  assert start == 32000 and np.array_equal(crop, wave[32000:32000 + spec_tagger.crop_samples])
  _, start = explain.select_crop(spec_tagger, wave, offset_seconds=60.0)  # past the end: the last full crop
  assert start == len(wave) - spec_tagger.crop_samples
  np.testing.assert_allclose(spec_explanation.token_seconds[:2] - spec_explanation.offset_seconds, [0, 0.016])


def test_strips_are_sums_of_the_sown_attention(spec_tagger, spec_explanation):
  e = spec_explanation
  first, last = _sown(spec_tagger, _crop(spec_tagger, e, _music(10.0)))
  cls_row = last[:, 0, :].sum(axis=0)
  np.testing.assert_allclose(e.last_layer_cls, cls_row[1:], rtol=1e-5, atol=1e-7)
  assert e.last_layer_cls_self == pytest.approx(cls_row[0], rel=1e-5)
  received = first.sum(axis=(0, 1))
  np.testing.assert_allclose(e.first_layer_received, received[1:], rtol=1e-5, atol=1e-6)
  heads_times_queries = 2 * 257
  assert e.first_layer_received.sum() + e.first_layer_cls_received == pytest.approx(heads_times_queries, rel=1e-5)
  assert np.ptp(e.last_layer_cls) > 0


def test_contribution_rows_are_forward_passes_with_forced_attention(spec_tagger, spec_explanation):
  e = spec_explanation
  crop = _crop(spec_tagger, e, _music(10.0))
  positions = [0, 1, 100, 256]
  forced = np.eye(257, dtype=np.float32)[positions]
  apply = jax.jit(lambda v, x, f: spec_tagger.model.apply(v, x, forced_attention=f).fine_logits)
  logits = apply(spec_tagger.variables, np.repeat(crop[None], len(positions), axis=0), forced)
  np.testing.assert_allclose(e.contribution[positions], jax.nn.sigmoid(logits), atol=2e-6)
  assert np.ptp(e.contribution[1:], axis=0).min() > 0  # forcing different tokens changes every tag
  np.testing.assert_array_equal(e.chosen_contribution()[:, 0],
                                e.contribution[1:, e.tag_names.index(e.chosen_tags[0])])


def test_resatt_model_adds_its_coarse_by_fine_map(tmp_path):
  tiny_models.save_tiny_model(tmp_path / "w", "raw", "attention", head="resatt", hierarchy=tiny_models.HIERARCHY)
  tagger = Tagger.load(tmp_path / "w")
  wave = _music(5.0)
  e = explain.explain(tagger, wave, tags=["strings", "violin"], offset_seconds=0.5, chunk_size=64)
  crop = _crop(tagger, e, wave)
  assert e.contribution.shape == (271, 6) and e.contribution_coarse.shape == (271, 3)
  apply = jax.jit(lambda v, x, f: tagger.model.apply(v, x, forced_attention=f))
  forced = apply(tagger.variables, crop[None], np.eye(271, dtype=np.float32)[[7]])
  np.testing.assert_allclose(e.contribution_coarse[7], jax.nn.sigmoid(forced.coarse_logits[0]), atol=2e-6)
  # This head's map does not depend on the input (resatt_input_dependent=False), so a forced pass shows it too.
  np.testing.assert_allclose(e.resatt_attention, forced.attention[0], atol=1e-6)
  np.testing.assert_array_equal(e.chosen_contribution()[:, 0], e.contribution_coarse[1:, 0])
  assert e.spectrogram.shape == (96, 257) and e.token_seconds.shape == (270,)

  paths = explain.save(e, tmp_path / "out", "clip")
  assert [pathlib.Path(p).name for p in paths][2] == "clip_resatt.png"
  width, height = plots.resatt_size(3, 6)
  assert mpimg.imread(paths[2]).shape[:2] == (height * plots.DPI, width * plots.DPI)
  assert np.load(paths[-1])["resatt_attention"].shape == (3, 6)


def test_unknown_tags_are_refused_with_the_valid_ones(spec_tagger):
  with pytest.raises(explain.ExplainError, match=r"unknown tag\(s\) banjo. The model's tags: guitar, piano"):
    explain.explain(spec_tagger, _music(5.0), tags=["guitar", "banjo"])


def test_models_without_attention_are_refused_clearly(tmp_path):
  workdir = tmp_path / "cnn"
  tiny_models.save_tiny_model(workdir, "spec", "cnn_p")
  with pytest.raises(explain.ExplainError, match="no self-attention"):
    explain.explain(Tagger.load(workdir), _music(5.0))
  clip = tmp_path / "clip.wav"
  soundfile.write(clip, _music(5.0), SR)
  result = subprocess.run([sys.executable, "-m", "flaxtag.explain", str(clip), "--workdir", str(workdir), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "error: the model in" in result.stderr and "spec+cnn_p" in result.stderr
  assert f"python -m flaxtag.tag FILE --workdir {workdir} --timeline" in result.stderr
  assert not (tmp_path / "out").exists()


def test_an_out_folder_that_is_a_file_fails_before_the_work(tmp_path):
  workdir = tmp_path / "att"
  tiny_models.save_tiny_model(workdir, "spec", "attention")
  clip, out = tmp_path / "clip.wav", tmp_path / "a_file"
  soundfile.write(clip, _music(5.0), SR)
  out.write_text("")
  result = subprocess.run([sys.executable, "-m", "flaxtag.explain", str(clip), "--workdir", str(workdir), "--out",
                           str(out)], capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 2
  assert result.stderr.endswith(f"error: cannot write {out / 'clip_explain.npz'}: {out} is a file, not a folder.\n")
  assert "crop" not in result.stderr  # nothing was explained

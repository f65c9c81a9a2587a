"""The models of SPEC §2–3: sizes, input handling, and numerical agreement with the reference architectures."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from flaxtag import audio, checkpoint
from flaxtag.convert import convert, convert_state_dict
from flaxtag.errors import AudioError, CheckpointError, ConfigError
from flaxtag.inference import Tagger
from flaxtag.models import backends, tagger
from flaxtag.torch_state_dict import load_state_dict

import reference_numpy

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"
REPO = pathlib.Path(__file__).resolve().parents[1]
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"reference files not found at {REFERENCE}")


def model_config(frontend, backend, **model_overrides):
  config = base.get_config()
  config.model.frontend = frontend
  config.model.backend = backend
  config.model.update(model_overrides)
  return config


@pytest.mark.parametrize("frontend,backend,expected", [
    ("spec", "attention", 6_882_452), ("raw", "attention", 6_718_178),
    ("spec", "cnn_p", 5_926_424), ("raw", "cnn_l", 97_154)])
def test_parameter_counts_equal_the_reference(frontend, backend, expected):
  model = tagger.build_model(model_config(frontend, backend).model)
  assert tagger.count_parameters(tagger.abstract_variables(model)["params"]) == expected


def test_learned_cls_and_positions_add_their_parameters():
  plain = tagger.build_model(model_config("spec", "attention").model)
  config = model_config("spec", "attention")
  config.model.encoder.cls_token = "learned"
  config.model.encoder.positions = "learned"
  learned = tagger.build_model(config.model)
  extra = tagger.count_parameters(tagger.abstract_variables(learned)["params"]) - 6_882_452
  assert extra == 512 + 512 * 512 + 2 * 512  # [CLS], position table, embedding LayerNorm
  del plain


def test_cnn_p_widths_are_config_fields():
  default = tagger.count_parameters(tagger.abstract_variables(
      tagger.build_model(model_config("spec", "cnn_p").model))["params"])
  narrow = tagger.abstract_variables(tagger.build_model(model_config(
      "spec", "cnn_p", cnn_p=dict(channels=64, embed_dim=100)).model))["params"]
  c_in, head_in = 16 * 29, 64  # the front-end's channels (c = 16), then CNN P's
  convs = 7 * c_in * 64 + 2 * 7 * 64 * 64 + 3 * (64 + 2 * 64)  # kernels; bias, BatchNorm scale and shift
  dense = 2 * head_in * 100 + 100 + 2 * 100  # max ‖ mean → embedding, its bias and BatchNorm
  assert narrow["backend"]["dense"]["kernel"].shape == (128, 100)
  # Only the back-end and the head's input width change.
  frontend = tagger.count_parameters(narrow["frontend"])
  assert tagger.count_parameters(narrow) == frontend + convs + dense + (100 + 1) * 50
  reference = tagger.count_parameters(tagger.abstract_variables(
      tagger.build_model(model_config("spec", "cnn_p").model))["params"]["frontend"])
  assert frontend == reference and default == 5_926_424
  # A config saved before model.cnn_p existed builds SPEC's CNN P.
  old = model_config("spec", "cnn_p")
  del old.model["cnn_p"]
  assert tagger.build_model(old.model).cnn_p == backends.PonsConfig(512, 500)
  with pytest.raises(ConfigError, match="model.cnn_p.channels and embed_dim must be positive"):
    tagger.build_model(model_config("spec", "cnn_p", cnn_p=dict(channels=0, embed_dim=10)).model)


def test_sinusoidal_positions_follow_the_formula():
  table = backends.sinusoidal_positions(5, 8)
  assert np.all(table[0] == 0)
  p, j = 3, 5  # odd feature: cosine of p / 10000^(2·2/8)
  np.testing.assert_allclose(table[p, j], np.cos(p / 10000 ** (4 / 8)), rtol=1e-6)
  np.testing.assert_allclose(table[2, 4], np.sin(2 / 10000 ** (4 / 8)), rtol=1e-6)


def test_fixed_cls_is_random_state_zero():
  np.testing.assert_array_equal(backends.fixed_cls_vector(512),
                                np.random.RandomState(0).random_sample(512).astype(np.float32))


@pytest.fixture(scope="module")
def layouts():
  if not REFERENCE.is_dir():
    pytest.skip(f"reference files not found at {REFERENCE}")
  return reference_numpy.read_layout(REFERENCE / reference_numpy.LAYOUT_FILE)


@pytest.mark.parametrize("architecture", list(reference_numpy.ARCHITECTURES))
@pytest.mark.slow
def test_converted_random_reference_matches_numpy_reference(layouts, architecture):
  """Every architecture of the layout file: converted weights give the probabilities of an independent forward."""
  frontend, backend = reference_numpy.ARCHITECTURES[architecture]
  state_dict = reference_numpy.random_state_dict(layouts[architecture], seed=1)
  model = tagger.build_model(model_config(frontend, backend).model)
  variables = convert_state_dict(state_dict, model)
  rng = np.random.default_rng(0)
  if frontend == "spec":  # a log-mel batch: the mel computation is tested against librosa elsewhere
    x = rng.normal(-30, 15, (2, 96, 256)).astype(np.float32)
  else:
    x = rng.normal(0, 0.3, (2, 65_610)).astype(np.float32)
  expected = reference_numpy.forward(architecture, state_dict, x)
  got = jax.nn.sigmoid(model.apply(variables, x, train=False).fine_logits)
  assert np.std(expected) > 1e-3  # not a saturated, uninformative comparison
  np.testing.assert_allclose(got, expected, atol=2e-5)


@needs_reference
@pytest.mark.slow
def test_lee_lee_reference_checkpoint_reproduces_its_outputs(tmp_path):
  """The shipped real case, through the command line and the inference API."""
  workdir = tmp_path / "lee_lee"
  result = subprocess.run(
      [sys.executable, "-m", "flaxtag.convert", str(REFERENCE / "lee_lee_c16.pth"), "--config",
       f"{REPO / 'configs' / 'mtat.py'}:raw_cnnl", "--workdir", str(workdir)],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr
  io = np.load(REFERENCE / "lee_lee_c16_io.npz")
  loaded = Tagger.load(workdir)
  assert loaded.tag_names[:3] == ["guitar", "classical", "slow"] and len(loaded.tag_names) == 50  # MTAT top-50
  probs = loaded.probs(io["x"])
  np.testing.assert_allclose(probs, io["probs"], atol=1e-5)
  assert np.abs(probs - io["probs"]).max() < 1e-6


@needs_reference
def test_reference_file_reader_reads_every_tensor():
  state_dict = load_state_dict(REFERENCE / "lee_lee_c16.pth")
  layout = reference_numpy.read_layout(REFERENCE / reference_numpy.LAYOUT_FILE)["lee_lee"]
  assert {k: v.shape for k, v in state_dict.items()} == layout
  assert state_dict["front_end.init_conv.bn.num_batches_tracked"].dtype == np.int64


def test_state_dict_reader_refuses_code(tmp_path):
  import pickle
  import zipfile
  path = tmp_path / "evil.pth"

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
  with pytest.raises(CheckpointError, match="refusing to load 'posix.system'"):
    load_state_dict(path)


@needs_reference
def test_convert_refuses_a_config_of_another_architecture(tmp_path):
  with pytest.raises(CheckpointError, match="has no tensor 'front_end.input_bn.weight'"):
    convert(REFERENCE / "lee_lee_c16.pth", model_config("spec", "cnn_p"), tmp_path / "w")
  narrow = model_config("raw", "cnn_l", conv_channels=8)
  with pytest.raises(CheckpointError, match="stored .* model needs"):
    convert(REFERENCE / "lee_lee_c16.pth", narrow, tmp_path / "w2")


@pytest.mark.slow
def test_checkpoint_of_another_shape_is_refused_clearly(tmp_path):
  config = model_config("raw", "cnn_l", conv_channels=4)
  model = tagger.build_model(config.model)
  manager = checkpoint.open_manager(tmp_path)
  checkpoint.save(manager, 0, variables=tagger.init_variables(model, jax.random.key(0)), config=config,
                  metadata={})
  manager.wait_until_finished()
  other = tagger.build_model(model_config("raw", "cnn_l", conv_channels=8).model)
  with pytest.raises(CheckpointError, match=r"batch_stats/frontend/init_conv/bn/mean: stored \(4,\), model needs "
                                            r"\(8,\)"):
    checkpoint.restore_variables(checkpoint.open_manager(tmp_path, read_only=True), 0,
                                 tagger.abstract_variables(other))
  with pytest.raises(CheckpointError, match="no checkpoints in"):
    Tagger.load(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def small_spec_att():
  config = model_config("spec", "attention", conv_channels=2)
  config.model.encoder.update(width=32, num_heads=4, mlp_dim=64)
  model = tagger.build_model(config.model)
  return model, tagger.init_variables(model, jax.random.key(0))


@pytest.mark.slow
def test_spec_model_takes_waveform_or_log_mel_alike(small_spec_att):
  model, variables = small_spec_att
  wave = np.random.default_rng(0).normal(0, 0.1, (2, 65_280)).astype(np.float32)
  from_wave = model.apply(variables, wave).fine_logits
  from_mel = model.apply(variables, audio.log_mel_spectrogram(jnp.asarray(wave), model.mel)).fine_logits
  np.testing.assert_allclose(from_wave, from_mel, rtol=1e-5, atol=1e-5)
  with pytest.raises(AudioError, match=r"log-mel batch \(batch, 96, frames\)"):
    model.apply(variables, np.zeros((2, 64, 256), np.float32))


@pytest.mark.slow
def test_sequence_length_follows_the_input(small_spec_att):
  model, variables = small_spec_att
  longer = np.random.default_rng(1).normal(0, 0.1, (1, 3 * 65_280)).astype(np.float32)
  _, state = model.apply(variables, longer, mutable="intermediates")
  attention = state["intermediates"]["backend"]["layer_0"]["attention"][0]
  tokens = 1 + audio.num_frames(3 * 65_280)  # [CLS] + one token per STFT frame
  assert attention.shape == (1, 4, tokens, tokens) and tokens == 767


@pytest.mark.parametrize("frontend,backend", [("raw", "attention"), ("raw", "cnn_l"), ("spec", "cnn_p")])
@pytest.mark.slow
def test_every_model_accepts_inputs_longer_than_a_crop(frontend, backend):
  config = model_config(frontend, backend, conv_channels=2)
  config.model.encoder.update(width=16, num_heads=2, mlp_dim=16)
  model = tagger.build_model(config.model)
  variables = tagger.init_variables(model, jax.random.key(0))
  x = np.random.default_rng(0).normal(0, 0.1, (2, 2 * tagger.crop_samples(model) + 1234)).astype(np.float32)
  logits = model.apply(variables, x).fine_logits
  assert logits.shape == (2, 50) and np.all(np.isfinite(logits))


@pytest.mark.slow
def test_learned_positions_refuse_longer_inputs_clearly():
  config = model_config("raw", "attention", conv_channels=2)
  config.model.encoder.update(width=16, num_heads=2, mlp_dim=16, positions="learned", max_positions=271)
  model = tagger.build_model(config.model)
  variables = tagger.init_variables(model, jax.random.key(0))
  with pytest.raises(AudioError, match="learned positions for 270 tokens but the input gives 540"):
    model.apply(variables, np.zeros((1, 2 * 65_610), np.float32))


@pytest.mark.parametrize("override,message", [
    (dict(frontend="cqt"), r"model.frontend='cqt': valid front-ends are \['spec', 'raw'\]"),
    (dict(backend="lstm"), r"model.backend='lstm': valid back-ends are"),
    (dict(backend="cnn_l"), r"model.backend='cnn_l' does not follow the 'spec' front-end"),
    (dict(head="tree"), r"unknown head 'tree'"),
])
def test_bad_model_config_names_the_key(override, message):
  config = base.get_config()
  config.model.update(override)
  with pytest.raises(ConfigError, match=message):
    tagger.build_model(config.model)
    tagger.abstract_variables(tagger.build_model(config.model))


def test_bad_feature_and_encoder_options_are_config_errors():
  config = base.get_config()
  config.model.features.mel_scale = "bark"
  with pytest.raises(ConfigError, match="mel_scale"):
    tagger.build_model(config.model)
  config = base.get_config()
  config.model.encoder.positions = "rotary"
  with pytest.raises(ConfigError, match="'sinusoidal' or 'learned'"):
    tagger.build_model(config.model)


@pytest.mark.slow
def test_summary_command_and_a_mistyped_override():
  base_command = [sys.executable, "-m", "flaxtag.summary", "--config", f"{REPO / 'configs' / 'mtat.py'}:raw_cnnl"]
  done = subprocess.run(base_command + ["--depth=1"], capture_output=True, text=True, cwd=REPO, check=False)
  assert done.returncode == 0 and done.stdout.strip().endswith("trainable parameters: 97154")
  done = subprocess.run(base_command + ["--config.model.conv_chanels=8"], capture_output=True, text=True, cwd=REPO,
                        check=False)
  assert done.returncode == 2
  assert done.stderr.strip() == ("error: bad command-line flag: 'conv_chanels' Did you mean \"conv_channels\" instead "
                                 "of \"conv_chanels\"?")

"""The jit-compiled train step over a device mesh: scale-out semantics and determinism."""
import jax
import numpy as np
import pytest

from configs import base
from flaxtag import optim, sharding
from flaxtag.hierarchy import Hierarchy
from flaxtag.models import tagger
from flaxtag.train_step import create_train_state, make_predict_step, make_train_step


def tiny_model(frontend="spec", backend="attention", head="flat", hierarchy=None, num_tags=6):
  config = base.get_config()
  config.model.update(frontend=frontend, backend=backend, conv_channels=2, num_tags=num_tags, head=head)
  config.model.encoder.update(width=16, num_heads=2, mlp_dim=32)
  return tagger.build_model(config.model, hierarchy)


def sgd_config():
  # SGD from the first step: its update is linear in the gradient. (Adam's first update is ±lr·sign(g), which
  # turns rounding noise in near-zero gradients, e.g. of conv biases before a BatchNorm, into ±lr.)
  config = optim.recipe_config()
  config.update(switch_epoch=0, sgd_lr_drop_epochs=())
  return optim.in_steps(config, steps_per_epoch=1)


def one_step(model, devices, batch, seed=0):
  mesh = sharding.make_mesh(devices=devices)
  tx = optim.make_optimizer(sgd_config())
  state = create_train_state(model, tx, jax.random.key(seed), mesh)
  state, metrics = make_train_step(model, tx, seed, mesh)(state, sharding.global_batch(batch, mesh))
  return jax.device_get(state), jax.device_get(metrics)


def random_batch(model, size=8, num_tags=6, seed=0):
  rng = np.random.default_rng(seed)
  return {"audio": (0.1 * rng.standard_normal((size, tagger.crop_samples(model)))).astype(np.float32),
          "labels": (rng.random((size, num_tags)) < 0.3).astype(np.float32)}


@pytest.mark.parametrize("frontend,backend", [("spec", "attention"), ("raw", "cnn_l")])
@pytest.mark.slow
def test_one_step_on_eight_devices_equals_one_device(frontend, backend):
  assert jax.device_count() == 8
  model = tiny_model(frontend, backend)
  batch = random_batch(model)
  state8, metrics8 = one_step(model, jax.devices(), batch)
  state1, metrics1 = one_step(model, jax.devices()[:1], batch)
  np.testing.assert_allclose(metrics8["loss"], metrics1["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics8["grad_norm"], metrics1["grad_norm"], rtol=1e-4)
  # BatchNorm statistics are those of the global batch, not of each device's share.
  for a, b in zip(jax.tree_util.tree_leaves(state8.batch_stats), jax.tree_util.tree_leaves(state1.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(state8.params), jax.tree_util.tree_leaves(state1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_dropout_depends_on_seed_and_step_only():
  model = tiny_model("raw", "cnn_l")  # dropout before the head; quick to compile
  batch = random_batch(model)
  a, _ = one_step(model, jax.devices(), batch, seed=3)
  b, _ = one_step(model, jax.devices(), batch, seed=3)
  c, _ = one_step(model, jax.devices(), batch, seed=4)
  leaves = lambda s: jax.tree_util.tree_leaves(s.params)
  assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
  assert not all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(c)))


@pytest.mark.slow
def test_predict_step_averages_crops_and_keeps_rows_in_order():
  hierarchy = Hierarchy.from_mapping({"strings": ["violin", "cello"], "keys": ["piano", "organ", "harpsichord"],
                                      "winds": ["flute"]})
  model = tiny_model(head="flat", hierarchy=hierarchy)
  mesh = sharding.make_mesh()
  variables = tagger.init_variables(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  audio = (0.1 * rng.standard_normal((8, 3, tagger.crop_samples(model)))).astype(np.float32)
  batch = {"audio": audio, "labels": np.eye(8, 6, dtype=np.float32), "mask": np.ones(8, bool),
           "clip_index": np.arange(8, dtype=np.int32)}
  out = jax.device_get(make_predict_step(model, mesh)(variables, sharding.global_batch(batch, mesh)))
  direct = jax.nn.sigmoid(model.apply(variables, audio.reshape(24, -1)).fine_logits).reshape(8, 3, 6).mean(1)
  np.testing.assert_allclose(out["fine_probs"], direct, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["clip_index"], np.arange(8))
  np.testing.assert_array_equal(out["labels"], batch["labels"])
  # A flat head's coarse outputs follow the max rule over each family's crop-averaged... per-crop maxima.
  logits = model.apply(variables, audio.reshape(24, -1)).fine_logits
  coarse = np.stack([np.max(np.asarray(logits)[:, hierarchy.parent == j], axis=1) for j in range(3)], axis=1)
  np.testing.assert_allclose(out["coarse_probs"], jax.nn.sigmoid(coarse).reshape(8, 3, 3).mean(1), rtol=1e-5)


def test_batch_not_divisible_by_devices_is_a_clear_error():
  from flaxtag.errors import ConfigError
  with pytest.raises(ConfigError, match="train.batch_size=12 must be divisible by the 8 data-parallel devices"):
    sharding.check_global_batch_size(12, sharding.make_mesh())


@pytest.mark.slow
def test_the_first_non_finite_step_is_carried_in_the_state():
  """Every step is checked on the device: the first step with a non-finite loss stays recorded, whatever follows."""
  model = tiny_model("raw", "cnn_l")
  mesh = sharding.make_mesh()
  tx = optim.make_optimizer(sgd_config())
  state = create_train_state(model, tx, jax.random.key(0), mesh)
  train_step = make_train_step(model, tx, 0, mesh)
  good, bad = random_batch(model), random_batch(model, seed=1)
  bad["audio"][3, 100] = np.nan
  for step, batch in enumerate([good, good, bad, good, bad], start=1):
    state, _ = train_step(state, sharding.global_batch(batch, mesh))
    assert int(state.first_nonfinite_step) == (-1 if step < 3 else 3)

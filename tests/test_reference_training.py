"""Training as the reference trains: from its initial weights, its batches and Adam, flaxtag's train step gives its
per-step losses and a trained model whose eval-mode outputs are the reference's (BatchNorm's running statistics
included: PyTorch mixes in the unbiased batch variance with momentum 0.1).

The lee_lee case is a recording of the reference PyTorch code (../shared/reference/README.md). For every Spec and
Raw model, one train step's BatchNorm statistics are also checked against an independent numpy computation.
"""
import pathlib

import jax
import numpy as np
import pytest

from configs import base
from flaxtag import optim, sharding
from flaxtag.convert import convert_state_dict
from flaxtag.models import tagger
from flaxtag.torch_state_dict import load_state_dict
from flaxtag.train_step import TrainState, make_train_step

import reference_numpy

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"reference files not found at {REFERENCE}")


def reference_model(frontend, backend, **model_overrides):
  config = base.get_config()
  config.model.update(frontend=frontend, backend=backend, head_dropout=0.0, **model_overrides)
  config.model.encoder.update(dropout=0.0, attention_dropout=0.0)
  return tagger.build_model(config.model)


def adam_like_the_reference(num_steps):
  """flaxtag's recipe optimizer in its Adam phase: torch.optim.Adam(lr=1e-4, betas=(0.9, 0.999), eps=1e-8)."""
  config = optim.recipe_config()
  config.update(adam_lr=1e-4, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8)
  # The `num_steps` updates make one epoch, far before the switch (epoch 60).
  return optim.make_optimizer(optim.in_steps(config, steps_per_epoch=num_steps))


def train(model, variables, batches):
  """Runs flaxtag's own train step (8-device mesh, global-batch BatchNorm) over `batches`; (state, losses)."""
  mesh = sharding.make_mesh()
  tx = adam_like_the_reference(len(batches))
  params = jax.device_put(variables["params"], sharding.replicated(mesh))
  state = TrainState(step=jax.device_put(np.int32(0), sharding.replicated(mesh)), params=params,
                     batch_stats=jax.device_put(variables["batch_stats"], sharding.replicated(mesh)),
                     opt_state=jax.jit(tx.init, out_shardings=sharding.replicated(mesh))(params),
                     first_nonfinite_step=jax.device_put(np.int32(-1), sharding.replicated(mesh)))
  step = make_train_step(model, tx, seed=0, mesh=mesh)
  losses = []
  for batch in batches:
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    assert int(metrics["optimizer_phase"]) == 0  # every step is an Adam step
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), np.array(losses)


@needs_reference
def test_lee_lee_training_reproduces_the_reference():
  case = np.load(REFERENCE / "lee_lee_train.npz")
  model = reference_model("raw", "cnn_l")
  variables = convert_state_dict(load_state_dict(REFERENCE / "lee_lee_train_init.pth"), model)
  batches = [{"audio": x, "labels": y} for x, y in zip(case["x"], case["y"])]
  state, losses = train(model, variables, batches)
  np.testing.assert_allclose(losses, case["losses"], rtol=0, atol=1e-5)
  probs = jax.nn.sigmoid(model.apply(state.variables, case["x_test"], train=False).fine_logits)
  np.testing.assert_allclose(probs, case["probs_test"], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def layouts():
  if not REFERENCE.is_dir():
    pytest.skip(f"reference files not found at {REFERENCE}")
  return reference_numpy.read_layout(REFERENCE / reference_numpy.LAYOUT_FILE)


def pytorch_running_stats(state_dict, batch_stats):
  """The state_dict after one PyTorch training forward: running = 0.9·running + 0.1·batch, with the batch's
  unbiased variance var·n/(n - 1) (or its biased var if `unbiased` is off)."""
  def mixed(unbiased):
    updated = dict(state_dict)
    for prefix, (mean, var, n) in batch_stats.items():
      updated[f"{prefix}.running_mean"] = 0.9 * state_dict[f"{prefix}.running_mean"] + 0.1 * mean
      updated[f"{prefix}.running_var"] = 0.9 * state_dict[f"{prefix}.running_var"] + \
          0.1 * var * (n / (n - 1) if unbiased else 1.0)
    return updated
  return mixed(True), mixed(False)


@pytest.mark.parametrize("architecture", list(reference_numpy.ARCHITECTURES))
@pytest.mark.slow
def test_batch_norm_running_statistics_follow_pytorch(layouts, architecture):
  """A training forward's BatchNorm updates, the fused timbre convs' and input BatchNorm's included, equal an
  independent numpy computation of PyTorch's rule."""
  frontend, backend = reference_numpy.ARCHITECTURES[architecture]
  state_dict = reference_numpy.random_state_dict(layouts[architecture], seed=2)
  model = reference_model(frontend, backend)
  variables = convert_state_dict(state_dict, model)
  rng = np.random.default_rng(3)
  if frontend == "spec":
    # A log-mel batch of few frames: n per timbre-conv channel is 2 × 6 × (96 - height + 1), small enough for
    # n / (n - 1) to show.
    x = rng.normal(-30, 15, (2, 96, 6)).astype(np.float32)
  else:
    x = rng.normal(0, 0.3, (2, 65_610)).astype(np.float32)
  _, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
  recorded = {}
  reference_numpy.forward(architecture, state_dict, x, batch_stats=recorded)
  assert len(recorded) == sum(key.endswith(".running_var") for key in state_dict)  # every BatchNorm recorded
  unbiased, biased = pytorch_running_stats(state_dict, recorded)
  got = jax.tree_util.tree_leaves_with_path(updated["batch_stats"])
  want = dict(jax.tree_util.tree_leaves_with_path(convert_state_dict(unbiased, model)["batch_stats"]))
  biased = dict(jax.tree_util.tree_leaves_with_path(convert_state_dict(biased, model)["batch_stats"]))
  assert len(got) == len(want)
  tolerance = dict(rtol=2e-5, atol=1e-6)
  for path, value in got:
    np.testing.assert_allclose(value, want[path], **tolerance, err_msg=jax.tree_util.keystr(path))
  # The check tells the rules apart: Flax's biased-variance update fails it, in the fused timbre convs and the
  # folded input BatchNorm too.
  failing = {jax.tree_util.keystr(path) for path, _ in got if not np.allclose(want[path], biased[path], **tolerance)}
  assert failing
  fused = [f"['frontend']['{name}']" for name in ("input_bn", *(f"timbre_{i}']['bn" for i in range(6)))]
  assert frontend == "raw" or all(f"{name}['var']" in failing for name in fused)

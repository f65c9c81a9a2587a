"""The fast layers equal the plain Flax computation they replace: values, gradients, BatchNorm statistics, attention.

Each formulation (`kernels='cpu'`, chosen on the CPU; `'banded'`, chosen on GPU and TPU; `'plain'`) runs here on the
CPU.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtag import audio
from flaxtag.errors import ConfigError
from flaxtag.models import backends, frontends, layers


@pytest.mark.parametrize("shape,rate,broadcast_dims", [
    ((4, 7, 5), 0.1, ()),
    ((3, 2, 6, 6), 0.5, ()),
    ((8, 33), 0.25, (0,)),
])
@pytest.mark.parametrize("typed_key", [False, True])
@pytest.mark.parametrize("kernels", ["cpu", "plain"])
@pytest.mark.slow
def test_dropout_draws_flax_masks(shape, rate, broadcast_dims, typed_key, kernels):
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape) + 3.0, jnp.float32)  # no zeros in x
  key = jax.random.key(7) if typed_key else jax.random.PRNGKey(7)
  fast = layers.Dropout(rate, broadcast_dims=broadcast_dims, kernels=kernels).apply(
      {}, x, deterministic=False, rngs={"dropout": key})
  plain = nn.Dropout(rate, broadcast_dims=broadcast_dims).apply({}, x, deterministic=False, rngs={"dropout": key})
  np.testing.assert_array_equal(np.asarray(fast), np.asarray(plain))
  assert 0 < np.mean(np.asarray(fast) == 0) < 1
  np.testing.assert_array_equal(layers.Dropout(rate).apply({}, x, deterministic=True), x)


@pytest.mark.parametrize("window,length", [(2, 9), (3, 12), (4, 10)])
@pytest.mark.parametrize("kernels", ["cpu", "plain"])
def test_max_pool_values_and_gradients_equal_flax(window, length, kernels):
  rng = np.random.default_rng(window)
  # Integer values: many ties within a window, where the gradient must go to the first maximum only.
  x = jnp.asarray(rng.integers(0, 3, size=(2, length, 3)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(2, length // window, 3)), jnp.float32)

  def pooled(pool):
    return lambda v: jnp.sum(pool(v) * cotangent)

  plain = lambda v: nn.max_pool(v, (window,), strides=(window,), padding="VALID")
  fast = lambda v: layers.max_pool(v, window, kernels)
  np.testing.assert_array_equal(fast(x), plain(x))
  np.testing.assert_array_equal(jax.grad(pooled(fast))(x), jax.grad(pooled(plain))(x))


class PlainTimbreConv(nn.Module):
  """The timbre branch written directly: 2-D conv, BatchNorm, ReLU, max over frequency."""
  features: int
  kernel_size: tuple[int, int]

  @nn.compact
  def __call__(self, spec, train):  # (B, mel, T)
    height, width = self.kernel_size
    y = nn.Conv(self.features, (height, width), padding=((0, 0), (width // 2, width // 2)), name="conv")(
        spec[..., None])
    y = nn.relu(layers.BatchNorm(name="bn")(y, train))
    return jnp.max(y, axis=1)  # (B, T, c)


class PlainSpecFrontEnd(nn.Module):
  """SpecFrontEnd before its fusions: input BatchNorm applied to the log-mel, then every branch on the result."""
  conv_channels: int
  mel: Any
  projection_dim: int

  @nn.compact
  def __call__(self, spec, train):
    spec = layers.BatchNorm(name="input_bn")(spec[..., None], train)[..., 0]
    c, n_mels = self.conv_channels, self.mel.n_mels
    branches = [PlainTimbreConv(c * mult, (int(share * n_mels), width), name=f"timbre_{i}")(spec, train)
                for i, (share, width, mult) in enumerate(frontends.TIMBRE_BRANCHES)]
    envelope = jnp.mean(spec, axis=1)[..., None]
    branches += [layers.ConvBlock(c * mult, length, name=f"temporal_{i}")(envelope, train)
                 for i, (length, mult) in enumerate(frontends.TEMPORAL_BRANCHES)]
    return layers.ConvBlock(self.projection_dim, 1, name="projection")(jnp.concatenate(branches, -1), train)


def _plain_variables(variables):
  """SpecFrontEnd's variables for PlainSpecFrontEnd: the timbre kernels and biases move under `conv`."""
  def move(tree):
    tree = dict(tree)
    for name in [n for n in tree if n.startswith("timbre_")]:
      branch = dict(tree[name])
      if "kernel" in branch:
        branch["conv"] = {"kernel": branch.pop("kernel"), "bias": branch.pop("bias")}
      tree[name] = branch
    return tree
  return {collection: move(tree) for collection, tree in variables.items()}


def test_kernels_are_chosen_by_platform():
  assert layers.resolve_kernels("auto") == ("cpu" if jax.default_backend() == "cpu" else "banded")
  assert layers.cpu_kernels("cpu") and not layers.cpu_kernels("banded") and not layers.cpu_kernels("plain")
  assert layers.banded_timbre_convs("cpu") and layers.banded_timbre_convs("banded")
  assert not layers.banded_timbre_convs("plain")
  with pytest.raises(ConfigError, match="kernels='gpu'"):
    layers.cpu_kernels("gpu")


@pytest.mark.parametrize("kernels", ["cpu", "plain"])
def test_inference_attention_equals_softmax_attention(kernels):
  """Per example (lax.map, 'cpu') or batched ('plain'), the division after the product: softmax(q·kᵀ)·v."""
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(3, 2, 9, 4)).astype(np.float32) * 3 for _ in range(3))
  logits = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  expected = np.einsum("bhqk,bhkd->bhqd", probs / probs.sum(-1, keepdims=True), v)
  got = backends.inference_attention(q, k, v, jnp.float32, kernels=kernels)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module", params=["cpu", "banded", "plain"])
def spec_frontend_case(request):
  mel = audio.MelConfig(n_mels=24)
  fast = frontends.SpecFrontEnd(2, mel, projection_dim=8, kernels=request.param)
  rng = np.random.default_rng(0)
  spec = jnp.asarray(-30 + 12 * rng.normal(size=(3, 24, 20)), jnp.float32)  # log-mel dB-like
  variables = fast.init(jax.random.key(0), spec, train=False)
  # Random BatchNorm scales of both signs: a negative scale makes the max over frequency a min before BN.
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  perturbed = []
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      leaf = rng.normal(size=leaf.shape).astype(np.float32)
    elif name.endswith("['bias']"):
      leaf = 0.3 * rng.normal(size=leaf.shape).astype(np.float32)
    elif name.endswith("['var']"):
      leaf = rng.uniform(0.5, 2.0, size=leaf.shape).astype(np.float32) * (100.0 if "input_bn" in name else 1.0)
    elif name.endswith("['mean']"):
      leaf = rng.normal(size=leaf.shape).astype(np.float32) + (-30.0 if "input_bn" in name else 0.0)
    perturbed.append(jnp.asarray(leaf))
  variables = jax.tree_util.tree_unflatten(treedef, perturbed)
  plain = PlainSpecFrontEnd(2, mel, 8)
  return fast, plain, variables, spec


@pytest.mark.slow
def test_spec_frontend_inference_equals_the_plain_computation(spec_frontend_case):
  fast, plain, variables, spec = spec_frontend_case
  np.testing.assert_allclose(fast.apply(variables, spec, train=False),
                             plain.apply(_plain_variables(variables), spec, train=False), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_spec_frontend_training_equals_the_plain_computation(spec_frontend_case):
  """Output, updated BatchNorm statistics and parameter gradients of a training step."""
  fast, plain, variables, spec = spec_frontend_case
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(3, 20, 8)), jnp.float32)

  def loss_and_stats(model, params, stats):
    out, updated = model.apply({"params": params, "batch_stats": stats}, spec, train=True, mutable=["batch_stats"])
    return jnp.sum(out * cotangent), (out, updated["batch_stats"])

  results = []
  for model, tree in ((fast, variables), (plain, _plain_variables(variables))):
    grads, (out, stats) = jax.grad(loss_and_stats, argnums=1, has_aux=True)(model, tree["params"],
                                                                            tree["batch_stats"])
    results.append((out, stats, grads))
  (fast_out, fast_stats, fast_grads), (plain_out, plain_stats, plain_grads) = results
  np.testing.assert_allclose(fast_out, plain_out, rtol=1e-4, atol=1e-4)
  for got, want in ((fast_stats, plain_stats), (fast_grads, plain_grads)):
    got = _plain_variables({"tree": got})["tree"]
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-4), got, want)


def test_batch_norm_refuses_one_value_per_feature_in_training():
  """PyTorch's running variance takes n / (n - 1) times the batch variance: n = 1 has none (PyTorch refuses it)."""
  x = jnp.ones((1, 4), jnp.float32)
  variables = layers.BatchNorm().init(jax.random.key(0), x, train=True)  # initialising updates nothing
  with pytest.raises(ConfigError, match="more than one value per feature"):
    layers.BatchNorm().apply(variables, x, train=True, mutable=["batch_stats"])

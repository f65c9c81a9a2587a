"""Small layers shared by the front-ends and back-ends."""
import functools
import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from flaxtag.errors import ConfigError

# PyTorch's BatchNorm as the reference models used it: momentum 0.1 on the new statistic (Flax's 0.9 on the old),
# eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# The formulations of a few layers (BENCHMARKS.md): 'cpu' those tuned for XLA:CPU, 'banded' only the banded timbre
# convs, 'plain' none; 'auto' is 'cpu' on the CPU and 'banded' elsewhere. All give the plain formulations' results.
KERNELS = ("auto", "cpu", "banded", "plain")


def resolve_kernels(kernels: str) -> str:
  """`kernels` as this backend runs it: 'auto' becomes 'cpu' on the CPU and 'banded' on GPU and TPU."""
  if kernels not in KERNELS:
    raise ConfigError(f"kernels={kernels!r}: use one of {list(KERNELS)}.")
  if kernels == "auto":
    return "cpu" if jax.default_backend() == "cpu" else "banded"
  return kernels


def cpu_kernels(kernels: str) -> bool:
  """Whether to use the formulations tuned for XLA:CPU: unrolled Threefry dropout masks, the custom-VJP max-pool,
  per-example inference (attention, timbre convs) and the banded timbre convs; all but the last are measured faster
  there only (per-example timbre convs made inference 1.8× slower on an H200)."""
  return resolve_kernels(kernels) == "cpu"


def banded_timbre_convs(kernels: str) -> bool:
  """Whether the timbre convs run as banded matmuls (`frontends.TimbreConv`): on every backend unless 'plain'.
  cuDNN has no fast fp32 algorithm for their kernels, 86 mel bands tall over one channel, either: on an H200 the
  banded form trained Spec+Att 3.7× faster in fp32 and 1.8× in bf16 at batch 256."""
  return resolve_kernels(kernels) != "plain"


class BatchNorm(nn.Module):
  """BatchNorm over the last axis, as the reference's PyTorch BatchNorm computes it.

  Why: every conv of SPEC §2–3 is followed by the reference's PyTorch BatchNorm (momentum 0.1, eps 1e-5; the
  layout file beside SPEC), and evaluation (SPEC §7) runs on its running statistics, so a model trained here gives
  the reference's eval-mode outputs only if they are updated by PyTorch's rule. Training normalises with the batch
  mean and the *biased* batch variance, but the running variance takes the *unbiased* one, n / (n - 1) times it,
  with n the values per feature in the global batch (batch × positions); nn.BatchNorm would mix in the biased one
  (6.7 % less for CNN P's dense BatchNorm at batch 16). Running averages are updated in training but not at
  initialisation. Variables are nn.BatchNorm's: params 'scale', 'bias'; batch_stats 'mean', 'var'; statistics are
  float32 (E[x²] - E[x]²) whatever `dtype`.
  """
  dtype: Any = jnp.float32

  def __call__(self, x, train: bool):
    mean, mul, bias = self.statistics(x, train)
    return ((x - mean) * mul + bias).astype(self.dtype)

  @nn.compact
  def statistics(self, x, train: bool, moments: tuple[jax.Array, jax.Array] | None = None):
    """(mean, mul, bias) per feature in float32, such that this BatchNorm of `x` is `(x - mean) * mul + bias`.

    A caller can so normalise a reduced tensor (after a max-pool, which commutes with this per-feature monotonic
    map) instead of every element. In training, `moments` = (E[y], E[y²]) per feature, if given, are the
    statistics of a tensor y with as many elements as `x` (whose values are then not used).
    """
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
    scale = self.param("scale", nn.initializers.ones, features)
    bias = self.param("bias", nn.initializers.zeros, features)
    if not train:
      return ra_mean.value, lax.rsqrt(ra_var.value + BN_EPSILON) * scale, bias
    if moments is None:
      axes = tuple(range(x.ndim - 1))
      x = x.astype(jnp.float32)
      moments = jnp.mean(x, axes), jnp.mean(lax.square(x), axes)
    mean, mean2 = moments
    var = jnp.maximum(0.0, mean2 - lax.square(mean))
    if not self.is_initializing():
      count = math.prod(x.shape[:-1])
      if count < 2:
        raise ConfigError(f"BatchNorm in training needs more than one value per feature, got input {x.shape}; "
                          "train with a larger batch (PyTorch refuses this too).")
      ra_mean.value = BN_MOMENTUM * ra_mean.value + (1 - BN_MOMENTUM) * mean
      ra_var.value = BN_MOMENTUM * ra_var.value + (1 - BN_MOMENTUM) * var * (count / (count - 1))
    return mean, lax.rsqrt(var + BN_EPSILON) * scale, bias


def _threefry2x32(k1, k2, x1, x2):
  """The Threefry-2x32 hash (20 rounds) as in jax.random, with every round unrolled."""
  keys = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  x1, x2 = x1 + keys[0], x2 + keys[1]
  for i in range(5):
    for r in rotations[i % 2]:
      x1 = x1 + x2
      x2 = ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r))) ^ x1
    x1 = x1 + keys[(i + 1) % 3]
    x2 = x2 + keys[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def bernoulli(rng: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
  """`jax.random.bernoulli(rng, p, shape)`, bit for bit, 3-4x faster on CPU.

  JAX lowers Threefry on CPU as a rolled loop, one pass over memory per four rounds; unrolled, the counter, the
  hash and the comparison fuse into one elementwise kernel. Other key kinds or JAX's older bit layout fall back to
  jax.random.bernoulli.
  """
  typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  size = int(np.prod(shape))
  if (typed and str(jax.random.key_impl(rng)) != "threefry2x32") or not jax.config.jax_threefry_partitionable \
      or size >= 2**32:
    return jax.random.bernoulli(rng, p, shape)
  k1, k2 = jax.random.key_data(rng) if typed else rng
  # jax.random's counters: a uint64 iota over the shape, as (high, low) uint32 words; the high word is 0 here.
  strides = np.cumprod((tuple(shape[1:]) + (1,))[::-1])[::-1]
  low = sum(lax.broadcasted_iota(np.uint32, shape, d) * np.uint32(s) for d, s in enumerate(strides))
  bits1, bits2 = _threefry2x32(k1, k2, jnp.zeros(shape, np.uint32), low)
  bits = bits1 ^ bits2
  # jax.random.uniform: 23 random mantissa bits under the exponent of 1.0 give [1, 2); minus 1 gives [0, 1).
  uniform = lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - 1.0
  return uniform < jnp.float32(p)


class Dropout(nn.Dropout):
  """nn.Dropout, with `bernoulli` above on the CPU: the same masks (same name, same rng stream), drawn faster."""
  kernels: str = "auto"  # see `cpu_kernels`

  @nn.compact
  def __call__(self, inputs, deterministic: bool | None = None, rng: jax.Array | None = None):
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    shape = list(inputs.shape)
    for dim in self.broadcast_dims:
      shape[dim] = 1
    draw = bernoulli if cpu_kernels(self.kernels) else jax.random.bernoulli
    mask = jnp.broadcast_to(draw(rng, keep_prob, tuple(shape)), inputs.shape)
    return lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


class ConvBlock(nn.Module):
  """1-D conv ('same' padding k//2 unless given) → BatchNorm → ReLU → optional max-pool, on (B, T, C)."""
  features: int
  kernel_size: int
  strides: int = 1
  pool: int = 1
  padding: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    pad = self.kernel_size // 2 if self.padding is None else self.padding
    x = nn.Conv(self.features, (self.kernel_size,), strides=(self.strides,), padding=[(pad, pad)],
                dtype=self.dtype, name="conv")(x)
    x = nn.relu(BatchNorm(self.dtype, name="bn")(x, train))
    if self.pool > 1:
      x = max_pool(x, self.pool)
    return x


def max_pool(x, window: int, kernels: str = "auto"):
  """nn.max_pool(x, (window,), strides=(window,), padding="VALID") on (B, T, C): same values, same gradient.

  XLA:CPU differentiates nn.max_pool with select-and-scatter (index tensors and a scatter), several times slower
  than the elementwise version used there (see `cpu_kernels`), which keeps the index of each window's first maximum
  (as select-and-scatter picks it) for the backward pass.
  """
  if not cpu_kernels(kernels):
    return nn.max_pool(x, (window,), strides=(window,), padding="VALID")
  length = x.shape[1] // window * window
  return _window_max(x[:, :length], window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _window_max(x, window):
  return _window_max_fwd(x, window)[0]


def _window_max_fwd(x, window):
  windows = x.reshape(x.shape[0], x.shape[1] // window, window, x.shape[2])
  best, index = windows[:, :, 0], jnp.zeros(windows.shape[:2] + windows.shape[3:], jnp.int32)
  for i in range(1, window):
    better = windows[:, :, i] > best
    best, index = jnp.where(better, windows[:, :, i], best), jnp.where(better, i, index)
  return best, index


def _window_max_bwd(window, index, grad):
  picked = [jnp.where(index == i, grad, 0) for i in range(window)]
  return (jnp.stack(picked, axis=2).reshape(grad.shape[0], -1, grad.shape[2]),)


_window_max.defvjp(_window_max_fwd, _window_max_bwd)

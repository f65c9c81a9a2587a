"""CNN front-ends (SPEC §2): raw audio → a sequence of feature vectors (B, tokens, channels).

`SpecFrontEnd`: log-mel spectrogram and musically motivated filters (Pons et al.): six vertical (timbre) branches
and four horizontal (temporal) branches, concatenated on channels (29c).
`SampleFrontEnd`: the sample-level CNN (Lee et al.) on the waveform.
"""
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from flaxtag import audio
from flaxtag.errors import AudioError
from flaxtag.models.layers import BatchNorm, ConvBlock, banded_timbre_convs, cpu_kernels

# Training crop per front-end (SPEC §1): 256 centred STFT frames, and 10·3^8 samples.
CROP_SAMPLES = {"spec": 65_280, "raw": 65_610}

# (height as a share of the mel bands, kernel width, channel multiplier), SPEC §2 branches 1–6.
TIMBRE_BRANCHES = ((0.9, 7, 1), (0.9, 3, 2), (0.9, 1, 4), (0.4, 7, 1), (0.4, 3, 2), (0.4, 1, 4))
# (kernel length, channel multiplier), branches 7–10.
TEMPORAL_BRANCHES = ((165, 1), (129, 2), (65, 4), (33, 8))


@jax.custom_vjp
def take_extreme(y: jax.Array, largest: jax.Array) -> jax.Array:
  """y (B, T, P, C) at its max over P where largest[c], at its min elsewhere: (B, T, C).

  The gradient goes to that one element (the first on ties), built in one elementwise pass from the stored
  indices; autodiff of a max would compare every element with the result and count the ties.
  """
  # Not differentiated (inference): the same values from a max and a min, without XLA:CPU's slow argmax.
  return jnp.where(largest, jnp.max(y, axis=2), jnp.min(y, axis=2))


def _take_extreme_fwd(y, largest):
  index = jnp.argmax(jnp.where(largest, y, -y), axis=2)
  return jnp.take_along_axis(y, index[:, :, None, :], axis=2)[:, :, 0], (index, y)


def _take_extreme_bwd(residuals, grad):
  index, y = residuals  # y only for its shape: its buffer is kept for the BN statistics' gradient anyway.
  picked = lax.broadcasted_iota(index.dtype, y.shape, 2) == index[:, :, None, :]
  return jnp.where(picked, grad[:, :, None, :], 0).astype(y.dtype), None


take_extreme.defvjp(_take_extreme_fwd, _take_extreme_bwd)


class TimbreConv(nn.Module):
  """A (height × width) conv over (frequency, time), unpadded in frequency, then BN, ReLU, max over frequency.

  Takes the front-end's input BatchNorm apart: `centred` (B, T, mel) is the log-mel minus that BatchNorm's mean,
  and the normalised input is `centred * in_mul + in_bias` (scalars).

  A tall kernel over one input channel is a poor case for XLA:CPU's convolutions and for cuDNN's in fp32, so it is
  computed as a 1-D conv over time whose input channels are the mel bands and whose output channels are (frequency
  position × filter), with a banded weight built from the kernel; under kernels='plain' (see
  `layers.banded_timbre_convs`) as the plain 2-D conv. The result is the same cross-correlation.
  """
  features: int
  kernel_size: tuple[int, int]
  dtype: Any = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, centred, in_mul, in_bias, train: bool):
    height, width = self.kernel_size
    batch, frames, n_mels = centred.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (height, width, 1, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    positions = n_mels - height + 1
    pad = [(width // 2, width // 2)]
    # conv(centred·in_mul + in_bias) + bias = in_mul·conv(centred) + offset: `centred` holds no parameter, so the
    # backward pass needs no input gradient of this, the front-end's largest matmul (a third of its cost).
    if banded_timbre_convs(self.kernels):
      offset = np.arange(n_mels)[:, None] - np.arange(positions)[None, :]  # mel band - output position
      inside = (offset >= 0) & (offset < height)
      banded = jnp.take(kernel[:, :, 0, :], np.clip(offset, 0, height - 1), axis=0)  # (mel, pos, width, c)
      banded = jnp.where(inside[:, :, None, None], banded, 0.0)
      banded = banded.transpose(2, 0, 1, 3).reshape(width, n_mels, positions * self.features).astype(self.dtype)

      def convolve(x):
        conv = jax.lax.conv_general_dilated(x.astype(self.dtype), banded, window_strides=(1,), padding=pad,
                                            dimension_numbers=("NWC", "WIO", "NWC"))
        return conv.reshape(x.shape[0], frames, positions, self.features)
    else:  # over (time, frequency) of (B, T, mel, 1): the kernel's (freq, time) axes swapped
      def convolve(x):
        return jax.lax.conv_general_dilated(x[..., None].astype(self.dtype),
                                            kernel.transpose(1, 0, 2, 3).astype(self.dtype), window_strides=(1, 1),
                                            padding=[*pad, (0, 0)], dimension_numbers=("NHWC", "HWIO", "NHWC"))
    # edge[t]: the kernel's sum over the taps that fall on frames (the input is zero-padded in time).
    edge = jax.lax.conv_general_dilated(jnp.ones((1, frames, 1), jnp.float32), jnp.sum(kernel, axis=0),
                                        window_strides=(1,), padding=pad, dimension_numbers=("NWC", "WIO", "NWC"))
    offset = in_bias * edge[0] + bias  # (T, c)
    in_mul_d, offset_d = in_mul.astype(self.dtype), offset.astype(self.dtype)
    # relu(BN(y)) is monotonic in conv, increasing where in_mul·mul ≥ 0 and decreasing elsewhere (float rounding
    # keeps it so), so its max over frequency is its value at conv's max, or min: y, BN and ReLU are then computed
    # for positions× fewer elements, each with the same arithmetic as it would have had before the pooling.
    if not train and cpu_kernels(self.kernels):
      # Inference on the CPU: one example at a time, so that its (frames, positions, filters) conv output stays in
      # cache for the max (a batch's is up to 62 MB, read back from memory; BENCHMARKS.md).
      mean, mul, bn_bias = BatchNorm(name="bn").statistics(
          jax.ShapeDtypeStruct((batch, frames, positions, self.features), self.dtype), train)
      largest = in_mul * mul >= 0
      extreme = lax.map(lambda example: take_extreme(convolve(example[None]), largest)[0], centred)
    else:
      conv = convolve(centred)
      moments = None
      if train:
        # BN statistics of y = conv·in_mul + offset from per-(t, c) sums of conv and conv² over (batch, position):
        # y itself (as big as conv) is never written, and the sums' backward fuses into that of `take_extreme`. The
        # running variance's n / (n - 1) counts conv's elements, as many as y's (batch × frames × positions).
        conv32 = conv.astype(jnp.float32)
        sum1, sum2 = jnp.sum(conv32, axis=(0, 2)), jnp.sum(lax.square(conv32), axis=(0, 2))
        n = batch * positions
        y_sum = in_mul * sum1 + n * offset
        y2_sum = lax.square(in_mul) * sum2 + 2 * in_mul * offset * sum1 + n * lax.square(offset)
        moments = jnp.sum(y_sum, axis=0) / (n * frames), jnp.sum(y2_sum, axis=0) / (n * frames)
      mean, mul, bn_bias = BatchNorm(name="bn").statistics(conv, train, moments)
      extreme = take_extreme(conv, in_mul * mul >= 0)
    y = (extreme * in_mul_d + offset_d).astype(jnp.float32)
    return nn.relu((y - mean) * mul + bn_bias).astype(self.dtype)  # (B, T, c)


class SpecFrontEnd(nn.Module):
  """Waveform (B, N) or log-mel (B, mel, T) → (B, T, 29c), or (B, T, projection_dim) after a 1×1 conv."""
  conv_channels: int
  mel: audio.MelConfig
  projection_dim: int | None = None
  dtype: Any = jnp.float32
  kernels: str = "auto"  # the timbre convs' formulation, see `layers.KERNELS`

  @nn.compact
  def __call__(self, x, train: bool):
    spec = self.log_mel(x).transpose(0, 2, 1)  # (B, T, mel)
    # The input BatchNorm (one channel, n = batch × frames × mel values) as (spec - mean)·mul + bias, applied
    # inside the branches (see TimbreConv).
    mean, mul, bias = BatchNorm(name="input_bn").statistics(spec.reshape(-1, 1), train)
    centred = spec - mean
    c, n_mels = self.conv_channels, self.mel.n_mels
    branches = [
        TimbreConv(c * mult, (int(share * n_mels), width), dtype=self.dtype, kernels=self.kernels, name=f"timbre_{i}")(
            centred, mul, bias, train)
        for i, (share, width, mult) in enumerate(TIMBRE_BRANCHES)
    ]
    # The mel-averaged envelope of the normalised input, (B, T, 1).
    envelope = (jnp.mean(centred, axis=2, keepdims=True) * mul + bias).astype(self.dtype)
    branches += [
        ConvBlock(c * mult, length, dtype=self.dtype, name=f"temporal_{i}")(envelope, train)
        for i, (length, mult) in enumerate(TEMPORAL_BRANCHES)
    ]
    x = jnp.concatenate(branches, axis=-1)
    if self.projection_dim:
      x = ConvBlock(self.projection_dim, 1, dtype=self.dtype, name="projection")(x, train)
    return x

  def log_mel(self, x):
    if x.ndim == 2:
      return audio.log_mel_spectrogram(x, self.mel)
    if x.ndim == 3 and x.shape[1] == self.mel.n_mels:
      return x
    raise AudioError(
        f"the Spec front-end takes a waveform batch (batch, samples) or a log-mel batch (batch, {self.mel.n_mels}, "
        f"frames); got an array of shape {tuple(x.shape)}.")


class SampleFrontEnd(nn.Module):
  """Waveform (B, N) → conv k3 stride 3 → blocks of [conv k3, BN, ReLU, max-pool 3] → optional projection conv.

  With the default four blocks a 65,610-sample crop gives 270 tokens of 243 samples each.
  """
  conv_channels: int
  block_multipliers: tuple[int, ...] = (1, 2, 2, 2)
  projection_dim: int | None = None
  projection_kernel: int = 7
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if x.ndim != 2:
      raise AudioError(
          f"the Raw front-end takes a waveform batch (batch, samples); got an array of shape {tuple(x.shape)}.")
    c = self.conv_channels
    x = ConvBlock(c, 3, strides=3, padding=1, dtype=self.dtype, name="init_conv")(
        x[..., None].astype(self.dtype), train)
    for i, mult in enumerate(self.block_multipliers):
      x = ConvBlock(c * mult, 3, pool=3, dtype=self.dtype, name=f"block_{i}")(x, train)
    if self.projection_dim:
      x = ConvBlock(self.projection_dim, self.projection_kernel, dtype=self.dtype, name="projection")(x, train)
    return x

"""CNN front-ends (SPEC §2): raw audio → a sequence of feature vectors (B, tokens, channels).

`SpecFrontEnd`: log-mel spectrogram and musically motivated filters (Pons et al.): six vertical (timbre) branches
and four horizontal (temporal) branches, concatenated on channels (29c).
`SampleFrontEnd`: the sample-level CNN (Lee et al.) on the waveform.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxtag import audio
from flaxtag.errors import AudioError
from flaxtag.models.layers import ConvBlock, batch_norm

# Training crop per front-end (SPEC §1): 256 centred STFT frames, and 10·3^8 samples.
CROP_SAMPLES = {"spec": 65_280, "raw": 65_610}

# (height as a share of the mel bands, kernel width, channel multiplier), SPEC §2 branches 1–6.
TIMBRE_BRANCHES = ((0.9, 7, 1), (0.9, 3, 2), (0.9, 1, 4), (0.4, 7, 1), (0.4, 3, 2), (0.4, 1, 4))
# (kernel length, channel multiplier), branches 7–10.
TEMPORAL_BRANCHES = ((165, 1), (129, 2), (65, 4), (33, 8))


class TimbreConv(nn.Module):
  """A (height × width) conv over (frequency, time), unpadded in frequency, then BN, ReLU, max over frequency.

  A tall kernel over one input channel is a poor case for XLA's convolutions, so it is computed as a 1-D conv
  over time whose input channels are the mel bands and whose output channels are (frequency position × filter),
  with a banded weight built from the kernel. The result is the same cross-correlation.
  """
  features: int
  kernel_size: tuple[int, int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, spec, train: bool):  # spec: (B, mel, T)
    height, width = self.kernel_size
    batch, n_mels, frames = spec.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (height, width, 1, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    positions = n_mels - height + 1
    offset = np.arange(n_mels)[:, None] - np.arange(positions)[None, :]  # mel band - output position
    inside = (offset >= 0) & (offset < height)
    banded = jnp.take(kernel[:, :, 0, :], np.clip(offset, 0, height - 1), axis=0)  # (mel, pos, width, c)
    banded = jnp.where(inside[:, :, None, None], banded, 0.0)
    banded = banded.transpose(2, 0, 1, 3).reshape(width, n_mels, positions * self.features)
    y = jax.lax.conv_general_dilated(
        spec.transpose(0, 2, 1).astype(self.dtype), banded.astype(self.dtype), window_strides=(1,),
        padding=[(width // 2, width // 2)], dimension_numbers=("NWC", "WIO", "NWC"))
    y = y.reshape(batch, frames, positions, self.features) + bias.astype(self.dtype)
    y = nn.relu(batch_norm(train, self.dtype, name="bn")(y))
    return jnp.max(y, axis=2)  # (B, T, c)


class SpecFrontEnd(nn.Module):
  """Waveform (B, N) or log-mel (B, mel, T) → (B, T, 29c), or (B, T, projection_dim) after a 1×1 conv."""
  conv_channels: int
  mel: audio.MelConfig
  projection_dim: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    spec = self.log_mel(x)
    spec = batch_norm(train, self.dtype, name="input_bn")(spec[..., None])[..., 0]
    c, n_mels = self.conv_channels, self.mel.n_mels
    branches = [
        TimbreConv(c * mult, (int(share * n_mels), width), dtype=self.dtype, name=f"timbre_{i}")(spec, train)
        for i, (share, width, mult) in enumerate(TIMBRE_BRANCHES)
    ]
    envelope = jnp.mean(spec, axis=1)[..., None]  # (B, T, 1): the mel-averaged envelope
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

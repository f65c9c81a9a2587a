"""Small layers shared by the front-ends and back-ends."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# PyTorch's BatchNorm defaults (momentum 0.1 on the new statistic, eps 1e-5), which the reference models used.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def batch_norm(train: bool, dtype: Any, name: str | None = None) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      dtype=dtype, name=name)


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
    x = nn.relu(batch_norm(train, self.dtype, name="bn")(x))
    if self.pool > 1:
      x = nn.max_pool(x, (self.pool,), strides=(self.pool,), padding="VALID")
    return x

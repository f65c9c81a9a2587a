"""Back-ends (SPEC §3): a sequence of front-end features (B, T, C) → one clip embedding (B, D).

`AttentionBackEnd`: a BERT-style post-LayerNorm Transformer encoder with a [CLS] token (the proposed back-end).
`PonsBackEnd` (CNN P) and `SampleBackEnd` (CNN L): the CNN back-ends it is compared with.

`BACKENDS`, the registry at the end of this module, maps `config.model.backend` to its module and what the rest of
flaxtag asks of it (which front-ends it follows, whether it has attention maps): adding a back-end is adding an
entry there.
"""
import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from flaxtag.errors import AudioError, ConfigError
from flaxtag.models.layers import BatchNorm, ConvBlock, Dropout, cpu_kernels, max_pool


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  width: int = 512
  num_layers: int = 2
  num_heads: int = 8
  mlp_dim: int = 2048
  dropout: float = 0.4
  attention_dropout: float = 0.4
  layer_norm_epsilon: float = 1e-12
  cls_token: str = "fixed"  # 'fixed': A's RandomState(0) vector, not trained; 'learned'.
  positions: str = "sinusoidal"  # 'sinusoidal'; 'learned': a table + LayerNorm, as A's visualisation model.
  max_positions: int = 512  # size of the learned table, [CLS] included.

  def __post_init__(self):
    if self.cls_token not in ("fixed", "learned"):
      raise ConfigError(f"model.encoder.cls_token={self.cls_token!r}: use 'fixed' or 'learned'.")
    if self.positions not in ("sinusoidal", "learned"):
      raise ConfigError(f"model.encoder.positions={self.positions!r}: use 'sinusoidal' or 'learned'.")
    if self.width % self.num_heads:
      raise ConfigError(f"model.encoder.width={self.width} is not divisible by num_heads={self.num_heads}.")


def fixed_cls_vector(width: int) -> np.ndarray:
  """A's [CLS] token: numpy RandomState(0).random_sample(width), uniform in [0, 1)."""
  return np.random.RandomState(0).random_sample(width).astype(np.float32)


def sinusoidal_positions(num_positions: int, width: int) -> np.ndarray:
  """(num_positions, width) table; row 0 (the [CLS] position) is zero, row p ≥ 1 is sin/cos of p/10000^(2(j//2)/w)."""
  p = np.arange(num_positions, dtype=np.float64)[:, None]
  j = np.arange(width)[None, :]
  angle = p / np.power(10000.0, 2 * (j // 2) / width)
  table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
  table[0] = 0.0
  return table.astype(np.float32)


def _unnormalised_attention(query, key, value, dtype):
  """(softmax(q·kᵀ)·v with its division left out, softmax's denominators) of (..., T, d) queries, keys, values."""
  logits = jnp.einsum("...qd,...kd->...qk", query, key).astype(jnp.float32)
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  return jnp.einsum("...qk,...kd->...qd", weights.astype(dtype), value), jnp.sum(weights, axis=-1, keepdims=True)


def inference_attention(query, key, value, dtype, kernels: str = "auto"):
  """softmax(q·kᵀ)·v of (B, heads, T, d) scaled queries, keys and values, for inference (the probabilities unseen).

  Softmax's division comes after the product with the values, on (T, d) per head instead of (T, T), and the
  probabilities are never written. On the CPU (`layers.cpu_kernels`) one example at a time (`lax.map`): its
  (heads, T, T) weights then stay in cache, 2-3x faster on XLA:CPU than the batched products (BENCHMARKS.md).
  """
  if cpu_kernels(kernels):
    context, total = lax.map(lambda qkv: _unnormalised_attention(*qkv, dtype), (query, key, value))
  else:
    context, total = _unnormalised_attention(query, key, value, dtype)
  return context / total.astype(dtype)


class EncoderLayer(nn.Module):
  """Self-attention → add → LayerNorm → GELU MLP → add → LayerNorm (post-LN, as BERT)."""
  config: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, forced_attention=None):
    cfg = self.config
    batch, tokens, width = x.shape
    head_dim = width // cfg.num_heads
    # One matmul for queries, keys and values.
    qkv = nn.Dense(3 * width, dtype=self.dtype, name="qkv")(x).reshape(batch, tokens, 3, cfg.num_heads, head_dim)
    # Heads before tokens, (B, heads, T, d): each head's matmuls then read contiguous (T, d) blocks, faster on CPU.
    query, key, value = qkv.transpose(2, 0, 3, 1, 4)
    # Scaling the queries, not the logits: 4x fewer elements (T·d vs T·T per head), and exact for head_dim = 64.
    query = query * (1 / math.sqrt(head_dim))
    if train or forced_attention is not None or self.is_mutable_collection("intermediates"):
      logits = jnp.einsum("bhqd,bhkd->bhqk", query, key).astype(jnp.float32)
      probs = jax.nn.softmax(logits, axis=-1)
      self.sow("intermediates", "attention", probs)
      if forced_attention is not None:  # (B, tokens): every head and query attends as given.
        probs = jnp.broadcast_to(forced_attention[:, None, None, :].astype(jnp.float32), probs.shape)
      probs = Dropout(cfg.attention_dropout)(probs, deterministic=not train)
      context = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(self.dtype), value)
    else:
      context = inference_attention(query, key, value, self.dtype)
    context = context.transpose(0, 2, 1, 3).reshape(batch, tokens, width)
    attended = nn.Dense(width, dtype=self.dtype, name="attention_out")(context)
    attended = Dropout(cfg.dropout)(attended, deterministic=not train)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, name="attention_norm")(x + attended)
    hidden = jax.nn.gelu(nn.Dense(cfg.mlp_dim, dtype=self.dtype, name="mlp_in")(x), approximate=False)
    hidden = nn.Dense(width, dtype=self.dtype, name="mlp_out")(hidden)
    hidden = Dropout(cfg.dropout)(hidden, deterministic=not train)
    return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, name="mlp_norm")(x + hidden)


class AttentionBackEnd(nn.Module):
  """Tokens (B, T, width) → [CLS] + positions → encoder layers → tanh(dense([CLS] output)) (B, width).

  `forced_attention` (B, T + 1), if given, replaces the last layer's attention probabilities (used by the
  tag-wise contribution map of SPEC §8). Attention probabilities of every layer are sown as 'intermediates'.
  """
  config: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, train: bool, forced_attention=None):
    cfg = self.config
    batch, length, width = tokens.shape
    if width != cfg.width:
      raise ConfigError(f"the encoder is {cfg.width} wide but the front-end gives {width} channels.")
    if cfg.cls_token == "fixed":
      cls = jnp.asarray(fixed_cls_vector(width))
    else:
      cls = self.param("cls", nn.initializers.uniform(1.0), (width,))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(tokens.dtype), (batch, 1, width)), tokens], axis=1)
    if cfg.positions == "sinusoidal":
      x = x + sinusoidal_positions(length + 1, width).astype(x.dtype)
    else:
      if length + 1 > cfg.max_positions:
        raise AudioError(
            f"this model has learned positions for {cfg.max_positions - 1} tokens but the input gives {length}; "
            "tag long audio in crops (flaxtag.tag does) or use a model with sinusoidal positions.")
      table = self.param("position_embeddings", nn.initializers.normal(0.02), (cfg.max_positions, width))
      x = x + table[: length + 1].astype(x.dtype)
      x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, name="embedding_norm")(x)
    x = Dropout(cfg.dropout)(x, deterministic=not train)
    for i in range(cfg.num_layers):
      forced = forced_attention if i == cfg.num_layers - 1 else None
      x = EncoderLayer(cfg, dtype=self.dtype, name=f"layer_{i}")(x, train, forced)
    return jnp.tanh(nn.Dense(width, dtype=self.dtype, name="pooler")(x[:, 0]))


@dataclasses.dataclass(frozen=True)
class PonsConfig:
  """CNN P's widths (`config.model.cnn_p`): SPEC §3's 512 channels and 500-wide embedding by default; smaller ones
  compare back-ends at matched capacity."""
  channels: int = 512
  embed_dim: int = 500

  def __post_init__(self):
    if self.channels < 1 or self.embed_dim < 1:
      raise ConfigError(f"model.cnn_p.channels and embed_dim must be positive, got {self.channels} and "
                        f"{self.embed_dim}.")


class PonsBackEnd(nn.Module):
  """CNN P: three k7 convs with residuals and a max-pool, global max ‖ mean over time, dense 2·channels → embed."""
  config: PonsConfig = PonsConfig()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    channels = self.config.channels
    x = ConvBlock(channels, 7, dtype=self.dtype, name="conv_0")(x, train)
    x = x + ConvBlock(channels, 7, dtype=self.dtype, name="conv_1")(x, train)
    x = max_pool(x, 2)
    x = x + ConvBlock(channels, 7, dtype=self.dtype, name="conv_2")(x, train)
    x = jnp.concatenate([jnp.max(x, axis=1), jnp.mean(x, axis=1)], axis=-1)
    x = nn.Dense(self.config.embed_dim, dtype=self.dtype, name="dense")(x)
    return nn.relu(BatchNorm(self.dtype, name="dense_bn")(x, train))


class SampleBackEnd(nn.Module):
  """CNN L: the sample-level CNN continued with five more blocks to length 1, then a 1×1 conv to 512.

  Block names continue the front-end's (block_4 … block_8). On inputs longer than a training crop the length
  does not reach 1; the remaining positions are max-pooled.
  """
  conv_channels: int
  block_multipliers: tuple[int, ...] = (2, 2, 2, 4, 4)
  first_block: int = 4
  embed_dim: int = 512
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for i, mult in enumerate(self.block_multipliers):
      x = ConvBlock(self.conv_channels * mult, 3, pool=3, dtype=self.dtype, name=f"block_{self.first_block + i}")(
          x, train)
    x = ConvBlock(self.embed_dim, 1, dtype=self.dtype, name="projection")(x, train)
    return jnp.max(x, axis=1)


class BackEnd(NamedTuple):
  """A back-end, as `tagger.MusicTagger` builds it and the tagging tools ask about it.

  build(model, name) → the flax module of `model` (the `tagger.MusicTagger` it is part of, whose fields describe
    it), called as module(features, train) or, with `attention`, module(features, train, forced_attention).
  frontends: the front-ends it follows (`config.model.frontend`).
  attention: whether it has self-attention: the front-end then projects its features to the encoder's width, the
    layers sow their attention probabilities, attention can be forced (SPEC §8), and `flaxtag.explain` has maps to
    show.
  """
  build: Callable[..., nn.Module]
  frontends: tuple[str, ...]
  attention: bool


# Every back-end by name; adding a back-end is adding an entry.
BACKENDS: dict[str, BackEnd] = {
    "attention": BackEnd(lambda model, name: AttentionBackEnd(model.encoder, dtype=model.dtype, name=name),
                         frontends=("spec", "raw"), attention=True),
    "cnn_p": BackEnd(lambda model, name: PonsBackEnd(model.cnn_p, dtype=model.dtype, name=name),
                     frontends=("spec",), attention=False),
    "cnn_l": BackEnd(lambda model, name: SampleBackEnd(model.conv_channels, dtype=model.dtype, name=name),
                     frontends=("raw",), attention=False),
}

"""The tagging model: front-end → back-end → dropout → head, composed from `config.model`."""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from flaxtag import audio
from flaxtag.errors import ConfigError
from flaxtag.hierarchy import Hierarchy
from flaxtag.models import backends, frontends, heads, layers

FRONTENDS = ("spec", "raw")


class MusicTagger(nn.Module):
  """(B, samples) waveforms (or (B, mel, frames) log-mel for Spec) → `heads.HeadOutputs` of logits."""
  frontend: str
  backend: str
  conv_channels: int
  num_tags: int
  mel: audio.MelConfig = audio.MelConfig()
  encoder: backends.EncoderConfig = backends.EncoderConfig()
  cnn_p: backends.PonsConfig = backends.PonsConfig()
  head: str = heads.FLAT
  head_options: heads.HeadOptions = heads.HeadOptions()
  hierarchy: Hierarchy | None = None
  head_dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, forced_attention=None) -> heads.HeadOutputs:
    backend = backends.BACKENDS[self.backend]
    projection = self.encoder.width if backend.attention else None
    if self.frontend == "spec":
      features = frontends.SpecFrontEnd(self.conv_channels, self.mel, projection, dtype=self.dtype, name="frontend")
    else:
      features = frontends.SampleFrontEnd(self.conv_channels, projection_dim=projection, dtype=self.dtype,
                                          name="frontend")
    x = features(x, train)
    embed = backend.build(self, name="backend")
    if backend.attention:
      x = embed(x, train, forced_attention)
    elif forced_attention is not None:
      raise ConfigError(f"the {self.backend} back-end has no attention to force.")
    else:
      x = embed(x, train)
    x = layers.Dropout(self.head_dropout)(x, deterministic=not train).astype(jnp.float32)
    head_params = self.param(
        "head", lambda rng: heads.init_params(rng, self.head, x.shape[-1], self.num_tags, self.hierarchy,
                                              self.head_options))
    return heads.apply(self.head, head_params, x, self.hierarchy, self.head_options)


def _fields(cls, values: dict, section: str):
  valid = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - valid)
  if unknown:
    raise ConfigError(f"unknown key(s) {unknown} in config.{section}; valid keys are {sorted(valid)}.")
  return cls(**values)


def build_model(model_config: ml_collections.ConfigDict, hierarchy: Hierarchy | None = None,
                half_precision: bool = False) -> MusicTagger:
  """The model described by `config.model`, with a clear error for any unknown or inconsistent choice.

  half_precision: compute in bfloat16 (GPU/TPU); parameters, log-mel features and the head stay float32.
  """
  cfg = model_config
  if cfg.frontend not in FRONTENDS:
    raise ConfigError(f"model.frontend={cfg.frontend!r}: valid front-ends are {list(FRONTENDS)}.")
  if cfg.backend not in backends.BACKENDS:
    raise ConfigError(f"model.backend={cfg.backend!r}: valid back-ends are {sorted(backends.BACKENDS)}.")
  if cfg.frontend not in backends.BACKENDS[cfg.backend].frontends:
    following = [name for name, backend in backends.BACKENDS.items() if cfg.frontend in backend.frontends]
    raise ConfigError(f"model.backend={cfg.backend!r} does not follow the {cfg.frontend!r} front-end; "
                      f"it takes {following}.")
  if cfg.conv_channels < 1 or cfg.num_tags < 1:
    raise ConfigError(f"model.conv_channels and model.num_tags must be positive, got {cfg.conv_channels} and "
                      f"{cfg.num_tags}.")
  return MusicTagger(
      frontend=cfg.frontend,
      backend=cfg.backend,
      conv_channels=cfg.conv_channels,
      num_tags=cfg.num_tags,
      mel=_fields(audio.MelConfig, cfg.features.to_dict(), "model.features"),
      encoder=_fields(backends.EncoderConfig, cfg.encoder.to_dict(), "model.encoder"),
      # Configs saved before model.cnn_p existed describe the default CNN P.
      cnn_p=_fields(backends.PonsConfig, cfg.cnn_p.to_dict() if "cnn_p" in cfg else {}, "model.cnn_p"),
      head=cfg.head,
      head_options=heads.HeadOptions.from_dict(cfg.head_options.to_dict()),
      hierarchy=hierarchy,
      head_dropout=cfg.head_dropout,
      dtype=jnp.bfloat16 if half_precision else jnp.float32,
  )


def has_attention(model: MusicTagger) -> bool:
  """Whether the model's back-end has self-attention (maps to show, attention to force)."""
  return backends.BACKENDS[model.backend].attention


def crop_samples(model: MusicTagger) -> int:
  return frontends.CROP_SAMPLES[model.frontend]


def abstract_variables(model: MusicTagger):
  """Shapes and dtypes of the model's variables, from one training crop, without computing anything."""
  example = jax.ShapeDtypeStruct((1, crop_samples(model)), jnp.float32)
  return jax.eval_shape(lambda rng: model.init(rng, jnp.zeros(example.shape)), jax.random.key(0))


def init_variables(model: MusicTagger, rng: jax.Array):
  return jax.jit(model.init)(rng, jnp.zeros((1, crop_samples(model)), jnp.float32))


def count_parameters(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))

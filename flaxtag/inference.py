"""Inference API: a trained or converted model loaded from its workdir.

  tagger = flaxtag.Tagger.load("runs/spec_att")
  probs = tagger.probs(waveforms)  # (B, samples) at 16 kHz, or (B, 96, frames) log-mel for Spec models

Inference mode: dropout off, BatchNorm uses its running statistics.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxtag import checkpoint
from flaxtag.hierarchy import Hierarchy
from flaxtag.models import heads, tagger


class Tagger:
  """A model with its variables, config and metadata (tag names, hierarchy)."""

  def __init__(self, model: tagger.MusicTagger, variables, config: ml_collections.ConfigDict, metadata: dict):
    self.model = model
    self.variables = variables
    self.config = config
    self.metadata = metadata
    self._apply = jax.jit(functools.partial(model.apply, train=False))

  @classmethod
  def load(cls, workdir, checkpoint_step: str | int = "best") -> "Tagger":
    """Loads `best` (by validation ROC-AUC), `latest`, or a step number from WORKDIR/checkpoints."""
    manager = checkpoint.open_manager(workdir, read_only=True)
    step = checkpoint.resolve_step(manager, checkpoint_step)
    config, metadata = checkpoint.load_config(manager, step)
    hierarchy = None
    if metadata.get("hierarchy"):
      hierarchy = Hierarchy.from_mapping(metadata["hierarchy"], fine_tags=metadata.get("tag_names"),
                                         source=f"{workdir} checkpoint metadata")
    model = tagger.build_model(config.model, hierarchy)
    variables = checkpoint.restore_variables(manager, step, tagger.abstract_variables(model))
    manager.close()
    return cls(model, variables, config, {**metadata, "step": step})

  @property
  def tag_names(self) -> list[str]:
    names = self.metadata.get("tag_names")
    return list(names) if names else [f"tag_{i}" for i in range(self.model.num_tags)]

  @property
  def crop_samples(self) -> int:
    return tagger.crop_samples(self.model)

  def outputs(self, batch) -> heads.HeadOutputs:
    """Head outputs (logits) for a batch of waveforms or, for Spec models, log-mel spectrograms."""
    return self._apply(self.variables, jnp.asarray(batch, jnp.float32))

  def probs(self, batch) -> np.ndarray:
    """Sigmoid probabilities of the (fine) tags, (B, num_tags)."""
    return np.asarray(jax.nn.sigmoid(self.outputs(batch).fine_logits))

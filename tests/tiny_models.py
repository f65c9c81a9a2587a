"""Tiny models of every kind, written as real orbax checkpoints into a workdir, for tests of tag, explain and eval.

  config = save_tiny_model(tmp_path / "w", "spec", "attention")
  tagger = flaxtag.Tagger.load(tmp_path / "w")

Sizes: conv_channels=2 and a 16-wide, 2-layer, 2-head encoder; they compile and run in seconds on a CPU.
"""
import jax
import numpy as np

from configs import base
from flaxtag import checkpoint
from flaxtag.hierarchy import Hierarchy
from flaxtag.models import tagger

TAG_NAMES = ("guitar", "piano", "drums", "violin", "vocal")
# A hierarchy over instrument tags; its fine order is the order of HIERARCHICAL_TAGS.
HIERARCHY = {"strings": ["guitar", "violin", "cello"], "keys": ["piano", "organ"], "percussion": ["drums"]}
HIERARCHICAL_TAGS = ("guitar", "piano", "drums", "violin", "cello", "organ")


def tiny_config(frontend: str = "spec", backend: str = "attention", head: str = "flat", num_tags: int = 5,
                width: int = 16):
  """The base config shrunk to a tiny model of the given kind."""
  config = base.get_config()
  config.model.update(frontend=frontend, backend=backend, head=head, num_tags=num_tags, conv_channels=2)
  config.model.encoder.update(width=width, num_layers=2, num_heads=2, mlp_dim=2 * width)
  config.model.head_options.resatt_dim = 4
  return config


def random_variables(model, seed: int = 0) -> dict:
  """Random variables of the model's shapes, drawn in numpy by name: XLA takes ~15 s to compile `model.init` on a
  CPU, and tests need many models.

  Kernels are normal with variance 1/fan-in (LeCun), biases small, norm scales 1, ResAtt's λ 1. BatchNorm statistics
  are moved away from (0, 1), the input BatchNorm's to those of log-mel dB values, so that inference-mode
  normalisation is exercised and activations (and attention) are not saturated.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = str(path[-1].key), leaf.shape
    if name == "kernel":
      value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
    elif name == "bias":
      value = rng.normal(0, 0.02, shape)
    elif name == "scale":
      value = rng.uniform(0.8, 1.2, shape)
    elif name == "lambda":
      value = np.ones(shape)
    elif name in ("queries", "keys"):
      value = rng.normal(0, 1, shape)
    elif name == "mean":
      value = np.full(shape, -40.0) if "input_bn" in str(path) else rng.normal(0, 0.1, shape)
    elif name == "var":
      value = np.full(shape, 400.0) if "input_bn" in str(path) else rng.uniform(0.5, 1.5, shape)
    else:  # learned [CLS], position table
      value = rng.normal(0, 0.02, shape)
    return value.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, tagger.abstract_variables(model))


def save_tiny_model(workdir, frontend: str = "spec", backend: str = "attention", head: str = "flat",
                    hierarchy: dict | None = None, tag_names=None, seed: int = 0, step: int = 0, width: int = 16,
                    half_precision: bool = False):
  """Builds a tiny model with `random_variables(model, seed)` and saves it as checkpoint `step` of `workdir`.

  hierarchy: {coarse: [fine, ...]}; its fine tags (or `tag_names`, which then must hold all of them) are the tags.
  half_precision: the run's `config.half_precision` (the variables are float32 either way).
  Returns (config, variables).
  """
  if tag_names is None:
    tag_names = HIERARCHICAL_TAGS if hierarchy else TAG_NAMES
  tag_names = list(tag_names)
  parsed = Hierarchy.from_mapping(hierarchy, fine_tags=tag_names) if hierarchy else None
  config = tiny_config(frontend, backend, head, len(tag_names), width)
  config.half_precision = half_precision
  model = tagger.build_model(config.model, parsed)
  variables = random_variables(model, seed)
  metadata = {"tag_names": tag_names}
  if hierarchy:
    metadata["hierarchy"] = {coarse: list(fine) for coarse, fine in hierarchy.items()}
  manager = checkpoint.open_manager(workdir)
  checkpoint.save(manager, step, variables=variables, config=config, metadata=metadata)
  manager.wait_until_finished()
  manager.close()
  return config, variables

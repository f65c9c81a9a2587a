"""Layer table of the model a config describes: output shape and parameters of every module.

  python -m flaxtag.summary --config configs/mtat.py:spec_att [--config.model.conv_channels=8] [--depth 2]

A hierarchical head's size depends on the tag hierarchy, taken as training takes it: `model.hierarchy_file`, else
the dataset's, from its build or, before it is built, from the file data_prep ships with it.
"""
import os

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from flaxtag import cli, input_pipeline
from flaxtag.errors import ConfigError, DatasetError
from flaxtag.hierarchy import Hierarchy, load_hierarchy
from flaxtag.models import heads, tagger

DATA_PREP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_prep")


def _walk(tree, prefix=()):
  """(path tuple, leaf) of a nested dict."""
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, "items"):
      yield from _walk(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def _shapes(output) -> str:
  """'(1, 256, 512)' for an array; the shapes of every array for a module that returns several."""
  return ", ".join(str(tuple(leaf.shape)) for leaf in jax.tree.leaves(output))


def layer_rows(model: tagger.MusicTagger, depth: int) -> list[tuple[str, str, int]]:
  """(module path, output shape for one crop, parameter count) for modules up to `depth` levels deep."""
  example = jax.ShapeDtypeStruct((1, tagger.crop_samples(model)), jnp.float32)
  variables = tagger.abstract_variables(model)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]), variables, example)
  rows = {}  # path → [output shape, parameters]
  for keys, leaf in _walk(state["intermediates"]):
    if keys[-1] == "__call__" and 0 < len(keys) - 1 <= depth and "Dropout" not in keys[-2]:
      rows.setdefault("/".join(keys[:-1]), [_shapes(leaf[0]), 0])  # leaf: the outputs of each call
  for keys, leaf in _walk(variables["params"]):
    for d in range(1, min(depth, len(keys) - 1) + 1):
      rows.setdefault("/".join(keys[:d]), ["", 0])[1] += leaf.size
  stage = {"frontend": 0, "backend": 1, "head": 2}  # intermediates come back key-sorted; show data-flow order
  ordered = sorted(rows, key=lambda name: stage.get(name.split("/")[0], 3))
  return [(name, *rows[name]) for name in ordered]


def summary_text(model: tagger.MusicTagger, depth: int = 2) -> str:
  rows = layer_rows(model, depth)
  width = max(len(r[0]) for r in rows) + 2
  lines = [f"{model.frontend} front-end + {model.backend} back-end, head '{model.head}', c={model.conv_channels}, "
           f"{model.num_tags} tags; output shapes for one {tagger.crop_samples(model):,}-sample crop",
           f"{'module':<{width}}{'output':<24}{'parameters':>12}"]
  lines += [f"{name:<{width}}{shape:<24}{count:>12,}" for name, shape, count in rows]
  variables = tagger.abstract_variables(model)
  stats = tagger.count_parameters(variables.get("batch_stats", {}))
  lines.append(f"BatchNorm statistics (not trained): {stats:,}")
  lines.append(f"trainable parameters: {tagger.count_parameters(variables['params'])}")
  return "\n".join(lines)


def hierarchy_for(config: ml_collections.ConfigDict) -> Hierarchy | None:
  """The tag hierarchy a hierarchical head of `config` is built with (None for the flat head, which has no
  coarse parameters)."""
  if config.model.hierarchy_file:
    return load_hierarchy(config.model.hierarchy_file)
  if not heads.needs_hierarchy(config.model.head):
    return None
  try:
    hierarchy = input_pipeline.dataset_info(config.data.data_dir, config.data.name).hierarchy
  except DatasetError:
    shipped = os.path.join(DATA_PREP, config.data.name.split("/")[0], input_pipeline.HIERARCHY_FILE)
    hierarchy = load_hierarchy(shipped) if os.path.exists(shipped) else None
  if hierarchy is None:
    raise ConfigError(f"model.head={config.model.head!r} needs a tag hierarchy and {config.data.name} has none "
                      "(or is not built); set model.hierarchy_file to a JSON/YAML file mapping coarse → fine tags.")
  return hierarchy


def main(argv):
  del argv
  config = flags.FLAGS.config
  print(summary_text(tagger.build_model(config.model, hierarchy_for(config)), flags.FLAGS.depth))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  flags.DEFINE_integer("depth", 2, "How many levels of modules to list.")
  flags.mark_flag_as_required("config")
  cli.run(main)

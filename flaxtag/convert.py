"""Import a state_dict of the reference PyTorch implementation of method A into a flaxtag checkpoint.

  python -m flaxtag.convert REF.pth --config configs/mtat.py:raw_cnnl --workdir runs/lee_lee

The config must describe the same architecture (front-end, back-end, conv_channels, number of tags); every tensor
of the file must land on a parameter of the model and every parameter must be filled, else nothing is written.
Key layout: ../shared/reference/torch_state_dict_layout.tsv.
"""
import dataclasses
import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from data_prep.msd import msd
from data_prep.mtat import mtat
from flaxtag import checkpoint, cli
from flaxtag.errors import CheckpointError
from flaxtag.models import tagger
from flaxtag.torch_state_dict import load_state_dict


@dataclasses.dataclass(frozen=True)
class Rule:
  torch_prefix: str  # e.g. 'front_end.init_conv.conv'
  flax_path: tuple[str, ...]  # module path under params / batch_stats
  kind: str  # 'conv', 'dense', 'bn', 'ln', 'qkv'


def _conv_bn(torch_prefix, flax_path, conv="conv", bn="bn"):
  return [Rule(f"{torch_prefix}.{conv}", (*flax_path, "conv"), "conv"), Rule(f"{torch_prefix}.{bn}", (*flax_path, "bn"), "bn")]


def _attention_rules(model: tagger.MusicTagger) -> list[Rule]:
  rules = []
  for layer in range(model.encoder.num_layers):
    src, dst = f"back_end.encoder.layer.{layer}", ("backend", f"layer_{layer}")
    rules += [Rule(f"{src}.attention.self", (*dst, "qkv"), "qkv"),
              Rule(f"{src}.attention.output.dense", (*dst, "attention_out"), "dense"),
              Rule(f"{src}.attention.output.LayerNorm", (*dst, "attention_norm"), "ln"),
              Rule(f"{src}.intermediate.dense", (*dst, "mlp_in"), "dense"),
              Rule(f"{src}.output.dense", (*dst, "mlp_out"), "dense"),
              Rule(f"{src}.output.LayerNorm", (*dst, "mlp_norm"), "ln")]
  return rules + [Rule("back_end.pooler.dense", ("backend", "pooler"), "dense")]


def _pons_rules(model: tagger.MusicTagger) -> list[Rule]:
  del model  # one layout whatever the config
  rules = []
  for i in range(3):
    rules += [Rule(f"back_end.conv{i + 1}", ("backend", f"conv_{i}", "conv"), "conv"),
              Rule(f"back_end.bn{i + 1}", ("backend", f"conv_{i}", "bn"), "bn")]
  return rules + [Rule("back_end.dense", ("backend", "dense"), "dense"),
                  Rule("back_end.bn4", ("backend", "dense_bn"), "bn")]


def _sample_rules(model: tagger.MusicTagger) -> list[Rule]:
  del model  # one layout whatever the config
  # The reference keeps all nine blocks and the 1×1 conv in its front_end.
  rules = [r for i in range(4, 9) for r in _conv_bn(f"front_end.convs.{i}", ("backend", f"block_{i}"))]
  return rules + _conv_bn("front_end.conv1x1", ("backend", "projection"))


# The reference implementation's layout of each of its back-ends (`backends.BACKENDS` names); a back-end it does not
# have has no entry, and cannot be converted.
BACKEND_RULES = {"attention": _attention_rules, "cnn_p": _pons_rules, "cnn_l": _sample_rules}


def reference_rules(model: tagger.MusicTagger) -> list[Rule]:
  """How each module of the reference implementation maps onto this model's variables."""
  if model.backend not in BACKEND_RULES:
    raise CheckpointError(f"the reference implementation has no {model.backend!r} back-end; it has "
                          f"{sorted(BACKEND_RULES)}.")
  projected = tagger.has_attention(model)  # the front-end's 1×1 conv to the encoder's width
  rules = []
  if model.frontend == "spec":
    rules.append(Rule("front_end.input_bn", ("frontend", "input_bn"), "bn"))
    for i in range(6):
      rules += [Rule(f"front_end.layers.{i}.conv", ("frontend", f"timbre_{i}"), "conv"),
                Rule(f"front_end.layers.{i}.bn", ("frontend", f"timbre_{i}", "bn"), "bn")]
    for i in range(4):
      rules += _conv_bn(f"front_end.layers.{i + 6}", ("frontend", f"temporal_{i}"))
    if projected:
      rules += [Rule("front_end.conv1x1", ("frontend", "projection", "conv"), "conv"),
                Rule("front_end.bn", ("frontend", "projection", "bn"), "bn")]
  else:
    rules += _conv_bn("front_end.init_conv", ("frontend", "init_conv"))
    rules += [r for i in range(4) for r in _conv_bn(f"front_end.convs.{i}", ("frontend", f"block_{i}"))]
    if projected:
      rules += _conv_bn("front_end.conv1x1", ("frontend", "projection"))
  rules += BACKEND_RULES[model.backend](model)
  rules.append(Rule("classifier", ("head", "fine"), "dense"))
  return rules


def _conv_kernel(w):
  # PyTorch (out, in, k) or (out, in, h, w) → Flax (k, in, out) or (h, w, in, out).
  return np.moveaxis(w, (0, 1), (-1, -2))


def convert_state_dict(state_dict: dict[str, np.ndarray], model: tagger.MusicTagger, source="state_dict"):
  """Returns {'params', 'batch_stats'} for `model` holding the reference weights; raises CheckpointError if any
  tensor is left over or any variable unfilled or of another shape."""
  params, stats, used = {}, {}, set()

  def take(key):
    if key not in state_dict:
      raise CheckpointError(
          f"{source}: has no tensor '{key}', which the {model.frontend}+{model.backend} model needs. Does the "
          "config's model.frontend/backend match the file's architecture?")
    used.add(key)
    return np.asarray(state_dict[key], np.float32)

  def put(tree, path, value):
    for name in path[:-1]:
      tree = tree.setdefault(name, {})
    tree[path[-1]] = value

  for rule in reference_rules(model):
    p, path = rule.torch_prefix, rule.flax_path
    if rule.kind == "conv":
      put(params, (*path, "kernel"), _conv_kernel(take(f"{p}.weight")))
      put(params, (*path, "bias"), take(f"{p}.bias"))
    elif rule.kind == "dense":
      put(params, (*path, "kernel"), take(f"{p}.weight").T)
      put(params, (*path, "bias"), take(f"{p}.bias"))
    elif rule.kind in ("bn", "ln"):
      put(params, (*path, "scale"), take(f"{p}.weight"))
      put(params, (*path, "bias"), take(f"{p}.bias"))
      if rule.kind == "bn":
        put(stats, (*path, "mean"), take(f"{p}.running_mean"))
        put(stats, (*path, "var"), take(f"{p}.running_var"))
        used.add(f"{p}.num_batches_tracked")
    elif rule.kind == "qkv":
      parts = ("query", "key", "value")
      put(params, (*path, "kernel"), np.concatenate([take(f"{p}.{n}.weight").T for n in parts], axis=1))
      put(params, (*path, "bias"), np.concatenate([take(f"{p}.{n}.bias") for n in parts]))
  left_over = sorted(set(state_dict) - used)
  if left_over:
    raise CheckpointError(
        f"{source}: {len(left_over)} tensors have no place in the {model.frontend}+{model.backend} model, e.g. "
        f"{left_over[:5]}. Does the config describe the file's architecture?")
  variables = {"params": params, "batch_stats": stats}
  checkpoint.check_tree_fits(variables, tagger.abstract_variables(model), source)
  return variables


# The reference models of method A were trained on these datasets; their outputs follow these tag orders.
REFERENCE_TAGS = {"mtat": mtat.TOP50, "msd": msd.TAGS}


def convert(reference_path, config, workdir, tag_names=None):
  """Reads REF.pth, converts it for the model of `config`, and writes step 0 of an orbax checkpoint in workdir.

  Tag names: `tag_names`, else those of `config.data.name` (MTAT or MSD top-50), which `eval` checks against the
  dataset it evaluates on.
  """
  model = tagger.build_model(config.model)
  variables = convert_state_dict(load_state_dict(reference_path), model, source=os.fspath(reference_path))
  manager = checkpoint.open_manager(workdir)
  if manager.all_steps():
    raise CheckpointError(f"{workdir} already holds checkpoints {manager.all_steps()}; choose an empty workdir.")
  tag_names = tag_names or list(REFERENCE_TAGS.get(config.data.name.split("/")[0], ()))
  if tag_names and len(tag_names) != model.num_tags:
    raise CheckpointError(f"{len(tag_names)} tag names for a model of {model.num_tags} tags; pass --tags.")
  metadata = {"source": f"converted from {os.path.abspath(reference_path)}", "tag_names": tag_names or None}
  checkpoint.save(manager, 0, variables=jax.tree_util.tree_map(np.asarray, variables), config=config,
                  metadata=metadata)
  manager.wait_until_finished()
  manager.close()
  return variables


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m flaxtag.convert REF.pth --config CONFIG --workdir OUT")
  f = flags.FLAGS
  tag_names = None
  if f.tags:
    with open(f.tags) as tags_file:
      tag_names = [line.strip() for line in tags_file if line.strip()]
  variables = convert(argv[1], f.config, f.workdir, tag_names)
  n = tagger.count_parameters(variables["params"])
  print(f"converted {argv[1]} ({n:,} parameters) → {checkpoint.checkpoint_dir(f.workdir)}/0", file=sys.stdout)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file describing the reference architecture.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory for the orbax checkpoint.", required=True)
  flags.DEFINE_string("tags", None, "Optional text file of tag names, one per line, in output order.")
  flags.mark_flag_as_required("config")
  cli.run(main)

"""Orbax checkpoints of a run's workdir: model variables, the config, and metadata, saved together.

Layout: `WORKDIR/checkpoints/<step>/{model, config, metadata, ...}`. The config (the single description of the
run) and metadata (tag names, hierarchy, provenance) travel with every checkpoint, so `eval`, `tag` and `explain`
need only the workdir. Items are separate so that inference restores the model variables without the optimizer.

Checkpoints do not depend on the topology that wrote them: every restore names its target shardings, built from
the reading program's own devices (`restore_targets`), so a run saved on 8 devices or 2 processes restores on 1
device, 4, or another number of processes. Orbax would otherwise reuse the saved device layout and refuse it.
"""
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from flaxtag.errors import CheckpointError

MODEL = "model"  # {'params': ..., 'batch_stats': ...}
CONFIG = "config"
METADATA = "metadata"
# Validation metric by which 'best' is chosen.
BEST_METRIC = "val_roc_auc"


def checkpoint_dir(workdir) -> str:
  return os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")


def open_manager(workdir, *, read_only=False, options: ocp.CheckpointManagerOptions | None = None,
                 extra_handlers: dict[str, ocp.CheckpointHandler] | None = None) -> ocp.CheckpointManager:
  """A CheckpointManager over WORKDIR/checkpoints; 'best' ranks by the metric BEST_METRIC where one was saved."""
  directory = checkpoint_dir(workdir)
  if read_only and not os.path.isdir(directory):
    raise CheckpointError(
        f"no checkpoints in {workdir}: expected {directory}. Train with `python -m flaxtag.train --workdir ...` or "
        "import a reference model with `python -m flaxtag.convert`.")
  if options is None:
    options = ocp.CheckpointManagerOptions(read_only=read_only, create=not read_only)
  handlers = {MODEL: ocp.StandardCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler(),
              METADATA: ocp.JsonCheckpointHandler(), **(extra_handlers or {})}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, *, variables, config: ml_collections.ConfigDict,
         metadata: dict, metrics: dict | None = None, extra_items: dict[str, ocp.args.CheckpointArgs] | None = None):
  """Saves model variables, config and metadata (plus any extra items, e.g. optimizer state) as one step."""
  items = {
      MODEL: ocp.args.StandardSave(variables),
      CONFIG: ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
      METADATA: ocp.args.JsonSave(metadata),
      **(extra_items or {}),
  }
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)


def resolve_step(manager: ocp.CheckpointManager, which: str | int = "best") -> int:
  """'latest', 'best' (by BEST_METRIC; the latest where no step has metrics) or a step number."""
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"no checkpoint steps under {manager.directory}.")
  if which == "latest":
    return manager.latest_step()
  if which == "best":
    scored = {s: m[BEST_METRIC] for s in steps
              if (m := _step_metrics(manager, s)) and m.get(BEST_METRIC) is not None}
    return max(scored, key=scored.get) if scored else manager.latest_step()
  try:
    step = int(which)
  except ValueError:
    raise CheckpointError(f"checkpoint {which!r}: use 'best', 'latest' or a step number.") from None
  if step not in steps:
    raise CheckpointError(f"no checkpoint at step {step} under {manager.directory}; steps are {sorted(steps)}.")
  return step


def _step_metrics(manager, step):
  # The `metrics` item orbax writes beside the others when the manager has a best_fn (train._manager sets one).
  path = os.path.join(os.fspath(manager.directory), str(step), "metrics", "metrics")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def restore_targets(abstract_tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Shape/dtype structs of `abstract_tree` placed on `sharding`: what a restore builds, whatever wrote it."""
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_tree)


def restore(manager: ocp.CheckpointManager, step: int, items: dict[str, ocp.args.CheckpointArgs]) -> dict:
  """Restores the named items of a step. A missing or unreadable item is one CheckpointError naming the step's
  directory, never an orbax traceback."""
  step_dir = _require_items(manager, step, items)
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax/tensorstore raise many types for one cause: the files are not what they should be
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(f"{step_dir} could not be read ({type(e).__name__}: {reason}). Use another step "
                          "(--checkpoint STEP) or start a new workdir.") from e


def _require_items(manager: ocp.CheckpointManager, step: int, names) -> epath.Path:
  step_dir = epath.Path(manager.directory) / str(step)
  missing = [name for name in names if not (step_dir / name).exists()]
  if missing:
    raise CheckpointError(
        f"{step_dir} has no {' and no '.join(missing)} item: it was not written by a flaxtag run that can be read "
        f"this way (e.g. `convert` writes no optimizer state). Use another step or start a new workdir.")
  return step_dir


def load_config(manager: ocp.CheckpointManager, step: int) -> tuple[ml_collections.ConfigDict, dict]:
  """The config and metadata saved with a step."""
  restored = restore(manager, step, {CONFIG: ocp.args.JsonRestore(), METADATA: ocp.args.JsonRestore()})
  return ml_collections.ConfigDict(restored[CONFIG]), dict(restored[METADATA])


def item_shapes(manager: ocp.CheckpointManager, step: int, item: str) -> Any:
  """The tree of array metadata (shapes) an item of a step holds, read without restoring it."""
  _require_items(manager, step, [item])
  try:
    return manager.item_metadata(step)[item]
  except Exception as e:  # as in `restore`
    raise CheckpointError(f"{epath.Path(manager.directory) / str(step) / item} could not be read "
                          f"({type(e).__name__}: {e}).") from e


def restore_variables(manager: ocp.CheckpointManager, step: int, abstract_variables: Any,
                      sharding: jax.sharding.Sharding | None = None):
  """Restores model variables onto `sharding` (default: this process's first device), first checking every array
  against the model's shapes (a clear error if not)."""
  check_tree_fits(item_shapes(manager, step, MODEL), abstract_variables,
                  f"checkpoint {manager.directory}/{step}")
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return restore(manager, step, {MODEL: ocp.args.StandardRestore(restore_targets(abstract_variables, sharding))}
                 )[MODEL]


def check_tree_fits(stored: Any, expected: Any, where: str):
  """Raises CheckpointError listing keys missing, unexpected, or of another shape in `stored` vs `expected`."""
  stored_shapes = _shapes(stored)
  expected_shapes = _shapes(expected)
  problems = [f"missing {k} {v}" for k, v in expected_shapes.items() if k not in stored_shapes]
  problems += [f"unexpected {k} {v}" for k, v in stored_shapes.items() if k not in expected_shapes]
  problems += [f"{k}: stored {stored_shapes[k]}, model needs {v}" for k, v in expected_shapes.items()
               if k in stored_shapes and stored_shapes[k] != v]
  if problems:
    listed = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
    raise CheckpointError(
        f"{where} does not fit the model described by its config ({len(problems)} problems):\n  {listed}\n"
        "Check model.frontend/backend/conv_channels/num_tags/head against the run that wrote the checkpoint.")


def _shapes(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape) for path, leaf in leaves}

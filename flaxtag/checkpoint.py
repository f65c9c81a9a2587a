"""Orbax checkpoints of a run's workdir: every item flaxtag writes, how steps are kept, chosen, saved and read.

Layout: `WORKDIR/checkpoints/<step>/{model, config, metadata, optimizer, data_iterator, metrics, checksums.json}`
(optimizer and data_iterator from training only). The config (the single description of the run) and metadata
(tag names, hierarchy, provenance) travel with every checkpoint, so `eval`, `tag` and `explain` need only the
workdir. Items are separate so that inference restores the model variables without the optimizer. 'best' is
orbax's best step by the validation metric saved with each step (`open_manager`'s best_fn).

Checkpoints do not depend on the topology that wrote them: every restore names its target shardings, built from
the reading program's own devices (`restore_targets`), so a run saved on 8 devices or 2 processes restores on 1
device, 4, or another number of processes. Orbax would otherwise reuse the saved device layout and refuse it.

Checkpoints defend themselves. Every saved step holds `checksums.json`, the size and sha256 of each file of its
items, written after orbax has finalised the step's files and before it commits the step (so a committed step
always has one). Orbax 0.12.8 has no option that verifies array data: its zarr3 format checksums only the shard
index, not the chunks. `read_step` checks a step against its checksums before reading it; a step that fails for
any reason (a file changed, cut short or missing, an item missing, orbax unable to read it) is damaged, and for
'best' and 'latest' the newest intact step is read instead, after one message naming the damaged step. A save
that fails (a full disk, an I/O error) is one `SaveError` saying what failed, where, and how much space a step
needs; earlier steps are untouched.
"""
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from flaxtag.errors import CheckpointError
from flaxtag.sharding import barrier

T = TypeVar("T")

MODEL = "model"  # {'params': ..., 'batch_stats': ...}
CONFIG = "config"
METADATA = "metadata"
OPTIMIZER = "optimizer"  # {'step', 'opt_state'}: written by training only
DATA_ITERATOR = "data_iterator"  # the grain iterator state (JSON): written by training only
DAMAGED_DIR = "damaged_checkpoints"  # in the workdir: steps a resumed run set aside because they could not be read
# Validation metric by which 'best' is chosen.
BEST_METRIC = "val_roc_auc"
# In each step directory: {"files": {path relative to the step: {"bytes": n, "sha256": hex}}} of its items' files.
CHECKSUMS = "checksums.json"


class DamagedStepError(CheckpointError):
  """A step's files are not those that were saved; the message is the reason, the caller names the step."""


class SaveError(CheckpointError):
  """A step could not be saved (a full disk, an I/O error); the steps saved before it are untouched."""

  def __init__(self, message: str, step: int, saved_steps: list[int]):
    super().__init__(message)
    self.step = step
    self.saved_steps = saved_steps


class Manager(ocp.CheckpointManager):
  """Orbax's CheckpointManager, whose saved steps carry checksums and whose failed saves are one SaveError.

  Saves are asynchronous: a failure shows when the next save starts or at `wait_until_finished`/`close`, and
  names the step that failed.
  """

  def __init__(self, directory, *, options: ocp.CheckpointManagerOptions, item_handlers):
    self._saving_step = None
    self._failure_reported = False
    if not options.read_only:
      if jax.default_backend() == "cpu":
        _save_cpu_arrays_from_one_replica()
      options = dataclasses.replace(options, async_options=ocp.AsyncOptions(
          post_finalization_callback=self._write_checksums))
      # Orbax logs a failed write from each of its threads (hundreds of lines); the failure reaches the caller as
      # one SaveError instead.
      for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_drop_orbax_save_errors)
      _quiet_abandoned_async_writes()
    super().__init__(directory, options=options, item_handlers=item_handlers)

  def save(self, step: int, *args, **kwargs) -> bool:
    self.wait_until_finished()  # the previous save's failure is its own, and the checksums need its step number
    self._check_space(step)
    self._saving_step = step
    try:
      return super().save(step, *args, **kwargs)
    except Exception as e:  # orbax and tensorstore raise many types for one cause: the step was not written
      raise self._save_failed(step, e) from e

  def wait_until_finished(self):
    try:
      super().wait_until_finished()
    except Exception as e:  # as in `save`
      if self._failure_reported:  # orbax raises it again at every wait; it was reported once
        return
      raise self._save_failed(self._saving_step, e) from e

  def close(self):
    try:
      super().close()
    except Exception:  # pylint: disable=broad-except
      if not self._failure_reported:
        raise

  def _write_checksums(self):
    # Orbax calls this in process 0 once all processes have written the step into `<step>.orbax-checkpoint-tmp`,
    # just before it renames that directory to `<step>`.
    tmp_dirs = list(epath.Path(self.directory).glob(f"{self._saving_step}{ocp.path.step.TMP_DIR_SUFFIX}*"))
    if len(tmp_dirs) != 1:
      raise RuntimeError(f"expected one directory being saved for step {self._saving_step}, found {tmp_dirs}")
    step_dir = os.fspath(tmp_dirs[0])
    with open(os.path.join(step_dir, CHECKSUMS), "w") as f:
      json.dump({"files": _file_checksums(step_dir)}, f, indent=0)

  def _check_space(self, step: int):
    """Refuses a save that cannot fit, taking the largest saved step as the size of this one (an estimate: the
    sizes of compressed steps differ a little); orbax's failure in mid-write would leave a partial step."""
    need = max((_bytes_under(self._step_dir(s)) for s in self.all_steps()), default=0)
    free = shutil.disk_usage(self.directory).free
    if need > free:
      raise self._error(step, "not enough free space to start it")

  def _save_failed(self, step: int, error: Exception) -> SaveError:
    self._failure_reported = True
    text = str(error)
    reason = ("no space left on device" if "No space left on device" in text or "RESOURCE_EXHAUSTED" in text
              else f"{type(error).__name__}: {_first_line(text)}")
    # The partial step would hold the space that the next attempt needs; orbax would remove it then anyway.
    if jax.process_index() == 0:
      for tmp_dir in epath.Path(self.directory).glob(f"{step}{ocp.path.step.TMP_DIR_SUFFIX}*"):
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return self._error(step, reason)

  def _error(self, step: int, reason: str) -> SaveError:
    saved = sorted(s for s in self.all_steps() if s != step)
    sizes = {s: _bytes_under(self._step_dir(s)) for s in saved}
    largest = max(sizes, key=sizes.get) if sizes else None
    need = (f"A step needs about {_megabytes(sizes[largest])} (the size of step {largest}); "
            if largest is not None else "")
    free = _megabytes(shutil.disk_usage(self.directory).free)
    kept = (f"The saved steps ({', '.join(map(str, saved))}) are untouched: free space and rerun the same command "
            f"to resume from step {saved[-1]}." if saved else "No earlier step was saved.")
    return SaveError(f"saving checkpoint step {step} to {self.directory} failed: {reason}. {need}{free} free "
                     f"there. {kept}", step, saved)

  def _step_dir(self, step: int) -> str:
    return os.path.join(os.fspath(self.directory), str(step))


@functools.cache  # once per process: each writer would otherwise wrap the hooks again
def _quiet_abandoned_async_writes():
  """When a write fails (a full disk), tensorstore's threads may still post results to the event loop of orbax's
  abandoned save, each printing 'RuntimeError: Event loop is closed' with a traceback (through sys.excepthook, from
  native code) around the one error line that reports the failure; drop just those."""
  default_except, default_unraisable, default_thread = sys.excepthook, sys.unraisablehook, threading.excepthook

  def abandoned(error) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"

  sys.excepthook = lambda kind, error, tb: None if abandoned(error) else default_except(kind, error, tb)
  sys.unraisablehook = lambda hook: None if abandoned(hook.exc_value) else default_unraisable(hook)
  threading.excepthook = lambda hook: None if abandoned(hook.exc_value) else default_thread(hook)


def _drop_orbax_save_errors(record: logging.LogRecord) -> bool:
  return not (record.levelno >= logging.ERROR and ("/orbax/" in record.pathname or "asyncio" in record.name))


def _file_checksums(step_dir: str) -> dict[str, dict]:
  """Size and sha256 of every file in the item directories of a step (not orbax's step-level bookkeeping, which
  it rewrites when it commits the step)."""
  files = {}
  for item in sorted(os.listdir(step_dir)):
    for root, _, names in os.walk(os.path.join(step_dir, item)):
      for name in sorted(names):
        path = os.path.join(root, name)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
          while chunk := f.read(1 << 20):  # hashlib.file_digest needs Python 3.11; flaxtag runs on 3.10
            digest.update(chunk)
        files[os.path.relpath(path, step_dir)] = {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}
  return files


def verify(manager: ocp.CheckpointManager, step: int):
  """Raises DamagedStepError where a file of the step differs from its checksum. Steps saved before flaxtag
  wrote checksums have none to check."""
  step_dir = os.path.join(os.fspath(manager.directory), str(step))
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      expected = json.load(f)["files"]
  except (OSError, ValueError, KeyError) as e:
    raise DamagedStepError(f"its {CHECKSUMS} cannot be read ({e})") from None
  missing_items = sorted({name.split(os.sep)[0] for name in expected} - set(os.listdir(step_dir)))
  if missing_items:
    raise DamagedStepError(f"it has no {' and no '.join(missing_items)} item")
  actual = _file_checksums(step_dir)
  for name, saved in expected.items():
    if name not in actual:
      raise DamagedStepError(f"{name} is missing")
    if actual[name]["bytes"] != saved["bytes"]:
      raise DamagedStepError(f"{name} has {actual[name]['bytes']} bytes, {saved['bytes']} were saved")
    if actual[name]["sha256"] != saved["sha256"]:
      raise DamagedStepError(f"{name} differs from the file saved (sha256 mismatch)")


@functools.cache
def _save_cpu_arrays_from_one_replica():
  """Orbax saves a replicated array replica-parallel by default, but on GPUs: one slice per device, each cut by a
  small computation of its own. CPU devices share one memory, so nothing is written in parallel, and a save held
  training up 3-6 times longer (Spec+Att on 8 devices: 7.3-7.9 s the first time, 1 s after, against 0.8 and 0.16 s;
  BENCHMARKS.md). Orbax's handler, with that one setting off."""
  handler = copy.copy(ocp.type_handlers.get_type_handler(jax.Array))
  handler._use_replica_parallel = False  # pylint: disable=protected-access  # the constructor's use_replica_parallel
  ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def checkpoint_dir(workdir) -> str:
  return os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")


def _best_metric(metrics: dict) -> float:
  value = metrics.get(BEST_METRIC)
  return -math.inf if value is None else value  # a validation that gave no score (one class only) ranks last


def open_manager(workdir, *, read_only=False, keep_latest: int | None = None) -> ocp.CheckpointManager:
  """A CheckpointManager over WORKDIR/checkpoints that knows every item flaxtag writes. 'best' ranks steps by the
  metric BEST_METRIC saved with them (orbax's best_fn: it also reads the metrics of earlier runs back).

  keep_latest: a writer's retention: the latest `keep_latest` steps and the best are kept (None: every step).
  """
  directory = checkpoint_dir(workdir)
  if read_only and not os.path.isdir(directory):
    raise CheckpointError(
        f"no checkpoints in {workdir}: expected {directory}. Train with `python -m flaxtag.train --workdir ...` or "
        "import a reference model with `python -m flaxtag.convert`.")
  policy = None
  if keep_latest is not None:
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(keep_latest),
        ocp.checkpoint_managers.BestN(get_metric_fn=_best_metric, reverse=False, n=1,
                                      keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(read_only=read_only, create=not read_only, preservation_policy=policy,
                                         enable_async_checkpointing=not read_only, best_fn=_best_metric,
                                         best_mode="max")
  handlers = {MODEL: ocp.StandardCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler(),
              METADATA: ocp.JsonCheckpointHandler(), OPTIMIZER: ocp.StandardCheckpointHandler(),
              DATA_ITERATOR: ocp.JsonCheckpointHandler()}
  return Manager(directory, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, *, variables, config: ml_collections.ConfigDict,
         metadata: dict, metrics: dict | None = None, optimizer: dict | None = None,
         data_iterator_state: dict | None = None):
  """Saves model variables, config and metadata as one step; training adds its optimizer ({'step', 'opt_state'})
  and data-iterator state, and the validation metrics by which 'best' is chosen."""
  items = {
      MODEL: ocp.args.StandardSave(variables),
      CONFIG: ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
      METADATA: ocp.args.JsonSave(metadata),
  }
  if optimizer is not None:
    items[OPTIMIZER] = ocp.args.StandardSave(optimizer)
  if data_iterator_state is not None:
    items[DATA_ITERATOR] = ocp.args.JsonSave(data_iterator_state)
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)


def resolve_step(manager: ocp.CheckpointManager, which: str | int = "best") -> int:
  """'latest', 'best' (by BEST_METRIC) or a step number. Where no step has a validation score, 'best' is the
  latest step, and says so when there was a choice."""
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"no checkpoint steps under {manager.directory}.")
  if which == "latest":
    return manager.latest_step()
  if which == "best":
    best = manager.best_step()
    if best is None:
      best = manager.latest_step()
      if len(steps) > 1 and jax.process_index() == 0:
        print(f"no checkpoint under {manager.directory} has a validation score; 'best' is the latest, step {best}",
              file=sys.stderr, flush=True)
    return best
  try:
    step = int(which)
  except ValueError:
    raise CheckpointError(f"checkpoint {which!r}: use 'best', 'latest' or a step number.") from None
  if step not in steps:
    raise CheckpointError(f"no checkpoint at step {step} under {manager.directory}; steps are {sorted(steps)}.")
  return step


def read_step(manager: ocp.CheckpointManager, which: str | int, read: Callable[[int], T]) -> tuple[int, T]:
  """The step `which` names (see `resolve_step`) and `read(step)`, after checking the step's checksums.

  For 'best' and 'latest', a damaged step (`DamagedStepError` from the checks or from `read`) is named in one
  message on stderr and the newest intact step is read instead; a damaged step asked for by number is an error.
  """
  first = resolve_step(manager, which)
  by_number = which not in ("best", "latest")
  candidates = [first] if by_number else [first] + sorted(set(manager.all_steps()) - {first}, reverse=True)
  damaged = []
  for step in candidates:
    try:
      verify(manager, step)
      value = read(step)
    except DamagedStepError as e:
      damaged.append(f"step {step} is damaged: {e}")
      continue
    if damaged and jax.process_index() == 0:
      print(f"{'; '.join(damaged)}; using step {step}", file=sys.stderr, flush=True)
    return step, value
  if by_number:
    raise CheckpointError(f"{damaged[0]} ({manager.directory}/{first}). Use another step (steps are "
                          f"{sorted(manager.all_steps())}) or --checkpoint latest.")
  raise CheckpointError(f"no intact checkpoint under {manager.directory}: {'; '.join(damaged)}. Use another "
                        "workdir, or move the checkpoints directory away to start over.")


def restore_targets(abstract_tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Shape/dtype structs of `abstract_tree` placed on `sharding`: what a restore builds, whatever wrote it."""
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_tree)


def restore(manager: ocp.CheckpointManager, step: int, items: dict[str, ocp.args.CheckpointArgs]) -> dict:
  """Restores the named items of a step. A missing or unreadable item is a DamagedStepError (see `read_step`),
  never an orbax traceback."""
  _require_items(manager, step, items)
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax/tensorstore raise many types for one cause: the files are not what they should be
    raise DamagedStepError(f"orbax cannot read it ({type(e).__name__}: {_first_line(str(e))})") from e


def _require_items(manager: ocp.CheckpointManager, step: int, names):
  step_dir = epath.Path(manager.directory) / str(step)
  missing = [name for name in names if not (step_dir / name).exists()]
  if missing:
    raise DamagedStepError(f"it has no {' and no '.join(missing)} item")


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
    raise DamagedStepError(f"orbax cannot read its {item} item ({type(e).__name__}: {_first_line(str(e))})") from e


def restore_variables(manager: ocp.CheckpointManager, step: int, abstract_variables: Any,
                      sharding: jax.sharding.Sharding | None = None):
  """Restores model variables onto `sharding` (default: this process's first device), first checking every array
  against the model's shapes (a clear error if not)."""
  check_tree_fits(item_shapes(manager, step, MODEL), abstract_variables,
                  f"checkpoint {manager.directory}/{step}")
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return restore(manager, step, {MODEL: ocp.args.StandardRestore(restore_targets(abstract_variables, sharding))}
                 )[MODEL]


def restore_training(manager: ocp.CheckpointManager, step: int, abstract_variables: Any, abstract_optimizer: Any
                     ) -> tuple[Any, Any, dict]:
  """(variables, optimizer, data-iterator state) of a training step, restored onto the shardings of the abstract
  trees (the reading run's mesh, whatever wrote the step)."""
  check_tree_fits(item_shapes(manager, step, MODEL), abstract_variables, f"checkpoint {manager.directory}/{step}")
  restored = restore(manager, step, {MODEL: ocp.args.StandardRestore(abstract_variables),
                                     OPTIMIZER: ocp.args.StandardRestore(abstract_optimizer),
                                     DATA_ITERATOR: ocp.args.JsonRestore()})
  return restored[MODEL], restored[OPTIMIZER], restored[DATA_ITERATOR]


def set_aside_steps_after(manager: ocp.CheckpointManager, step: int, workdir) -> list[int]:
  """Moves the steps after `step` (damaged: a resume could not read them) to WORKDIR/damaged_checkpoints, so that
  the run saves those steps anew (orbax would skip a step number that exists). Returns the steps moved."""
  moved = sorted(s for s in manager.all_steps() if s > step)
  if moved and jax.process_index() == 0:
    damaged_dir = os.path.join(os.fspath(workdir), DAMAGED_DIR)
    os.makedirs(damaged_dir, exist_ok=True)
    for s in moved:
      target, n = os.path.join(damaged_dir, str(s)), 1
      while os.path.exists(target):  # the same step damaged again in a later attempt
        target, n = os.path.join(damaged_dir, f"{s}.{n}"), n + 1
      shutil.move(os.path.join(os.fspath(manager.directory), str(s)), target)
  if moved:
    barrier("damaged steps set aside")
    manager.reload()
  return moved


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


def _first_line(text: str, limit: int = 300) -> str:
  line = text.strip().splitlines()[0] if text.strip() else ""
  return line if len(line) <= limit else line[:limit] + "…"


def _bytes_under(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _megabytes(n: int) -> str:
  return f"{n / 1e6:.1f} MB"

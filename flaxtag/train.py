"""Training: `train_and_evaluate(config, workdir)` and the thin `python -m flaxtag.train` entry point.

  python -m flaxtag.train --config configs/mtat.py:spec_att --workdir runs/spec_att [--config.train.batch_size=32]

Every epoch ends with a checkpoint (model, optimizer state, data-iterator state, config, metadata: the run's tag
names and hierarchy, and the data it was trained on, `DatasetInfo.describe`), every
`train.eval_every_epochs`-th epoch and the last with a 16-crop validation first; the latest
`train.checkpoints_to_keep` and the best by validation ROC-AUC are kept. Rerunning the
same command resumes from the latest checkpoint, on any number of devices and processes, and continues exactly as
an uninterrupted run would; log records after the restored step are dropped first. A damaged latest step is
named, set aside in WORKDIR/damaged_checkpoints, and the run resumes from the newest intact step. SIGTERM (a
preemption) to any process makes every process save the same step and exit with status 0. When the optimizer
switches (Adam → SGD) or the SGD learning rate drops, training continues from the best parameters so far (SPEC §4).

One run trains in a workdir at a time (WORKDIR/train.lock, `run_lock`). A checkpoint that cannot be saved (a full
disk) stops the run with one error; its validation records in metrics.jsonl get `"checkpoint_saved": false`.
A run that looks diverged (`DivergenceWatch`) is warned about once, on stderr and in metrics.jsonl. With
`train.early_stopping_patience` = N, a run ends after N validations in a row without a better ROC-AUC than the best
so far (`EarlyStopping`); metrics.jsonl records the stop, and rerunning the command does not train further.
"""
import dataclasses
import math
import os
import signal
import sys
import time

from absl import flags
from jax.experimental import multihost_utils
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import config_flags
from tqdm import tqdm

from flaxtag import checkpoint, cli, input_pipeline, optim, run_lock, sharding
from flaxtag import eval as evaluation
from flaxtag.errors import ConfigError, FlaxtagError
from flaxtag.hierarchy import Hierarchy, LabelSelection, load_hierarchy
from flaxtag.metric_writer import MetricWriter
from flaxtag.models import heads, tagger
from flaxtag.train_step import TrainState, create_train_state, make_predict_step, make_train_step


# When to warn that a run looks diverged: for DIVERGENCE_EVALS validations in a row, the mean training loss since
# the previous validation stayed above DIVERGENCE_LOSS_FACTOR × the loss of the first step, or the validation
# ROC-AUC stayed within CHANCE_AUC_MARGIN of chance (0.5).
DIVERGENCE_EVALS = 3
DIVERGENCE_LOSS_FACTOR = 10.0
CHANCE_AUC_MARGIN = 0.02


class TrainingDiverged(FlaxtagError):
  """The loss became NaN or infinite."""


@dataclasses.dataclass
class Run:
  """Everything `train_and_evaluate` builds from the config before the first step."""
  config: ml_collections.ConfigDict
  info: input_pipeline.DatasetInfo
  tag_names: tuple[str, ...]  # the fine tags the model is trained on: the dataset's, or the hierarchy file's
  selection: LabelSelection | None  # how they are read from the dataset (None: its own labels, as stored)
  model: tagger.MusicTagger
  mesh: jax.sharding.Mesh
  local_batch_size: int
  steps_per_epoch: int
  optim_config: ml_collections.ConfigDict

  @property
  def total_steps(self) -> int:
    return self.config.train.num_epochs * self.steps_per_epoch

  @property
  def metadata(self) -> dict:
    hierarchy = self.model.hierarchy
    return {"tag_names": list(self.tag_names), "hierarchy": hierarchy.to_mapping() if hierarchy else None,
            "dataset": self.config.data.name, "data": self.info.describe("train", "valid"), "source": "flaxtag.train"}


def run_tags(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo
             ) -> tuple[tuple[str, ...], Hierarchy | None]:
  """The fine tags and hierarchy of a run: those of `model.hierarchy_file`, in its order, where it is set (a file
  naming every dataset tag keeps the dataset's order, as whole-dataset hierarchies always have); else the dataset's."""
  if not config.model.hierarchy_file:
    return info.tags, info.hierarchy
  hierarchy = load_hierarchy(config.model.hierarchy_file)
  if set(hierarchy.fine_tags) == set(info.tags):
    hierarchy = load_hierarchy(config.model.hierarchy_file, fine_tags=info.tags)
  return hierarchy.fine_tags, hierarchy


def setup(config: ml_collections.ConfigDict) -> Run:
  """Checks the config against the data and devices; fails before anything is compiled."""
  info = input_pipeline.dataset_info(config.data.data_dir, config.data.name)
  for split in ("train", "valid"):
    input_pipeline.check_split(
        info, split, "Training needs a 'train' and a 'valid' split (it validates on 'valid' to choose the best "
        "checkpoint); rebuild the dataset with clips in both (the folder builder: a 'split' column, or "
        "--valid_fraction).")
  tag_names, hierarchy = run_tags(config, info)
  selection = input_pipeline.label_selection(info, tag_names, hierarchy, source=config.model.hierarchy_file)
  if heads.needs_hierarchy(config.model.head) and hierarchy is None:
    raise ConfigError(f"model.head={config.model.head!r} needs a tag hierarchy: {config.data.name} has none; set "
                      "model.hierarchy_file to a JSON/YAML file mapping coarse → fine tags.")
  if config.model.num_tags != len(tag_names):
    where = (f"the hierarchy file {config.model.hierarchy_file} names" if config.model.hierarchy_file
             else f"{config.data.name} has")
    raise ConfigError(f"model.num_tags={config.model.num_tags} but {where} {len(tag_names)} tags; "
                      f"set --config.model.num_tags={len(tag_names)}.")
  model = tagger.build_model(config.model, hierarchy, config.half_precision)
  mesh = sharding.make_mesh()
  local_batch = sharding.check_global_batch_size(config.train.batch_size, mesh)
  sharding.check_global_batch_size(config.train.eval_batch_size, mesh, "train.eval_batch_size")
  for key in ("num_epochs", "eval_every_epochs"):
    if config.train[key] < 1:
      raise ConfigError(f"train.{key}={config.train[key]} must be at least 1.")
  if config.train.early_stopping_patience < 0:
    raise ConfigError(f"train.early_stopping_patience={config.train.early_stopping_patience} must be 0 (never stop "
                      "early) or a number of validations.")
  steps = input_pipeline.steps_per_epoch(info.split_sizes["train"], local_batch, jax.process_count())
  if steps < 1:
    raise ConfigError(f"the train split of {config.data.name} ({info.split_sizes['train']} clips) is smaller than "
                      f"one batch of train.batch_size={config.train.batch_size}.")
  return Run(config, info, tag_names, selection, model, mesh, local_batch, steps, optim.in_steps(config.optim, steps))


def _save(manager, run: Run, state: TrainState, data_iterator, metrics=None):
  checkpoint.save(manager, int(state.step), variables=state.variables, config=run.config, metadata=run.metadata,
                  metrics=metrics, optimizer={"step": state.step, "opt_state": state.opt_state},
                  data_iterator_state=data_iterator.get_state())


# What a resumed run must keep from the run it continues, and what changing it would change. Others may change:
# the device and process count (batches are global), the data's folder, the number of epochs (to extend a run).
RESUME_KEEPS = {
    "data.name": "the dataset",
    "train.batch_size": "the steps of an epoch, the learning-rate schedule and the data order",
    "seed": "the data order and the dropout masks",
}


def check_resumable(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir, step: int):
  """Raises ConfigError where `config` changes a value of RESUME_KEEPS from `saved`, the config of the step it
  would resume."""
  for key, changes in RESUME_KEEPS.items():
    before, now = saved[key], config[key]  # ConfigDict reads dotted keys
    if before != now:
      raise ConfigError(
          f"{workdir} was trained with {key}={before!r} (the config of its step {step}); resuming with {now!r} "
          f"would change {changes}. Resume with --config.{key}={before!r}, or start the run in a new --workdir.")


def _resume(manager, workdir, config, state: TrainState, data_iterator) -> TrainState:
  """The state of the newest intact step, restored onto the shardings of `state` (this run's mesh, whatever wrote
  it), after checking that `config` may continue it (`check_resumable`). Damaged newer steps are set aside, so
  that the run saves those steps anew."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  step, (variables, optimizer, iterator_state) = checkpoint.read_step(
      manager, "latest", lambda step: checkpoint.restore_training(
          manager, step, abstract.variables, {"step": abstract.step, "opt_state": abstract.opt_state}))
  check_resumable(checkpoint.load_config(manager, step)[0], config, workdir, step)
  moved = checkpoint.set_aside_steps_after(manager, step, workdir)
  if moved:
    _tell(f"moved the damaged step(s) {', '.join(map(str, moved))} to "
          f"{os.path.join(workdir, checkpoint.DAMAGED_DIR)}")
  data_iterator.set_state(iterator_state)
  return state.replace(step=optimizer["step"], params=variables["params"], batch_stats=variables["batch_stats"],
                       opt_state=optimizer["opt_state"])


def _reload_best(manager, run: Run, state: TrainState) -> TrainState:
  """The best model so far (by validation ROC-AUC; the newest intact step where the best is damaged), keeping the
  optimizer state and step."""
  manager.wait_until_finished()
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state.variables)
  best, variables = checkpoint.read_step(manager, "best", lambda step: checkpoint.restore_variables(
      manager, step, abstract, sharding.replicated(run.mesh)))
  _tell(f"optimizer stage changes after step {int(state.step)}: continuing from the best checkpoint, step {best}")
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


class StopRequests:
  """Whether a stop (SIGTERM: preemption, `scancel`, `scontrol requeue`) was requested, answered with the same
  step in every process.

  Several processes use JAX's preemption sync point (through orbax's `reached_preemption`): SIGTERM to any of them,
  at any moment, makes all of them answer True at one agreed step, so they save that step together. JAX installs
  its own SIGTERM handler for this under `jax.distributed`; a Python handler would replace it, so only a process
  alone installs one.
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self._manager = manager
    self._requested = False
    self._alone = jax.process_count() == 1
    if self._alone:
      self._previous_handler = signal.signal(signal.SIGTERM, self._request)

  def _request(self, *_):
    self._requested = True

  def reached(self, step: int) -> bool:
    """Call after every step, in every process."""
    return self._requested if self._alone else self._manager.reached_preemption(step)

  def close(self):
    if self._alone:
      signal.signal(signal.SIGTERM, self._previous_handler)


def stage_changed_in_epoch(optim_config, step: int, steps_per_epoch: int, switch_count: int) -> bool:
  """Whether the optimizer switched, or the SGD lr dropped, within the epoch that ends at `step`."""
  changes = [switch_count] + ([b for b in optim_config.sgd_lr_boundaries] if switch_count >= 0 else [])
  return any(step - steps_per_epoch < c <= step for c in changes if c >= 0)


def validate(run: Run, predict_step, state: TrainState, split: str = "valid") -> dict:
  return evaluation.evaluate_split(predict_step, state.variables, run.mesh, run.config.data.data_dir,
                                   run.config.data.name, split, run.config.train.eval_batch_size,
                                   tagger.crop_samples(run.model), run.tag_names, run.model.hierarchy,
                                   run.info.split_sizes[split], run.selection)[0]


class DivergenceWatch:
  """Tells, once per run, when training looks diverged (see DIVERGENCE_EVALS). Built from the metrics.jsonl
  records kept from earlier attempts, so that a resumed run continues the count and does not warn twice."""

  def __init__(self, records: list[dict]):
    self.first_loss = None
    self._losses = []  # since the last validation
    self._high_loss = []  # steps of the validations in a row after which the loss was high
    self._at_chance = []  # ... at which ROC-AUC was at chance
    self.warned = False
    for record in records:
      if record["kind"] == "train":
        self.train_loss(record["step"], record["loss"])
      elif record["kind"] == "valid":
        self.validated(record["step"], record["roc_auc"])
      elif record["kind"] == "warning":
        self.warned = True

  def train_loss(self, step: int, loss: float):
    if self.first_loss is None:
      self.first_loss = (step, loss)
    self._losses.append(loss)

  def validated(self, step: int, roc_auc: float | None) -> str | None:
    """The warning, the first time the run looks diverged; else None."""
    mean_loss = sum(self._losses) / len(self._losses) if self._losses else None
    self._losses = []
    high = mean_loss is not None and mean_loss > DIVERGENCE_LOSS_FACTOR * self.first_loss[1]
    self._high_loss = self._high_loss + [step] if high else []
    chance = roc_auc is not None and abs(roc_auc - 0.5) < CHANCE_AUC_MARGIN
    self._at_chance = self._at_chance + [step] if chance else []
    signs = []
    if len(self._high_loss) >= DIVERGENCE_EVALS:
      signs.append(f"the mean training loss stayed above {DIVERGENCE_LOSS_FACTOR:g}× its first value "
                   f"({self.first_loss[1]:.4g} at step {self.first_loss[0]}; now {mean_loss:.4g})")
    if len(self._at_chance) >= DIVERGENCE_EVALS:
      signs.append(f"validation ROC-AUC stayed within {CHANCE_AUC_MARGIN} of chance (now {roc_auc:.4f})")
    if not signs or self.warned:
      return None
    self.warned = True
    steps = self._high_loss if len(self._high_loss) >= DIVERGENCE_EVALS else self._at_chance
    return (f"training looks diverged: over the last {len(steps)} validations (steps "
            f"{', '.join(map(str, steps))}), {' and '.join(signs)}. Lower the learning rate (config.optim.adam_lr) "
            "or check the data.")


class EarlyStopping:
  """Counts the validations since the best validation ROC-AUC (a strictly higher one resets the count; a non-finite
  one never does). Built from the metrics.jsonl records kept from earlier attempts, so that a resumed run continues
  the count, and a run that stopped early stays stopped."""

  def __init__(self, patience: int, records: list[dict]):
    self.patience = patience
    self.best = None  # (roc_auc, step)
    self.since_best = 0
    for record in records:
      if record["kind"] == "valid":
        self.validated(record["step"], _finite_or_none(record["roc_auc"]))

  def validated(self, step: int, roc_auc: float | None):
    if roc_auc is not None and (self.best is None or roc_auc > self.best[0]):
      self.best, self.since_best = (roc_auc, step), 0
    else:
      self.since_best += 1

  def due(self) -> bool:
    """Whether to stop now: process 0's answer, on every process (a collective where there are several), since
    only process 0 reads the records back and all must stop at the same step."""
    due = self.patience > 0 and self.since_best >= self.patience
    if jax.process_count() > 1:
      due = bool(multihost_utils.broadcast_one_to_all(np.array(due)))
    return due

  def message(self, step: int) -> str:
    best = f"{self.best[0]:.4f} at step {self.best[1]}" if self.best else "none finite"
    return (f"stopped early at step {step}: {self.since_best} validations without a better ROC-AUC than the best "
            f"({best}); train.early_stopping_patience={self.patience}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run of `config` in `workdir`; returns the last validation scalars. Raises
  run_lock.WorkdirBusy where another run trains in `workdir`."""
  with run_lock.hold(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  run = setup(config)
  tx = optim.make_optimizer(run.optim_config)
  state = create_train_state(run.model, tx, jax.random.key(config.seed), run.mesh)
  train_step = sharding.meet_before_first_run(make_train_step(run.model, tx, config.seed, run.mesh), "train step")
  predict_step = sharding.meet_before_first_run(make_predict_step(run.model, run.mesh), "eval step")
  data_iterator = input_pipeline.train_iterator(
      config.data.data_dir, config.data.name, batch_size=run.local_batch_size,
      crop_len=tagger.crop_samples(run.model), seed=config.seed, worker_count=config.data.worker_count,
      selection=run.selection)
  manager = checkpoint.open_manager(workdir, keep_latest=config.train.checkpoints_to_keep)
  if manager.latest_step() is not None:
    state = _resume(manager, workdir, config, state, data_iterator)
    _tell(f"resuming {workdir} from step {int(state.step)} on {jax.device_count()} devices, "
          f"{jax.process_count()} process(es)")
  step = int(state.step)
  writer = MetricWriter(workdir, resume_step=step)
  divergence = DivergenceWatch(writer.records)
  early_stopping = EarlyStopping(config.train.early_stopping_patience, writer.records)
  stop = StopRequests(manager)
  scalars = {}
  bar = tqdm(total=run.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  try:
    if step and step % run.steps_per_epoch == 0 and step < run.total_steps:
      # Resumed at an epoch end: redo the stage-change reload, which does not change the saved state.
      state = _maybe_reload(manager, run, state, step)
    if early_stopping.due():
      _tell(f"{early_stopping.message(step)}; nothing more to train in {workdir}")
      return _last_validation(writer.records)
    window_start, window_steps = time.perf_counter(), 0
    while step < run.total_steps:
      state, metrics = train_step(state, sharding.global_batch(next(data_iterator), run.mesh))
      step += 1
      window_steps += 1
      epoch_end = step % run.steps_per_epoch == 0
      stopping = stop.reached(step)
      if step % config.train.log_every_steps == 0 or epoch_end or stopping:
        metrics, first_nonfinite = jax.device_get((metrics, state.first_nonfinite_step))
        _check_finite(int(first_nonfinite), step, workdir, manager)
        rate = window_steps * config.train.batch_size / (time.perf_counter() - window_start)
        writer.write(step, "train", {**metrics, "examples_per_second": rate})
        divergence.train_loss(step, float(metrics["loss"]))
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", ex_s=f"{rate:.1f}")
        window_start, window_steps = time.perf_counter(), 0
      bar.update(1)
      epoch = step // run.steps_per_epoch
      if epoch_end and (epoch % config.train.eval_every_epochs == 0 or step == run.total_steps):
        result = validate(run, predict_step, state)
        scalars = evaluation.headline(result)
        roc_auc = _finite_or_none(scalars["roc_auc"])
        writer.write(step, "valid", {**scalars, "epoch": epoch})
        if jax.process_index() == 0:
          bar.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
        if warning := divergence.validated(step, roc_auc):
          if jax.process_index() == 0:
            bar.write(f"warning: {warning}", file=sys.stderr)  # on a line of its own, not after the progress bar
          writer.write(step, "warning", {"warning": "diverged", "message": warning})
        _save(manager, run, state, data_iterator, metrics={checkpoint.BEST_METRIC: roc_auc})
        early_stopping.validated(step, roc_auc)
        if early_stopping.due():
          writer.write(step, "early_stop", {"epoch": epoch, "best_step": early_stopping.best and early_stopping.best[1],
                                            "message": early_stopping.message(step)})
          _tell(early_stopping.message(step))
          break
      elif epoch_end or stopping:
        _save(manager, run, state, data_iterator)
      if stopping:
        manager.wait_until_finished()
        print(f"process {jax.process_index()}: stop requested (SIGTERM); saved step {step} in {workdir}; rerun the "
              "same command to resume.", file=sys.stderr, flush=True)
        sys.exit(0)
      if epoch_end and step < run.total_steps:
        state = _maybe_reload(manager, run, state, step)
    manager.wait_until_finished()  # the last save's failure, if any, is reported here
  except checkpoint.SaveError as e:
    writer.mark_unsaved(max(e.saved_steps, default=0))
    raise
  finally:
    bar.close()  # ends the progress line, so that an error starts a line of its own
    stop.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return scalars


def _last_validation(records: list[dict]) -> dict:
  """The scalars of the last validation record, as `train_and_evaluate` returns them."""
  last = [r for r in records if r["kind"] == "valid"][-1:]  # none on processes other than 0
  return {k: v for r in last for k, v in r.items() if k not in ("kind", "step", "epoch", "checkpoint_saved")}


def _maybe_reload(manager, run: Run, state: TrainState, step: int) -> TrainState:
  switch_count = int(jax.device_get(optim.switch_state(state.opt_state).switch_count))
  if stage_changed_in_epoch(run.optim_config, step, run.steps_per_epoch, switch_count):
    return _reload_best(manager, run, state)
  return state


def _tell(message):
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def _finite_or_none(x):
  return float(x) if x is not None and math.isfinite(x) else None


def _check_finite(first_nonfinite_step: int, step: int, workdir, manager):
  """Stops a run whose loss or gradient norm stopped being finite at any step up to `step`."""
  if first_nonfinite_step < 0:
    return
  manager.wait_until_finished()
  last = manager.latest_step()
  raise TrainingDiverged(
      f"the loss or gradient norm is not finite at step {first_nonfinite_step} (noticed at step {step}); stopped. "
      f"The last good checkpoint is {'step ' + str(last) if last is not None else 'none (no epoch finished)'} in "
      f"{workdir}. Lower the learning rate (config.optim.adam_lr) or check the data.")


def main(argv):
  del argv
  f = flags.FLAGS
  if not sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id):
    sharding.split_cpu_for_training(f.config.train)
  _tell(f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices "
        f"({jax.local_device_count()} local)")
  train_and_evaluate(f.config, f.workdir)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file of the run.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
  flags.DEFINE_string("coordinator_address", "", "Multi-process: host:port of process 0.")
  flags.DEFINE_integer("num_processes", 0, "Multi-process: number of processes.")
  flags.DEFINE_integer("process_id", -1, "Multi-process: this process's id.")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)

"""Training: `train_and_evaluate(config, workdir)` and the thin `python -m flaxtag.train` entry point.

  python -m flaxtag.train --config configs/mtat.py:spec_att --workdir runs/spec_att [--config.train.batch_size=32]

Every epoch ends with a checkpoint (model, optimizer state, data-iterator state, config, metadata), every
`train.eval_every_epochs`-th epoch and the last with a 16-crop validation first; the latest
`train.checkpoints_to_keep` and the best by validation ROC-AUC are kept. Rerunning the
same command resumes from the latest checkpoint, on any number of devices and processes, and continues exactly as
an uninterrupted run would; log records after the restored step are dropped first. SIGTERM (a preemption) to any
process makes every process save the same step and exit with status 0. When the optimizer switches (Adam → SGD) or
the SGD learning rate drops, training continues from the best parameters so far (SPEC §4).
"""
import dataclasses
import math
import signal
import sys
import time

from absl import flags
import jax
import ml_collections
import orbax.checkpoint as ocp
from ml_collections import config_flags
from tqdm import tqdm

from flaxtag import checkpoint, cli, input_pipeline, optim, sharding
from flaxtag import eval as evaluation
from flaxtag.errors import ConfigError, FlaxtagError
from flaxtag.hierarchy import load_hierarchy
from flaxtag.metric_writer import MetricWriter
from flaxtag.models import heads, tagger
from flaxtag.train_step import TrainState, create_train_state, make_predict_step, make_train_step

OPTIMIZER = "optimizer"  # checkpoint item: {'step', 'opt_state'}
DATA_ITERATOR = "data_iterator"  # checkpoint item: the grain iterator state (JSON)


class TrainingDiverged(FlaxtagError):
  """The loss became NaN or infinite."""


@dataclasses.dataclass
class Run:
  """Everything `train_and_evaluate` builds from the config before the first step."""
  config: ml_collections.ConfigDict
  info: input_pipeline.DatasetInfo
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
    return {"tag_names": list(self.info.tags), "hierarchy": hierarchy.to_mapping() if hierarchy else None,
            "dataset": self.config.data.name, "source": "flaxtag.train"}


def setup(config: ml_collections.ConfigDict) -> Run:
  """Checks the config against the data and devices; fails before anything is compiled."""
  info = input_pipeline.dataset_info(config.data.data_dir, config.data.name)
  hierarchy = info.hierarchy
  if config.model.hierarchy_file:
    hierarchy = load_hierarchy(config.model.hierarchy_file, fine_tags=info.tags)
  if heads.needs_hierarchy(config.model.head) and hierarchy is None:
    raise ConfigError(f"model.head={config.model.head!r} needs a tag hierarchy: {config.data.name} has none; set "
                      "model.hierarchy_file to a JSON/YAML file mapping coarse → fine tags.")
  if config.model.num_tags != info.num_tags:
    raise ConfigError(f"model.num_tags={config.model.num_tags} but {config.data.name} has {info.num_tags} tags; "
                      f"set --config.model.num_tags={info.num_tags}.")
  model = tagger.build_model(config.model, hierarchy, config.half_precision)
  mesh = sharding.make_mesh()
  local_batch = sharding.check_global_batch_size(config.train.batch_size, mesh)
  sharding.check_global_batch_size(config.train.eval_batch_size, mesh, "train.eval_batch_size")
  for key in ("num_epochs", "eval_every_epochs"):
    if config.train[key] < 1:
      raise ConfigError(f"train.{key}={config.train[key]} must be at least 1.")
  steps = input_pipeline.steps_per_epoch(info.split_sizes["train"], local_batch, jax.process_count())
  if steps < 1:
    raise ConfigError(f"the train split of {config.data.name} ({info.split_sizes['train']} clips) is smaller than "
                      f"one batch of train.batch_size={config.train.batch_size}.")
  return Run(config, info, model, mesh, local_batch, steps, optim.in_steps(config.optim, steps))


def _manager(workdir, config) -> ocp.CheckpointManager:
  best_metric = lambda m: m[checkpoint.BEST_METRIC]
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(config.train.checkpoints_to_keep),
      ocp.checkpoint_managers.BestN(get_metric_fn=best_metric, reverse=False, n=1,
                                    keep_checkpoints_without_metrics=False),
  ])
  # best_fn too: without it orbax keeps the metrics of a save in memory only, and "best" would not survive the run.
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=True,
                                         best_fn=best_metric, best_mode="max")
  return checkpoint.open_manager(workdir, options=options, extra_handlers={
      OPTIMIZER: ocp.StandardCheckpointHandler(), DATA_ITERATOR: ocp.JsonCheckpointHandler()})


def _save(manager, run: Run, state: TrainState, data_iterator, metrics=None):
  checkpoint.save(manager, int(state.step), variables=state.variables, config=run.config, metadata=run.metadata,
                  metrics=metrics, extra_items={
                      OPTIMIZER: ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
                      DATA_ITERATOR: ocp.args.JsonSave(data_iterator.get_state())})


def _restore(manager, step: int, state: TrainState, data_iterator) -> TrainState:
  """The state saved at `step`, restored onto the shardings of `state` (this run's mesh, whatever wrote it)."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  where = f"checkpoint {manager.directory}/{step}"
  checkpoint.check_tree_fits(checkpoint.item_shapes(manager, step, checkpoint.MODEL), abstract.variables, where)
  restored = checkpoint.restore(manager, step, {
      checkpoint.MODEL: ocp.args.StandardRestore(abstract.variables),
      OPTIMIZER: ocp.args.StandardRestore({"step": abstract.step, "opt_state": abstract.opt_state}),
      DATA_ITERATOR: ocp.args.JsonRestore()})
  data_iterator.set_state(restored[DATA_ITERATOR])
  variables = restored[checkpoint.MODEL]
  return state.replace(step=restored[OPTIMIZER]["step"], params=variables["params"],
                       batch_stats=variables["batch_stats"], opt_state=restored[OPTIMIZER]["opt_state"])


def _reload_best(manager, state: TrainState) -> TrainState:
  """The best model so far (by validation ROC-AUC), keeping the optimizer state and step."""
  manager.wait_until_finished()
  best = checkpoint.resolve_step(manager, "best")
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state.variables)
  variables = checkpoint.restore(manager, best, {checkpoint.MODEL: ocp.args.StandardRestore(abstract)}
                                 )[checkpoint.MODEL]
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
  batches = input_pipeline.eval_batches(
      run.config.data.data_dir, run.config.data.name, split=split,
      batch_size=run.config.train.eval_batch_size // jax.process_count(), crop_len=tagger.crop_samples(run.model))
  num_batches = input_pipeline.num_eval_batches(run.info.split_sizes[split],
                                                run.config.train.eval_batch_size // jax.process_count(),
                                                jax.process_count())
  predictions = evaluation.predict_split(predict_step, state.variables, batches, run.mesh, num_batches,
                                         progress=f"{split} ({run.info.split_sizes[split]} clips)"
                                         if jax.process_index() == 0 else None)
  return evaluation.report(predictions, run.info.tags, run.model.hierarchy)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run of `config` in `workdir`; returns the last validation scalars."""
  run = setup(config)
  tx = optim.make_optimizer(run.optim_config)
  state = create_train_state(run.model, tx, jax.random.key(config.seed), run.mesh)
  train_step = make_train_step(run.model, tx, config.seed, run.mesh)
  predict_step = make_predict_step(run.model, run.mesh)
  data_iterator = input_pipeline.train_iterator(
      config.data.data_dir, config.data.name, batch_size=run.local_batch_size,
      crop_len=tagger.crop_samples(run.model), seed=config.seed, worker_count=config.data.worker_count)
  manager = _manager(workdir, config)
  if manager.latest_step() is not None:
    state = _restore(manager, manager.latest_step(), state, data_iterator)
    _tell(f"resuming {workdir} from step {int(state.step)} on {jax.device_count()} devices, "
          f"{jax.process_count()} process(es)")
  step = int(state.step)
  writer = MetricWriter(workdir, resume_step=step)
  stop = StopRequests(manager)
  scalars = {}
  try:
    if step and step % run.steps_per_epoch == 0 and step < run.total_steps:
      # Resumed at an epoch end: redo the stage-change reload, which does not change the saved state.
      state = _maybe_reload(manager, run, state, step)
    bar = tqdm(total=run.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0)
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
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", ex_s=f"{rate:.1f}")
        window_start, window_steps = time.perf_counter(), 0
      bar.update(1)
      epoch = step // run.steps_per_epoch
      if epoch_end and (epoch % config.train.eval_every_epochs == 0 or step == run.total_steps):
        result = validate(run, predict_step, state)
        scalars = evaluation.headline(result)
        writer.write(step, "valid", {**scalars, "epoch": epoch})
        if jax.process_index() == 0:
          bar.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
        _save(manager, run, state, data_iterator, metrics={checkpoint.BEST_METRIC: _finite_or_none(scalars["roc_auc"])})
      elif epoch_end or stopping:
        _save(manager, run, state, data_iterator)
      if stopping:
        manager.wait_until_finished()
        print(f"process {jax.process_index()}: stop requested (SIGTERM); saved step {step} in {workdir}; rerun the "
              "same command to resume.", file=sys.stderr, flush=True)
        sys.exit(0)
      if epoch_end and step < run.total_steps:
        state = _maybe_reload(manager, run, state, step)
    bar.close()
  finally:
    stop.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return scalars


def _maybe_reload(manager, run: Run, state: TrainState, step: int) -> TrainState:
  switch_count = int(jax.device_get(optim.switch_state(state.opt_state).switch_count))
  if stage_changed_in_epoch(run.optim_config, step, run.steps_per_epoch, switch_count):
    return _reload_best(manager, state)
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
  sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
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

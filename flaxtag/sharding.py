"""Device mesh, batch sharding, start-up (CPU devices, joining other hosts) and keeping processes in step (barriers,
compiled steps they start together): the one place that knows about devices and hosts.

Data parallelism only: the mesh has one `data` axis over which batches are split, and parameters, BatchNorm
statistics and the optimizer state are replicated. flaxtag's models have 0.3–7 M parameters (a few tens of MB with
Adam's moments), so splitting them over devices would add communication and save no memory worth having.
The train and eval steps only see global arrays and shardings.
"""
import itertools
import math
import os
from collections.abc import Mapping

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
from orbax.checkpoint import multihost

from flaxtag.errors import ConfigError

DATA_AXIS = "data"
# How long a process waits at a barrier for the others: long enough for the slowest compile of a train step on an
# overloaded host (minutes); a process that died ends the wait sooner (the coordination service reports it).
BARRIER_TIMEOUT_S = 1800
_barrier_numbers = itertools.count()


def split_cpu(num_devices: int | None = None) -> None:
  """Makes JAX start `num_devices` CPU devices (None: one per core this process may run on), unless the process
  chose a count already (XLA_FLAGS' --xla_force_host_platform_device_count, or jax_num_cpu_devices).

  A process-wide setting, so entry points call it first thing in `main`, before JAX starts its backend; library
  code never does. Once JAX has started, its devices stay as they are.
  """
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") or jax.config.jax_num_cpu_devices > 0:
    return
  try:
    jax.config.update("jax_num_cpu_devices", num_devices or len(os.sched_getaffinity(0)))
  except RuntimeError:
    pass  # JAX has started already (a library call in someone's process): its devices stay as they are


def cpu_devices_dividing(batch_size: int, cores: int | None = None) -> int:
  """One CPU device per core (default: the cores this process may run on), as many as split a batch of `batch_size`
  evenly: the largest divisor of `batch_size` not above the core count. More devices than cores slow a step (the
  demo's train step on 2 cores: 15–25 % longer on 8 devices than on 1 or 2, benchmarks/demo_devices.py), and one per
  core lets the evaluation's forward use every core (BENCHMARKS.md, inference)."""
  cores = cores or len(os.sched_getaffinity(0))
  return max(d for d in range(1, min(cores, batch_size) + 1) if batch_size % d == 0)


def split_cpu_for_training(train_config) -> None:
  """`split_cpu` for a one-process training run: one device per core, as many as split both the training and the
  evaluation batch evenly (the step then splits its batch over the cores: 1.14x the samples/s of one device for
  Spec+Att on 2 cores, BENCHMARKS.md). `train_config` is a config's `train` section."""
  split_cpu(cpu_devices_dividing(math.gcd(train_config.batch_size, train_config.eval_batch_size)))


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
  """Joins a multi-process run; returns whether it did. With no arguments it joins only inside an `srun` step of
  several tasks or on a Cloud TPU pod, where JAX finds the coordinator itself; on one machine give the coordinator
  (e.g. 127.0.0.1:1234), the number of processes and this one's id."""
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif in_slurm_job(os.environ):
    jax.distributed.initialize(local_device_ids=slurm_local_device_ids(os.environ))
  elif "TPU_WORKER_HOSTNAMES" in os.environ:
    jax.distributed.initialize()
  else:
    return False
  return True


def in_slurm_job(environ: Mapping[str, str]) -> bool:
  """Inside an `srun` step of more than one task (one task alone needs no coordination)."""
  return int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in environ


def slurm_local_device_ids(environ: Mapping[str, str]) -> list[int] | None:
  """The GPUs a SLURM task's process should use.

  JAX's own SLURM detection gives each process only the GPU numbered SLURM_LOCALID, which assumes one task per GPU
  with every GPU of the node visible (`--ntasks-per-node=G --gpus-per-node=G`): None keeps that. With
  `--gpus-per-task=K` SLURM makes only the task's own K GPUs visible, renumbered from 0, so SLURM_LOCALID may name
  a GPU the task cannot see: the process takes all K.
  """
  if "SLURM_GPUS_PER_TASK" in environ and environ.get("CUDA_VISIBLE_DEVICES"):
    return list(range(len(environ["CUDA_VISIBLE_DEVICES"].split(","))))
  return None


def make_mesh(devices=None) -> Mesh:
  """A one-axis (`data`) mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(mesh_utils.create_device_mesh((len(devices),), devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def per_device(fn, mesh: Mesh):
  """fn(variables, *batch_arrays) run by each device on its own rows (shard_map): the variables replicated, the
  arrays' leading axis and the outputs' split over `data`. For functions with no work across examples (the eval
  forward): each device runs the one-device program, which XLA compiles without partitioning it (a `lax.map` over
  the batch, as in backends.inference_attention, would otherwise be gathered whole on every device)."""
  def run(variables, *arrays):
    return jax.shard_map(fn, mesh=mesh, in_specs=(PartitionSpec(),) + (PartitionSpec(DATA_AXIS),) * len(arrays),
                         out_specs=PartitionSpec(DATA_AXIS))(variables, *arrays)
  return run


def check_global_batch_size(global_batch_size: int, mesh: Mesh, what: str = "train.batch_size"):
  data = mesh.shape[DATA_AXIS]
  if global_batch_size % data or global_batch_size % jax.process_count():
    raise ConfigError(
        f"{what}={global_batch_size} must be divisible by the {data} data-parallel devices and the "
        f"{jax.process_count()} processes; use e.g. {what}={max(data, jax.process_count()) * 2}.")
  return global_batch_size // jax.process_count()


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a global batch → global arrays sharded over `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def barrier(name: str) -> None:
  """Waits until every process of the run reaches this barrier; nothing with one process. The coordination
  service's barrier, not a device collective (`jax.experimental.multihost_utils.sync_global_devices` is one, and
  on CPUs its first run has the 30-s limit described in `meet_before_first_run`). Every process must call the same
  barriers in the same order: the name gets a sequence number, since a barrier's name may be used only once."""
  multihost.get_barrier_sync_fn()(key=f"flaxtag {next(_barrier_numbers)}: {name}", timeout_ms=BARRIER_TIMEOUT_S * 1000)


def meet_before_first_run(jitted, name: str):
  """`jitted` (a `jax.jit` function) such that, in a CPU run of several processes, the processes start each of its
  executables together: a new input signature is compiled ahead of time, the processes meet at a `barrier`, then
  the compiled executable runs. Elsewhere (one process, or GPUs and TPUs) it returns `jitted` itself, so call it
  after joining the other processes (`initialize_distributed`).

  Why: the first run of a collective across processes on CPUs sets up a gloo communicator for its device group,
  and gloo gives up when the other processes have not joined within 30 s (`Gloo context initialization failed:
  DEADLINE_EXCEEDED: GetKeyValue() timed out`; no XLA or JAX setting reaches that limit). Processes whose
  compiles end further apart (a slower or busier host, or a restore that took longer) would fail. Later runs
  reuse the communicator and wait as long as they must."""
  if jax.process_count() == 1 or jax.default_backend() != "cpu":
    return jitted
  executables = {}

  def run(*args):
    leaves, treedef = jax.tree.flatten(args)
    signature = (treedef, tuple((x.shape, x.dtype) for x in leaves))
    if signature not in executables:
      executables[signature] = jitted.lower(*args).compile()
      barrier(f"first run of {name}")
    return executables[signature](*args)

  return run

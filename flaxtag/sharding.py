"""Device mesh, batch sharding and multi-host start-up: the one place that knows about devices and hosts.

The mesh has a `data` axis over which batches are split, and a `model` axis (size 1 unless configured) left for
model/FSDP sharding. Parameters are replicated. The train and eval steps only see global arrays and shardings.
"""
import os

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from flaxtag.errors import ConfigError

DATA_AXIS = "data"
MODEL_AXIS = "model"


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1):
  """Joins a multi-process run. With no arguments, JAX auto-detects SLURM, TPU pod and GKE clusters; on one
  machine give the coordinator (e.g. 127.0.0.1:1234), the number of processes and this one's id."""
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _in_cluster():
    jax.distributed.initialize()


def _in_cluster() -> bool:
  return ("SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1) or "TPU_WORKER_HOSTNAMES" in os.environ


def make_mesh(model_axis_size: int = 1, devices=None) -> Mesh:
  """A (data, model) mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  if model_axis_size < 1 or len(devices) % model_axis_size:
    raise ConfigError(f"mesh.model={model_axis_size} must divide the {len(devices)} devices.")
  shape = (len(devices) // model_axis_size, model_axis_size)
  return Mesh(mesh_utils.create_device_mesh(shape, devices), (DATA_AXIS, MODEL_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


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

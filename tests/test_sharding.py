"""Start-up decisions: CPU devices, and joining other hosts read from a scheduler's environment (the SLURM variables
as srun sets them)."""
import os
import subprocess
import sys

import pytest

from flaxtag import sharding

STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "node[01-04]", "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1"}


@pytest.mark.parametrize("environ,expected", [
    ({**STEP, "SLURM_NTASKS": "8"}, True),
    ({**STEP, "SLURM_NTASKS": "1"}, False),  # one task: nothing to join
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}, False),  # the batch script, not an srun task
    ({}, False),
])
def test_a_multi_task_srun_step_is_a_distributed_run(environ, expected):
  assert sharding.in_slurm_job(environ) is expected


def test_a_task_uses_every_gpu_bound_to_it():
  # --gpus-per-task=4: SLURM shows each task its own 4 GPUs; JAX's detection alone would pick GPU SLURM_LOCALID.
  environ = {**STEP, "SLURM_NTASKS": "8", "SLURM_GPUS_PER_TASK": "4", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
  assert sharding.slurm_local_device_ids(environ) == [0, 1, 2, 3]
  # --ntasks-per-node=G --gpus-per-node=G: every task sees all G GPUs and takes GPU SLURM_LOCALID (JAX's default).
  environ = {**STEP, "SLURM_NTASKS": "8", "SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
  assert sharding.slurm_local_device_ids(environ) is None
  assert sharding.slurm_local_device_ids({**STEP, "SLURM_NTASKS": "2"}) is None  # CPU nodes


def test_cpu_devices_dividing_is_one_per_core_and_splits_the_batch_evenly():
  assert [sharding.cpu_devices_dividing(8, cores) for cores in (1, 2, 3, 4, 6, 8, 16)] == [1, 2, 2, 4, 4, 8, 8]
  assert sharding.cpu_devices_dividing(12, 5) == 4 and sharding.cpu_devices_dividing(7, 4) == 1


def _devices_after_split_cpu(xla_flags):
  """jax.device_count() of a fresh process that calls split_cpu(3) before JAX starts, under `xla_flags`."""
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags}
  code = "from flaxtag import sharding; sharding.split_cpu(3); import jax; print(jax.device_count())"
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
  return int(done.stdout)


@pytest.mark.slow
def test_split_cpu_sets_the_device_count_unless_the_process_chose_one():
  assert _devices_after_split_cpu("") == 3
  assert _devices_after_split_cpu("--xla_force_host_platform_device_count=2") == 2

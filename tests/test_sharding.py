"""Multi-host start-up decisions read from a scheduler's environment (the SLURM variables as srun sets them)."""
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

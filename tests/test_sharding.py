"""Start-up decisions: CPU devices, and joining other hosts read from a scheduler's environment (the SLURM variables
as srun sets them); processes that must meet before a collective."""
import os
import subprocess
import sys

import pytest

from flaxtag import sharding
import train_runs

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


# Process `pid` of 2 (2 CPU devices each): process 1 comes 35 s late to the first run of a sum over all 4 devices.
LATE_PROCESS = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
from flaxtag import sharding
pid, port = int(sys.argv[1]), sys.argv[2]
sharding.initialize_distributed(f"127.0.0.1:{port}", 2, pid)
mesh = sharding.make_mesh()
x = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), np.full(2, pid + 1.0, np.float32))
total = sharding.meet_before_first_run(jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh)), "the sum")
if pid == 1:
  time.sleep(35)
print(float(total(x)), float(total(x + 1)))
"""


def test_processes_reaching_their_first_collective_35_s_apart_both_run_it():
  """On CPUs, gloo gives up on setting up a device group's communicator when a process is more than 30 s late to
  the group's first collective (as a process whose train step compiles slower is): `meet_before_first_run` makes
  them wait for each other at a barrier first. Without it this fails with `Gloo context initialization failed`."""
  port = str(train_runs.free_port())
  processes = [subprocess.Popen([sys.executable, "-c", LATE_PROCESS, str(pid), port], env=train_runs.devices_env(2),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
  outputs = [p.communicate(timeout=300) for p in processes]
  assert [p.returncode for p in processes] == [0, 0], [err[-2500:] for _, err in outputs]
  assert [out.splitlines()[-1].split() for out, _ in outputs] == [["6.0", "10.0"]] * 2  # 1+1+2+2, then each + 1

"""How many CPU devices `make demo` should split the CPU into: its train step (configs/demo.py, batch 8, the GMP head on
the synthetic set's 25 instruments in 8 families) timed on 8, 2 and 1 JAX CPU devices, in fresh processes whose
order alternates round by round, so that the machine's load weighs on every count alike.

  .venv/bin/python benchmarks/demo_devices.py [--counts 8,2,1] [--rounds 2] [--steps 40]

One process per (round, count): JAX fixes its device count when it starts. Each times `--steps` steps on a fixed
random batch already on the devices (the input pipeline is not part of the figure) after 3 warm-up steps.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from train_throughput import load_average  # noqa: E402  (this folder is on sys.path when the script runs)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def time_steps(steps: int) -> dict:
  """Median seconds per step of the demo's jit-compiled train step over this process's devices."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  from data_prep.synth_instruments import render  # pylint: disable=g-import-not-at-top
  from flaxtag import optim, sharding  # pylint: disable=g-import-not-at-top
  from flaxtag.hierarchy import Hierarchy  # pylint: disable=g-import-not-at-top
  from flaxtag.models import tagger  # pylint: disable=g-import-not-at-top
  from flaxtag.train_step import create_train_state, make_train_step  # pylint: disable=g-import-not-at-top
  from train_throughput import block, random_batch  # pylint: disable=g-import-not-at-top

  config = demo.get_config()
  hierarchy = Hierarchy.from_mapping(render.hierarchy())
  model = tagger.build_model(config.model, hierarchy)
  mesh = sharding.make_mesh()
  tx = optim.make_optimizer(optim.in_steps(config.optim, 1500 // config.train.batch_size))
  state = create_train_state(model, tx, jax.random.key(0), mesh)
  step = make_train_step(model, tx, 0, mesh)
  size = config.train.batch_size
  batch = random_batch(model, size, hierarchy.num_fine, mesh)  # coarse targets derived from the fine ones
  for _ in range(3):
    state, _ = block(step(state, batch))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, _ = block(step(state, batch))
    times.append(time.perf_counter() - start)
  return {"devices": jax.device_count(), "batch_size": size, "s_per_step": statistics.median(times)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--counts", default="8,2,1", help="device counts, comma-separated")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._child:  # pylint: disable=protected-access
    sys.path.insert(0, REPO)  # flaxtag and configs, for this and time_steps
    from flaxtag import host  # pylint: disable=g-import-not-at-top
    host.restart_with_allocator_settings()  # as `python -m flaxtag.demo` trains (flaxtag/__init__.py)
    print(json.dumps(time_steps(args.steps)))
    return
  counts = [int(c) for c in args.counts.split(",")]
  print(f"load average before: {load_average()[0]:.2f}")
  results = {c: [] for c in counts}
  for round_index in range(args.rounds):
    order = counts if round_index % 2 == 0 else counts[::-1]
    for count in order:
      env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}
      done = subprocess.run([sys.executable, __file__, "--_child", f"--steps={args.steps}"], env=env, check=True,
                            capture_output=True, text=True)
      result = json.loads(done.stdout.strip().splitlines()[-1])
      seconds, size = result["s_per_step"], result["batch_size"]
      results[count].append(seconds)
      print(f"round {round_index + 1}, {count} devices: {seconds:.4f} s/step", flush=True)
  print(f"load average after: {load_average()[0]:.2f}")
  for count, seconds in results.items():
    best = statistics.median(seconds)
    print(f"{count} devices: median {best:.4f} s/step ({size / best:.1f} examples/s at batch {size}), runs "
          + ", ".join(f"{s:.4f}" for s in seconds))


if __name__ == "__main__":
  main()

r"""Checkpoint saves on CPU devices: how long a training run is held up by each save of its state.

  python benchmarks/checkpoint_save.py --devices 8 [--saves 7] [--replica_parallel]

Builds the Spec+Att model of configs/synth.py (flat head) and its Adam state, replicated over `--devices` CPU
devices as training makes it, and saves it `--saves` times as `flaxtag.train` does (model, optimizer, config,
metadata, metrics, iterator state), waiting for each save to finish before the next. Prints the time `save` blocks:
the first save's (it compiles what the save runs) and the median of the others. `--replica_parallel` keeps orbax's
own default for CPU arrays instead of flaxtag's (`checkpoint._save_cpu_arrays_from_one_replica`), to compare the
two. No JAX compilation cache is used, as in a user's first run.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--saves", type=int, default=7)
  parser.add_argument("--replica_parallel", action="store_true")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"

  import jax  # pylint: disable=g-import-not-at-top
  from configs import synth  # pylint: disable=g-import-not-at-top
  from flaxtag import checkpoint, optim, sharding, train_step  # pylint: disable=g-import-not-at-top
  from flaxtag.models import tagger  # pylint: disable=g-import-not-at-top

  if args.replica_parallel:
    checkpoint._save_cpu_arrays_from_one_replica = lambda: None  # pylint: disable=protected-access
  config = synth.get_config("flat")
  model = tagger.build_model(config.model, None, config.half_precision)
  tx = optim.make_optimizer(optim.in_steps(config.optim, 100))
  state = train_step.create_train_state(model, tx, jax.random.key(0), sharding.make_mesh())
  blocked = []
  with tempfile.TemporaryDirectory(prefix="flaxtag-save-bench-") as workdir:
    manager = checkpoint.open_manager(workdir, keep_latest=2)
    for step in range(1, args.saves + 1):
      start = time.perf_counter()
      checkpoint.save(manager, step, variables=state.variables, config=config, metadata={},
                      metrics={checkpoint.BEST_METRIC: 0.5},
                      optimizer={"step": state.step, "opt_state": state.opt_state}, data_iterator_state={})
      blocked.append(time.perf_counter() - start)
      manager.wait_until_finished()
    manager.close()
  arrays = len(jax.tree.leaves((state.variables, state.opt_state)))
  params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"{args.devices} devices, {'orbax default (replica-parallel)' if args.replica_parallel else 'flaxtag'}: "
        f"{params:,} parameters in {arrays} arrays; save blocks {blocked[0]:.2f} s the first time, "
        f"{statistics.median(blocked[1:]):.3f} s after (median of {len(blocked) - 1})")


if __name__ == "__main__":
  main()

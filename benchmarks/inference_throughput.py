"""Inference throughput of method A's four models: crops/s and the share of the matmul peak of the forward that
`flaxtag.tag`, `flaxtag.explain` and `flaxtag.eval` run (eval mode, `Tagger.predict` on a batch of crops).

For each model (c=16, 50 tags, random initial weights) this times `Tagger.predict` on a fixed batch of crops of
noise, host to host (the batch is copied to the devices and the probabilities back, as in tagging), with the batch
split over one device and over every device, alternately, step by step. The FLOPs are train_throughput.py's
analytic forward count (convolutions, dense layers, attention matmuls, mel filterbank; 2 per multiply-add); the
share of peak is that count's FLOP/s over the FLOP/s of a jit-compiled fp32 matmul (train_throughput.MatmulPeak)
measured just before and just after each timed forward, so that load from other processes weighs on both alike;
the median over steps is reported, with its range.

  .venv/bin/python benchmarks/inference_throughput.py                  # all four models, batch 16
  .venv/bin/python benchmarks/inference_throughput.py --models=spec_att --steps=10
  python benchmarks/inference_throughput.py --half_precision --batch_size=256 --json=out.json  # GPU, bf16 compute

`--devices` is the number of JAX CPU devices the process starts with; 0 (the default), one per core, as
`flaxtag.tag` starts (on a GPU: the GPUs). Do not run it under tests/conftest.py's 8-device setting.
`benchmarks/gpu_check.sh` runs it with train_throughput.py on a GPU machine.
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax

if __name__ == "__main__":  # before JAX starts its backend
  _devices = argparse.ArgumentParser(add_help=False)
  _devices.add_argument("--devices", type=int, default=0)
  jax.config.update("jax_num_cpu_devices", _devices.parse_known_args()[0].devices or len(os.sched_getaffinity(0)))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flaxtag import host  # noqa: E402
from flaxtag.inference import Tagger  # noqa: E402
from flaxtag.models import layers, tagger  # noqa: E402
from train_throughput import (LABELS, MODELS, MatmulPeak, analytic_forward_flops,  # noqa: E402
                              load_average, model_config, print_run_conditions, print_table)


def benchmark_model(name: str, args, peak: MatmulPeak) -> list[dict]:
  """Times the model's forward with the batch on one device and split over all, alternately; a dict for each."""
  config = model_config(name, args.conv_channels, args.num_tags)
  model = tagger.build_model(config, half_precision=args.half_precision)
  variables = jax.device_get(tagger.init_variables(model, jax.random.key(0)))
  crops = (0.1 * np.random.default_rng(0).standard_normal((args.batch_size, tagger.crop_samples(model))))
  crops = crops.astype(np.float32)
  flops = analytic_forward_flops(name, config) * args.batch_size
  splits = {1: jax.local_devices()[:1], len(jax.local_devices()): jax.local_devices()}
  taggers = {n: Tagger(model, variables, config, {}, devices) for n, devices in splits.items()}
  compile_s = {}
  for n, t in taggers.items():
    start = time.perf_counter()
    t.predict(crops, batch_size=args.batch_size)
    compile_s[n] = time.perf_counter() - start
    for _ in range(args.warmup):
      t.predict(crops, batch_size=args.batch_size)
  times = {n: [] for n in taggers}
  shares = {n: [] for n in taggers}
  for _ in range(args.steps):
    for n, t in taggers.items():
      before = peak.measure()
      start = time.perf_counter()
      t.predict(crops, batch_size=args.batch_size)
      times[n].append(time.perf_counter() - start)
      shares[n].append(flops / times[n][-1] / ((before + peak.measure()) / 2))
  results = []
  for n in taggers:
    seconds = statistics.median(times[n])
    results.append({
        "model": name, "mode": "infer", "devices": n, "batch_size": args.batch_size, "s_per_batch": seconds,
        "crops_per_s": args.batch_size / seconds, "compile_s": compile_s[n],
        "gflop_per_crop": flops / args.batch_size / 1e9, "gflop_per_s": flops / seconds / 1e9,
        # Median over steps of each forward's FLOP/s over the peak measured just before and after it.
        "peak_share": statistics.median(shares[n]), "peak_share_min": min(shares[n]),
        "peak_share_max": max(shares[n])})
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {','.join(MODELS)}")
  parser.add_argument("--batch_size", type=int, default=16, help="crops per forward")
  parser.add_argument("--steps", type=int, default=7, help="timed forwards per model and device split")
  parser.add_argument("--warmup", type=int, default=1, help="untimed forwards after the compiling one")
  parser.add_argument("--devices", type=int, default=0, help="JAX CPU devices to start; 0: one per core")
  parser.add_argument("--conv_channels", type=int, default=16)
  parser.add_argument("--num_tags", type=int, default=50)
  parser.add_argument("--half_precision", action="store_true", help="bf16 compute (GPU/TPU); fp32 params")
  parser.add_argument("--json", default="", help="also write the results (the last line printed) to this file")
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  unknown = sorted(set(names) - set(MODELS))
  if unknown:
    parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")

  device = jax.devices()[0]
  load_before = load_average()
  peak = MatmulPeak(2048 if device.platform == "cpu" else 8192, jnp.bfloat16 if args.half_precision else jnp.float32)

  def summary(results) -> str:
    return json.dumps({
        "benchmark": "inference_throughput", "mode": "infer", "device": device.device_kind,
        "platform": device.platform, "host": host.describe(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "jax": jax.__version__,
        "half_precision": args.half_precision, "kernels": layers.resolve_kernels("auto"),
        "load_average_before": load_before[:3], "load_average": load_average()[:3],
        "peak_gflop_per_s": statistics.median(peak.samples) / 1e9, "peak_size": peak.size, "results": results})

  results = []
  for name in names:
    results += benchmark_model(name, args, peak)
    if args.json:  # after every model, so that a run stopped midway keeps what it measured
      with open(args.json, "w") as f:
        f.write(summary(results) + "\n")
  print_run_conditions(device, load_before, peak, "forward")
  print(f"inference (Tagger.predict, eval mode), {'bf16' if args.half_precision else 'fp32'} compute")
  header = (f"{'model':<11} {'devices':>7} {'batch':>5} {'s/batch':>8} {'crops/s':>8} {'GFLOP/crop':>10} "
            f"{'GFLOP/s':>8} {'of peak':>8} {'(min-max)':>11}")
  print_table(header, [
      f"{LABELS[r['model']]:<11} {r['devices']:>7} {r['batch_size']:>5} {r['s_per_batch']:>8.3f} "
      f"{r['crops_per_s']:>8.1f} {r['gflop_per_crop']:>10.2f} {r['gflop_per_s']:>8.1f} "
      f"{100 * r['peak_share']:>7.1f}% ({100 * r['peak_share_min']:.0f}-{100 * r['peak_share_max']:.0f}%)"
      for r in results])
  print(summary(results))


if __name__ == "__main__":
  host.restart_with_allocator_settings()  # as `python -m flaxtag.COMMAND` runs (flaxtag/__init__.py)
  main()

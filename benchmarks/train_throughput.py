"""Training throughput of method A's four models: samples/s, FLOPs per sample and MFU.

For each model (c=16, 50 tags by default) this builds the recipe's optimizer (`make_optimizer`, Adam phase) and the
jit-compiled `make_train_step`, on a 1-device mesh, and times it on a fixed random batch already on the device (the
input pipeline is not part of the figure). Inference has its own script, inference_throughput.py, which imports the
FLOP count and the matmul peak from here. FLOPs per sample are counted twice:

- analytic: the model's convolutions, dense layers and attention matmuls (2 FLOPs per multiply-add), ×3 for the
  forward and backward; elementwise work, the FFT and the optimizer are left out. This is
  the "model FLOPs" of MFU, independent of how the code computes them.
- XLA: `cost_analysis()` of the compiled step that is timed (forward, backward and the optimizer, whose share is
  below 0.1 %). It counts what the compiled program does, e.g. the zeros of the banded vertical
  convolutions and elementwise ops.

MFU = analytic FLOP/s of a step / the FLOP/s of a dense jit-compiled matmul (fp32 2048×2048 on CPU; 8192×8192 on
GPU, bf16 with --half_precision) measured just before and just after that step, so that load from other processes
on a shared machine weighs on both alike; the median over the timed steps is reported, with its range. Runs
unchanged on CPU and GPU (where an fp32 matmul may run in TF32 under JAX's default precision, and so may the model).

  .venv/bin/python benchmarks/train_throughput.py                      # all four models, batch 16, CPU
  .venv/bin/python benchmarks/train_throughput.py --models=spec_att --steps=10
  python benchmarks/train_throughput.py --half_precision --batch_size=256 --json=out.json  # GPU, bf16 compute

`benchmarks/gpu_check.sh` runs the whole set on a GPU machine.

Do not run it under tests/conftest.py's 8-device setting: that splits the CPU into 8 devices.
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import base  # noqa: E402
from flaxtag import host, optim, sharding, train_step  # noqa: E402
from flaxtag.models import frontends, layers, tagger  # noqa: E402

# name → (front-end, back-end), SPEC §2–3.
MODELS = {"spec_att": ("spec", "attention"), "raw_att": ("raw", "attention"), "spec_cnnp": ("spec", "cnn_p"),
          "raw_cnnl": ("raw", "cnn_l")}
LABELS = {"spec_att": "Spec+Att", "raw_att": "Raw+Att", "spec_cnnp": "Spec+CNN P", "raw_cnnl": "Raw+CNN L"}
# A's PyTorch Spec+Att, batch 16, on SPEC §3's 2-core AVX2 CPU; torch_reference.py measures it on the machine at hand.
REFERENCE_SAMPLES_PER_S = 3.9
REFERENCE_MFU = 0.26
SPEC_GFLOP_PER_SAMPLE = 11.4  # SPEC §3's fwd+bwd figure for Spec+Att, from which the reference's 26 % was derived.


def model_config(name: str, conv_channels: int, num_tags: int):
  config = base.get_config().model
  config.frontend, config.backend = MODELS[name]
  config.conv_channels = conv_channels
  config.num_tags = num_tags
  return config


# ----------------------------------------------------------------------------------------------------------------------
# Analytic FLOPs (forward, per sample; 2 per multiply-add).


def _conv(length: int, kernel: int, cin: int, cout: int) -> float:
  return 2.0 * length * kernel * cin * cout


def _encoder(config, tokens: int) -> float:
  width, mlp = config.encoder.width, config.encoder.mlp_dim
  dense = _conv(tokens, 1, width, 3 * width) + _conv(tokens, 1, width, width) + 2 * _conv(tokens, 1, width, mlp)
  attention = 2 * 2.0 * tokens * tokens * width  # scores and context, all heads together
  return config.encoder.num_layers * (dense + attention) + _conv(1, 1, width, width)  # + pooler


def _spec_frontend(config, frames: int, projection: int | None) -> float:
  c, mels = config.conv_channels, config.features.n_mels
  n_bins = config.features.n_fft // 2 + 1
  flops = 2.0 * frames * n_bins * mels  # mel filterbank
  for share, width, mult in frontends.TIMBRE_BRANCHES:
    height = int(share * mels)
    flops += (mels - height + 1) * _conv(frames, height * width, 1, c * mult)
  flops += sum(_conv(frames, length, 1, c * mult) for length, mult in frontends.TEMPORAL_BRANCHES)
  out = c * (sum(m for _, _, m in frontends.TIMBRE_BRANCHES) + sum(m for _, m in frontends.TEMPORAL_BRANCHES))
  if projection:
    flops += _conv(frames, 1, out, projection)
  return flops


def _raw_layers(c: int, samples: int, multipliers) -> tuple[float, int, int]:
  """Init conv (k3 stride 3) then [conv k3, pool 3] blocks: (flops, length, channels)."""
  length = (samples + 2 - 3) // 3 + 1
  flops, cin = _conv(length, 3, 1, c), c
  for mult in multipliers:
    flops += _conv(length, 3, cin, c * mult)
    cin, length = c * mult, length // 3
  return flops, length, cin


def analytic_forward_flops(name: str, config) -> float:
  frontend, backend = MODELS[name]
  c, tags = config.conv_channels, config.num_tags
  if frontend == "spec":
    frames = 1 + frontends.CROP_SAMPLES["spec"] // config.features.hop_length
    if backend == "attention":
      return _spec_frontend(config, frames, config.encoder.width) + _encoder(config, frames + 1) + \
          _conv(1, 1, config.encoder.width, tags)
    width = 512  # CNN P, SPEC §3
    out = c * 29
    flops = _spec_frontend(config, frames, None) + _conv(frames, 7, out, width) + _conv(frames, 7, width, width)
    flops += _conv(frames // 2, 7, width, width) + _conv(1, 1, 2 * width, 500) + _conv(1, 1, 500, tags)
    return flops
  samples = frontends.CROP_SAMPLES["raw"]
  if backend == "attention":
    flops, length, cin = _raw_layers(c, samples, (1, 2, 2, 2))
    flops += _conv(length, 7, cin, config.encoder.width)
    return flops + _encoder(config, length + 1) + _conv(1, 1, config.encoder.width, tags)
  flops, length, cin = _raw_layers(c, samples, (1, 2, 2, 2, 2, 2, 2, 4, 4))
  return flops + _conv(length, 1, cin, 512) + _conv(1, 1, 512, tags)


# ----------------------------------------------------------------------------------------------------------------------
# Measurements.


def print_run_conditions(device, load_before, peak, what: str) -> list[float]:
  """Prints where and under what load the figures below were measured, and the matmul peak; returns the load."""
  load = load_average()
  print(f"device: {device.device_kind} ({device.platform}, {len(jax.devices())} device(s); host {host.describe()}), "
        f"jax {jax.__version__}, load average (1 min) {load_before[0]:.2f} before, {load[0]:.2f} after")
  print(f"{jnp.dtype(peak.a.dtype).name} {peak.size}x{peak.size} matmul peak, measured around every timed {what}: "
        f"median {statistics.median(peak.samples) / 1e9:.1f} GFLOP/s (min {min(peak.samples) / 1e9:.0f}, "
        f"max {max(peak.samples) / 1e9:.0f})")
  return load


def print_table(header: str, rows: list[str]):
  print(header)
  print("-" * len(header))
  print("\n".join(rows))


def load_average() -> list[float]:
  return list(os.getloadavg()) if hasattr(os, "getloadavg") else [float("nan")] * 3


def block(tree):
  return jax.tree.map(lambda x: x.block_until_ready() if isinstance(x, jax.Array) else x, tree)


class MatmulPeak:
  """FLOP/s of a jit-compiled size×size matmul: the practical peak that MFU is relative to."""

  def __init__(self, size: int, dtype):
    self.size = size
    self.a = jax.random.normal(jax.random.key(1), (size, size), dtype)
    self.b = jax.random.normal(jax.random.key(2), (size, size), dtype)
    self.f = jax.jit(jnp.matmul)
    self.f(self.a, self.b).block_until_ready()
    self.samples = []

  def measure(self, repeats: int = 2) -> float:
    """Best of `repeats` runs, recorded: called next to every timed step, so both see the same machine load."""
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      self.f(self.a, self.b).block_until_ready()
      times.append(time.perf_counter() - t)
    self.samples.append(2.0 * self.size**3 / min(times))
    return self.samples[-1]


def random_batch(model, batch_size: int, num_tags: int, mesh) -> dict:
  """{'audio': (B, crop), 'labels'} of noise and random tags, on the mesh."""
  rng = np.random.default_rng(0)
  audio = (0.1 * rng.standard_normal((batch_size, tagger.crop_samples(model)))).astype(np.float32)
  return sharding.global_batch(
      {"audio": audio, "labels": (rng.random((batch_size, num_tags)) < 0.1).astype(np.float32)}, mesh)


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def benchmark_model(name: str, args, mesh, peak: MatmulPeak) -> dict:
  config = model_config(name, args.conv_channels, args.num_tags)
  model = tagger.build_model(config, half_precision=args.half_precision)
  batch = random_batch(model, args.batch_size, args.num_tags, mesh)
  # Every step of the benchmark in its first epoch, so all are Adam steps (the switch is at epoch 60).
  tx = optim.make_optimizer(optim.in_steps(optim.recipe_config(), steps_per_epoch=1 + args.warmup + args.steps))
  state = train_step.create_train_state(model, tx, jax.random.key(0), mesh)
  step = train_step.make_train_step(model, tx, seed=0, mesh=mesh)
  analytic_per_sample = 3.0 * analytic_forward_flops(name, config)

  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  # cost_analysis counts one device's share of the partitioned program.
  xla_per_sample = xla_flops(compiled) * mesh.size / args.batch_size

  def run(state):
    return block(compiled(state, batch))

  for _ in range(1 + args.warmup):
    state, outputs = run(state)
  times, mfus = [], []
  for _ in range(args.steps):
    before = peak.measure()
    t = time.perf_counter()
    state, outputs = run(state)
    times.append(time.perf_counter() - t)
    local_peak = (before + peak.measure()) / 2
    mfus.append(analytic_per_sample * args.batch_size / times[-1] / local_peak)
  if not np.isfinite(float(outputs["loss"])):
    raise FloatingPointError(f"{name}: non-finite loss")
  seconds = statistics.median(times)
  result = {
      "model": name, "mode": "train", "batch_size": args.batch_size, "s_per_step": seconds,
      "s_per_step_min": min(times), "s_per_step_max": max(times), "samples_per_s": args.batch_size / seconds,
      "compile_s": compile_s, "gflop_per_sample": analytic_per_sample / 1e9,
      "xla_gflop_per_sample": xla_per_sample / 1e9, "gflop_per_s": analytic_per_sample * args.batch_size / seconds / 1e9,
      # Median over steps of each step's FLOP/s over the peak measured just before and after it.
      "mfu": statistics.median(mfus), "mfu_min": min(mfus), "mfu_max": max(mfus),
      "optimizer_phase": int(outputs["optimizer_phase"]),
  }
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {','.join(MODELS)}")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=7, help="timed steps per model (medians are reported)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the compiling one")
  parser.add_argument("--half_precision", action="store_true", help="bf16 compute (GPU/TPU); fp32 params")
  parser.add_argument("--conv_channels", type=int, default=16)
  parser.add_argument("--num_tags", type=int, default=50)
  parser.add_argument("--peak_size", type=int, default=0,
                      help="matmul size for the peak; 0: 2048 on CPU, 8192 elsewhere")
  parser.add_argument("--json", default="", help="also write the results (the last line printed) to this file")
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  unknown = sorted(set(names) - set(MODELS))
  if unknown:
    parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")

  mesh = sharding.make_mesh()
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  peak_size = args.peak_size or (2048 if on_cpu else 8192)
  peak_dtype = jnp.bfloat16 if args.half_precision else jnp.float32
  kernels = layers.resolve_kernels("auto")
  load_before = load_average()
  peak = MatmulPeak(peak_size, peak_dtype)

  def summary(results) -> str:
    return json.dumps({
        "benchmark": "train_throughput", "mode": "train", "device": device.device_kind,
        "platform": device.platform, "host": host.describe(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "jax": jax.__version__,
        "half_precision": args.half_precision, "kernels": kernels, "load_average_before": load_before,
        "load_average": load_average(), "peak_gflop_per_s": statistics.median(peak.samples) / 1e9,
        "peak_min_gflop_per_s": min(peak.samples) / 1e9, "peak_max_gflop_per_s": max(peak.samples) / 1e9,
        "peak_size": peak_size, "results": results})

  results = []
  for name in names:
    results.append(benchmark_model(name, args, mesh, peak))
    if args.json:  # after every model, so that a run stopped midway keeps what it measured
      with open(args.json, "w") as f:
        f.write(summary(results) + "\n")
  print_run_conditions(device, load_before, peak, "step")
  print(f"train step, "
        f"{'bf16' if args.half_precision else 'fp32'} compute, {kernels} kernels")
  header = (f"{'model':<11} {'batch':>5} {'s/step':>7} {'samples/s':>9} {'GFLOP/sample':>12} {'XLA GFLOP':>9} "
            f"{'GFLOP/s':>8} {'MFU':>6} {'(min-max)':>11}")
  print_table(header, [
      f"{LABELS[r['model']]:<11} {r['batch_size']:>5} {r['s_per_step']:>7.3f} {r['samples_per_s']:>9.2f} "
      f"{r['gflop_per_sample']:>12.2f} {r['xla_gflop_per_sample']:>9.2f} {r['gflop_per_s']:>8.1f} "
      f"{100 * r['mfu']:>5.1f}% ({100 * r['mfu_min']:.0f}-{100 * r['mfu_max']:.0f}%)" for r in results])
  spec_att = [r for r in results if r["model"] == "spec_att"]
  if on_cpu and not args.half_precision and spec_att and args.batch_size == 16:
    r = spec_att[0]
    print(f"reference PyTorch Spec+Att, batch 16, on SPEC's AVX2 CPU: {REFERENCE_SAMPLES_PER_S} samples/s, "
          f"{100 * REFERENCE_MFU:.0f}% MFU (with SPEC's {SPEC_GFLOP_PER_SAMPLE} GFLOP/sample); here "
          f"{r['samples_per_s'] / REFERENCE_SAMPLES_PER_S:.2f}x its samples/s, and "
          f"{100 * r['mfu'] * SPEC_GFLOP_PER_SAMPLE / r['gflop_per_sample']:.1f}% MFU with SPEC's FLOP count "
          "(benchmarks/torch_reference.py times the reference on this machine)")
  print(summary(results))


if __name__ == "__main__":
  host.restart_with_allocator_settings()  # as `python -m flaxtag.COMMAND` runs (flaxtag/__init__.py)
  main()

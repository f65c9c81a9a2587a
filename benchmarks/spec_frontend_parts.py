"""Where the Spec front-end's training time goes: its parts' forward and backward, timed one at a time.

On one H200 (2026-12-04, BENCHMARKS.md) Spec+Att's fp32 train step at batch 256 took 0.13 s against Raw+Att's 0.038 s
for about the same FLOPs; this splits the front-end to find the part. Timed, each jit-compiled on a fixed batch of
noise (c = 16, 96 mel bands, the default crop), median over --steps after two warm-up runs:

- the log-mel alone (forward: it holds no parameter, so training never differentiates it);
- the whole front-end's forward and backward (the gradient of a sum of squares of its output with respect to its
  parameters), from waveforms and from precomputed log-mels;
- each timbre branch (SPEC §2 branches 1–6: a tall conv over (mel, time), BN, ReLU, max over frequency) and each
  temporal branch (7–10: a 1-D conv over the mel-averaged envelope), forward and backward alike.

`--kernels` picks the timbre convs' formulation (`layers.KERNELS`): banded matmuls ('auto', 'cpu' and 'banded'; on
the CPU 'auto' and 'cpu' also run inference one example at a time) or the plain 2-D convs ('plain'), to compare
them on one machine.

  .venv/bin/python benchmarks/spec_frontend_parts.py --batch_size 16
  python3 benchmarks/spec_frontend_parts.py --batch_size 256 --half_precision --kernels plain --json parts.json  # GPU
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

from flaxtag import audio, host  # noqa: E402
from flaxtag.models import backends, frontends, layers  # noqa: E402

CONV_CHANNELS = 16


def time_compiled(fn, args, steps: int) -> dict:
  """Compile time and the median of `steps` runs of jit(fn)(*args), after two warm-up runs."""
  t = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t
  for _ in range(2):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
  return {"ms": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times), "ms_max": 1e3 * max(times),
          "compile_s": compile_s}


def parameter_gradient(module, variables, *inputs):
  """(params, *inputs) → the gradient of sum(output²) with respect to params, in training mode."""
  def loss(params, *xs):
    y, _ = module.apply({**variables, "params": params}, *xs, True, mutable=["batch_stats"])
    return jnp.sum(jnp.square(y.astype(jnp.float32)))
  return jax.grad(loss)


def parts(batch_size: int, dtype, kernels: str):
  """(name, fn, args) of every part timed."""
  mel = audio.MelConfig()
  rng = np.random.default_rng(0)
  wave = jnp.asarray((0.1 * rng.standard_normal((batch_size, frontends.CROP_SAMPLES["spec"]))).astype(np.float32))
  log_mel = jax.jit(lambda x: audio.log_mel_spectrogram(x, mel))
  spec = log_mel(wave)
  yield "log-mel (forward)", log_mel, (wave,)
  # With Spec+Att's projection to the encoder's width.
  frontend = frontends.SpecFrontEnd(CONV_CHANNELS, mel, backends.EncoderConfig().width, dtype=dtype, kernels=kernels)
  variables = frontend.init(jax.random.key(0), wave[:2], False)
  grad = parameter_gradient(frontend, variables)
  yield "front-end from waveforms", grad, (variables["params"], wave)
  yield "front-end from log-mels", grad, (variables["params"], spec)
  # The branches' inputs as the front-end makes them: the log-mel as (B, T, mel) minus a mean; scale 1, shift 0.
  centred = spec.transpose(0, 2, 1) - jnp.mean(spec)
  one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
  for share, width, mult in frontends.TIMBRE_BRANCHES:
    height = int(share * mel.n_mels)
    branch = frontends.TimbreConv(CONV_CHANNELS * mult, (height, width), dtype=dtype, kernels=kernels)
    branch_vars = branch.init(jax.random.key(0), centred[:2], one, zero, False)
    yield (f"timbre {height}×{width}, {CONV_CHANNELS * mult} filters",
           parameter_gradient(branch, branch_vars), (branch_vars["params"], centred, one, zero))
  envelope = jnp.mean(centred, axis=2, keepdims=True).astype(dtype)
  for length, mult in frontends.TEMPORAL_BRANCHES:
    branch = layers.ConvBlock(CONV_CHANNELS * mult, length, dtype=dtype)
    branch_vars = branch.init(jax.random.key(0), envelope[:2], False)
    yield (f"temporal {length}, {CONV_CHANNELS * mult} filters", parameter_gradient(branch, branch_vars),
           (branch_vars["params"], envelope))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--half_precision", action="store_true", help="bf16 compute (parameters stay fp32)")
  parser.add_argument("--kernels", default="auto", choices=layers.KERNELS)
  parser.add_argument("--json", default="", help="also write the results to this file (rewritten after each part)")
  args = parser.parse_args(argv)
  dtype = jnp.bfloat16 if args.half_precision else jnp.float32
  device = jax.devices()[0]
  kernels = layers.resolve_kernels(args.kernels)
  report = {"benchmark": "spec_frontend_parts", "device": device.device_kind, "platform": device.platform,
            "host": host.describe(), "jax": jax.__version__, "batch_size": args.batch_size,
            "half_precision": args.half_precision, "kernels": kernels, "results": []}
  print(f"Spec front-end parts on {device.device_kind} ({device.platform}), batch {args.batch_size}, "
        f"{jnp.dtype(dtype).name} compute, {kernels} timbre kernels; forward and backward unless marked")
  print(f"{'part':<34} {'ms':>8} {'(min-max)':>15} {'compile s':>9}")
  for name, fn, fn_args in parts(args.batch_size, dtype, args.kernels):
    timing = time_compiled(fn, fn_args, args.steps)
    report["results"].append({"part": name, **timing})
    print(f"{name:<34} {timing['ms']:>8.2f} ({timing['ms_min']:.2f}-{timing['ms_max']:.2f}) "
          f"{timing['compile_s']:>9.1f}", flush=True)
    if args.json:  # after every part, so that a run stopped midway keeps what it measured
      with open(args.json, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
  host.restart_with_allocator_settings()  # as `python -m flaxtag.COMMAND` runs (flaxtag/__init__.py)
  main()

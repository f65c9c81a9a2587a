"""Method A's Spec+Att in plain PyTorch, as its reference code computes it, timed beside flaxtag on the same machine.

The reference implementation is not shipped here (only its state_dict layout and cases, ../shared/reference), so
this module writes the model from SPEC §2–3 with the layout file's names and the reference's building blocks:
nn.Conv2d / Conv1d, BatchNorm, a BERT-style encoder (separate query/key/value Linears, softmax, dropout on the
probabilities, post-LayerNorm, erf GELU), the log-mel computed inside the model (torch.stft), and
`torch.optim.Adam`. `--check` first proves it computes flaxtag's function: its state_dict, converted by
`flaxtag.convert.convert_state_dict`, gives flaxtag's eval-mode logits on the same waveforms.

  pip install --target /tmp/torch_site torch   # CPU wheel, beside the venv: flaxtag does not depend on it
  PYTHONPATH=/tmp/torch_site .venv/bin/python benchmarks/torch_reference.py --check --steps 7 [--json out.json]

It prints, like train_throughput.py and inference_throughput.py, samples/s (training: forward, BCE, backward and an
Adam step on a fixed batch, dropout on) and crops/s (eval-mode forward under inference_mode), and MFU against the
FLOP/s of a torch fp32 2048×2048 matmul measured just before and after each timed step, with the analytic FLOP count
of train_throughput.py. Run it alternated with those scripts for a same-machine ratio (BENCHMARKS.md).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.train_throughput import analytic_forward_flops, load_average, model_config  # noqa: E402
from flaxtag import audio, host  # noqa: E402


class ConvBN(nn.Module):
  """A conv followed by BatchNorm (the layout's `<prefix>.conv` and `<prefix>.bn`); ReLU is applied by the caller."""

  def __init__(self, conv: nn.Module, channels: int, dims: int):
    super().__init__()
    self.conv = conv
    self.bn = nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)

  def forward(self, x):
    return torch.relu(self.bn(self.conv(x)))


class SpecFrontEnd(nn.Module):
  """SPEC §2 Spec: log-mel, input BatchNorm, six vertical and four horizontal branches, 1×1 conv to 512."""

  def __init__(self, c: int, n_mels: int = 96, width: int = 512):
    super().__init__()
    config = audio.MelConfig()
    self.n_fft, self.hop = config.n_fft, config.hop_length
    self.register_buffer("window", torch.hann_window(config.n_fft, periodic=True), persistent=False)
    fb = audio.mel_filterbank(config.sample_rate, config.n_fft, n_mels, config.f_min, config.f_max, config.mel_scale)
    self.register_buffer("mel_fb", torch.from_numpy(np.asarray(fb)), persistent=False)
    self.input_bn = nn.BatchNorm2d(1)
    layers = []
    for height in (int(0.9 * n_mels), int(0.4 * n_mels)):
      for kernel, out in ((7, c), (3, 2 * c), (1, 4 * c)):
        layers.append(ConvBN(nn.Conv2d(1, out, (height, kernel), padding=(0, kernel // 2)), out, dims=2))
    for kernel, out in ((165, c), (129, 2 * c), (65, 4 * c), (33, 8 * c)):
      layers.append(ConvBN(nn.Conv1d(1, out, kernel, padding=kernel // 2), out, dims=1))
    self.layers = nn.ModuleList(layers)
    self.conv1x1 = nn.Conv1d(29 * c, width, 1)
    self.bn = nn.BatchNorm1d(width)

  def log_mel(self, wave):
    """SPEC §1: |STFT|² of centred, reflect-padded periodic-Hann frames → mel → 10·log10, 80 dB below each max."""
    spec = torch.stft(wave, self.n_fft, self.hop, window=self.window, center=True, pad_mode="reflect",
                      return_complex=True)
    mel = torch.einsum("bft,fm->bmt", spec.real**2 + spec.imag**2, self.mel_fb)
    db = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
    return torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - 80.0)

  def forward(self, wave):
    x = self.input_bn(self.log_mel(wave)[:, None])  # (B, 1, mel, T)
    branches = [layer(x).amax(dim=2) for layer in self.layers[:6]]  # global max over the conv's frequency axis
    envelope = x.mean(dim=2)  # (B, 1, T)
    branches += [layer(envelope) for layer in self.layers[6:]]
    return torch.relu(self.bn(self.conv1x1(torch.cat(branches, dim=1))))  # (B, 512, T)


class _Dense(nn.Module):
  """BERT's `<prefix>.dense` Linear and its post-LayerNorm `<prefix>.LayerNorm`."""

  def __init__(self, cin: int, cout: int, dropout: float):
    super().__init__()
    self.dense = nn.Linear(cin, cout)
    self.LayerNorm = nn.LayerNorm(cout, eps=1e-12)  # noqa: N815 (the layout's name)
    self.dropout = nn.Dropout(dropout)

  def forward(self, x, residual):
    return self.LayerNorm(residual + self.dropout(self.dense(x)))


class SelfAttention(nn.Module):
  def __init__(self, width: int, heads: int, dropout: float):
    super().__init__()
    self.heads = heads
    self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
    self.dropout = nn.Dropout(dropout)

  def forward(self, x):
    batch, length, width = x.shape
    split = lambda t: t.view(batch, length, self.heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // self.heads)
    probs = self.dropout(torch.softmax(scores, dim=-1))
    return (probs @ v).transpose(1, 2).reshape(batch, length, width)


class Attention(nn.Module):
  def __init__(self, width, heads, dropout):
    super().__init__()
    self.self = SelfAttention(width, heads, dropout)
    self.output = _Dense(width, width, dropout)

  def forward(self, x):
    return self.output(self.self(x), x)


class Intermediate(nn.Module):
  def __init__(self, width, mlp):
    super().__init__()
    self.dense = nn.Linear(width, mlp)

  def forward(self, x):
    return nn.functional.gelu(self.dense(x))  # exact (erf)


class EncoderLayer(nn.Module):
  def __init__(self, width, heads, mlp, dropout):
    super().__init__()
    self.attention = Attention(width, heads, dropout)
    self.intermediate = Intermediate(width, mlp)
    self.output = _Dense(mlp, width, dropout)

  def forward(self, x):
    x = self.attention(x)
    return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
  def __init__(self, layers, width, heads, mlp, dropout):
    super().__init__()
    self.layer = nn.ModuleList(EncoderLayer(width, heads, mlp, dropout) for _ in range(layers))

  def forward(self, x):
    for layer in self.layer:
      x = layer(x)
    return x


class Pooler(nn.Module):
  def __init__(self, width):
    super().__init__()
    self.dense = nn.Linear(width, width)

  def forward(self, x):
    return torch.tanh(self.dense(x[:, 0]))


class AttentionBackEnd(nn.Module):
  """SPEC §3 Att: fixed [CLS] (RandomState(0)), sinusoidal positions, embedding dropout, encoder, tanh pooler."""

  def __init__(self, width=512, layers=2, heads=8, mlp=2048, dropout=0.4):
    super().__init__()
    self.register_buffer("cls", torch.from_numpy(np.random.RandomState(0).random_sample(width).astype(np.float32)),
                         persistent=False)  # fixed, not in the state_dict (layout file)
    self.width = width
    self.dropout = nn.Dropout(dropout)
    self.encoder = Encoder(layers, width, heads, mlp, dropout)
    self.pooler = Pooler(width)

  def positions(self, length):
    p = torch.arange(length, dtype=torch.float64)[:, None]
    j = torch.arange(self.width)
    angle = p / 10000 ** (2 * (j // 2) / self.width)
    table = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle))
    table[0] = 0  # the [CLS] position
    return table.float()

  def forward(self, x):  # (B, C, T)
    x = x.transpose(1, 2)
    x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1)
    x = self.dropout(x + self.positions(x.shape[1]))
    return self.pooler(self.encoder(x))


class SpecAtt(nn.Module):
  """Spec+Att with the reference's state_dict keys (layout `pons_won`); returns logits."""

  def __init__(self, conv_channels=16, num_tags=50):
    super().__init__()
    self.front_end = SpecFrontEnd(conv_channels)
    self.back_end = AttentionBackEnd()
    self.head_dropout = nn.Dropout(0.5)
    self.classifier = nn.Linear(512, num_tags)

  def forward(self, wave):
    return self.classifier(self.head_dropout(self.back_end(self.front_end(wave))))


def crop_samples() -> int:
  """flaxtag's Spec training crop (tagger.crop_samples): 256 frames."""
  return 255 * audio.MelConfig().hop_length


def check_against_flaxtag(model: SpecAtt, conv_channels: int, num_tags: int) -> float:
  """Largest |logit_torch − logit_flaxtag| in eval mode, over the spread (sd) of flaxtag's logits, flaxtag's weights
  converted from this model's state_dict. Every bias, norm scale and running statistic is first drawn at random (a
  default 1 or 0 would hide a swapped or dropped tensor)."""
  import jax  # here: only the check needs flaxtag's model, and JAX must not share the timed process's threads

  from flaxtag.convert import convert_state_dict
  from flaxtag.models import tagger
  flax_model = tagger.build_model(model_config("spec_att", conv_channels, num_tags))
  model.eval()
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if name.endswith("running_var"):
        tensor.uniform_(0.5, 1.5)
      elif name.endswith(("running_mean", "bias")):
        tensor.normal_(0, 0.1)
      elif tensor.ndim == 1:  # BatchNorm and LayerNorm scales
        tensor.normal_(1, 0.1)
  variables = convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, flax_model)
  wave = (0.1 * np.random.default_rng(3).standard_normal((4, crop_samples()))).astype(np.float32)
  with torch.inference_mode():
    ours = model(torch.from_numpy(wave)).numpy()
  theirs = np.asarray(flax_model.apply(variables, wave, train=False).fine_logits)
  return float(np.abs(ours - theirs).max() / np.std(theirs))


class TorchMatmulPeak:
  """FLOP/s of a torch fp32 size×size matmul, best of two, recorded next to every timed step: train_throughput.py's
  MatmulPeak in torch, so that each framework is measured against its own matmul."""

  def __init__(self, size=2048):
    self.size = size
    self.a, self.b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(self.a, self.b)
    self.samples = []

  def measure(self):
    times = []
    for _ in range(2):
      t = time.perf_counter()
      torch.mm(self.a, self.b)
      times.append(time.perf_counter() - t)
    self.samples.append(2.0 * self.size**3 / min(times))
    return self.samples[-1]


def timed(run, steps: int, warmup: int, flops: float, peak: TorchMatmulPeak) -> dict:
  """Median s/step and MFU (flops per step over the peak measured around the step) over `steps` runs."""
  for _ in range(warmup):
    run()
  seconds, mfu = [], []
  for _ in range(steps):
    before = peak.measure()
    t = time.perf_counter()
    run()
    seconds.append(time.perf_counter() - t)
    mfu.append(flops / seconds[-1] / statistics.mean([before, peak.measure()]))
  return {"s_per_step": statistics.median(seconds), "mfu": statistics.median(mfu), "mfu_range": [min(mfu), max(mfu)]}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--conv_channels", type=int, default=16)
  parser.add_argument("--num_tags", type=int, default=50)
  parser.add_argument("--steps", type=int, default=7)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--check", action="store_true", help="first compare eval-mode outputs with flaxtag's")
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args(argv)
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = SpecAtt(args.conv_channels, args.num_tags)
  if args.check:
    error = check_against_flaxtag(model, args.conv_channels, args.num_tags)
    print(f"check: eval-mode logits equal flaxtag's to {error:.1e} of their spread")
    if error > 1e-5:
      raise SystemExit("check failed: this model does not compute flaxtag's function")

  load_before = load_average()
  peak = TorchMatmulPeak()
  rng = np.random.default_rng(0)
  wave = torch.from_numpy((0.1 * rng.standard_normal((args.batch_size, crop_samples()))).astype(np.float32))
  labels = torch.from_numpy((rng.random((args.batch_size, args.num_tags)) < 0.1).astype(np.float32))
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
  loss_fn = nn.BCEWithLogitsLoss()

  def train_step():
    model.train()
    optimizer.zero_grad()
    loss_fn(model(wave), labels).backward()
    optimizer.step()

  def eval_forward():
    model.eval()
    with torch.inference_mode():
      torch.sigmoid(model(wave))

  forward_flops = analytic_forward_flops("spec_att", model_config("spec_att", args.conv_channels, args.num_tags))
  results = {
      "train": timed(train_step, args.steps, args.warmup, 3 * forward_flops * args.batch_size, peak),
      "eval_forward": timed(eval_forward, args.steps, args.warmup, forward_flops * args.batch_size, peak)}
  results.update(torch=torch.__version__, threads=args.threads, batch_size=args.batch_size, cpu=host.describe(),
                 peak_gflops_median=statistics.median(peak.samples) / 1e9, load_before=load_before,
                 load_after=load_average())
  train, forward = results["train"], results["eval_forward"]
  print(f"PyTorch {torch.__version__}, {args.threads} threads, {host.describe()}, load {load_before[0]:.2f} → "
        f"{results['load_after'][0]:.2f}, fp32 matmul peak median {results['peak_gflops_median']:.1f} GFLOP/s")
  print(f"Spec+Att training: {train['s_per_step']:.3f} s/step, {args.batch_size / train['s_per_step']:.2f} samples/s, "
        f"MFU {100 * train['mfu']:.1f} % ({100 * train['mfu_range'][0]:.0f}–{100 * train['mfu_range'][1]:.0f})")
  print(f"Spec+Att eval forward: {forward['s_per_step']:.3f} s/batch, "
        f"{args.batch_size / forward['s_per_step']:.1f} crops/s, MFU {100 * forward['mfu']:.1f} % "
        f"({100 * forward['mfu_range'][0]:.0f}–{100 * forward['mfu_range'][1]:.0f})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()

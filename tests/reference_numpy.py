"""An independent numpy forward pass of method A's reference architectures, in PyTorch's layouts and naming.

Written from SPEC §2–3 directly on a state_dict ({torch key: array}), with explicit sliding-window convolutions, so
that comparing it with a converted Flax model checks the conversion (layouts, fused attention weights, banded
vertical convs) independently of the Flax code. Also makes random state_dicts from the layout file.

`forward(..., batch_stats={})` is PyTorch's training mode for BatchNorm: every BatchNorm normalises with its batch
mean and biased variance over (batch, positions) and records them, with the count n, under its key prefix.
"""
import re

import numpy as np
from scipy import special

LAYOUT_FILE = "torch_state_dict_layout.tsv"
# Architecture names of the layout file → (front-end, back-end) of flaxtag.
ARCHITECTURES = {"pons_won": ("spec", "attention"), "lee_won": ("raw", "attention"),
                 "pons_pons": ("spec", "cnn_p"), "lee_lee": ("raw", "cnn_l")}


def read_layout(path) -> dict[str, dict[str, tuple]]:
  """{architecture: {key: shape}} from the layout file."""
  layouts, current = {}, None
  for line in open(path):
    if m := re.match(r"## architecture (\w+)", line):
      current = layouts.setdefault(m.group(1), {})
    elif current is not None and line.strip() and not line.startswith("#"):
      key, shape = line.rstrip("\n").split("\t")
      current[key] = tuple(int(d) for d in re.findall(r"\d+", shape))
  return layouts


def random_state_dict(layout: dict[str, tuple], seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in layout.items():
    if key.endswith("num_batches_tracked"):
      sd[key] = np.array(7, np.int64)
    elif key.endswith("running_var"):
      sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif key.endswith("running_mean") or key.endswith(".bias"):
      sd[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    elif len(shape) == 1:  # BatchNorm / LayerNorm scale
      sd[key] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      fan_in = int(np.prod(shape[1:]))
      sd[key] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
  return sd


def _conv1d(x, w, b, stride=1, pad=0):  # x (B, Cin, L), w (Cout, Cin, K)
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad)))
  k = w.shape[-1]
  n_out = (x.shape[-1] - k) // stride + 1
  windows = np.lib.stride_tricks.sliding_window_view(x, k, axis=2)[:, :, ::stride][:, :, :n_out]
  return np.einsum("bclk,ock->bol", windows, w, optimize=True) + b[None, :, None]


def _conv2d(x, w, b, pad_time):  # x (B, 1, F, T), w (Cout, 1, kh, kw); no frequency padding
  x = np.pad(x, ((0, 0), (0, 0), (0, 0), (pad_time, pad_time)))
  windows = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))
  return np.einsum("bcftij,ocij->boft", windows, w, optimize=True) + b[None, :, None, None]


def _bn(x, sd, p, batch_stats=None):  # channels on axis 1
  shape = (1, -1) + (1,) * (x.ndim - 2)
  if batch_stats is None:
    mean, var = sd[f"{p}.running_mean"], sd[f"{p}.running_var"]
  else:
    axes = (0,) + tuple(range(2, x.ndim))
    mean, var = x.mean(axes), x.var(axes)
    batch_stats[p] = (mean, var, x.size // x.shape[1])
  scale = sd[f"{p}.weight"] / np.sqrt(var + 1e-5)
  return (x - mean.reshape(shape)) * scale.reshape(shape) + sd[f"{p}.bias"].reshape(shape)


def _relu(x):
  return np.maximum(x, 0)


def _maxpool(x, k):
  n = x.shape[-1] // k
  return x[..., : n * k].reshape(*x.shape[:-1], n, k).max(-1)


def _linear(x, sd, p):
  return x @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]


def _layer_norm(x, sd, p, eps=1e-12):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * sd[f"{p}.weight"] + sd[f"{p}.bias"]


def pons_front_end(spec, sd, conv1x1, batch_stats=None):  # spec (B, 96, T) log-mel
  x = _bn(spec[:, None].astype(np.float64), sd, "front_end.input_bn", batch_stats)
  outs = []
  for i in range(6):
    w = sd[f"front_end.layers.{i}.conv.weight"]
    y = _conv2d(x, w, sd[f"front_end.layers.{i}.conv.bias"], pad_time=w.shape[-1] // 2)
    outs.append(_relu(_bn(y, sd, f"front_end.layers.{i}.bn", batch_stats)).max(axis=2))
  envelope = x.mean(axis=2)
  for i in range(6, 10):
    w = sd[f"front_end.layers.{i}.conv.weight"]
    y = _conv1d(envelope, w, sd[f"front_end.layers.{i}.conv.bias"], pad=w.shape[-1] // 2)
    outs.append(_relu(_bn(y, sd, f"front_end.layers.{i}.bn", batch_stats)))
  x = np.concatenate(outs, axis=1)
  if conv1x1:
    x = _conv1d(x, sd["front_end.conv1x1.weight"], sd["front_end.conv1x1.bias"])
    x = _relu(_bn(x, sd, "front_end.bn", batch_stats))
  return x  # (B, C, T)


def lee_front_end(wave, sd, num_blocks, final_pad, batch_stats=None):
  def block(x, p, stride=1, pad=1, pool=1):
    x = _conv1d(x, sd[f"{p}.conv.weight"], sd[f"{p}.conv.bias"], stride, pad)
    x = _relu(_bn(x, sd, f"{p}.bn", batch_stats))
    return _maxpool(x, pool) if pool > 1 else x
  x = block(wave[:, None].astype(np.float64), "front_end.init_conv", stride=3)
  for i in range(num_blocks):
    x = block(x, f"front_end.convs.{i}", pool=3)
  return block(x, "front_end.conv1x1", pad=final_pad)


def bert_back_end(x, sd, num_layers=2, heads=8):  # x (B, C, T)
  x = x.transpose(0, 2, 1)
  batch, length, width = x.shape
  cls = np.random.RandomState(0).random_sample(width)
  x = np.concatenate([np.broadcast_to(cls, (batch, 1, width)), x], axis=1)
  pos = np.zeros((length + 1, width))
  for p in range(1, length + 1):
    for j in range(width):
      angle = p / 10000 ** (2 * (j // 2) / width)
      pos[p, j] = np.sin(angle) if j % 2 == 0 else np.cos(angle)
  x = x + pos
  d = width // heads
  for layer in range(num_layers):
    p = f"back_end.encoder.layer.{layer}"
    split = lambda t: t.reshape(batch, length + 1, heads, d).transpose(0, 2, 1, 3)
    q, k, v = (split(_linear(x, sd, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length + 1, width)
    x = _layer_norm(x + _linear(context, sd, f"{p}.attention.output.dense"), sd, f"{p}.attention.output.LayerNorm")
    h = _linear(x, sd, f"{p}.intermediate.dense")
    h = 0.5 * h * (1 + special.erf(h / np.sqrt(2)))
    x = _layer_norm(x + _linear(h, sd, f"{p}.output.dense"), sd, f"{p}.output.LayerNorm")
  return np.tanh(_linear(x[:, 0], sd, "back_end.pooler.dense"))


def pons_back_end(x, sd, batch_stats=None):
  def conv(x, i):
    y = _conv1d(x, sd[f"back_end.conv{i}.weight"], sd[f"back_end.conv{i}.bias"], pad=3)
    return _relu(_bn(y, sd, f"back_end.bn{i}", batch_stats))
  x = conv(x, 1)
  x = _maxpool(x + conv(x, 2), 2)
  x = x + conv(x, 3)
  x = np.concatenate([x.max(-1), x.mean(-1)], axis=1)
  return _relu(_bn(_linear(x, sd, "back_end.dense"), sd, "back_end.bn4", batch_stats))


def forward(architecture: str, sd, x, batch_stats: dict | None = None) -> np.ndarray:
  """Sigmoid tag probabilities of the reference architecture for `x` (log-mel (B, 96, T) or waveform (B, N)).

  With a `batch_stats` dict: BatchNorm in training mode, its statistics recorded there (see the module's doc).
  """
  if architecture == "pons_won":
    h = bert_back_end(pons_front_end(x, sd, conv1x1=True, batch_stats=batch_stats), sd)
  elif architecture == "pons_pons":
    h = pons_back_end(pons_front_end(x, sd, conv1x1=False, batch_stats=batch_stats), sd, batch_stats)
  elif architecture == "lee_won":
    h = bert_back_end(lee_front_end(x, sd, num_blocks=4, final_pad=3, batch_stats=batch_stats), sd)
  else:
    h = lee_front_end(x, sd, num_blocks=9, final_pad=0, batch_stats=batch_stats).max(-1)
  return special.expit(_linear(h, sd, "classifier"))

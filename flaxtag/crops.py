"""Crops (SPEC §1): where a model's fixed-length crops of a clip start, and how they are cut.

The one crop policy of training, evaluation, tagging and explaining; `crop_len` is the model's crop in samples
(`models.tagger.crop_samples`). Where crops start:
  train_offset        one crop per clip per training step, at a start hashed from (seed, epoch, record)
  eval_offsets        EVAL_CROPS evenly spaced crops, a fixed number of them (the evaluation pipeline)
  whole_clip_offsets  the same, but one crop of a clip no longer than a crop (a whole clip's tags)
  timeline_offsets    consecutive crops a hop apart (tags over time)
  loudest_offset      the loudest of the evaluation crops (the crop `explain` shows)
How they are cut, zero-padded past the end of the clip:
  copy                one crop into a given buffer (int16 PCM scaled to [-1, 1) into a float one)
  cut                 crops of a waveform held whole
  cut_blocks          crops of a waveform arriving a block at a time (files streamed by `flaxtag.tag`)
"""
from collections.abc import Iterable, Iterator

import numpy as np

from flaxtag import audio

EVAL_CROPS = 16  # SPEC §1: crops per clip in evaluation, their sigmoid outputs averaged.

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
  """64 well-mixed bits from integers (SplitMix64 steps): a cheap, stateless hash for per-record randomness."""
  z = 0
  for v in values:
    z = (z + (v & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
  return z


def train_offset(num_samples: int, crop_len: int, seed: int, epoch: int, record: int) -> int:
  """Start of the training crop of record `record` in `epoch`: uniform over the valid starts, 0 if the clip is short.

  A hash of (seed, epoch, record), not an RNG: it costs ~2 µs where seeding numpy's generator costs ~60 µs per crop.
  """
  if num_samples <= crop_len:
    return 0
  return _mix(seed, epoch, record) % (num_samples - crop_len + 1)


def eval_offsets(num_samples: int, crop_len: int, num_crops: int = EVAL_CROPS) -> np.ndarray:
  """Starts of the evaluation crops of a clip: k · ((L − crop) // num_crops) for k < num_crops (SPEC §1); all 0
  for a clip no longer than a crop."""
  return (max(num_samples - crop_len, 0) // num_crops) * np.arange(num_crops)


def whole_clip_offsets(num_samples: int, crop_len: int, num_crops: int = EVAL_CROPS) -> np.ndarray:
  """`eval_offsets`, but [0] for a clip no longer than one crop: its copies of the one padded crop would score the
  same."""
  if num_samples <= crop_len:
    return np.zeros(1, np.int64)
  return eval_offsets(num_samples, crop_len, num_crops)


def timeline_offsets(num_samples: int, crop_len: int, hop_seconds: float | None = None,
                     sample_rate: int = audio.SAMPLE_RATE) -> np.ndarray:
  """Starts of consecutive crops `hop_seconds` apart (default: one crop length, no overlap); a last crop ending at
  the end of the clip covers any remainder."""
  hop = crop_len if hop_seconds is None else int(round(hop_seconds * sample_rate))
  if hop <= 0:
    raise ValueError(f"hop_seconds must be positive, got {hop_seconds}")
  last = max(num_samples - crop_len, 0)
  offsets = np.arange(0, last + 1, hop)
  return offsets if offsets[-1] == last else np.append(offsets, last)


def loudest_offset(waveform: np.ndarray, crop_len: int, num_crops: int = EVAL_CROPS) -> int:
  """Start of the loudest (highest RMS) of the clip's evaluation crops, which is rarely an intro or a fade."""
  offsets = whole_clip_offsets(len(waveform), crop_len, num_crops)
  loudness = np.sqrt(np.mean(cut(waveform, offsets, crop_len) ** 2, axis=1))
  return int(offsets[np.argmax(loudness)])


def copy(waveform: np.ndarray, offset: int, out: np.ndarray) -> None:
  """out[:] = waveform[offset:offset + len(out)], zero past the end of the clip; int16 PCM into a float `out` is
  scaled to [-1, 1)."""
  segment = waveform[offset:offset + out.shape[0]]
  if segment.dtype == np.int16 and out.dtype != np.int16:
    np.multiply(segment, audio.INT16_SCALE, out=out[:segment.shape[0]])
  else:
    out[:segment.shape[0]] = segment
  out[segment.shape[0]:] = 0


def cut(waveform: np.ndarray, offsets: np.ndarray, crop_len: int) -> np.ndarray:
  """(len(offsets), crop_len) float32 crops of a mono waveform starting at `offsets`."""
  out = np.empty((len(offsets), crop_len), np.float32)
  for row, offset in zip(out, offsets):
    copy(waveform, int(offset), row)
  return out


def cut_blocks(blocks: Iterable[np.ndarray], offsets: np.ndarray, crop_len: int) -> Iterator[np.ndarray]:
  """`cut` of a waveform given as consecutive blocks, one crop at a time, holding at most a crop and a block of it.
  `offsets` must not decrease."""
  held, held_start = np.zeros(0, np.float32), 0  # samples [held_start, held_start + len(held)) of the waveform
  i = 0
  for block in blocks:
    held = np.concatenate([held, block])
    while i < len(offsets) and offsets[i] + crop_len <= held_start + len(held):
      yield held[offsets[i] - held_start:offsets[i] - held_start + crop_len].copy()
      i += 1
    keep = (offsets[i] if i < len(offsets) else held_start + len(held)) - held_start
    held, held_start = held[max(keep, 0):], held_start + max(keep, 0)
  for offset in offsets[i:]:  # crops running past the end: zero-padded
    piece = held[max(offset - held_start, 0):max(offset - held_start + crop_len, 0)]
    yield np.pad(piece, (0, crop_len - len(piece)))

"""Run logs: one JSON line per record in WORKDIR/metrics.jsonl and TensorBoard event files in WORKDIR/tensorboard.

TensorBoard files are written with tensorboardX, so `tensorboard --logdir WORKDIR` works without TensorFlow.
Only process 0 writes; the other processes of a multi-host run get a writer that does nothing.
"""
import json
import math
import os
import time

import jax
import numpy as np


class MetricWriter:

  def __init__(self, workdir):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, kind: str, scalars: dict):
    """Records scalars (numbers) and, in the JSONL file only, any other JSON-serialisable values."""
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind, "time": time.time()}
    for name, value in scalars.items():
      if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.size(value) == 1:
        value = value.item()
      record[name] = value
      if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        self._tensorboard.add_scalar(f"{kind}/{name}", value, step)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()

"""Run logs: one JSON line per record in WORKDIR/metrics.jsonl and TensorBoard event files in WORKDIR/tensorboard.

TensorBoard files are written with tensorboardX, so `tensorboard --logdir WORKDIR` works without TensorFlow.
Only process 0 writes; the other processes of a multi-host run get a writer that does nothing. A resumed run
starts by dropping the records after the step it resumed from, so that redone steps are not logged twice.
"""
import json
import math
import os
import time

import jax
import numpy as np


class MetricWriter:

  def __init__(self, workdir, resume_step: int = 0):
    """`resume_step`: the step the run continues from; records of later steps are dropped."""
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    _drop_records_after(path, resume_step)
    self._jsonl = open(path, "a")
    # TensorBoard hides the events of steps ≥ purge_step written before this point.
    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                      purge_step=resume_step + 1 if resume_step else None)

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


def _drop_records_after(path: str, step: int):
  """Rewrites the JSONL file without records of steps after `step` (atomically: a crash leaves one or the other)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  # A line cut short by a killed process is dropped too.
  kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
  if len(kept) == len(lines):
    return
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)


def _step_of(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None

"""Run logs: one JSON line per record in WORKDIR/metrics.jsonl and TensorBoard event files in WORKDIR/tensorboard.

TensorBoard files are written with tensorboardX, so `tensorboard --logdir WORKDIR` works without TensorFlow; the
event file is created with the first scalar, so that a run killed before it leaves no empty one. Only process 0
writes; the other processes of a multi-host run get a writer that does nothing. A resumed run starts by dropping
the records after the step it resumed from, so that redone steps are not logged twice.
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
    # The records kept from earlier attempts of the run (process 0 only).
    self.records: list[dict] = []
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._path = os.path.join(workdir, "metrics.jsonl")
    self.records = _rewrite(self._path, lambda r: r if r["step"] <= resume_step else None)
    self._jsonl = open(self._path, "a")
    self._tensorboard_dir = os.path.join(workdir, "tensorboard")
    self._resume_step = resume_step
    self._tensorboard = None

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
        self._summary_writer().add_scalar(f"{kind}/{name}", value, step)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def mark_unsaved(self, after_step: int):
    """Marks the validation records after `after_step` (the last step saved) with `"checkpoint_saved": false`:
    their checkpoints could not be written."""
    if not self.enabled:
      return
    self._jsonl.close()
    _rewrite(self._path, lambda r: {**r, "checkpoint_saved": False}
             if r["kind"] == "valid" and r["step"] > after_step else r)
    self._jsonl = open(self._path, "a")

  def close(self):
    if self.enabled:
      self._jsonl.close()
      if self._tensorboard is not None:
        self._tensorboard.close()

  def _summary_writer(self):
    if self._tensorboard is None:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # TensorBoard hides the events of steps ≥ purge_step written before this point.
      self._tensorboard = SummaryWriter(self._tensorboard_dir,
                                        purge_step=self._resume_step + 1 if self._resume_step else None)
    return self._tensorboard


def _rewrite(path: str, change) -> list[dict]:
  """Applies `change` (record → record, or None to drop it) to every record of the JSONL file, rewriting it where
  anything changed (atomically: a crash leaves one or the other); returns the records kept. A line cut short by a
  killed process is dropped."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.readlines()
  records = [_parse(line) for line in lines]
  kept = [change(r) for r in records if r is not None]
  kept = [r for r in kept if r is not None]
  if kept == records:
    return kept
  with open(path + ".tmp", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(path + ".tmp", path)
  return kept


def _parse(line: str) -> dict | None:
  try:
    record = json.loads(line)
    int(record["step"])
    return record
  except (ValueError, KeyError, TypeError):
    return None

"""One training run per workdir: WORKDIR/train.lock, held by process 0 of the run training there.

The lock is an flock on the file, which the kernel drops when its process ends in any way (exit, exception,
SIGTERM, SIGKILL), so a lock left by a dead process, on this host or, on a file system with network locks
(NFS), another, never blocks a new run; the file's content (pid, host, since when) only names the holder. The
other processes of a multi-process run share the workdir and take no lock: process 0 tells them whether it got
it. `eval`, `tag` and `explain` take none, so they can read checkpoints while a run trains.
"""
import contextlib
import datetime
import fcntl
import json
import os
import socket

import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxtag import sharding
from flaxtag.errors import FlaxtagError

LOCK_FILE = "train.lock"


class WorkdirBusy(FlaxtagError):
  """Another training run holds the workdir."""


@contextlib.contextmanager
def hold(workdir):
  """Holds WORKDIR/train.lock for the duration of the block, in every process of the run; raises WorkdirBusy
  (in every process) when another run holds it."""
  path = os.path.join(os.fspath(workdir), LOCK_FILE)
  fd, busy = None, None
  if jax.process_index() == 0:
    try:
      fd = _acquire(path)
    except WorkdirBusy as e:
      busy = e
  if jax.process_count() > 1:
    # Together into the run's first collective (see sharding.meet_before_first_run): it sets up the communicators
    # that this broadcast, early stopping's and orbax's own barriers use later.
    sharding.barrier("run lock")
    got_it = bool(multihost_utils.broadcast_one_to_all(np.array(busy is None)))
    if not got_it and busy is None:
      busy = WorkdirBusy(_busy_message(path))
  if busy is not None:
    raise busy
  try:
    yield
  finally:
    if fd is not None:
      # Unlinked before it is unlocked: a run that opened it meanwhile sees it is gone and opens a new one.
      os.unlink(path)
      os.close(fd)


def _acquire(path: str) -> int:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirBusy(_busy_message(path)) from None
    try:
      if os.path.samestat(os.fstat(fd), os.stat(path)):
        break
    except FileNotFoundError:
      pass
    os.close(fd)  # the holder removed the file between our open and our lock: lock the current one
  holder = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  os.ftruncate(fd, 0)
  os.write(fd, (json.dumps(holder) + "\n").encode())
  return fd


def _busy_message(path: str) -> str:
  try:
    with open(path) as f:
      holder = json.load(f)
    who = f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
  except (OSError, ValueError, KeyError, TypeError):
    who = "a run that has not yet written its name"  # it holds the lock but is still writing the file
  return (f"{os.path.dirname(path)} is in use by another training run ({who}; {path}). Wait for it to end or "
          "stop it, or use another --workdir.")

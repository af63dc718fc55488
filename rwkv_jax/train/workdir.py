"""One run at a time in a workdir, and what a killed or damaged run left behind.

Process 0 holds WORKDIR/.lock (an flock, which the OS drops when the process dies) from start
to end, and first removes what a killed run's unfinished checkpoint save left behind. A run
resumes from the newest checkpoint that reads back whole: newer damaged ones are moved to
WORKDIR/damaged_checkpoints with a warning naming them and the step used.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import pathlib
import shutil
import socket
from typing import Callable

import jax
from absl import logging
from jax.experimental import multihost_utils

from rwkv_jax import files
from rwkv_jax.config import RWKVConfig
from rwkv_jax.io import checkpoint as ckpt_lib
from rwkv_jax.io.tensor_names import CheckpointError
from rwkv_jax.train.step import TrainState


class WorkdirBusyError(RuntimeError):
  """Raised when another live process holds the workdir's lock."""


class WorkdirError(ValueError):
  """Raised when the workdir is a file or cannot be created or written."""


LOCK_FILE = ".lock"
DAMAGED_DIR = "damaged_checkpoints"  # where unreadable checkpoints are moved, in the workdir
# What Orbax appends to a checkpoint directory's name until its save completes.
_ORBAX_TMP = ".orbax-checkpoint-tmp"


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path):
  """Holds WORKDIR/.lock for the block, or raises WorkdirBusyError naming its holder.

  An flock rather than a pid file: the OS releases it when the holder dies, however it dies,
  so a killed run never blocks the next one. The holder's pid and host are written into the
  file only for the message.
  """
  path = workdir / LOCK_FILE
  with files.reporting_no_room(path):
    f = open(path, "a+", encoding="utf-8")  # "a+": opening must not erase the holder's name
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "another process"
    f.close()
    raise WorkdirBusyError(
        f"{workdir} is in use by {holder} (it holds {path}); wait for that run to end or stop "
        f"it, or pass another --workdir.") from None
  try:
    os.ftruncate(f.fileno(), 0)
    try:  # unbuffered: a full disk must leave no buffered bytes behind to fail again at close
      os.pwrite(f.fileno(), f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    except OSError:  # the flock holds without the name, which is only for the message
      os.ftruncate(f.fileno(), 0)
    yield
  finally:
    os.ftruncate(f.fileno(), 0)
    f.close()  # releases the lock


def make_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
  """The absolute workdir, created if new; WorkdirError if it is not a writable directory."""
  workdir = pathlib.Path(workdir).expanduser().absolute()
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory; pass a new directory "
                       f"or an earlier run's workdir.")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be created ({e.strerror}: {e.filename}); "
                       f"pass a directory you can write.") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir={workdir} is not writable; pass a directory you can write.")
  return workdir


def remove_unfinished_saves(workdir: pathlib.Path) -> None:
  """Deletes the temporary directories of checkpoints whose save was killed midway.

  Orbax saves step s into "s.orbax-checkpoint-tmp-*" and renames it when complete, so one left
  behind belongs to a dead run; with the workdir's lock held no live run is writing it.
  """
  for tmp in sorted((workdir / "checkpoints").glob(f"*{_ORBAX_TMP}*")):
    logging.warning("Removing %s, the unfinished save of a run that was stopped.", tmp)
    if tmp.is_dir():
      shutil.rmtree(tmp)
    else:
      tmp.unlink()


def restore_newest_complete(ckpt: ckpt_lib.TrainCheckpointer, state: TrainState, train_it,
                             cfg: RWKVConfig, workdir: pathlib.Path) -> tuple[int, list[int]]:
  """Restores into `state` and `train_it` the newest checkpoint that reads back whole.

  A newer checkpoint that cannot be read (a file truncated or missing, e.g. a disk that filled
  up) is passed over for the one before it, with a warning naming both.

  Returns:
    (the restored step, or 0 when the workdir has no checkpoint; the damaged newer steps).

  Raises:
    CheckpointError: a checkpoint was written for another model, or none reads back whole.
  """
  damaged: list[tuple[int, CheckpointError]] = []
  for s in sorted(ckpt.all_steps(), reverse=True):
    try:
      meta = ckpt.read_meta(s)
    except CheckpointError as e:
      damaged.append((s, e))
      continue
    # Another model's checkpoint is the user's mistake, not damage: never pass over it.
    ckpt_lib.check_compatible(meta, cfg, f"Checkpoint {s} in {workdir}")
    try:
      state.params, state.opt_state = ckpt.restore(s, state.params, state.opt_state, train_it)
    except CheckpointError as e:
      damaged.append((s, e))
      continue
    for bad, error in damaged:
      logging.warning(
          "CHECKPOINT STEP %d IN %s IS DAMAGED; resuming from step %d, the newest complete one "
          "(the steps after it are trained again). Step %d is moved to %s. %s", bad,
          ckpt.directory, s, bad, workdir / DAMAGED_DIR, error)
    return s, [bad for bad, _ in damaged]
  if len(damaged) > 1:
    raise CheckpointError(
        f"Every checkpoint in {ckpt.directory} (steps {sorted(s for s, _ in damaged)}) is "
        f"damaged; use a new --workdir to start again. Newest: {damaged[0][1]}")
  if damaged:
    raise damaged[0][1]
  return 0, []


def set_aside(steps: list[int], ckpt: ckpt_lib.TrainCheckpointer, workdir: pathlib.Path,
               reopen: Callable[[], ckpt_lib.TrainCheckpointer]) -> ckpt_lib.TrainCheckpointer:
  """Moves damaged checkpoints out of checkpoints/ and returns a checkpointer without them.

  Kept, not deleted, for a post-mortem; out of the way, since the run saves those steps again.
  """
  multi = jax.process_count() > 1
  if multi:  # every process has finished reading them
    multihost_utils.sync_global_devices("rwkv_jax: damaged checkpoints found")
  if jax.process_index() == 0:
    aside = workdir / DAMAGED_DIR
    aside.mkdir(exist_ok=True)
    for s in steps:
      target = aside / str(s)
      for i in itertools.count(1):
        if not target.exists():
          break
        target = aside / f"{s}.{i}"
      shutil.move(ckpt.directory / str(s), target)
  if multi:
    multihost_utils.sync_global_devices("rwkv_jax: damaged checkpoints moved")
  ckpt.close()
  return reopen()

"""Stopping a training run cleanly on SIGTERM or SIGINT, at a step every process agrees on.

A cluster that preempts a job sends SIGTERM and kills it after a grace period. The training loop
asks `StopSignals.should_stop(step)` after every step; once it says yes, the loop saves that
step's checkpoint, writes its metrics and returns, and the same command resumes from there.

  one process   SIGTERM or SIGINT is noted here; the loop stops after the step in flight.
  several       jax.distributed's preemption service catches SIGTERM in any process and agrees
                with all of them on the step to stop at, which Orbax's
                `CheckpointManager.reached_preemption(step)` reports. SIGINT is passed on to that
                service as a SIGTERM to this process.

Once a stop is under way, a second signal ends the process at once (the default action): the
checkpoint being saved stays in Orbax's temporary directory, which is never taken for a complete
one, and the next run resumes from the one before.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

import jax
from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
  """Notes SIGTERM and SIGINT while training (a context manager) and says when to stop.

  Args:
    reached_preemption: `step -> bool`, whether all processes agreed to stop at `step`
      (`TrainCheckpointer.reached_preemption`); asked only in a multi-process run.
  """

  def __init__(self, reached_preemption: Callable[[int], bool]):
    self.reason: str | None = None  # set once a stop is under way: what asked for it
    self.signal_number: int | None = None  # and the signal's number
    self._reached_preemption = reached_preemption
    self._multi = jax.process_count() > 1
    self._received: signal.Signals | None = None
    self._previous: dict[signal.Signals, object] = {}

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is not threading.main_thread():
      logging.warning("Training outside the main thread: SIGTERM and SIGINT keep their handlers "
                      "and stop it without a checkpoint.")
      return self
    if self._multi:
      # SIGTERM is left to jax.distributed's preemption notifier, installed by its initialize.
      self._install(signal.SIGINT, self._forward)
    else:
      for signum in SIGNALS:
        self._install(signum, self._note)
    return self

  def __exit__(self, *unused_exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _install(self, signum: signal.Signals, handler) -> None:
    previous = signal.signal(signum, handler)
    self._previous.setdefault(signum, previous)

  def _note(self, signum: int, unused_frame) -> None:
    self._received = signal.Signals(signum)
    self._exit_on_next_signal()
    logging.warning("%s received: training stops after the step in progress, saving its "
                    "checkpoint; another signal stops it at once, without one.",
                    self._received.name)

  def _forward(self, signum: int, unused_frame) -> None:
    self._received = signal.Signals(signum)
    self._install(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)  # the preemption notifier's signal

  def _exit_on_next_signal(self) -> None:
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._install(signum, signal.SIG_DFL)

  def should_stop(self, step: int) -> bool:
    """Whether to stop after `step`; call it after every step, in every process.

    Once True, a second SIGTERM or SIGINT ends the process at once.
    """
    if self._multi:
      stop = self._reached_preemption(step)  # collective: all processes answer alike
    else:
      stop = self._received is not None
    if stop and self.reason is None:
      self.signal_number = int(self._received or signal.SIGTERM)
      self.reason = (self._received.name if self._received is not None
                     else "SIGTERM (a preemption notice to a process of this run)")
      self._exit_on_next_signal()
    return stop

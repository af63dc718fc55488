"""Compile once per machine: JAX's persistent compilation cache, on for the runners and notebooks.

A command's first run compiles its programs (prefill, decode, the train step) and writes them to
CACHE/xla (`files.cache_dir()`); a later run of the same programs loads them instead of compiling.
It is invisible but for speed: a program is found only under a key that covers the lowered
program itself, the compile options and XLA flags, the jax and jaxlib versions and the device
kind, so a code, flag or version change compiles anew and never reuses a stale program. The
directory is bounded (least recently used programs are evicted past `max_bytes`) and shared
safely by processes that start together (JAX locks it with `filelock` while it writes or
evicts).

    RWKV_JAX_COMPILE_CACHE=0      turns it off
    RWKV_JAX_COMPILE_CACHE=DIR    puts it in DIR

JAX's own setting (JAX_COMPILATION_CACHE_DIR, or jax_compilation_cache_dir set in the process)
is kept when neither of these names a directory.

`ahead_of_time` compiles on a background thread, so that a runner's programs are compiled (or
loaded from the cache) while its weights are read.

`enable` does not import jax: called before jax is imported (a runner's start, before its flags
are checked), it sets JAX's environment variables, which jax reads when it is imported, so a
mistake in the flags is still reported at once.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import sys
import threading
from typing import Callable, Iterable

from absl import logging

from rwkv_jax import files

ENV = "RWKV_JAX_COMPILE_CACHE"
DEFAULT_MAX_BYTES = 2 << 30
# Programs that compile faster than this are not worth a file (and a read) each.
MIN_COMPILE_SECONDS = 0.2


def enable(directory: files.PathLike | None = None, *,
           max_bytes: int = DEFAULT_MAX_BYTES) -> pathlib.Path | None:
  """Turns the persistent compilation cache on for this process, unless $RWKV_JAX_COMPILE_CACHE=0.

  Call it before the first compilation (a runner's start). A directory that cannot be created
  leaves the cache off with a warning: it only ever costs speed.

  Args:
    directory: where the programs go; default $RWKV_JAX_COMPILE_CACHE, else the directory JAX
      is already configured with (left as it is), else CACHE/xla.
    max_bytes: the size the directory is kept under.

  Returns:
    The directory, or None when the cache is off.
  """
  setting = os.environ.get(ENV, "")
  if setting == "0":
    return None
  jax = sys.modules.get("jax")
  configured = (jax.config.jax_compilation_cache_dir if jax
                else os.environ.get("JAX_COMPILATION_CACHE_DIR"))
  if not (directory or setting) and configured:
    return pathlib.Path(configured)
  path = pathlib.Path(directory or setting or files.cache_dir(create=False) / "xla").expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    logging.warning("Compilation cache off: %s cannot be created (%s).", path, e.strerror)
    return None
  settings = {"jax_compilation_cache_dir": str(path),
              "jax_persistent_cache_min_compile_time_secs": MIN_COMPILE_SECONDS,
              "jax_persistent_cache_min_entry_size_bytes": 0,
              "jax_compilation_cache_max_size": int(max_bytes)}
  for name, value in settings.items():
    if jax:
      jax.config.update(name, value)
    else:  # read by jax when it is imported (and by processes started from here)
      os.environ[name.upper()] = str(value)
  logging.info("Compilation cache: %s", path)
  return path


class Background:
  """Functions run one after another on a daemon thread; `wait(n)` returns once the first n have
  run, `wait()` once all have."""

  def __init__(self, work: Iterable[Callable[[], None]]):
    work = list(work)
    self._done = [threading.Event() for _ in work]
    self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)
    _STARTED.append(self._thread)
    self._thread.start()

  def _run(self, work: list[Callable[[], None]]) -> None:
    for f, done in zip(work, self._done):
      try:
        f()
      except Exception as e:  # pylint: disable=broad-except
        # Only time is lost: the program is compiled again where it is called, which reports
        # whatever is wrong.
        logging.warning("Compiling ahead of time failed (%s: %s); compiling when called "
                        "instead.", type(e).__name__, e)
      finally:
        done.set()

  def wait(self, count: int | None = None) -> None:
    """Waits for the first `count` functions (default all): the program that runs first can
    start while the next still compiles."""
    if count is None or count >= len(self._done):
      self._thread.join()
      return
    for done in self._done[:count]:
      done.wait()


_STARTED: list[threading.Thread] = []


def busy() -> bool:
  """Whether a compilation ahead of time is still running. A process that ends then must end
  with os._exit: Python's shutdown would stop the thread inside XLA and abort the process."""
  return any(t.is_alive() for t in _STARTED)


@atexit.register
def _wait_at_exit() -> None:
  """An ordinary exit (a traceback, sys.exit) waits for the compilations still running, for the
  reason above."""
  for t in _STARTED:
    t.join()


def ahead_of_time(work: Iterable[Callable[[], None]]) -> Background:
  """Starts `work` (functions that each compile a program, e.g. `sampling.compile_generate`'s)
  on a background thread: XLA compiles without Python's lock, so the compilations overlap with
  reading the weights. Call `wait()` on the result before the programs first run: a call while
  its program is still compiling would compile it a second time.

  One after another, not in parallel: each compilation of a model's program holds about 40% of
  a float32 169M model's size in memory (0.25-0.3 GB), and two at once beside the loaded
  weights would raise the command's peak memory by that much again.
  """
  return Background(work)

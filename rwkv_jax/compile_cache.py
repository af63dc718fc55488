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

`enable` does not import jax: called before jax is imported (a runner's start, before its flags
are checked), it sets JAX's environment variables, which jax reads when it is imported, so a
mistake in the flags is still reported at once.
"""

from __future__ import annotations

import os
import pathlib
import sys

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

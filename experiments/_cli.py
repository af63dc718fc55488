"""How an entry point ends on an error: one line for the user's mistake, a traceback for a bug.

`run(main, failures=...)` replaces `app.run(main)`. A bad flag, a missing config file, an override
naming no config field, or a `UsageError` raised by main prints one line `error: ...` and exits
with status 2; a `WriteError`, a disk with no room left (`rwkv_jax.files.NoSpaceError`, or any
OSError of ENOSPC, EDQUOT or EFBIG) or one of `failures` (the run itself failed: a non-finite
loss, a busy workdir) prints one line and exits with status 1. SIGTERM and SIGINT end the program
with one line and status 128 + the signal's number; every output is written under a temporary
name and renamed when whole, so none is left half-written (training stops more gently: see
rwkv_jax/train/preemption.py). Anything else is a bug and keeps its traceback, as does
everything with --debug.

A mistake is raised as a `UsageError` where the input comes in: by the entry point's own checks,
by `output_path` (the one rule for every path a program writes), or by a library call that
checks what the user gave, wrapped in `user_input(ErrorType)`. A library's ValueError anywhere
else is a bug, and shows as one.

Every entry point run this way keeps the programs it compiles on disk and loads them on its next
run (`rwkv_jax.compile_cache`; RWKV_JAX_COMPILE_CACHE=0 turns that off, =DIR moves it).
"""

from __future__ import annotations

import contextlib
import gc
import os
import pathlib
import re
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

from absl import app, flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from rwkv_jax import compile_cache, files

_DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of every error.")

USAGE, FAILURE = 2, 1


class UsageError(app.UsageError):
  """A mistake in the command line or in the files it names: one line, exit status 2."""


class WriteError(RuntimeError):
  """An output that could not be written (a full disk, a permission): one line, exit status 1."""


class _Stopped(BaseException):
  """SIGTERM or SIGINT, raised where the program is: its outputs' temporary files are removed."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


@contextlib.contextmanager
def user_input(*errors: type[Exception], flag: str = "") -> Iterator[None]:
  """Raises the `errors` of the block as a UsageError with the same message, after `flag: `.

  Wraps a library call that checks what the user gave (a config, a data file, a tokenizer
  name), so that its ValueError says the user's mistake in one line; keep the block to that call,
  since whatever else it raised would be reported as the user's mistake too.
  """
  try:
    yield
  except errors as e:
    raise UsageError(f"{flag}: {e}" if flag else str(e)) from e


@contextlib.contextmanager
def writing(flag: str, path: str | os.PathLike[str]) -> Iterator[None]:
  """Raises an OSError of the block (which writes --flag's `path`) as a WriteError."""
  try:
    yield
  except OSError as e:
    raise WriteError(f"could not write --{flag}={path}: {e.strerror or e}.") from e


def output_path(flag: str, value: str | os.PathLike[str] | None, *,
                directory: bool = False) -> pathlib.Path | None:
  """The path --flag names for writing, checked before any work is done.

  One rule for every program: missing parent directories are created when the output is
  written; an empty value, an existing directory where a file is written (or a value ending in
  "/"), an existing file where a directory is written, a parent that is a file, and a parent
  without write permission are refused.

  Args:
    flag: the flag's name, for the message.
    value: its value; None (the flag not given) is returned as None.
    directory: whether the output is a directory (else a file, or a prefix of files).

  Returns:
    The path, or None.

  Raises:
    UsageError: naming the flag and what to pass instead.
  """
  if value is None:
    return None
  text, kind = os.fspath(value), "directory" if directory else "file"
  if not text:
    raise UsageError(f"--{flag} is empty; name a {kind}.")
  path = pathlib.Path(text).expanduser()
  if not directory and (path.is_dir() or text.endswith(("/", os.sep))):
    raise UsageError(f"--{flag}={value} is a directory; name a file inside it.")
  if directory and path.exists() and not path.is_dir():
    raise UsageError(f"--{flag}={value} is a file; name a directory.")
  folder = path.absolute() if directory and path.is_dir() else path.absolute().parent
  existing = next(p for p in (folder, *folder.parents) if p.exists())
  if not existing.is_dir():
    raise UsageError(f"--{flag}={value} cannot be written: {existing} is a file, not a "
                     f"directory; choose another --{flag}.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UsageError(f"--{flag}={value} cannot be written: no write permission in {existing}; "
                     f"choose another --{flag}.")
  return path


class _Stderr:
  """sys.stderr as it was, remembering whether a line is open; `say` writes a program's last
  line on a line of its own and drops what other threads write after it.

  After a failed save, threads of the storage library may still print tracebacks of their
  abandoned writes; without this, the error line could start in the middle of one of them
  ("...Event loop is closed')error: could not write ...") or be followed by screens of them.
  """

  def __init__(self, stream):
    self._stream, self._line_open, self._said = stream, False, False
    self._main = threading.main_thread()

  def write(self, text: str) -> int:
    if self._said and threading.current_thread() is not self._main:
      return len(text)
    if text:
      self._line_open = not text.endswith("\n")
    return self._stream.write(text)

  def say(self, line: str) -> None:
    self._said = True
    self._stream.write(("\n" if self._line_open else "") + line + "\n")
    self._line_open = False

  def __getattr__(self, name: str) -> Any:
    return getattr(self._stream, name)


def _say(line: str) -> None:
  """Writes `line` to stderr as the program's last line (see _Stderr)."""
  if isinstance(sys.stderr, _Stderr):
    sys.stderr.say(line)
  else:
    sys.stderr.write(line + "\n")


def _fail(status: int, message: str) -> None:
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  _say(f"error: {' '.join(lines)}")
  if compile_cache.busy():  # at once, without waiting for a compilation that is now of no use
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(status)


def _config_files(argv: list[str]) -> list[tuple[str, str]]:
  """(flag, path) of every config-file flag on the command line (--flag=PATH or --flag PATH)."""
  names = {name for name in flags.FLAGS
           if isinstance(flags.FLAGS[name].parser, ConfigFileFlagParser)}
  found = []
  for arg, following in zip(argv[1:], [*argv[2:], None]):
    match = re.fullmatch(r"--?([\w-]+)(?:=(.*))?", arg)
    if match and match.group(1) in names:
      value = match.group(2) if match.group(2) is not None else following
      if value is not None:
        found.append((match.group(1), value))
  return found


def _parse(argv: list[str]) -> list[str]:
  debug = any(re.fullmatch(r"--?debug(=(1|true|True))?", arg) for arg in argv[1:])
  for name, value in _config_files(argv):
    path = value.split(":", 1)[0]  # PATH:ARGS passes ARGS to get_config
    if not os.path.isfile(path) and not debug:
      _fail(USAGE, f"--{name}={value}: there is no file {path}; pass the path of a config file.")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if debug:
      raise
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # a config file's error, wrapped
      _fail(USAGE, f"{lines[0]} {lines[-1]} (--debug shows the traceback).")
    _fail(USAGE, f"{e} (--helpshort lists the flags).")
  except (AttributeError, KeyError) as e:  # an override --config.a.b=v naming no field
    if debug:
      raise
    while e.args and isinstance(e.args[0], BaseException):  # ConfigDict wraps its KeyError
      e = e.args[0]
    field, *hint = str(e.args[0] if e.args else e).splitlines()  # 'name', "Did you mean ..."
    field = field.strip("\"'")
    given = [a.split("=", 1)[0] for a in argv[1:]
             if "." in a and field in a.split("=", 1)[0].split(".")]
    _fail(USAGE, f"{', '.join(given) or field}: the config has no field {field!r}. "
                 f"{' '.join(hint) or 'Check the spelling against the config file.'}")
  except Exception as e:  # pylint: disable=broad-except  (e.g. a config file that fails)
    if debug:
      raise
    # ml_collections puts a TypeError's or ValueError's traceback into its message: keep the end.
    last = ([line for line in str(e).splitlines() if line.strip()] or [""])[-1].strip()
    if not last.startswith(type(e).__name__):
      last = f"{type(e).__name__}: {last}"
    what = " or ".join(f"--{n}={v}" for n, v in _config_files(argv)) or "the command line"
    _fail(USAGE, f"{what} failed to load: {last} (--debug shows the traceback).")


INT32_MIN, INT32_MAX = -2**31, 2**31 - 1  # token ids, lengths, counts: int32 arrays in the end


def integers(flag: str, value: str | Sequence[str], *, minimum: int = INT32_MIN,
             maximum: int = INT32_MAX, allow_empty: bool = False) -> list[int]:
  """The integers of --flag: comma-separated text ("1, 2,3") or a flags.DEFINE_list value.

  Raises:
    UsageError: naming the flag, for anything but integers, one below `minimum` or above
      `maximum` (by default, outside int32), or none (unless allow_empty).
  """
  items = value.split(",") if isinstance(value, str) else list(value)
  items = [x.strip() for x in items if x.strip()]
  shown = value if isinstance(value, str) else ",".join(value)
  try:
    ids = [int(x) for x in items]
  except ValueError:
    raise UsageError(f"--{flag}={shown!r} must be comma-separated integers, e.g. "
                     f"--{flag}=1,2,3.") from None
  if not ids and not allow_empty:
    raise UsageError(f"--{flag} is empty; give at least one integer.")
  if any(i < minimum for i in ids):
    raise UsageError(f"--{flag}={shown}: every value must be >= {minimum}.")
  if any(i > maximum for i in ids):
    raise UsageError(f"--{flag}={shown}: {max(ids)} is too large; every value must be <= "
                     f"{maximum}.")
  return ids


def load_model_and_tokenizer(checkpoint: str, dtype: str | None, tokenizer_name: str, *,
                             prepare: Callable[[Any, Any], None] | None = None,
                             adapters: str | None = None):
  """(model, config, tokenizer) for a runner's --checkpoint, --dtype and --tokenizer, each mistake
  one line naming its flag; a tokenizer larger than the model's vocabulary is refused.

  `adapters` (--adapters) is a fine-tuning run's adapters directory, put on the checkpoint
  unmerged (`rwkv_jax.train.adapters.load`); adapters of another base are refused in one line.

  `prepare(config, tokenizer)` is called once the checkpoint's shape is known, before its weights
  are read (`weights.load`'s on_config): a runner checks its inputs against the model there, and
  starts compiling its programs (`compile_cache.ahead_of_time`) while the weights load.
  """
  from rwkv_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from rwkv_jax.io import weights  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(checkpoint)
  if not path.exists():
    raise UsageError(f"--checkpoint={path} does not exist; pass an official RWKV-4 .pth file, a "
                     f"HuggingFace directory or an rwkv_jax export.")
  if adapters is not None and not pathlib.Path(adapters).is_dir():
    raise UsageError(f"--adapters={adapters} is not a directory; pass the adapters/ directory of "
                     f"a fine-tuning run (experiments.finetune --workdir=DIR writes DIR/adapters).")
  with user_input(ValueError, OSError, flag="--tokenizer"):
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_name)

  def on_config(config) -> None:
    if tokenizer.vocab_size > config.vocab_size:
      raise UsageError(
          f"--tokenizer={tokenizer_name} has {tokenizer.vocab_size} tokens but the model only "
          f"{config.vocab_size}; use the tokenizer the model was trained with (RWKV-4 Pile "
          f"models: neox; byte-level models: bytes).")
    if prepare is not None:
      prepare(config, tokenizer)

  # A CheckpointError, or a --dtype the checkpoint cannot hold (`prepare` raises UsageErrors).
  with user_input(ValueError, FileNotFoundError, flag=f"--checkpoint={path} --dtype={dtype}"):
    model, config = weights.load(path, dtype=dtype, on_config=on_config)
  if adapters is not None:  # weights.load(adapters=)'s two steps, so that errors name their flag
    from rwkv_jax.train import adapters as adapters_lib  # pylint: disable=g-import-not-at-top
    with user_input(ValueError, FileNotFoundError, flag=f"--adapters={adapters}"):
      model = adapters_lib.load(model, adapters, adapters_lib.base_digest(path))
  return model, config, tokenizer


def chunk_for(requested: int, longest: int) -> int:
  """Tokens per model call for inputs of at most `longest` tokens: `requested`, or the power of
  two (at least 16) at or above `longest` when that is smaller.

  Every chunk is padded to the chunk length (rwkv_jax.infer.chunks), so a 100-token prompt in
  chunks of 1,024 would run ten times the work it needs; rounding up to a power of two keeps the
  programs the lengths of a command compile to a few (one per power of two), each loaded from the
  compilation cache on later runs.
  """
  return min(requested, max(16, 1 << max(longest - 1, 0).bit_length()))


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
  """Raises SIGTERM and SIGINT as _Stopped in the main thread for the block; a second one ends
  the program at once."""

  def stop(signum: int, unused_frame) -> None:
    for s in (signal.SIGTERM, signal.SIGINT):
      signal.signal(s, signal.SIG_DFL)
    raise _Stopped(signum)

  previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def run(main: Callable[[list[str]], None], *,
        failures: tuple[type[BaseException], ...] = ()) -> None:
  """Runs `main` as `app.run` does, turning the user's mistakes and failed runs into one line.

  Args:
    main: the entry point's main(argv).
    failures: what main raises when the run fails through no mistake in the command (status 1),
      besides WriteError.
  """

  def checked_main(argv: list[str]) -> None:
    compile_cache.enable()  # imports no jax: a mistake in the flags is still reported at once
    if not isinstance(sys.stderr, _Stderr):
      sys.stderr = _Stderr(sys.stderr)
    try:
      with _stopped_by_signals():
        main(argv)
      # What is alive now lives until exit: Python's last collections over jax's objects at
      # exit would take most of a second.
      gc.freeze()
    except _Stopped as e:
      sys.stdout.flush()
      _say(f"error: stopped by {signal.Signals(e.signum).name}; outputs not yet complete were "
           f"not written.")
      sys.stderr.flush()
      os._exit(128 + e.signum)  # at once: no background work is worth waiting for
    except (WriteError, files.NoSpaceError, *failures) as e:
      if _DEBUG.value:
        raise
      _fail(FAILURE, str(e))
    except OSError as e:
      if _DEBUG.value or e.errno not in files.NO_ROOM:
        raise
      _fail(FAILURE, str(files.NoSpaceError(e.errno, e.filename or "an output")))
    except app.UsageError as e:  # UsageError, and absl's own
      if _DEBUG.value:
        raise
      _fail(USAGE, str(e))

  app.run(checked_main, flags_parser=_parse)

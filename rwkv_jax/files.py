"""Files on disk: the one atomic write, the one cache directory, and a disk with no room left.

Every file rwkv_jax writes (weights, encoded data, downloaded assets, results) goes through
`atomic_write`: the bytes land in a temporary file beside the destination, which is renamed over
it only once complete, so a reader or a killed process never sees half a file.

A write that fails because the disk (or the quota, or the file size limit) is full raises
`NoSpaceError`, an OSError whose message is one line naming the destination, the cause and what
to do; the libraries underneath report it in their own ways, which `no_room` reads.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pathlib
import re
import tempfile
from collections.abc import Iterator

CACHE_ENV = "RWKV_JAX_CACHE"

PathLike = str | os.PathLike[str]

# The errno of a write that found no room: a full disk, a full quota, the file size limit.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# How a failed write's errno shows in messages: tensorstore's (Orbax) and Rust's (safetensors).
_ERRNO_IN_MESSAGE = re.compile(r"os_error_code='(\d+)'|\(os error (\d+)\)")
# Less free space than this after a write failed without saying why means the disk filled up.
_FULL_BELOW_BYTES = 1 << 20


class NoSpaceError(OSError):
  """A write that found no room (ENOSPC, EDQUOT or EFBIG), naming what could not be written.

  `str()` is one line: the path, the cause and what to do.
  """

  def __init__(self, code: int, path: PathLike, advice: str = ""):
    super().__init__(code, os.strerror(code), os.fspath(path))
    self.advice = advice or "free space there and run the same command again."

  def __str__(self) -> str:
    return (f"could not write {self.filename}: {self.strerror} "
            f"({errno.errorcode.get(self.errno, self.errno)}); {self.advice}")

  def __reduce__(self):
    return type(self), (self.errno, self.filename, self.advice)


def no_room(error: BaseException, directory: PathLike | None = None) -> int | None:
  """The errno if `error`, or an error it came from, is a write that found no room; else None.

  Args:
    error: what a write raised. An OSError carries its errno; Orbax (tensorstore) and
      safetensors put it in their message; torch.save says only "unexpected pos".
    directory: where the write went. For an error that names no errno, free space below 1 MiB
      there (measured before the failed write's temporary file is removed) means ENOSPC.

  Returns:
    ENOSPC, EDQUOT or EFBIG, or None.
  """
  seen: set[int] = set()
  cause: BaseException | None = error
  while cause is not None and id(cause) not in seen:
    seen.add(id(cause))
    code = cause.errno if isinstance(cause, OSError) else None
    if code is None:
      match = _ERRNO_IN_MESSAGE.search(str(cause))
      code = int(match.group(1) or match.group(2)) if match else None
    if code in NO_ROOM:
      return code
    cause = cause.__cause__ or cause.__context__
  if directory is not None and not isinstance(error, OSError):
    try:
      stat = os.statvfs(directory)
    except OSError:
      return None
    if stat.f_bavail * stat.f_frsize < _FULL_BELOW_BYTES:
      return errno.ENOSPC
  return None


@contextlib.contextmanager
def reporting_no_room(path: PathLike, advice: str = "") -> Iterator[None]:
  """Raises an error of the block that is a write finding no room as NoSpaceError naming `path`.

  Args:
    path: what the block writes (a file or a directory), for the message and the free space.
    advice: what to do, for the message; default: free space and run the same command again.
  """
  try:
    yield
  except NoSpaceError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (every library reports it its own way)
    directory = pathlib.Path(path)
    while not directory.is_dir() and directory != directory.parent:
      directory = directory.parent
    code = no_room(e, directory)
    if code is None:
      raise
    raise NoSpaceError(code, path, advice) from e


def cache_dir(directory: PathLike | None = None, *, create: bool = True) -> pathlib.Path:
  """Resolves the cache directory: the argument, then $RWKV_JAX_CACHE, then ~/.cache/rwkv_jax.

  Args:
    directory: explicit directory; wins over the environment.
    create: create the directory if it does not exist.

  Returns:
    The directory.
  """
  if directory is not None:
    path = pathlib.Path(directory).expanduser()
  elif os.environ.get(CACHE_ENV):
    path = pathlib.Path(os.environ[CACHE_ENV]).expanduser()
  else:
    path = pathlib.Path.home() / ".cache" / "rwkv_jax"
  if create:
    path.mkdir(parents=True, exist_ok=True)
  return path


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary path beside `path`; renames it onto `path` when the block succeeds.

  For writers that take a file name (torch.save, np.save, safetensors). On any exception the
  temporary file is removed and `path` is left as it was; one of a disk with no room left is
  raised as NoSpaceError naming `path`.

  Args:
    path: the destination; its parent directory is created.

  Yields:
    The temporary path to write.
  """
  path = pathlib.Path(path)
  with reporting_no_room(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  tmp_path = pathlib.Path(tmp)
  try:
    yield tmp_path
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes it owner-only; honour the umask
    os.replace(tmp_path, path)
  except BaseException as e:
    # Measured while the temporary file still takes its room (torch.save does not say why).
    code = no_room(e, path.parent) if isinstance(e, Exception) else None
    tmp_path.unlink(missing_ok=True)
    if code is not None and not isinstance(e, NoSpaceError):
      raise NoSpaceError(code, path) from e
    raise


def _umask() -> int:
  mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: str | None = None):
  """Opens a file whose content replaces `path` only when the block completes.

  Args:
    path: the destination; its parent directory is created.
    mode: "wb" or "w".
    encoding: text encoding for mode "w" (default utf-8).

  Yields:
    The open temporary file.
  """
  if mode not in ("wb", "w"):
    raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
  if mode == "w" and encoding is None:
    encoding = "utf-8"
  with atomic_path(path) as tmp:
    with open(tmp, mode, encoding=encoding) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())


def sha256(path: PathLike) -> str:
  """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()

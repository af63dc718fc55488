"""Files on disk: the one atomic write and the one cache directory of rwkv_jax.

Every file rwkv_jax writes (weights, encoded data, downloaded assets, results) goes through
`atomic_write`: the bytes land in a temporary file beside the destination, which is renamed over
it only once complete, so a reader or a killed process never sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import tempfile
from collections.abc import Iterator

CACHE_ENV = "RWKV_JAX_CACHE"

PathLike = str | os.PathLike[str]


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
  temporary file is removed and `path` is left as it was.

  Args:
    path: the destination; its parent directory is created.

  Yields:
    The temporary path to write.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  tmp_path = pathlib.Path(tmp)
  try:
    yield tmp_path
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes it owner-only; honour the umask
    os.replace(tmp_path, path)
  except BaseException:
    tmp_path.unlink(missing_ok=True)
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

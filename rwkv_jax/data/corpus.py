"""Real text corpora: a Wikipedia XML sample from a PyPI wheel, and enwik8.

Both land in a cache directory and are fetched at most once:
`cache_dir` argument > `$RWKV_JAX_CACHE` > `~/.cache/rwkv_jax`.

- `wiki_sample()`: 6.09 MB of raw English Wikipedia XML (CC BY-SA), the same kind of data as
  enwik8. It ships inside the `gensim==4.4.0` wheel as a test file, so it is reachable wherever
  PyPI is (`pip download`), even without general internet access.
- `enwik8()`: the first 10^8 bytes of a 2006 English Wikipedia dump (Hutter prize), downloaded
  from mattmahoney.net; needs general internet access.
"""

from __future__ import annotations

import bz2
import os
import pathlib
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile

from rwkv_jax import files
from rwkv_jax.data import assets

WIKI_SAMPLE_NAME = "enwiki_sample.xml"
GENSIM_REQUIREMENT = "gensim==4.4.0"
GENSIM_MEMBER = (
    "gensim/test/test_data/"
    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_NAME = "enwik8"
ENWIK8_BYTES = 100_000_000


class DownloadError(RuntimeError):
  """A corpus could not be fetched; the message says how to provide it by hand."""


def _download_gensim_wheel(workdir: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
  try:
    return assets.download_wheel(GENSIM_REQUIREMENT, target, workdir)
  except assets.AssetError as e:
    raise DownloadError(str(e)) from e


def wiki_sample(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns the path of a 6.09 MB English Wikipedia XML sample (CC BY-SA), fetching it once.

  The file comes from the `gensim==4.4.0` wheel on PyPI (any platform's wheel holds it). With
  the XML already in the cache, or a `gensim-4.4.0-*.whl` placed there by hand, no network is
  used.

  Args:
    cache_dir: where to keep `enwiki_sample.xml` (default: `files.cache_dir()`).

  Returns:
    Path to the decompressed XML, which starts with `<mediawiki`.

  Raises:
    DownloadError: the wheel could not be downloaded; the message says where to put it by hand.
  """
  root = files.cache_dir(cache_dir)
  target = root / WIKI_SAMPLE_NAME
  if target.exists():
    return target
  with tempfile.TemporaryDirectory(dir=root) as tmp:
    local = sorted(root.glob("gensim-4.4.0-*.whl"))
    try:
      wheel = local[0] if local else _download_gensim_wheel(pathlib.Path(tmp), target)
    except DownloadError as e:
      raise DownloadError(
          f"Could not fetch the Wikipedia sample: {e}\n"
          f"To provide it by hand, download any {GENSIM_REQUIREMENT} wheel from PyPI into "
          f"{root}, or extract {GENSIM_MEMBER} from it, decompress it (bunzip2) and save it as "
          f"{target}.") from e
    with zipfile.ZipFile(wheel) as zf, zf.open(GENSIM_MEMBER) as member, \
         files.atomic_write(target) as out:
      shutil.copyfileobj(bz2.BZ2File(member), out, 1 << 20)
  return target


def enwik8(cache_dir: str | os.PathLike | None = None, *, url: str = ENWIK8_URL,
           timeout: float = 60.0) -> pathlib.Path:
  """Returns the path of enwik8 (10^8 bytes of Wikipedia XML), downloading it once.

  Args:
    cache_dir: where to keep `enwik8` (default: `files.cache_dir()`).
    url: where to download `enwik8.zip` from.
    timeout: seconds to wait for the server before giving up.

  Returns:
    Path to the unzipped 100,000,000-byte file.

  Raises:
    DownloadError: no internet access or a bad download; the message says what to do instead.
  """
  root = files.cache_dir(cache_dir)
  target = root / ENWIK8_NAME
  if target.exists():
    return target
  with tempfile.TemporaryDirectory(dir=root) as tmp:
    zip_path = pathlib.Path(tmp) / "enwik8.zip"
    try:
      with urllib.request.urlopen(url, timeout=timeout) as response, open(zip_path, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)
      with zipfile.ZipFile(zip_path) as zf, zf.open(ENWIK8_NAME) as member, \
           files.atomic_write(target) as out:
        shutil.copyfileobj(member, out, 1 << 20)
    except (urllib.error.URLError, OSError, zipfile.BadZipFile, KeyError) as e:
      raise DownloadError(
          f"enwik8 needs internet access to download {url} ({type(e).__name__}: {e}). "
          f"Put the unzipped file at {target} by hand, or pass --config.data.path=FILE to "
          f"train on your own file.") from e
  if target.stat().st_size != ENWIK8_BYTES:
    size = target.stat().st_size
    target.unlink()
    raise DownloadError(
        f"Downloaded enwik8 has {size} bytes, expected {ENWIK8_BYTES}; {url} served a "
        f"different file. Put the real file at {target} by hand.")
  return target

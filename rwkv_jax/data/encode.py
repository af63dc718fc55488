"""Text to tokens, once: a text file tokenized into a binidx pair, cached by what produced it.

    encode_text_file(path, tokenizer, prefix)   one document per paragraph (or line), each ended
                                                by END_OF_DOCUMENT, written as PREFIX.bin/.idx
    encode_once(path, tokenizer_name, prefix)   the same, skipped when PREFIX.source.json records
                                                this very text, tokenizer and encoding
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from absl import logging

from rwkv_jax import files
from rwkv_jax.data import binidx
from rwkv_jax.data.tokenizer import Tokenizer, load_tokenizer

# The official RWKV make_data.py ends every document with token 0 (<|endoftext|> in the NeoX
# 20B and World vocabularies), so documents stay separated once the trainer concatenates them.
END_OF_DOCUMENT = 0


def check_exists(path: pathlib.Path, what: str) -> None:
  if not path.exists():
    raise FileNotFoundError(
        f"{what} {path} does not exist; pass an existing file (e.g. --config.data.path=FILE).")


# Bump when encode_text_file's output for the same text and tokenizer changes.
_ENCODING = {"version": 1, "split": "paragraph", "end_of_document": END_OF_DOCUMENT}


def _file_identity(path: pathlib.Path) -> dict[str, Any]:
  stat = path.stat()
  return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": files.sha256(path)}


def _encoding_key(path: pathlib.Path, tokenizer_name: str) -> dict[str, Any]:
  """What the encoded tokens depend on: the text, the tokenizer and the encoding."""
  key = {"text": _file_identity(path), "tokenizer": tokenizer_name, "encoding": _ENCODING}
  tokenizer_file = pathlib.Path(tokenizer_name).expanduser()
  if tokenizer_file.is_file():  # a vocabulary file can change under the same name
    key["tokenizer_file"] = _file_identity(tokenizer_file)
  return key


def encode_once(path: pathlib.Path, tokenizer_name: str, prefix: pathlib.Path) -> pathlib.Path:
  """Encodes text `path` into binidx PREFIX unless it already holds exactly that encoding.

  The cache is keyed by what produced it (PREFIX.source.json): a file of the same name with
  other content, or another tokenizer, is encoded again. Process 0 decides and writes; the
  others wait for it.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0:
    record = prefix.with_name(prefix.name + ".source.json")
    key = _encoding_key(path, tokenizer_name)
    cached = json.loads(record.read_text()) if record.exists() else None
    if cached is None or cached.get("key") != key or not binidx.binidx_paths(prefix)[1].exists():
      if binidx.binidx_paths(prefix)[1].exists():
        logging.warning("Encoding %s again: %s holds tokens of %s.", path,
                        binidx.binidx_paths(prefix)[0],
                        "an unrecorded source" if cached is None else
                        f"another text or tokenizer ({cached.get('path')}, "
                        f"{cached.get('key', {}).get('tokenizer')})")
      record.unlink(missing_ok=True)  # a crash mid-encoding must not leave a matching record
      encode_text_file(path, load_tokenizer(tokenizer_name), prefix)
      with files.atomic_write(record, "w") as f:
        json.dump({"path": str(path.absolute()), "key": key}, f, indent=2)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices("encoded_data")
  return prefix


def _iter_text_documents(path: pathlib.Path, split: str) -> Iterator[str]:
  with open(path, encoding="utf-8") as f:
    if split == "line":
      for line in f:
        line = line.rstrip("\n")
        if line.strip():
          yield line
      return
    paragraph: list[str] = []
    for line in f:
      if line.strip():
        paragraph.append(line)
      elif paragraph:
        yield "".join(paragraph).rstrip("\n")
        paragraph = []
    if paragraph:
      yield "".join(paragraph).rstrip("\n")


def encode_text_file(path: str | os.PathLike, tokenizer: Tokenizer,
                     out_prefix: str | os.PathLike, *,
                     split: Literal["paragraph", "line"] = "paragraph",
                     dtype: np.dtype | type | None = None,
                     end_of_document: int | None = END_OF_DOCUMENT,
                     ) -> binidx.BinidxSource:
  """Tokenizes a UTF-8 text file into a binidx pair, one document per paragraph or line.

  Documents are paragraphs separated by one or more blank lines (split="paragraph", the
  default, which keeps multi-line text such as verse or code whole) or single non-empty lines
  (split="line", e.g. one article per line). Each document is encoded on its own and followed
  by `end_of_document` (token 0, as the official RWKV make_data.py does); the blank lines
  themselves are not encoded.

  Args:
    path: the text file.
    tokenizer: any object with `.encode(str) -> list[int]` and `.vocab_size`.
    out_prefix: output prefix; OUT_PREFIX.bin and OUT_PREFIX.idx are written.
    split: "paragraph" or "line", see above.
    dtype: token dtype; default uint16 when the vocabulary fits (NeoX 50277, World 65536),
      else int32.
    end_of_document: token appended to every document, or None for none.

  Returns:
    The written pair, opened as a `BinidxSource`.
  """
  path = pathlib.Path(path).expanduser()
  check_exists(path, "Text file")
  if split not in ("paragraph", "line"):
    raise ValueError(f"split={split!r}; use 'paragraph' or 'line'.")
  vocab_size = int(tokenizer.vocab_size)
  if dtype is None:
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
  dtype = np.dtype(dtype)
  if dtype.kind not in "iu" or vocab_size - 1 > np.iinfo(dtype).max:
    raise ValueError(f"Tokenizer vocab_size {vocab_size} does not fit in {dtype.name}; pass "
                     f"dtype=np.int32 (or leave dtype unset to choose automatically).")

  def documents() -> Iterator[np.ndarray]:
    for text in _iter_text_documents(path, split):
      ids = tokenizer.encode(text)
      ids = list(getattr(ids, "ids", ids))  # accept tokenizers.Encoding too
      if end_of_document is not None:
        ids.append(end_of_document)
      yield np.asarray(ids, np.int64)

  docs = documents()
  first = next(docs, None)
  if first is None:  # an empty pair would be unreadable, and there is nothing to train on
    raise ValueError(f"Text file {path} holds no text (it is empty or only blank lines); pass "
                     f"a file with text in it.")
  binidx.write_binidx(out_prefix, itertools.chain([first], docs), dtype=dtype)
  return binidx.BinidxSource(out_prefix)

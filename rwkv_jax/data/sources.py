"""Token sources: files turned into one 1-D token stream (`source.tokens`, memory-mapped where
it can be).

    ByteSource(path_or_dir)   any file(s) as bytes, vocab 256 (enwik8, the Wikipedia sample)
    BinidxSource(prefix)      a Megatron binidx pair (rwkv_jax/data/binidx.py), documents joined
    open_source(path)         picks one of the two from the path
    open_training_source(config.data, ...)   the source an experiment config names, a text file
                                             tokenized once (rwkv_jax/data/encode.py), a .jsonl
                                             file read as documents (rwkv_jax/data/documents.py)
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from rwkv_jax.data import binidx, documents, encode
from rwkv_jax.data.tokenizer import load_tokenizer


class ByteSource:
  """Raw bytes of a file, or of every file under a directory, as tokens (vocab 256).

  A single file is memory-mapped. A directory's files (recursively, sorted by path, hidden
  files skipped) are read into memory and joined with b"\\n" so documents do not run together.

  Attributes:
    path: the file or directory given.
    tokens: uint8 [n] token stream.
    vocab_size: 256.
  """

  vocab_size = 256

  def __init__(self, path_or_dir: str | os.PathLike):
    self.path = pathlib.Path(path_or_dir).expanduser()
    encode.check_exists(self.path, "Data path")
    if self.path.is_dir():
      files = sorted(p for p in self.path.rglob("*")
                     if p.is_file() and not any(part.startswith(".")
                                                for part in p.relative_to(self.path).parts))
      if not files:
        raise ValueError(f"Data directory {self.path} holds no files; put text files in it.")
      self.tokens = np.frombuffer(b"\n".join(p.read_bytes() for p in files), dtype=np.uint8)
    else:
      # np.memmap refuses empty files; report those like any other too-short stream.
      if self.path.stat().st_size == 0:
        self.tokens = np.zeros((0,), np.uint8)
      else:
        self.tokens = np.memmap(self.path, dtype=np.uint8, mode="r")
    if len(self.tokens) == 0:
      raise ValueError(f"Data path {self.path} is empty (0 bytes); use a file with text in it.")

  def __len__(self) -> int:
    return len(self.tokens)

  def __repr__(self) -> str:
    return f"ByteSource({str(self.path)!r}, {len(self)} tokens)"


def open_source(path: str | os.PathLike) -> ByteSource | binidx.BinidxSource:
  """Opens `path` as binidx when it names a .bin/.idx pair (or its prefix), else as bytes.

  Args:
    path: a text/binary file, a directory of files, or a binidx prefix / .bin / .idx path.

  Returns:
    A `BinidxSource` or a `ByteSource`.
  """
  if binidx.is_binidx(path):
    return binidx.BinidxSource(path)
  return ByteSource(path)


def open_training_source(data_config: Any, workdir: str | os.PathLike, vocab_size: int
                         ) -> ByteSource | binidx.BinidxSource | documents.DocumentSource:
  """The token source an experiment config's `data` section names, tokenized if it must be.

  A .jsonl file is read as documents with the config's tokenizer ("bytes" = UTF-8 bytes): one
  training example per document with a loss mask, "text" or "prompt"/"response" records
  (rwkv_jax/data/documents.py). It is tokenized in memory at every start.

  A text file with a tokenizer other than "bytes" is encoded once into WORKDIR/data/NAME.bin/.idx
  (by process 0, the others wait) and read from there on later runs, as long as the text file,
  the tokenizer and the encoding are those recorded beside it in NAME.source.json; otherwise it
  is encoded again.

  Args:
    data_config: `config.data` (rwkv_jax/train_config.py): source, path and tokenizer.
    workdir: the run's directory.
    vocab_size: the model's vocabulary; a stream with a larger token id is an error.

  Returns:
    The opened source.

  Raises:
    documents.JsonlError: a JSONL line is not a record of its file's format (FILE:LINE).
  """
  from rwkv_jax.data import corpus  # pylint: disable=g-import-not-at-top  (downloads on demand)

  d = data_config
  if d.source == "wiki_sample":
    path = corpus.wiki_sample()
  elif d.source == "enwik8":
    path = corpus.enwik8()
  elif d.source == "file":
    if not d.path:
      raise ValueError("--config.data.source=file needs --config.data.path=FILE_OR_DIR_OR_PREFIX.")
    path = pathlib.Path(d.path)
  else:
    raise ValueError(f"--config.data.source={d.source!r}; use wiki_sample, enwik8 or file.")
  if documents.is_jsonl(path):
    source = documents.read_jsonl(path, load_tokenizer(d.tokenizer))
  elif d.tokenizer != "bytes" and not binidx.is_binidx(path):
    prefix = pathlib.Path(workdir) / "data" / pathlib.Path(path).name
    source = open_source(encode.encode_once(path, d.tokenizer, prefix))
  else:
    source = open_source(path)
  # A bounded prefix: a full scan of a Pile-sized memmap would read it all from disk.
  top = int(np.max(source.tokens[: min(len(source.tokens), 1 << 24)])) + 1
  if top > vocab_size:
    raise ValueError(f"{source.path} holds token ids up to {top - 1} but "
                     f"--config.model.vocab_size={vocab_size}; raise the vocabulary "
                     f"size or use the matching tokenizer.")
  return source

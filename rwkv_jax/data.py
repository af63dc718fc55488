"""Training data: token sources, their tokenization, and the grain sample pipeline.

A source turns files into one 1-D token stream (`source.tokens`, memory-mapped where it can be):

    ByteSource(path_or_dir)   any file(s) as bytes, vocab 256 (enwik8, the Wikipedia sample)
    BinidxSource(prefix)      a Megatron binidx pair (rwkv_jax/binidx.py), documents joined
    open_source(path)         picks one of the two from the path
    encode_text_file(...)     tokenizes a text file into a binidx pair, once
    open_training_source(config.data, ...)   all of the above, as an experiment config names it

`make_dataset(tokens, ctx_len, batch_size, seed, ...)` turns a stream into a grain `IterDataset`
of {"inputs": int32 [b, t], "targets": int32 [b, t]} (b = per-host batch, t = ctx_len), built
from windows of ctx_len + 1 tokens with targets = inputs shifted by one. The last `val_fraction`
of the stream is held out for validation. Iterators are checkpointable:

    it = iter(make_dataset(source, ctx_len=1024, batch_size=16, seed=0))
    state = it.get_state()        # a small JSON-able dict
    it.set_state(state)           # the same batches follow again

With Orbax, grain's handler saves that state next to the model (one JSON file per host):

    import grain, orbax.checkpoint as ocp
    mngr.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model_state), data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(it)))
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any, Literal

import grain
import numpy as np
from absl import logging

from rwkv_jax import binidx, files
from rwkv_jax.tokenizer import Tokenizer, load_tokenizer

# Shape legend: b = per-host batch, t = ctx_len (tokens per example), n = stream length.

# The official RWKV make_data.py ends every document with token 0 (<|endoftext|> in the NeoX
# 20B and World vocabularies), so documents stay separated once the trainer concatenates them.
END_OF_DOCUMENT = 0


# ----------------------------------------------------------------------------------------------
# Sources


def _check_exists(path: pathlib.Path, what: str) -> None:
  if not path.exists():
    raise FileNotFoundError(
        f"{what} {path} does not exist; pass an existing file (e.g. --config.data.path=FILE).")


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
    _check_exists(self.path, "Data path")
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


def open_training_source(data_config: Any, workdir: str | os.PathLike,
                         vocab_size: int) -> ByteSource | binidx.BinidxSource:
  """The token source an experiment config's `data` section names, tokenized if it must be.

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
  """
  from rwkv_jax import corpus  # pylint: disable=g-import-not-at-top  (downloads on demand)

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
  if d.tokenizer != "bytes" and not binidx.is_binidx(path):
    path = _encode_once(path, d.tokenizer, pathlib.Path(workdir) / "data" / pathlib.Path(path).name)
  source = open_source(path)
  # A bounded prefix: a full scan of a Pile-sized memmap would read it all from disk.
  top = int(np.max(source.tokens[: min(len(source.tokens), 1 << 24)])) + 1
  if top > vocab_size:
    raise ValueError(f"{source.path} holds token ids up to {top - 1} but "
                     f"--config.model.vocab_size={vocab_size}; raise the vocabulary "
                     f"size or use the matching tokenizer.")
  return source


# Bump when encode_text_file's output for the same text and tokenizer changes.
_ENCODING = {"version": 1, "split": "paragraph", "end_of_document": END_OF_DOCUMENT}


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _file_identity(path: pathlib.Path) -> dict[str, Any]:
  stat = path.stat()
  return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(path)}


def _encoding_key(path: pathlib.Path, tokenizer_name: str) -> dict[str, Any]:
  """What the encoded tokens depend on: the text, the tokenizer and the encoding."""
  key = {"text": _file_identity(path), "tokenizer": tokenizer_name, "encoding": _ENCODING}
  tokenizer_file = pathlib.Path(tokenizer_name).expanduser()
  if tokenizer_file.is_file():  # a vocabulary file can change under the same name
    key["tokenizer_file"] = _file_identity(tokenizer_file)
  return key


def _encode_once(path: pathlib.Path, tokenizer_name: str, prefix: pathlib.Path) -> pathlib.Path:
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
  _check_exists(path, "Text file")
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


# ----------------------------------------------------------------------------------------------
# The sample pipeline


class _Windows(grain.transforms.Map):
  """Maps a batch of window starts [b] to {"inputs", "targets"} int32 [b, t].

  Pickles a memory-mapped stream as its file name (not its contents) so worker processes
  re-open the file instead of receiving a copy of it.
  """

  def __init__(self, tokens: np.ndarray, ctx_len: int):
    self.tokens = tokens
    self.ctx_len = ctx_len

  def map(self, starts_b: np.ndarray) -> dict[str, np.ndarray]:
    offsets = np.arange(self.ctx_len + 1)
    window_bt = np.asarray(self.tokens[np.asarray(starts_b)[:, None] + offsets], np.int32)
    return {"inputs": window_bt[:, :-1], "targets": window_bt[:, 1:]}

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    tokens = self.tokens
    if isinstance(tokens, np.memmap) and tokens.filename is not None:
      state["tokens"] = ("memmap", tokens.filename, tokens.dtype.str, tokens.offset,
                         tokens.shape)
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    tokens = state["tokens"]
    if isinstance(tokens, tuple) and tokens[0] == "memmap":
      _, filename, dtype, offset, shape = tokens
      state["tokens"] = np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=shape)
    self.__dict__.update(state)


@dataclasses.dataclass(frozen=True)
class Split:
  """Where the train and val windows lie in a stream of n tokens.

  Training windows start anywhere in [0, train_end - ctx_len - 1]; validation windows tile
  [train_end, n) with stride ctx_len (every val token is a target exactly once). No window of
  one split touches a token of the other.
  """
  num_tokens: int
  train_end: int
  ctx_len: int

  @property
  def num_train_windows(self) -> int:
    return max(self.train_end - self.ctx_len, 0)

  @property
  def num_val_windows(self) -> int:
    return max((self.num_tokens - self.train_end - 1) // self.ctx_len, 0)

  def val_starts(self) -> np.ndarray:
    return self.train_end + self.ctx_len * np.arange(self.num_val_windows, dtype=np.int64)


def split_stream(num_tokens: int, ctx_len: int, val_fraction: float) -> Split:
  """Returns the train/val split of a stream: the last `val_fraction` of it is validation."""
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction={val_fraction}; use a value in [0, 1).")
  return Split(num_tokens, num_tokens - int(num_tokens * val_fraction), ctx_len)


def make_dataset(tokens: np.ndarray | ByteSource | binidx.BinidxSource, ctx_len: int,
                 batch_size: int, seed: int, *, split: Literal["train", "val"] = "train",
                 val_fraction: float = 0.01, shard_index: int = 0, shard_count: int = 1,
                 worker_count: int = 0,
                 read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """Builds the grain pipeline of next-token examples.

  train: windows start at every position of the training part, visited in a seeded random
  order without replacement; each epoch is reshuffled (grain folds the epoch into the seed) and
  the dataset repeats forever. val: non-overlapping windows of the held-out tail in stream
  order, one pass; windows that would leave a global batch incomplete are dropped so every host
  gets the same number of batches.

  Sharding: `batch_size` is the global batch. Global batch k is the single-host batch k;
  host i gets its rows [i * b, (i + 1) * b) with b = batch_size // shard_count, so
  concatenating the hosts' batches in host order gives the single-host batch exactly.

  Args:
    tokens: a 1-D token array (np.memmap is fine) or a source (`ByteSource`, `BinidxSource`).
    ctx_len: tokens per example (t).
    batch_size: global batch size, divisible by `shard_count`.
    seed: shuffle seed for the training order, in [0, 2**32).
    split: "train" (infinite, shuffled) or "val" (finite, in order).
    val_fraction: fraction of the stream held out at its end for validation.
    shard_index: this host's index (`jax.process_index()` in multi-host runs).
    shard_count: number of hosts (`jax.process_count()`).
    worker_count: worker processes for grain; 0 reads in this process (threads only). Workers
      need absl flags parsed (as under `absl.app.run`).
    read_options: grain thread prefetch options (default: 2 threads, 4 batches ahead).

  Returns:
    A `grain.IterDataset` of {"inputs": int32 [b, t], "targets": int32 [b, t]}; `iter()` of it
    is a `grain.DatasetIterator` with `get_state()` / `set_state()`.
  """
  name = (str(tokens.path) if isinstance(tokens, (ByteSource, binidx.BinidxSource))
          else "The token stream")
  if isinstance(tokens, (ByteSource, binidx.BinidxSource)):
    tokens = tokens.tokens
  if np.ndim(tokens) != 1:
    raise ValueError(f"tokens must be 1-D; got shape {np.shape(tokens)}.")
  if ctx_len < 1 or batch_size < 1:
    raise ValueError(f"ctx_len={ctx_len} and batch_size={batch_size} must be positive.")
  if split not in ("train", "val"):
    raise ValueError(f"split={split!r}; use 'train' or 'val'.")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count}).")
  if batch_size % shard_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by shard_count={shard_count}; "
                     f"use a global batch size that is a multiple of the number of hosts.")
  n = len(tokens)
  if n < ctx_len + 2:
    raise ValueError(f"{name} has {n} tokens; need at least ctx_len + 2 = {ctx_len + 2}; use a "
                     f"longer file or a smaller --config.model.ctx_len.")
  parts = split_stream(n, ctx_len, val_fraction)
  local_batch = batch_size // shard_count

  if split == "train":
    if parts.num_train_windows < 1:
      raise ValueError(
          f"{name} has {n} tokens; after holding out val_fraction={val_fraction} for validation, "
          f"{parts.train_end} are left for training, fewer than ctx_len + 2 = {ctx_len + 2}. "
          f"Use a smaller val_fraction, a longer file or a smaller --config.model.ctx_len.")
    starts = grain.MapDataset.range(parts.num_train_windows).shuffle(seed=seed).repeat(None)
  else:
    num_windows = parts.num_val_windows // batch_size * batch_size
    if num_windows == 0:
      raise ValueError(
          f"The validation part of {name} ({n - parts.train_end} tokens, val_fraction="
          f"{val_fraction}) holds {parts.num_val_windows} windows of ctx_len + 1 = "
          f"{ctx_len + 1} tokens, fewer than one batch of {batch_size}. Use a larger "
          f"val_fraction, a smaller batch size or a longer file.")
    starts = grain.MapDataset.source(parts.val_starts()[:num_windows])
  # Batch the start indices first so each batch is one vectorized gather from the stream, then
  # give host i every shard_count-th local batch: local batches i, i + n, ... together tile the
  # global batches in order.
  ds = starts.batch(local_batch, drop_remainder=True)
  ds = ds[shard_index::shard_count]
  ds = ds.map(_Windows(tokens, ctx_len))
  if read_options is None:
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
  iter_ds = ds.to_iter_dataset(read_options)
  if worker_count > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter_ds

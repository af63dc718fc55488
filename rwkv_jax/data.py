"""Training data: token sources (raw bytes, Megatron binidx) and the grain sample pipeline.

A source turns files into one 1-D token stream (`source.tokens`, memory-mapped where it can be):

    ByteSource(path_or_dir)   any file(s) as bytes, vocab 256 (enwik8, the Wikipedia sample)
    BinidxSource(prefix)      PREFIX.bin + PREFIX.idx, the Megatron/GPT-NeoX indexed dataset that
                              the official RWKV trainer reads; documents are concatenated
    open_source(path)         picks one of the two from the path

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

`encode_text_file` and `write_binidx` turn text into binidx with any tokenizer.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import struct
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any, Literal, Protocol

import grain
import numpy as np

# Shape legend: b = per-host batch, t = ctx_len (tokens per example), n = stream length.

BINIDX_MAGIC = b"MMIDIDX\x00\x00"
BINIDX_VERSION = 1
# Megatron's dtype codes, as stored in the .idx header.
BINIDX_DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float32), 7: np.dtype(np.float64),
    8: np.dtype(np.uint16),
}
_BINIDX_CODES = {dtype: code for code, dtype in BINIDX_DTYPES.items()}
# magic, version (uint64), dtype code (uint8), number of sequences, number of documents (uint64).
_HEADER = struct.Struct("<9sQBQQ")
# The official RWKV make_data.py ends every document with token 0 (<|endoftext|> in the NeoX
# 20B and World vocabularies), so documents stay separated once the trainer concatenates them.
END_OF_DOCUMENT = 0


class Tokenizer(Protocol):
  vocab_size: int

  def encode(self, text: str) -> list[int]:
    ...


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


def _binidx_paths(prefix: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
  prefix = str(pathlib.Path(prefix).expanduser())
  for suffix in (".bin", ".idx"):
    if prefix.endswith(suffix):
      prefix = prefix[: -len(suffix)]
  return pathlib.Path(prefix + ".bin"), pathlib.Path(prefix + ".idx")


@dataclasses.dataclass(frozen=True)
class _BinidxIndex:
  dtype: np.dtype
  sizes: np.ndarray     # int32 [num_sequences]
  pointers: np.ndarray  # int64 [num_sequences], byte offsets into .bin
  doc_idx: np.ndarray   # int64 [num_documents], sequence index where each document starts


def _read_binidx_index(idx_path: pathlib.Path, bin_path: pathlib.Path) -> _BinidxIndex:
  """Parses and validates an .idx file against its .bin."""
  pair = f"{bin_path} / {idx_path}"
  raw = idx_path.read_bytes()
  if len(raw) < _HEADER.size:
    raise ValueError(f"Index {idx_path} has {len(raw)} bytes, too short for a binidx header; "
                     f"rewrite the pair {pair} (experiments/make_binidx.py).")
  magic, version, code, num_seq, num_docs = _HEADER.unpack_from(raw)
  if magic != BINIDX_MAGIC:
    raise ValueError(f"Index {idx_path} does not start with {BINIDX_MAGIC!r} (got {magic!r}): "
                     f"not a Megatron mmap binidx index. Pass the prefix of a .bin/.idx pair.")
  if version != BINIDX_VERSION:
    raise ValueError(f"Index {idx_path} has version {version}; only version {BINIDX_VERSION} "
                     f"is supported.")
  if code not in BINIDX_DTYPES:
    raise ValueError(f"Index {idx_path} has unknown dtype code {code}; expected one of "
                     f"{sorted(BINIDX_DTYPES)}.")
  dtype = BINIDX_DTYPES[code]
  expected = _HEADER.size + 4 * num_seq + 8 * num_seq + 8 * num_docs
  if len(raw) != expected:
    raise ValueError(f"Index {idx_path} has {len(raw)} bytes but its header promises {num_seq} "
                     f"sequences and {num_docs} documents ({expected} bytes); the file is "
                     f"truncated or corrupt. Rewrite the pair {pair}.")
  offset = _HEADER.size
  sizes = np.frombuffer(raw, np.int32, num_seq, offset)
  offset += sizes.nbytes
  pointers = np.frombuffer(raw, np.int64, num_seq, offset)
  offset += pointers.nbytes
  doc_idx = np.frombuffer(raw, np.int64, num_docs, offset)

  bin_bytes = bin_path.stat().st_size
  ends = np.cumsum(sizes.astype(np.int64)) * dtype.itemsize
  starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
  if np.any(sizes < 0) or not np.array_equal(pointers, starts):
    raise ValueError(f"Index {idx_path}: sequence pointers do not match sequence sizes; the "
                     f"pair {pair} is corrupt. Rewrite it.")
  total = int(ends[-1]) if num_seq else 0
  if total != bin_bytes:
    raise ValueError(
        f"The binidx pair does not match: {idx_path} describes {total} bytes of {dtype.name} "
        f"tokens but {bin_path} has {bin_bytes} bytes. The two files come from different "
        f"datasets or one is truncated; regenerate both together.")
  if num_docs and (np.any(np.diff(doc_idx) < 0) or doc_idx[0] != 0 or doc_idx[-1] > num_seq):
    raise ValueError(f"Index {idx_path}: document index is not increasing within "
                     f"[0, {num_seq}]; the pair {pair} is corrupt. Rewrite it.")
  return _BinidxIndex(dtype, sizes, pointers, doc_idx)


class BinidxSource:
  """A Megatron/GPT-NeoX binidx pair: PREFIX.bin (raw tokens) and PREFIX.idx (index).

  The token stream is every sequence concatenated in file order, which is what the official
  RWKV trainer samples from. The .bin is memory-mapped, never read whole.

  Attributes:
    bin_path, idx_path: the two files.
    tokens: [n] token stream in the file's dtype (np.memmap).
    sizes: int32 [num_sequences] tokens per sequence.
    doc_idx: int64 [num_documents] the sequence where each document starts (Megatron's
      convention: [0, 1, ..., num_sequences] when every document is one sequence).
    vocab_size: None (binidx does not record it).
  """

  vocab_size = None

  def __init__(self, prefix: str | os.PathLike):
    self.bin_path, self.idx_path = _binidx_paths(prefix)
    for path in (self.bin_path, self.idx_path):
      _check_exists(path, "Binidx file")
    index = _read_binidx_index(self.idx_path, self.bin_path)
    self.dtype = index.dtype
    self.sizes = index.sizes
    self.pointers = index.pointers
    self.doc_idx = index.doc_idx
    if self.bin_path.stat().st_size == 0:
      self.tokens = np.zeros((0,), self.dtype)
    else:
      self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
    self.path = self.bin_path

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def num_sequences(self) -> int:
    return len(self.sizes)

  def sequence(self, i: int) -> np.ndarray:
    """Returns sequence `i` (a view into the memory-mapped .bin)."""
    start = int(self.pointers[i]) // self.dtype.itemsize
    return self.tokens[start:start + int(self.sizes[i])]

  def __repr__(self) -> str:
    return f"BinidxSource({str(self.bin_path)!r}, {len(self)} {self.dtype.name} tokens)"


def open_source(path: str | os.PathLike) -> ByteSource | BinidxSource:
  """Opens `path` as binidx when it names a .bin/.idx pair (or its prefix), else as bytes.

  Args:
    path: a text/binary file, a directory of files, or a binidx prefix / .bin / .idx path.

  Returns:
    A `BinidxSource` or a `ByteSource`.
  """
  path = pathlib.Path(path).expanduser()
  bin_path, idx_path = _binidx_paths(path)
  if path.suffix in (".bin", ".idx") or (not path.exists() and idx_path.exists()):
    return BinidxSource(path)
  return ByteSource(path)


def write_binidx(prefix: str | os.PathLike, documents: Iterable[np.ndarray],
                 dtype: np.dtype | type = np.uint16) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes documents as a Megatron binidx pair, one sequence per document.

  The .bin is streamed (documents may come from a generator); both files are written to temp
  names and renamed at the end, so a crash never leaves a mismatched pair.

  Args:
    prefix: output path without suffix; PREFIX.bin and PREFIX.idx are written.
    documents: 1-D integer arrays (or lists) of token ids.
    dtype: token dtype stored in the files; every token must fit in it.

  Returns:
    (bin_path, idx_path).
  """
  dtype = np.dtype(dtype)
  if dtype not in _BINIDX_CODES:
    raise ValueError(f"dtype {dtype} has no binidx code; use one of "
                     f"{sorted(d.name for d in _BINIDX_CODES)}.")
  bin_path, idx_path = _binidx_paths(prefix)
  bin_path.parent.mkdir(parents=True, exist_ok=True)
  info = np.iinfo(dtype) if dtype.kind in "iu" else None
  sizes = []
  tmp_bin = tempfile.NamedTemporaryFile(dir=bin_path.parent, prefix=f".{bin_path.name}.",
                                        suffix=".tmp", delete=False)
  tmp_idx = pathlib.Path(str(tmp_bin.name)[:-4] + ".idx.tmp")
  try:
    with tmp_bin:
      for i, doc in enumerate(documents):
        doc = np.asarray(doc)
        if doc.ndim != 1:
          raise ValueError(f"Document {i} has shape {doc.shape}; documents must be 1-D.")
        if info is not None and doc.size and (doc.min() < info.min or doc.max() > info.max):
          raise ValueError(
              f"Document {i} has token ids in [{doc.min()}, {doc.max()}], outside {dtype.name} "
              f"[{info.min}, {info.max}]; pass a wider dtype (e.g. dtype=np.int32).")
        tmp_bin.write(doc.astype(dtype, copy=False).tobytes())
        sizes.append(doc.size)
    sizes_arr = np.asarray(sizes, np.int32)
    ends = np.cumsum(sizes_arr.astype(np.int64)) * dtype.itemsize
    pointers = np.concatenate([[0], ends[:-1]]).astype(np.int64) if sizes else np.zeros(0, np.int64)
    doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
    with open(tmp_idx, "wb") as f:
      f.write(_HEADER.pack(BINIDX_MAGIC, BINIDX_VERSION, _BINIDX_CODES[dtype], len(sizes),
                           len(doc_idx)))
      f.write(sizes_arr.tobytes())
      f.write(pointers.tobytes())
      f.write(doc_idx.tobytes())
    for tmp in (tmp_bin.name, tmp_idx):
      os.chmod(tmp, 0o644)  # temp files are created owner-only
    os.replace(tmp_bin.name, bin_path)
    os.replace(tmp_idx, idx_path)
  except BaseException:
    pathlib.Path(tmp_bin.name).unlink(missing_ok=True)
    tmp_idx.unlink(missing_ok=True)
    raise
  return bin_path, idx_path


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
                     ) -> BinidxSource:
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

  write_binidx(out_prefix, documents(), dtype=dtype)
  return BinidxSource(out_prefix)


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


def make_dataset(tokens: np.ndarray | ByteSource | BinidxSource, ctx_len: int, batch_size: int,
                 seed: int, *, split: Literal["train", "val"] = "train",
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
  name = (str(tokens.path) if isinstance(tokens, (ByteSource, BinidxSource))
          else "The token stream")
  if isinstance(tokens, (ByteSource, BinidxSource)):
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

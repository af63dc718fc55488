"""The Megatron/GPT-NeoX binidx format: PREFIX.bin (raw tokens) and PREFIX.idx (the index).

The official RWKV trainer reads this format. The .idx is

    header: magic b"MMIDIDX\\x00\\x00", version (uint64), dtype code (uint8),
            number of sequences (uint64), number of documents (uint64)
    sizes     int32 [num_sequences]      tokens per sequence
    pointers  int64 [num_sequences]      byte offset of each sequence in the .bin
    doc_idx   int64 [num_documents]      sequence where each document starts (plus the end)

and the .bin every sequence's tokens back to back. `write_binidx` writes a pair, `BinidxSource`
reads one (memory-mapped) as one token stream, checking the two files against each other and a
signed stream for negative ids.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import struct
from collections.abc import Iterable

import numpy as np

from rwkv_jax import files

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
# Tokens per read when scanning a stream, so a large .bin is never read into memory whole.
_SCAN_CHUNK = 1 << 24


def binidx_paths(prefix: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
  """(PREFIX.bin, PREFIX.idx) for a prefix, or for either file's own path."""
  prefix = str(pathlib.Path(prefix).expanduser())
  for suffix in (".bin", ".idx"):
    if prefix.endswith(suffix):
      prefix = prefix[: -len(suffix)]
  return pathlib.Path(prefix + ".bin"), pathlib.Path(prefix + ".idx")


def is_binidx(path: str | os.PathLike) -> bool:
  """Whether `path` names a binidx pair: a .bin / .idx file, or a prefix whose .idx exists."""
  path = pathlib.Path(path).expanduser()
  return path.suffix in (".bin", ".idx") or (not path.exists() and binidx_paths(path)[1].exists())


@dataclasses.dataclass(frozen=True)
class _Index:
  dtype: np.dtype
  sizes: np.ndarray     # int32 [num_sequences]
  pointers: np.ndarray  # int64 [num_sequences], byte offsets into .bin
  doc_idx: np.ndarray   # int64 [num_documents], sequence index where each document starts


def _read_index(idx_path: pathlib.Path, bin_path: pathlib.Path) -> _Index:
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
  if np.any(sizes < 0):
    i = int(np.argmax(sizes < 0))
    raise ValueError(f"Index {idx_path}: sequence {i} has size {int(sizes[i])} < 0; the pair "
                     f"{pair} is corrupt. Rewrite it.")
  ends = np.cumsum(sizes.astype(np.int64)) * dtype.itemsize
  starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
  if not np.array_equal(pointers, starts):
    i = int(np.argmax(pointers != starts))
    raise ValueError(f"Index {idx_path}: sequence pointers do not match sequence sizes: "
                     f"sequence {i} points to byte {int(pointers[i])} of {bin_path} ({bin_bytes} "
                     f"bytes), where the sizes before it put it at byte {int(starts[i])}; the "
                     f"pair is corrupt. Rewrite it.")
  total = int(ends[-1]) if num_seq else 0
  if total != bin_bytes:
    raise ValueError(
        f"The binidx pair does not match: {idx_path} describes {total} bytes of {dtype.name} "
        f"tokens but {bin_path} has {bin_bytes} bytes. The two files come from different "
        f"datasets or one is truncated; regenerate both together.")
  if num_docs and (np.any(np.diff(doc_idx) < 0) or doc_idx[0] != 0 or doc_idx[-1] > num_seq):
    raise ValueError(f"Index {idx_path}: document index is not increasing within "
                     f"[0, {num_seq}]; the pair {pair} is corrupt. Rewrite it.")
  return _Index(dtype, sizes, pointers, doc_idx)


class BinidxSource:
  """A binidx pair read as one token stream: every sequence concatenated in file order.

  That stream is what the official RWKV trainer samples from. The .bin is memory-mapped, never
  read whole.

  Attributes:
    path, bin_path, idx_path: the .bin (`path`, as for every source) and the two files.
    tokens: [n] token stream in the file's dtype (np.memmap).
    sizes: int32 [num_sequences] tokens per sequence.
    doc_idx: int64 [num_documents] the sequence where each document starts (Megatron's
      convention: [0, 1, ..., num_sequences] when every document is one sequence).
    vocab_size: None (binidx does not record it).
  """

  vocab_size = None

  def __init__(self, prefix: str | os.PathLike):
    self.bin_path, self.idx_path = binidx_paths(prefix)
    for path in (self.bin_path, self.idx_path):
      if not path.exists():
        raise FileNotFoundError(f"Binidx file {path} does not exist; pass an existing file "
                                f"(e.g. --config.data.path=FILE).")
    index = _read_index(self.idx_path, self.bin_path)
    self.dtype = index.dtype
    self.sizes = index.sizes
    self.pointers = index.pointers
    self.doc_idx = index.doc_idx
    if self.bin_path.stat().st_size == 0:
      self.tokens = np.zeros((0,), self.dtype)
    else:
      self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
    self.path = self.bin_path
    if self.dtype.kind == "i":
      self._check_not_negative()

  def _check_not_negative(self) -> None:
    """Signed files can hold ids < 0, which index the embedding from its end: refuse them."""
    for start in range(0, len(self.tokens), _SCAN_CHUNK):
      chunk = np.asarray(self.tokens[start:start + _SCAN_CHUNK])
      if chunk.min() < 0:
        position = start + int(np.argmax(chunk < 0))
        sequence = int(np.searchsorted(np.cumsum(self.sizes, dtype=np.int64), position,
                                       side="right"))
        raise ValueError(
            f"{self.bin_path} holds the negative token id {int(self.tokens[position])} at "
            f"position {position} of the stream (sequence {sequence}); token ids must be >= 0. "
            f"Regenerate the pair from the text with the right tokenizer.")

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


def write_binidx(prefix: str | os.PathLike, documents: Iterable[np.ndarray],
                 dtype: np.dtype | type = np.uint16) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes documents as a binidx pair, one sequence per document.

  The .bin is streamed (documents may come from a generator). Both files are written atomically
  and the .idx is renamed into place last, so a reader that finds an .idx finds its whole .bin,
  and a failed write leaves neither file behind.

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
  bin_path, idx_path = binidx_paths(prefix)
  info = np.iinfo(dtype) if dtype.kind in "iu" else None
  sizes = []
  with files.atomic_path(idx_path) as tmp_idx:
    with files.atomic_write(bin_path) as f:
      for i, doc in enumerate(documents):
        doc = np.asarray(doc)
        if doc.ndim != 1:
          raise ValueError(f"Document {i} has shape {doc.shape}; documents must be 1-D.")
        if info is not None and doc.size and (doc.min() < info.min or doc.max() > info.max):
          raise ValueError(
              f"Document {i} has token ids in [{doc.min()}, {doc.max()}], outside {dtype.name} "
              f"[{info.min}, {info.max}]; pass a wider dtype (e.g. dtype=np.int32).")
        f.write(doc.astype(dtype, copy=False).tobytes())
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
  return bin_path, idx_path

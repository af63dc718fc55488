"""The grain sample pipeline: a token stream (rwkv_jax/data/sources.py) to training batches.

`make_dataset(tokens, ctx_len, batch_size, seed, ...)` turns a stream into a grain `IterDataset`
of {"inputs": int32 [b, t], "targets": int32 [b, t]} (b = per-host batch, t = ctx_len), built
from windows of ctx_len + 1 tokens with targets = inputs shifted by one. The last `val_fraction`
of the stream is held out for validation.

A JSONL file of documents (rwkv_jax/data/documents.py) gives one example per document window
instead, never joined across documents, padded to ctx_len, with a third entry "mask": float32
[b, t], 1 on the targets the loss counts (0 on padding and on prompt tokens); see
`make_document_dataset`. The train step threads the mask through to the loss and the metrics.

Iterators are checkpointable:

    it = iter(make_dataset(source, ctx_len=1024, batch_size=16, seed=0))
    state = it.get_state()        # a small JSON-able dict
    it.set_state(state)           # the same batches follow again

With Orbax, grain's handler saves that state next to the model (one JSON file per host):

    import grain, orbax.checkpoint as ocp
    mngr.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model_state), data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(it)))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import grain
import numpy as np

from rwkv_jax.data import binidx, documents, sources

# Shape legend: b = per-host batch, t = ctx_len (tokens per example), n = stream length.

# A padded example slot (the last validation batch's): every token padding, mask all 0.
_EMPTY = -1


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


def make_dataset(tokens: (np.ndarray | sources.ByteSource | binidx.BinidxSource
                         | documents.DocumentSource), ctx_len: int,
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

  A `documents.DocumentSource` (JSONL) makes one example per document window instead, with a
  loss mask: see `make_document_dataset`, which takes the same arguments.

  Args:
    tokens: a 1-D token array (np.memmap is fine), a source (`ByteSource`, `BinidxSource`), or
      a `DocumentSource`.
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
  if isinstance(tokens, documents.DocumentSource):
    return make_document_dataset(tokens, ctx_len, batch_size, seed, split=split,
                                 val_fraction=val_fraction, shard_index=shard_index,
                                 shard_count=shard_count, worker_count=worker_count,
                                 read_options=read_options)
  name = (str(tokens.path) if isinstance(tokens, (sources.ByteSource, binidx.BinidxSource))
          else "The token stream")
  if isinstance(tokens, (sources.ByteSource, binidx.BinidxSource)):
    tokens = tokens.tokens
  if np.ndim(tokens) != 1:
    raise ValueError(f"tokens must be 1-D; got shape {np.shape(tokens)}.")
  _check_arguments(ctx_len, batch_size, split, shard_index, shard_count)
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
  return _batched(starts, _Windows(tokens, ctx_len), local_batch, shard_index, shard_count,
                  worker_count, read_options)


def _check_arguments(ctx_len: int, batch_size: int, split: str, shard_index: int,
                     shard_count: int) -> None:
  if ctx_len < 1 or batch_size < 1:
    raise ValueError(f"ctx_len={ctx_len} and batch_size={batch_size} must be positive.")
  if split not in ("train", "val"):
    raise ValueError(f"split={split!r}; use 'train' or 'val'.")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count}).")
  if batch_size % shard_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by shard_count={shard_count}; "
                     f"use a global batch size that is a multiple of the number of hosts.")


def _batched(ids: grain.MapDataset, examples: grain.transforms.Map, local_batch: int,
             shard_index: int, shard_count: int, worker_count: int,
             read_options: grain.ReadOptions | None) -> grain.IterDataset:
  """Batches of `examples` over the example ids `ids`, this host's share, prefetched."""
  # Batch the ids first so each batch is one vectorized gather, then give host i every
  # shard_count-th local batch: local batches i, i + n, ... together tile the global batches in
  # order.
  ds = ids.batch(local_batch, drop_remainder=True)
  ds = ds[shard_index::shard_count]
  ds = ds.map(examples)
  if read_options is None:
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
  iter_ds = ds.to_iter_dataset(read_options)
  if worker_count > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter_ds


# ----------------------------------------------------------------------------------------------
# Documents (JSONL): one document per example, with a loss mask


def document_windows(source: documents.DocumentSource, ctx_len: int,
                     doc_range: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The examples of documents [lo, hi): (document index, start token) int64 [e] each.

  A document of L tokens has targets at its positions 1..L-1; windows start at 0, ctx_len,
  2 * ctx_len, ... so their targets tile those positions once each. Windows with no counted
  target (all prompt, or a one-token document) are dropped.
  """
  lo, hi = doc_range if doc_range is not None else (0, source.num_documents)
  lengths = np.diff(source.offsets)[lo:hi]
  per_doc = np.maximum((lengths - 1 + ctx_len - 1) // ctx_len, 0)
  doc = np.repeat(np.arange(lo, hi, dtype=np.int64), per_doc)
  first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
  start = (np.arange(len(doc), dtype=np.int64) - first) * ctx_len
  # Counted targets of each window: loss_mask over absolute positions (start, start + t].
  counted = np.concatenate([[0], np.cumsum(source.loss_mask, dtype=np.int64)])
  begin = source.offsets[doc] + start
  end = np.minimum(begin + ctx_len, source.offsets[doc + 1] - 1)
  keep = counted[end + 1] - counted[begin + 1] > 0
  return doc[keep], start[keep]


class _DocumentWindows(grain.transforms.Map):
  """Maps a batch of example ids [b] to {"inputs", "targets": int32, "mask": float32} [b, t].

  Example e is document doc[e]'s tokens from start[e] (ctx_len + 1 of them at most); the rest
  of the row is padding (token 0, mask 0). Id `_EMPTY` is a row of padding only.
  """

  def __init__(self, source: documents.DocumentSource, doc: np.ndarray, start: np.ndarray,
               ctx_len: int):
    self.tokens, self.loss_mask, self.offsets = source.tokens, source.loss_mask, source.offsets
    self.doc, self.start, self.ctx_len = doc, start, ctx_len

  def map(self, ids_b: np.ndarray) -> dict[str, np.ndarray]:
    ids_b = np.asarray(ids_b)
    empty_b = ids_b == _EMPTY
    doc_b = self.doc[np.where(empty_b, 0, ids_b)]
    begin_b = self.offsets[doc_b] + self.start[np.where(empty_b, 0, ids_b)]
    end_b = np.where(empty_b, begin_b, self.offsets[doc_b + 1])  # one past the document
    pos_bt = begin_b[:, None] + np.arange(self.ctx_len + 1)
    valid_bt = pos_bt < end_b[:, None]
    pos_bt = np.minimum(pos_bt, len(self.tokens) - 1)
    window_bt = np.where(valid_bt, self.tokens[pos_bt], 0).astype(np.int32)
    mask_bt = valid_bt[:, 1:] & (self.loss_mask[pos_bt[:, 1:]] > 0)
    return {"inputs": window_bt[:, :-1], "targets": window_bt[:, 1:],
            "mask": mask_bt.astype(np.float32)}


def make_document_dataset(source: documents.DocumentSource, ctx_len: int, batch_size: int,
                          seed: int, *, split: Literal["train", "val"] = "train",
                          val_fraction: float = 0.01, shard_index: int = 0,
                          shard_count: int = 1, worker_count: int = 0,
                          read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """Builds the grain pipeline of one-document examples with a loss mask (`make_dataset`'s args).

  Documents are never joined: each example is one document's window (`document_windows`),
  padded to ctx_len, with "mask" 1 on the targets that count (0 on padding and on prompt
  tokens). The last ceil(val_fraction * d) documents are held out for validation, so no
  document is split between train and val. train: examples in a seeded random order, reshuffled
  every epoch, forever. val: every example once, in order; the last global batch is filled up
  with padding rows (mask 0), so no example is dropped and every host gets as many batches.

  Returns:
    A `grain.IterDataset` of {"inputs": int32 [b, t], "targets": int32 [b, t],
    "mask": float32 [b, t]}, checkpointable as `make_dataset`'s.
  """
  _check_arguments(ctx_len, batch_size, split, shard_index, shard_count)
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction={val_fraction}; use a value in [0, 1).")
  d = source.num_documents
  train_docs = d - int(np.ceil(d * val_fraction))
  local_batch = batch_size // shard_count
  if split == "train":
    doc, start = document_windows(source, ctx_len, (0, train_docs))
    if len(doc) == 0:
      raise ValueError(
          f"{source.path} has no training example: its first {train_docs} of {d} documents "
          f"(val_fraction={val_fraction} holds out the rest) have no token to learn (each needs "
          f"two tokens, and a response). Use a smaller val_fraction or more documents.")
    ids = grain.MapDataset.range(len(doc)).shuffle(seed=seed).repeat(None)
  else:
    doc, start = document_windows(source, ctx_len, (train_docs, d))
    if len(doc) == 0:
      raise ValueError(
          f"The validation part of {source.path} (its last {d - train_docs} of {d} documents, "
          f"val_fraction={val_fraction}) has no example; use a larger val_fraction or more "
          f"documents.")
    padded = -(-len(doc) // batch_size) * batch_size
    ids = grain.MapDataset.source(np.concatenate(
        [np.arange(len(doc)), np.full(padded - len(doc), _EMPTY)]).astype(np.int64))
  return _batched(ids, _DocumentWindows(source, doc, start, ctx_len), local_batch, shard_index,
                  shard_count, worker_count, read_options)

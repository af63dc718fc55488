"""The grain sample pipeline: a token stream (rwkv_jax/data/sources.py) to training batches.

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
        model=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(it)))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import grain
import numpy as np

from rwkv_jax.data import binidx, sources

# Shape legend: b = per-host batch, t = ctx_len (tokens per example), n = stream length.


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


def make_dataset(tokens: np.ndarray | sources.ByteSource | binidx.BinidxSource, ctx_len: int,
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
  name = (str(tokens.path) if isinstance(tokens, (sources.ByteSource, binidx.BinidxSource))
          else "The token stream")
  if isinstance(tokens, (sources.ByteSource, binidx.BinidxSource)):
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

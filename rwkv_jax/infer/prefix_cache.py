"""Prompt prefixes -> the model's state after them: an LRU bounded in bytes.

RWKV's state after a prefix is all the model needs to continue it, and it has a fixed size
whatever the prefix's length. The serving engine stores the state (and the next-token logits)
after each prefill chunk boundary of a prompt and after the whole prompt; a later prompt that
starts with a stored prefix is prefilled from there, only its rest computed.

    cache = PrefixCache(max_bytes=256 << 20)
    cache.put(tokens[:256], (state, logits))
    hit = cache.longest_prefix(tokens)  # (256, (state, logits)) or None

Keys are the prefix's int32 token bytes, compared exactly (no hash collisions); the bytes an entry
counts are its key's and those of every array in its value.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, NamedTuple

import jax
import numpy as np


class CacheStats(NamedTuple):
  hits: int  # lookups that found a prefix
  misses: int  # lookups that found none
  entries: int
  bytes: int
  evictions: int


def _nbytes(value: Any) -> int:
  return sum(int(x.nbytes) for x in jax.tree.leaves(value))


class PrefixCache:
  """Token prefixes -> values (pytrees of arrays), least recently used evicted past max_bytes.

  Thread-safe. A lookup is one dictionary probe per distinct stored prefix length, longest first.
  """

  def __init__(self, max_bytes: int):
    if max_bytes < 0:
      raise ValueError(f"max_bytes={max_bytes} must be >= 0 (0 turns the cache off).")
    self.max_bytes = int(max_bytes)
    self._entries: collections.OrderedDict[bytes, tuple[Any, int]] = collections.OrderedDict()
    self._lengths: collections.Counter[int] = collections.Counter()  # prefix length -> entries
    self._bytes = self._hits = self._misses = self._evictions = 0
    self._lock = threading.Lock()

  @staticmethod
  def _key(tokens: np.ndarray) -> bytes:
    return np.ascontiguousarray(tokens, np.int32).tobytes()

  def put(self, prefix: np.ndarray, value: Any) -> None:
    """Stores `value` under the token prefix (replacing an older one); an entry larger than the
    whole cache is not stored."""
    key = self._key(prefix)
    size = len(key) + _nbytes(value)
    if size > self.max_bytes:
      return
    with self._lock:
      if key in self._entries:
        self._bytes -= self._entries.pop(key)[1]
        self._lengths[len(prefix)] -= 1
      self._entries[key] = (value, size)
      self._lengths[len(prefix)] += 1
      self._bytes += size
      while self._bytes > self.max_bytes:
        old_key, (_, old_size) = self._entries.popitem(last=False)
        self._bytes -= old_size
        self._lengths[len(old_key) // 4] -= 1
        self._evictions += 1
      self._lengths = +self._lengths  # drops lengths with no entry left

  def longest_prefix(self, tokens: np.ndarray, max_length: int | None = None
                     ) -> tuple[int, Any] | None:
    """The longest stored prefix of `tokens` (at most max_length tokens) as (its length, value),
    now the most recently used; None if there is none."""
    tokens = np.asarray(tokens, np.int32)
    limit = len(tokens) if max_length is None else min(max_length, len(tokens))
    with self._lock:
      for length in sorted(self._lengths, reverse=True):
        if length > limit:
          continue
        key = self._key(tokens[:length])
        if key in self._entries:
          self._entries.move_to_end(key)
          self._hits += 1
          return length, self._entries[key][0]
      self._misses += 1
      return None

  def clear(self) -> None:
    with self._lock:
      self._entries.clear()
      self._lengths.clear()
      self._bytes = 0

  def stats(self) -> CacheStats:
    with self._lock:
      return CacheStats(self._hits, self._misses, len(self._entries), self._bytes,
                        self._evictions)

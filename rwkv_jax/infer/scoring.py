"""Scoring text: logits, per-token losses, perplexity, bits per byte, and loss by position.

Long inputs run in fixed-size chunks with the recurrent state carried between them, so memory
stays constant however long the text. Logits and losses come from `rwkv_jax.infer.chunks`
(exact for any length); losses are computed on the device chunk by chunk, so only one float per
token reaches the host and a 50k-token vocabulary never materialises [t, v] there.

Shapes: b = batch (documents), t = time, v = vocab, p = position.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence

import numpy as np

from rwkv_jax import model as model_lib
from rwkv_jax.infer import chunks


def logits_for(model: model_lib.RWKV, tokens: np.ndarray, *, chunk: int = 1024,
               impl: str = "auto") -> np.ndarray:
  """Float32 logits [t, v] for a 1-D token sequence of any length.

  Args:
    model: the model.
    tokens: int array [t], t >= 1.
    chunk: tokens per model call; every length shares one compilation (see rwkv_jax.infer.chunks).
    impl: WKV implementation.

  Returns:
    np.float32 [t, vocab].
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be 1-D; got shape {tokens.shape}.")
  logits_btv, _ = chunks.run_chunks(model, tokens[None], chunk=chunk, impl=impl)
  return logits_btv[0]


def batch_token_losses(model: model_lib.RWKV, documents: Sequence[np.ndarray], *,
                       chunk: int = 1024, impl: str = "auto") -> list[np.ndarray]:
  """Per-token losses of each document, all documents run side by side in one batch.

  Token i+1 of a document is predicted from its tokens 0..i, so a document of n tokens gets
  n - 1 losses. Documents of different lengths are padded at the end, and each row runs only its
  own tokens (`chunks.run_chunks` with per-row lengths); every call has the shape [b, chunk], so
  one compilation serves every length.

  Args:
    model: the model.
    documents: 1-D int arrays, each with at least 2 tokens.
    chunk: tokens per model call.
    impl: WKV implementation.

  Returns:
    float32 [n_i - 1] per document, in order.
  """
  documents = [np.asarray(d) for d in documents]
  for i, doc in enumerate(documents):
    if doc.ndim != 1 or len(doc) < 2:
      raise ValueError(f"document {i} has shape {doc.shape}; scoring needs at least 2 tokens "
                       f"(one context, one prediction).")
  if not documents:
    return []
  longest = max(len(d) for d in documents) - 1
  tokens_bt = np.zeros((len(documents), longest), np.int32)
  targets_bt = np.full((len(documents), longest), -1, np.int32)
  for i, doc in enumerate(documents):
    tokens_bt[i, :len(doc) - 1] = doc[:-1]  # the last token predicts nothing scored
    targets_bt[i, :len(doc) - 1] = doc[1:]
  loss_bt, _ = chunks.run_chunks(model, tokens_bt, chunk=chunk, impl=impl, targets=targets_bt,
                                 lengths=[len(d) - 1 for d in documents])
  return [loss_bt[i, :len(doc) - 1] for i, doc in enumerate(documents)]


# ----------------------------------------------------------------------------------------------
# Summaries.

_MAX_EXP_ARG = math.log(sys.float_info.max)


@dataclasses.dataclass(frozen=True)
class TextScore:
  """Losses of tokens 1..t-1, each predicted from the tokens before it."""

  token_losses: np.ndarray  # nats, [t - 1]
  num_bytes: int  # UTF-8 bytes of the predicted tokens' text

  @property
  def mean_loss(self) -> float:
    return float(np.mean(self.token_losses))

  @property
  def perplexity(self) -> float:
    """e^mean_loss; infinity where that overflows a float (a diverged model), not an error."""
    return math.exp(self.mean_loss) if self.mean_loss < _MAX_EXP_ARG else math.inf

  @property
  def bits_per_byte(self) -> float:
    return float(np.sum(self.token_losses)) / math.log(2) / max(self.num_bytes, 1)


def score_tokens(model: model_lib.RWKV, tokens: np.ndarray, num_bytes: int, *,
                 chunk: int = 1024, impl: str = "auto") -> TextScore:
  """Per-token losses of a sequence; `num_bytes` is the byte length of tokens[1:]'s text."""
  if len(tokens) < 2:
    raise ValueError(f"need at least 2 tokens to score (one context, one prediction); "
                     f"got {len(tokens)}. Give a longer text.")
  return TextScore(batch_token_losses(model, [np.asarray(tokens)], chunk=chunk, impl=impl)[0],
                   num_bytes)


@dataclasses.dataclass(frozen=True)
class PositionLoss:
  """Loss by token position, averaged over documents: what a long-context claim is judged by.

  Position p is the prediction of a document's token p from its p tokens before it (p >= 1);
  index p - 1 of the arrays.
  """

  loss_sum: np.ndarray  # float64 [p]: summed over the documents that reach position p
  count: np.ndarray  # int64 [p]: how many documents reach position p

  @property
  def mean_loss(self) -> np.ndarray:
    """float64 [p]: mean loss at each position (NaN where no document reaches it)."""
    with np.errstate(invalid="ignore", divide="ignore"):
      return self.loss_sum / self.count

  def bucketed(self) -> list[tuple[int, int, float, int]]:
    """(first, last, mean loss, tokens) over positions [1, 2), [2, 4), [4, 8), ... (last < 2^k)."""
    rows, first = [], 1
    while first <= len(self.count):
      last = min(2 * first - 1, len(self.count))
      n = int(self.count[first - 1:last].sum())
      if n:
        rows.append((first, last, float(self.loss_sum[first - 1:last].sum() / n), n))
      first *= 2
    return rows

  def to_json(self) -> dict:
    return {"position": list(range(1, len(self.count) + 1)),
            "mean_loss": [None if c == 0 else float(s / c)
                          for s, c in zip(self.loss_sum, self.count)],
            "documents": [int(c) for c in self.count],
            "buckets": [{"first": a, "last": b, "mean_loss": m, "tokens": n}
                        for a, b, m, n in self.bucketed()]}


def loss_by_position(model: model_lib.RWKV, documents: Sequence[np.ndarray], *,
                     max_position: int = 0, batch_size: int = 8, chunk: int = 1024,
                     impl: str = "auto") -> PositionLoss:
  """Mean loss at each token position over documents (each scored from an empty state).

  Args:
    model: the model.
    documents: 1-D int arrays; those with fewer than 2 tokens are skipped.
    max_position: score only the first max_position + 1 tokens of each document (0: all).
    batch_size: documents per batch (longest first, so a batch holds similar lengths).
    chunk: tokens per model call.
    impl: WKV implementation.

  Returns:
    The summed losses and document counts per position, up to the longest document scored.
  """
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1.")
  if not isinstance(max_position, (int, np.integer)) or max_position < 0:
    raise ValueError(f"max_position={max_position!r} must be an integer >= 0 (0: no limit).")
  docs = [np.asarray(d)[:max_position + 1] if max_position else np.asarray(d) for d in documents]
  docs = sorted((d for d in docs if len(d) >= 2), key=len, reverse=True)
  if not docs:
    raise ValueError("no document has 2 or more tokens; nothing to score.")
  longest = len(docs[0]) - 1
  loss_sum, count = np.zeros(longest, np.float64), np.zeros(longest, np.int64)
  for start in range(0, len(docs), batch_size):
    for losses in batch_token_losses(model, docs[start:start + batch_size], chunk=chunk,
                                     impl=impl):
      loss_sum[:len(losses)] += losses
      count[:len(losses)] += 1
  return PositionLoss(loss_sum, count)

"""Scoring text: logits, per-token losses, perplexity and bits per byte over any length.

Long inputs run in fixed-size chunks with the recurrent state carried between them
(`rwkv_jax.chunks`), so memory stays constant and one compiled function serves every chunk.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax import chunks, model as model_lib


def logits_for(model: model_lib.RWKV, tokens: np.ndarray, *, chunk: int = 1024,
               impl: str = "auto") -> np.ndarray:
  """Float32 logits [t, v] for a 1-D token sequence of any length.

  Args:
    model: the model.
    tokens: int array [t], t >= 1.
    chunk: tokens per model call; every length shares one compilation (see rwkv_jax.chunks).
    impl: WKV implementation.

  Returns:
    np.float32 [t, vocab].
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be 1-D; got shape {tokens.shape}.")
  logits_btv, _ = chunks.run_chunks(model, tokens[None], chunk=chunk, impl=impl)
  return logits_btv[0]


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


def token_losses(logits_tv: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  """Cross-entropy (nats) of tokens[1:] under logits[:-1]."""
  logits = jnp.asarray(logits_tv[:-1])
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens[1:])[:, None], axis=-1)[:, 0])


def score_tokens(model: model_lib.RWKV, tokens: np.ndarray, num_bytes: int, *,
                 chunk: int = 1024, impl: str = "auto") -> TextScore:
  """Per-token losses of a sequence; `num_bytes` is the byte length of tokens[1:]'s text."""
  if len(tokens) < 2:
    raise ValueError(f"need at least 2 tokens to score (one context, one prediction); "
                     f"got {len(tokens)}. Give a longer text.")
  return TextScore(token_losses(logits_for(model, tokens, chunk=chunk, impl=impl), tokens),
                   num_bytes)

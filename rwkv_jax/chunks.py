"""Runs a long token array through the parallel model in fixed-size chunks, carrying the state.

Scoring and prefill share this one runner. Memory is bounded by the chunk, not by the sequence,
and there is one compiled program per chunk length (and batch size), whatever the lengths:

  * Every chunk, the last one too, reaches the program padded to `chunk` tokens, with each row's
    real length in it as a traced number.
  * RWKV has no padding mask, so padding run through the model would leak into the state.
    The program therefore never keeps it: it holds one model call per piece length (`chunk`, and
    every power of two below it) and runs the full chunk, or the pieces that sum to a row's real
    length (13 = 8 + 4 + 1), each piece under `lax.cond` so that a piece no row needs costs
    nothing. Each row reads its piece from its own offset, and keeps the piece's state and logits
    only if its length has that piece. Every token a row's result sees is real, so the logits and
    the state after each row's last real token are exact, and prompts of different lengths are
    prefilled together in one batch (rows that end early keep their state).

Shapes: b = batch, t = time, v = vocab, c = chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax import model as model_lib

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("impl", "last_only"))
def _run_chunk(graphdef, params, tokens_bc, lengths_b, state, logits_in, impl, last_only):
  """The first lengths_b[i] tokens of row i of the padded chunk tokens_bc [b, c] through the model.

  Module-level, so every call with the same model structure and chunk length reuses one
  compilation. Rows with length 0 keep their state (and logits_in). Returns (logits [b, c, v],
  zeros past each row's length; or, if last_only, [b, 1, v] after each row's last real token, else
  logits_in; the state after each row's last real token).
  """
  model = nnx.merge(graphdef, params)
  b, chunk = tokens_bc.shape
  rows_b1 = jnp.arange(b)[:, None]

  def call(n, take_b):
    def run(carry):
      start_b, state, logits = carry
      pos_bn = start_b[:, None] + jnp.arange(n)
      piece_bn = jnp.take_along_axis(tokens_bc, jnp.minimum(pos_bn, chunk - 1), axis=1)
      out, new_state = model(piece_bn, state, impl=impl, last_only=last_only)
      state = jax.tree.map(lambda new, old: jnp.where(take_b[None, :, None], new, old),
                           new_state, state)
      if last_only:
        logits = jnp.where(take_b[:, None, None], out, logits)
      else:  # rows not taking the piece write out of bounds, which is dropped
        logits = logits.at[rows_b1, jnp.where(take_b[:, None], pos_bn, chunk)].set(
            out, mode="drop")
      return start_b + n * take_b, state, logits
    return lambda carry: jax.lax.cond(jnp.any(take_b), run, lambda c: c, carry)

  # The whole chunk, or the powers of two in the binary form of length < chunk, largest first.
  full_b = lengths_b == chunk
  logits = logits_in if last_only else jnp.zeros((b, chunk, model.config.vocab_size),
                                                 jnp.float32)
  carry = (jnp.zeros((b,), jnp.int32), state, logits)
  carry = call(chunk, full_b)(carry)
  for i in reversed(range((chunk - 1).bit_length())):
    carry = call(1 << i, ~full_b & ((lengths_b >> i) & 1 == 1))(carry)
  _, state, logits = carry
  return logits, state


def run_chunks(model: model_lib.RWKV, tokens_bt: np.ndarray | Array,
               state: model_lib.RWKVState | None = None, *, chunk: int = 1024,
               impl: str = "auto", last_only: bool = False, lengths=None
               ) -> tuple[np.ndarray | Array, model_lib.RWKVState]:
  """Logits of [b, t] tokens and the state after them, `chunk` tokens per model call.

  Args:
    model: the model.
    tokens_bt: int [b, t] tokens, t >= 1; with `lengths`, row i's tokens are its first
      lengths[i], and the rest is padding (any valid ids, e.g. 0) that no result sees.
    state: state to continue from, or None for an empty one.
    chunk: tokens per parallel call; memory is bounded by this, not by t. The first call with
      a new chunk length (or batch size) compiles one program that serves every t; it holds
      log2(chunk) + 1 model calls, so prefer a chunk near the usual length for short inputs.
    impl: WKV implementation (see rwkv_jax.wkv).
    last_only: return only the logits after each row's last token, [b, v] (the head runs on one
      position per call).
    lengths: int [b] real tokens per row, each in [0, t]; None means all t. A row of length 0
      keeps its state, and its last_only logits are zeros.

  Returns:
    (logits, state): logits float32 [b, v] as a jax.Array if last_only, else [b, t, v] as a
    numpy array (gathered on the host chunk by chunk, so device memory stays bounded; zeros past
    a row's length); the state after each row's last token, as exact as one model call over its
    tokens.
  """
  if not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise ValueError(f"chunk={chunk!r} must be an integer >= 1 (tokens per model call).")
  tokens_bt = np.asarray(tokens_bt)
  model_lib.check_tokens(tokens_bt, model.config.vocab_size)
  b, t = tokens_bt.shape
  if lengths is None:
    lengths_b = np.full((b,), t, np.int64)
  else:
    lengths_b = np.asarray(lengths, np.int64).reshape(-1)
    if lengths_b.shape != (b,) or lengths_b.min() < 0 or lengths_b.max() > t:
      raise ValueError(f"lengths={lengths_b.tolist()} must give one count in [0, {t}] for each "
                       f"of the {b} rows of tokens.")
  graphdef, params = nnx.split(model)
  if state is None:
    state = model_lib.empty_state(model.config, b)
  logits = jnp.zeros((b, 1, model.config.vocab_size), jnp.float32) if last_only else None
  out = []
  for start in range(0, max(int(lengths_b.max()), 1), chunk):
    piece_bt = tokens_bt[:, start:start + chunk]
    real = piece_bt.shape[1]
    piece_bt = np.pad(piece_bt, ((0, 0), (0, chunk - real)))
    real_b = np.clip(lengths_b - start, 0, chunk)
    logits_btv, state = _run_chunk(graphdef, params, jnp.asarray(piece_bt, jnp.int32),
                                   jnp.asarray(real_b, jnp.int32), state, logits, impl,
                                   last_only)
    if last_only:
      logits = logits_btv
    else:
      out.append(np.asarray(logits_btv[:, :real]))
  if last_only:
    return logits[:, 0], state
  logits_btv = np.concatenate(out, axis=1)
  if logits_btv.shape[1] < t:  # every row shorter than t
    logits_btv = np.pad(logits_btv, ((0, 0), (0, t - logits_btv.shape[1]), (0, 0)))
  return logits_btv, state

"""Runs a long token array through the parallel model in fixed-size chunks, carrying the state.

Scoring and prefill share this one runner. Memory is bounded by the chunk, not by the sequence,
and there is one compiled program per chunk length (and batch size), whatever the lengths:

  * Every chunk, the last one too, reaches the program padded to `chunk` tokens, with its real
    length as a traced number.
  * RWKV has no padding mask, so padding run through the model would leak into the state.
    The program therefore never runs it: it holds one model call per piece length (`chunk`, and
    every power of two below it) and, under `lax.cond`, runs the full chunk or the pieces that
    sum to the real length (13 = 8 + 4 + 1). Every token the model sees is real, so the logits
    and the state after the last real token are exact.

Shapes: b = batch, t = time, v = vocab.
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
def _run_chunk(graphdef, params, tokens_bc, length, state, impl, last_only):
  """The first `length` tokens of the padded chunk tokens_bc [b, chunk] through the model.

  Module-level, so every call with the same model structure and chunk length reuses one
  compilation. Returns (logits [b, chunk, v], or [b, 1, v] after the last real token if
  last_only; the state after the last real token).
  """
  model = nnx.merge(graphdef, params)
  b, chunk = tokens_bc.shape
  v = model.config.vocab_size

  def call(n):
    def run(carry):
      start, state, logits = carry
      piece_bn = jax.lax.dynamic_slice_in_dim(tokens_bc, start, n, axis=1)
      out, state = model(piece_bn, state, impl=impl, last_only=last_only)
      if not last_only:
        out = jax.lax.dynamic_update_slice_in_dim(logits, out, start, axis=1)
      return start + n, state, out
    return run

  # The whole chunk, or the powers of two in the binary form of length < chunk, largest first.
  full = length == chunk
  carry = (jnp.zeros((), jnp.int32), state,
           jnp.zeros((b, 1 if last_only else chunk, v), jnp.float32))
  carry = jax.lax.cond(full, call(chunk), lambda c: c, carry)
  for i in reversed(range((chunk - 1).bit_length())):
    take = ~full & ((length >> i) & 1 == 1)
    carry = jax.lax.cond(take, call(1 << i), lambda c: c, carry)
  _, state, logits = carry
  return logits, state


def run_chunks(model: model_lib.RWKV, tokens_bt: np.ndarray | Array,
               state: model_lib.RWKVState | None = None, *, chunk: int = 1024,
               impl: str = "auto", last_only: bool = False
               ) -> tuple[np.ndarray | Array, model_lib.RWKVState]:
  """Logits of [b, t] tokens and the state after them, `chunk` tokens per model call.

  Args:
    model: the model.
    tokens_bt: int [b, t] tokens, t >= 1.
    state: state to continue from, or None for an empty one.
    chunk: tokens per parallel call; memory is bounded by this, not by t. The first call with
      a new chunk length (or batch size) compiles one program that serves every t; it holds
      log2(chunk) + 1 model calls, so prefer a chunk near the usual length for short inputs.
    impl: WKV implementation (see rwkv_jax.wkv).
    last_only: return only the logits after the last token, [b, v] (the head runs on one
      position per call).

  Returns:
    (logits, state): logits float32 [b, v] as a jax.Array if last_only, else [b, t, v] as a
    numpy array (gathered on the host chunk by chunk, so device memory stays bounded); the
    state after the last token, as exact as one model call over all t tokens.
  """
  if not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise ValueError(f"chunk={chunk!r} must be an integer >= 1 (tokens per model call).")
  tokens_bt = np.asarray(tokens_bt)
  model_lib.check_tokens(tokens_bt, model.config.vocab_size)
  b, t = tokens_bt.shape
  graphdef, params = nnx.split(model)
  if state is None:
    state = model_lib.empty_state(model.config, b)
  out = []
  for start in range(0, t, chunk):
    piece_bt = tokens_bt[:, start:start + chunk]
    real = piece_bt.shape[1]
    piece_bt = np.pad(piece_bt, ((0, 0), (0, chunk - real)))
    logits_btv, state = _run_chunk(graphdef, params, jnp.asarray(piece_bt, jnp.int32),
                                   jnp.asarray(real, jnp.int32), state, impl, last_only)
    if not last_only:
      out.append(np.asarray(logits_btv[:, :real]))
  if last_only:
    return logits_btv[:, 0], state
  return np.concatenate(out, axis=1), state

"""Runs a long token array through the parallel model in fixed-size chunks, carrying the state.

Scoring and prefill share this one runner. Memory is bounded by the chunk, not by the sequence,
and there is one compiled program per chunk length (and batch size; a second for rows of
different lengths), whatever the lengths:

  * Every chunk, the last one too, reaches the program padded to `chunk` tokens, with each row's
    real length in it as a traced number.
  * RWKV has no padding mask, so padding run through the model would leak into the state.
    The program therefore never runs it: it holds one model call per piece length (`chunk`, and
    every power of two below it) and, under `lax.cond`, runs the full chunk or the pieces that
    sum to the real length (13 = 8 + 4 + 1). Every token the model sees is real, so the logits
    and the state after the last real token are exact.
  * Prompts of different lengths share every call (batched prefill): the pieces cover the
    longest row, and the model's `lengths=` stops each row's state at its own last token
    (rwkv_jax.wkv.wkv_state_after); a row with nothing left in a piece keeps its state. This
    path is compiled apart (`ragged`), so equal lengths pay nothing for it. Once some prompts
    have ended, a chunk runs only the rows still going (padded to a power of two).

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


@functools.partial(jax.jit, static_argnames=("impl", "last_only", "ragged"))
def _run_chunk(graphdef, params, tokens_bc, lengths_b, state, logits_in, impl, last_only,
               ragged):
  """The first lengths_b[i] tokens of row i of the padded chunk tokens_bc [b, c] through the model.

  Module-level, so every call with the same model structure and chunk length reuses one
  compilation. Without `ragged` every row has lengths_b[0] tokens. Returns (logits [b, c, v],
  zeros past each row's length; or, if last_only, [b, 1, v] after each row's last real token,
  logits_in for rows with no tokens; the state after each row's last real token).
  """
  model = nnx.merge(graphdef, params)
  b, chunk = tokens_bc.shape
  length = jnp.max(lengths_b)

  def call(n):
    def run(carry):
      start, state, logits = carry
      piece_bn = jax.lax.dynamic_slice_in_dim(tokens_bc, start, n, axis=1)
      if ragged:
        real_b = jnp.clip(lengths_b - start, 0, n)
        out, new_state = model(piece_bn, state, impl=impl, last_only=last_only,
                               lengths=jnp.maximum(real_b, 1))
        keep_b = real_b > 0
        state = jax.tree.map(lambda x, y: jnp.where(keep_b[None, :, None], x, y),
                             new_state, state)
        if last_only:
          out = jnp.where(keep_b[:, None, None], out, logits)
        else:
          out = jnp.where((jnp.arange(n) < real_b[:, None])[..., None], out, 0.0)
      else:
        out, state = model(piece_bn, state, impl=impl, last_only=last_only)
      if not last_only:
        out = jax.lax.dynamic_update_slice_in_dim(logits, out, start, axis=1)
      return start + n, state, out
    return run

  # The whole chunk, or the powers of two in the binary form of length < chunk, largest first.
  full = length == chunk
  logits = logits_in if last_only else jnp.zeros((b, chunk, model.config.vocab_size),
                                                 jnp.float32)
  carry = (jnp.zeros((), jnp.int32), state, logits)
  carry = jax.lax.cond(full, call(chunk), lambda c: c, carry)
  for i in reversed(range((chunk - 1).bit_length())):
    take = ~full & ((length >> i) & 1 == 1)
    carry = jax.lax.cond(take, call(1 << i), lambda c: c, carry)
  _, state, logits = carry
  return logits, state


def _rows_to_run(real_b: np.ndarray) -> np.ndarray | None:
  """The rows a chunk must run when some have no tokens left (their prompts ended), or None
  for all. Padded with ended rows (which keep their state) to a power of two, so that at most
  log2(batch) + 1 batch sizes are compiled; a long prompt among short ones then costs one row,
  not the whole batch, once the others have ended."""
  active = np.flatnonzero(real_b > 0)
  size = 1 << max(len(active) - 1, 0).bit_length()
  if size >= len(real_b):
    return None
  return np.concatenate([active, np.flatnonzero(real_b == 0)[:size - len(active)]])


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
  ragged = bool(lengths_b.min() != lengths_b.max())
  out = []
  for start in range(0, max(int(lengths_b.max()), 1), chunk):
    piece_bt = tokens_bt[:, start:start + chunk]
    real = piece_bt.shape[1]
    piece_bt = np.pad(piece_bt, ((0, 0), (0, chunk - real)))
    real_b = np.clip(lengths_b - start, 0, chunk)
    rows = _rows_to_run(real_b)
    if rows is None:
      logits_btv, state = _run_chunk(graphdef, params, jnp.asarray(piece_bt, jnp.int32),
                                     jnp.asarray(real_b, jnp.int32), state, logits, impl,
                                     last_only, ragged)
    else:  # only the rows with tokens left, and the state of the others is not touched
      sub_logits, sub_state = _run_chunk(
          graphdef, params, jnp.asarray(piece_bt[rows], jnp.int32),
          jnp.asarray(real_b[rows], jnp.int32), jax.tree.map(lambda x: x[:, rows], state),
          None if logits is None else logits[rows], impl, last_only, True)
      state = jax.tree.map(lambda x, y: x.at[:, rows].set(y), state, sub_state)
      if last_only:
        logits_btv = logits.at[rows].set(sub_logits)
      else:
        logits_btv = np.zeros((b, *sub_logits.shape[1:]), np.float32)
        logits_btv[rows] = np.asarray(sub_logits)
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

"""Runs a long token array through the parallel model in fixed-size chunks, carrying the state.

Memory is bounded by the chunk, not by the sequence, and the number of compiled programs is
bounded too, whatever the lengths:

  * Logits only (scoring): the last chunk is padded to `chunk` tokens. Causality keeps the
    padding from touching the real positions, so there is one program per chunk length. The
    state after the padding is wrong, so none is returned.
  * With the state (prefill): RWKV has no padding mask, so padding would leak into the state.
    The tail of t % chunk tokens is instead cut into pieces whose lengths are distinct powers of
    two (13 = 8 + 4 + 1). Every token is real, so the state is exact, and over all lengths at
    most log2(chunk) + 1 programs are compiled.

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
def _run_piece(graphdef, params, tokens_bt, state, impl, last_only):
  # Module-level, so every call with the same model structure and piece length reuses one
  # compilation instead of tracing a fresh closure.
  return nnx.merge(graphdef, params)(tokens_bt, state, impl=impl, last_only=last_only)


def piece_lengths(t: int, chunk: int, *, exact_state: bool) -> list[int]:
  """The lengths of the model calls that cover t tokens (the last one padded if not exact).

  >>> piece_lengths(21, 8, exact_state=True)
  [8, 8, 4, 1]
  >>> piece_lengths(21, 8, exact_state=False)
  [8, 8, 8]
  """
  full, tail = divmod(t, chunk)
  if not exact_state:
    return [chunk] * (full + (tail > 0))
  powers = [1 << i for i in reversed(range(tail.bit_length())) if tail >> i & 1]
  return [chunk] * full + powers


def run_chunks(model: model_lib.RWKV, tokens_bt: np.ndarray | Array,
               state: model_lib.RWKVState | None = None, *, chunk: int = 1024,
               impl: str = "auto", last_only: bool = False, exact_state: bool = True
               ) -> tuple[np.ndarray | Array, model_lib.RWKVState | None]:
  """Logits of [b, t] tokens and the state after them, `chunk` tokens per model call.

  Args:
    model: the model.
    tokens_bt: int [b, t] tokens, t >= 1.
    state: state to continue from, or None for an empty one.
    chunk: tokens per parallel call; memory is bounded by this, not by t.
    impl: WKV implementation (see rwkv_jax.wkv).
    last_only: return only the logits after the last token, [b, v] (the head runs on one
      position per call).
    exact_state: return the state after the last token (the tail runs in power-of-two pieces);
      False pads the tail to `chunk` (one program) and returns None for the state.

  Returns:
    (logits, state): logits float32 [b, v] as a jax.Array if last_only, else [b, t, v] as a
    numpy array (gathered on the host chunk by chunk, so device memory stays bounded); state
    as described under exact_state.
  """
  if not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise ValueError(f"chunk={chunk!r} must be an integer >= 1 (tokens per model call).")
  if last_only and not exact_state:
    raise ValueError("last_only=True needs exact_state=True: the last position of a padded "
                     "chunk is padding.")
  tokens_bt = np.asarray(tokens_bt)
  model_lib.check_tokens(tokens_bt, model.config.vocab_size)
  b, t = tokens_bt.shape
  if t < 1:
    raise ValueError("tokens_bt has no tokens; give at least one per row.")
  graphdef, params = nnx.split(model)
  if state is None:
    state = model_lib.empty_state(model.config, b)
  out, start = [], 0
  for n in piece_lengths(t, chunk, exact_state=exact_state):
    piece_bt = tokens_bt[:, start:start + n]
    real = piece_bt.shape[1]
    piece_bt = np.pad(piece_bt, ((0, 0), (0, n - real)))
    logits_btv, state = _run_piece(graphdef, params, jnp.asarray(piece_bt, jnp.int32), state,
                                   impl, last_only)
    if not last_only:
      out.append(np.asarray(logits_btv[:, :real]))
    start += n
  if not exact_state:
    state = None
  if last_only:
    return logits_btv[:, 0], state
  return np.concatenate(out, axis=1), state

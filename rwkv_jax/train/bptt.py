"""The training loss of long windows, run in chunks that carry the recurrent state.

A window of t tokens is cut into chunks of `chunk_len` tokens (the last one shorter when
`chunk_len` does not divide t). Each chunk starts from the state the previous one ended in, so
the logits are those of one call over the whole window (the model's contract, DESIGN.md). The
window's loss is the sum of the chunks' losses, each weighted by its share of the window's
positions, so it equals the one-call loss; L2Wrap keeps its one-call strength per position
(its backward term ignores the incoming cotangent, see losses.py, so it is scaled through its
factor instead).

bptt="full": gradients flow through the carried state, and equal one-call training's. The
chunks run in a `lax.scan` whose body is `jax.checkpoint`ed, so the forward pass keeps only
the states at chunk boundaries, and the backward pass recomputes one chunk's activations at a
time: activation memory follows the chunk, not the window, for about one more forward pass of
compute.

bptt="truncated": the state is carried forward but its gradient is stopped at every chunk
boundary (each chunk is trained as if its incoming state were data), as community
"infinite context" RWKV trainers do: gradients that ignore dependencies across chunks. The
chunks are rematerialized as in "full" mode (autodiff of a scan keeps every iteration's
residuals otherwise), so memory follows the chunk here too.

Shapes: b = batch, t = time (the window), n = chunks, c = chunk_len, v = vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rwkv_jax import model as model_lib
from rwkv_jax.train import losses
from rwkv_jax.train.config import BPTT_MODES

Array = jax.Array


def window_loss(graphdef, params, inputs_bt: Array, targets_bt: Array,
                mask_bt: Array | None = None, *, chunk_len: int = 0, bptt: str = "full",
                l2wrap_factor: float = losses.L2WRAP_FACTOR,
                impl: str = "auto") -> tuple[Array, dict[str, Array]]:
  """The loss of a batch of windows, as `losses.lm_loss` of one model call over each window.

  Args:
    graphdef, params: the model, split by `nnx.split(model, nnx.Param)`.
    inputs_bt, targets_bt: int [b, t] tokens and next tokens; every window starts from the
      empty state.
    mask_bt: optional float [b, t], 1 on the targets the loss and metrics count (0 on padding
      and prompt tokens); None counts every position, exactly as before masks existed. Chunks
      are weighted by their share of the counted targets, so the loss is still the one call's.
    chunk_len: tokens per chunk; 0 (or >= t) runs the whole window in one model call.
    bptt: "full" or "truncated" (see the module docstring); ignored for one call.
    l2wrap_factor: L2Wrap strength (losses.py); 0 disables it.
    impl: WKV implementation.

  Returns:
    (loss, metrics) as `losses.lm_loss` returns them for the whole window.

  Raises:
    ValueError: an unknown `bptt`, a negative `chunk_len`, or chunks asked of a model that has no
      recurrent state.
  """
  if bptt not in BPTT_MODES:
    raise ValueError(f"bptt={bptt!r} is not one of {BPTT_MODES}.")
  if chunk_len < 0:
    raise ValueError(f"chunk_len={chunk_len} must be >= 0 (0 = the whole window at once).")
  b, t = inputs_bt.shape
  if chunk_len == 0 or chunk_len >= t:
    logits_btv, _ = nnx.merge(graphdef, params)(inputs_bt, impl=impl)
    return losses.lm_loss(logits_btv, targets_bt, mask_bt, l2wrap_factor=l2wrap_factor)

  model = nnx.merge(graphdef, params)
  if not isinstance(model, model_lib.RWKV) and not hasattr(model, "initial_state"):
    raise ValueError(f"train.chunk_len={chunk_len} carries RWKV's recurrent state between "
                     f"chunks; {type(model).__name__} has none. Set --config.train.chunk_len=0.")

  # The counted targets of the whole window: a chunk's masked mean times its count over this is
  # its part of the window's masked mean (0 for a chunk with none, whose mean is 0 too).
  counted = None if mask_bt is None else jnp.maximum(jnp.sum(mask_bt.astype(jnp.float32)), 1.0)

  def chunk(params, state, inputs_bc, targets_bc, mask_bc=None):
    """One chunk: (its state out, its weighted share of the window's loss and metrics)."""
    if bptt == "truncated":
      state = jax.lax.stop_gradient(state)
    c = inputs_bc.shape[1]
    logits_bcv, state = nnx.merge(graphdef, params)(inputs_bc, state, impl=impl)
    # lm_loss's mean over c positions, times c / t, is this chunk's part of the window's mean;
    # L2Wrap's term is factor / (b * positions), so its factor scales by c / t as well (with a
    # mask too: L2Wrap acts on every position, see losses.lm_loss).
    loss, metrics = losses.lm_loss(logits_bcv, targets_bc, mask_bc,
                                   l2wrap_factor=l2wrap_factor * c / t)
    share = c / t if mask_bc is None else jnp.sum(mask_bc.astype(jnp.float32)) / counted
    return state, (loss * share, {"loss": metrics["loss"] * share,
                                  "accuracy": metrics["accuracy"] * share,
                                  "num_tokens": metrics["num_tokens"]})

  # Keep only each chunk's inputs (the boundary state and its tokens); recompute the rest.
  chunk = jax.checkpoint(chunk)

  n, rest = divmod(t, chunk_len)
  # [b, n * c] -> [n, b, c]: the scan runs over chunks; b keeps its place on the data axes.
  to_chunks = lambda x: x[:, :n * chunk_len].reshape(b, n, chunk_len).swapaxes(0, 1)

  def body(carry, xs):
    state, total = carry
    state, part = chunk(params, state, *xs)
    return (state, jax.tree.map(jnp.add, total, part)), None

  zero = jnp.zeros((), jnp.float32)
  total = (zero, {"loss": zero, "accuracy": zero, "num_tokens": zero})
  # A fine-tuned model's learned initial state (rwkv_jax/train/adapters.py), else the empty one.
  state = (model.initial_state(b) if hasattr(model, "initial_state")
           else model_lib.empty_state(model.config, b))
  per_chunk = (inputs_bt, targets_bt) + (() if mask_bt is None else (mask_bt,))
  (state, total), _ = jax.lax.scan(body, (state, total), tuple(map(to_chunks, per_chunk)))
  if rest:
    _, part = chunk(params, state, *(x[:, n * chunk_len:] for x in per_chunk))
    total = jax.tree.map(jnp.add, total, part)
  return total

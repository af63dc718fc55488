"""The language-model loss of the official RWKV-4 trainer: cross-entropy plus L2Wrap.

L2Wrap leaves the loss value alone and, in the backward pass, adds a small gradient at each
position's largest logit, pulling that logit towards zero:

    dL/dlogits[b, t, argmax_v] += factor / (B * T) * max_v logits[b, t, v]

which is the gradient of `factor / (B * T) * sum_bt 0.5 * max_v(logits)^2`. Like the official
`L2Wrap.backward`, the extra term does not depend on the incoming cotangent: it is added at full
strength whatever the loss is later multiplied by. It keeps logits from drifting upwards (which
matters in bf16) without changing the reported loss.

Shapes: b = batch, t = time, v = vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

L2WRAP_FACTOR = 1e-4  # the official trainer's constant


def token_losses(logits_btv: Array, targets_bt: Array) -> Array:
  """Cross-entropy (nats) of each target under its logits, float32 [b, t], via log_softmax.

  The one per-token loss: training's mean, scoring and evaluation are all made of it. A target
  < 0 is not scored (loss 0), so padded positions can be marked with -1.
  """
  logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  targets_bt = targets_bt.astype(jnp.int32)
  picked_bt = jnp.take_along_axis(logp_btv, jnp.maximum(targets_bt, 0)[..., None], axis=-1)
  return jnp.where(targets_bt >= 0, -picked_bt[..., 0], 0.0)


def cross_entropy(logits_btv: Array, targets_bt: Array, mask_bt: Array | None = None) -> Array:
  """Mean next-token cross-entropy, computed in float32 through log_softmax.

  Args:
    logits_btv: unnormalized scores [b, t, v].
    targets_bt: integer token ids [b, t] in [0, v).
    mask_bt: optional weights [b, t] (1 = count this position, 0 = ignore).

  Returns:
    Scalar float32: the mean over positions, or over the masked positions when `mask_bt` is given
    (0 when the mask is all zeros).
  """
  _check_shapes(logits_btv, targets_bt, mask_bt)
  nll_bt = token_losses(logits_btv, targets_bt)
  if mask_bt is None:
    return jnp.mean(nll_bt)
  mask_bt = mask_bt.astype(jnp.float32)
  return jnp.sum(nll_bt * mask_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def l2wrap(loss: Array, logits_btv: Array, factor: float = L2WRAP_FACTOR) -> Array:
  """Returns `loss` unchanged; its gradient w.r.t. `logits_btv` gains the L2Wrap term.

  Args:
    loss: scalar loss computed from `logits_btv`.
    logits_btv: the logits [b, t, v] (any number of leading dims; B*T is their product).
    factor: strength; the official trainer uses 1e-4.

  Returns:
    `loss`, with the extra backward term described in the module docstring.
  """
  del logits_btv, factor
  return loss


def _l2wrap_fwd(loss, logits_btv, factor):
  return loss, logits_btv


def _l2wrap_bwd(factor, logits_btv, g):
  positions = logits_btv.size // logits_btv.shape[-1]
  scale = factor / positions
  ids = jnp.argmax(logits_btv, axis=-1)
  max_logit = jnp.max(logits_btv, axis=-1)
  onehot = jax.nn.one_hot(ids, logits_btv.shape[-1], dtype=logits_btv.dtype)
  # Not multiplied by g: the official backward returns (grad_output, gy) with gy independent of it.
  gy = onehot * (max_logit * scale).astype(logits_btv.dtype)[..., None]
  return g, gy


l2wrap.defvjp(_l2wrap_fwd, _l2wrap_bwd)


def lm_loss(logits_btv: Array, targets_bt: Array, mask_bt: Array | None = None,
            l2wrap_factor: float = L2WRAP_FACTOR) -> tuple[Array, dict[str, Array]]:
  """Training loss: cross-entropy wrapped by L2Wrap (skipped when `l2wrap_factor` is 0).

  Args:
    logits_btv: model output [b, t, v].
    targets_bt: next-token ids [b, t].
    mask_bt: optional weights [b, t]; L2Wrap still acts on every position, as in the official
      trainer.
    l2wrap_factor: L2Wrap strength (official 1e-4); 0 disables it.

  Returns:
    (loss, metrics): the scalar loss to differentiate, and float32 scalars "loss" (the
    cross-entropy), "accuracy" (argmax == target) and "num_tokens" (counted positions), all
    without gradient.
  """
  loss = cross_entropy(logits_btv, targets_bt, mask_bt)
  if l2wrap_factor:
    loss = l2wrap(loss, logits_btv, float(l2wrap_factor))
  weights_bt = (jnp.ones(targets_bt.shape, jnp.float32) if mask_bt is None
                else mask_bt.astype(jnp.float32))
  correct_bt = (jnp.argmax(logits_btv, axis=-1) == targets_bt).astype(jnp.float32)
  num_tokens = jnp.sum(weights_bt)
  metrics = {
      "loss": loss,
      "accuracy": jnp.sum(correct_bt * weights_bt) / jnp.maximum(num_tokens, 1.0),
      "num_tokens": num_tokens,
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def _check_shapes(logits_btv, targets_bt, mask_bt) -> None:
  if logits_btv.ndim < 2 or tuple(targets_bt.shape) != tuple(logits_btv.shape[:-1]):
    raise ValueError(f"logits must be [batch, time, vocab] and targets [batch, time]; got "
                     f"{logits_btv.shape=} and {targets_bt.shape=}.")
  if not jnp.issubdtype(targets_bt.dtype, jnp.integer):
    raise ValueError(f"targets must be integer token ids; got dtype {targets_bt.dtype}.")
  if mask_bt is not None and tuple(mask_bt.shape) != tuple(targets_bt.shape):
    raise ValueError(f"mask must match targets' shape {tuple(targets_bt.shape)}; "
                     f"got {tuple(mask_bt.shape)}.")

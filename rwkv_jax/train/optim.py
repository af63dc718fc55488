"""The optimizer of the official RWKV-4 trainer, as one optax transformation.

    updates = clip_by_global_norm(grad_clip)      # on the update's (mean) gradient
            -> Adam(b1, b2, eps)                  # bias-corrected, eps outside the sqrt
            -> + weight_decay * param             # decoupled (AdamW), >= 2-D parameters only
            -> * -schedule(step)
            -> * per-parameter multiplier         # time_decay x2, time_first x3, others x1

The multiplier scales a parameter's whole step (decay included), like the official per-group
learning rate `lr * my_lr_scale`. Because Adam normalizes each gradient, two parameters that see
identical gradients move by exactly the ratio of their multipliers.

The schedule is one object: `learning_rate_schedule` builds it, `make_optimizer` follows it, and
the trainer logs the rate from the same object. Gradient accumulation is not here: the train step
(rwkv_jax/train/step.py) averages the micro-batches' gradients in a `lax.scan` and calls `update`
once per optimizer step, so the schedule counts real updates.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rwkv_jax.sharding import path_name

# Label -> learning-rate multiplier, as the official trainer's parameter groups (layerwise_lr).
LR_MULTIPLIERS = {"lr_1x": 1.0, "lr_2x": 2.0, "lr_3x": 3.0}


def learning_rate_schedule(*, lr_init: float, lr_final: float, warmup_steps: int,
                           total_steps: int) -> optax.Schedule:
  """The official RWKV-4 schedule, by optimizer step s (0-based).

    progress(s) = clip((s - warmup_steps + 1) / (total_steps - warmup_steps), 0, 1)
    base(s) = lr_init * exp(log(lr_final / lr_init) * progress(s))   (exponential decay)
            = lr_init + (lr_final - lr_init) * progress(s)           (if either LR is 0)
            = lr_init                                                (if lr_final == lr_init)
    lr(s) = base(s) * (0.2 + 0.8 * s / warmup_steps)   for s < warmup_steps
          = base(s)                                    afterwards

  So warmup ramps from 0.2 * lr_init, decay reaches lr_final at step total_steps - 1, and the
  rate stays lr_final after that.

  Args:
    lr_init: peak learning rate.
    lr_final: learning rate at the end of the decay.
    warmup_steps: number of warmup steps (0 for none).
    total_steps: step count over which the decay runs (including warmup).

  Returns:
    An optax schedule: step -> learning rate (float32 scalar).
  """
  if lr_init < 0 or lr_final < 0:
    raise ValueError(f"Learning rates must be >= 0; got {lr_init=}, {lr_final=}.")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps={warmup_steps} must be >= 0.")
  decays = lr_final != lr_init
  if decays and total_steps <= warmup_steps:
    raise ValueError(f"total_steps={total_steps} must exceed warmup_steps={warmup_steps} for the "
                     f"learning rate to decay from {lr_init} to {lr_final}.")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if not decays:
      lr = jnp.full((), lr_init, jnp.float32)
    else:
      progress = jnp.clip((step - warmup_steps + 1) / (total_steps - warmup_steps), 0.0, 1.0)
      if lr_init == 0 or lr_final == 0:
        lr = lr_init + (lr_final - lr_init) * progress
      else:
        lr = lr_init * jnp.exp(math.log(lr_final / lr_init) * progress)
    if warmup_steps > 0:
      lr = jnp.where(step < warmup_steps, lr * (0.2 + 0.8 * step / warmup_steps), lr)
    return lr

  return schedule


def param_labels(params: Any, layerwise_lr: bool = True) -> Any:
  """The learning-rate group of each parameter: "lr_2x" (time_decay), "lr_3x" (time_first) or
  "lr_1x"; everything is "lr_1x" when layerwise_lr is False.

  Args:
    params: nnx.State of parameters (or any pytree with the model's key paths).
    layerwise_lr: whether the official per-group multipliers are on.

  Returns:
    A pytree of the same structure with string leaves (keys of LR_MULTIPLIERS); the group's rate
    at step s is `schedule(s) * LR_MULTIPLIERS[label]`.
  """
  def label(path, _):
    name = path_name(path).rsplit("/", 1)[-1]
    if layerwise_lr and name == "time_decay":
      return "lr_2x"
    if layerwise_lr and name == "time_first":
      return "lr_3x"
    return "lr_1x"
  return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params: Any) -> Any:
  """True for parameters with >= 2 non-unit dimensions (the official `p.squeeze().ndim >= 2`)."""
  return jax.tree.map(lambda p: sum(d > 1 for d in jnp.shape(p)) >= 2, params)


def scale_by_multipliers(layerwise_lr: bool = True) -> optax.GradientTransformation:
  """Multiplies each update by its group's LR multiplier (see `param_labels`)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    labels = param_labels(updates, layerwise_lr)
    updates = jax.tree.map(lambda u, l: u * jnp.asarray(LR_MULTIPLIERS[l], u.dtype),
                           updates, labels)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(schedule: optax.Schedule, *, betas: tuple[float, float] = (0.9, 0.99),
                   eps: float = 1e-8, weight_decay: float = 0.0, grad_clip: float = 1.0,
                   layerwise_lr: bool = True) -> optax.GradientTransformation:
  """The official RWKV-4 optimizer (see the module docstring for the chain).

  Args:
    schedule: the learning rate by optimizer step (`learning_rate_schedule`).
    betas: Adam (b1, b2); official (0.9, 0.99).
    eps: Adam epsilon; official 1e-8.
    weight_decay: decoupled weight decay on >= 2-D parameters; 0 (official default) disables it.
    grad_clip: max global gradient norm; <= 0 disables clipping.
    layerwise_lr: time_decay x2 and time_first x3 learning-rate multipliers.

  Returns:
    An optax.GradientTransformation over the parameters' pytree (e.g. an nnx.State of
    nnx.Param). Its `update` needs `params` when weight_decay > 0.
  """
  if weight_decay < 0:
    raise ValueError(f"weight_decay={weight_decay} must be >= 0.")
  parts = []
  if grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.scale_by_adam(b1=betas[0], b2=betas[1], eps=eps))
  if weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
  parts.append(optax.scale_by_learning_rate(schedule))
  parts.append(scale_by_multipliers(layerwise_lr))
  return optax.chain(*parts)


class GroupRates(NamedTuple):
  """Learning rates of the three groups at one step, for logging."""

  lr_1x: jax.Array
  lr_2x: jax.Array
  lr_3x: jax.Array


def group_learning_rates(schedule: optax.Schedule, step, layerwise_lr: bool = True
                         ) -> GroupRates:
  """The rate each LR group gets at `step` (all equal when layerwise_lr is False)."""
  lr = schedule(step)
  scale = LR_MULTIPLIERS if layerwise_lr else dict.fromkeys(LR_MULTIPLIERS, 1.0)
  return GroupRates(*(lr * scale[k] for k in GroupRates._fields))

"""The training state and the jitted, sharded train and eval steps.

Parameters and optimizer state are created directly on the mesh by a jitted init with
out_shardings from `rwkv_jax.sharding`; the step is `jax.jit` with in/out shardings and donated
state, and accumulates gradients over micro-batches itself (a `lax.scan`, one micro-batch's
activations alive at a time) before its one optimizer update. Long windows train in chunks that
carry the recurrent state (train.chunk_len, train.bptt; rwkv_jax/train/bptt.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from rwkv_jax import model as model_lib
from rwkv_jax import sharding
from rwkv_jax.config import RWKVConfig
from rwkv_jax.train import bptt as bptt_lib
from rwkv_jax.train import config as train_config
from rwkv_jax.train import losses, optim


def model_config(config: ml_collections.ConfigDict) -> RWKVConfig:
  """The model's frozen config from an experiment config's `model` section."""
  m = config.model
  return RWKVConfig(n_layer=m.n_layer, n_embd=m.n_embd, vocab_size=m.vocab_size,
                    dim_att=m.dim_att, dim_ffn=m.dim_ffn, ctx_len=m.ctx_len, dtype=m.dtype,
                    param_dtype=m.param_dtype)


# Builds the model to train from the config; `build_model` (RWKV) unless the caller passes another
# with RWKV's calling convention, e.g. the Transformer baseline of experiments/baselines.
ModelBuilder = Callable[[ml_collections.ConfigDict, nnx.Rngs], nnx.Module]


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> model_lib.RWKV:
  return model_lib.RWKV(model_config(config), rngs=rngs, init=config.model.init,
                        emb_scale=config.optim.lr_init, remat=config.model.remat)


def build_optimizer(config: ml_collections.ConfigDict
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer of `config` and the one schedule it follows (the loop logs its rate).

  Raises:
    ValueError: the config is invalid (`train_config.check`), e.g. its steps do not outlast
      the warmup.
  """
  train_config.check(config)
  o = config.optim
  schedule = optim.learning_rate_schedule(lr_init=o.lr_init, lr_final=o.lr_final,
                                          warmup_steps=o.warmup_steps,
                                          total_steps=config.train.steps)
  tx = optim.make_optimizer(schedule, betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay, grad_clip=o.grad_clip,
                            layerwise_lr=o.layerwise_lr)
  return tx, schedule


@dataclasses.dataclass
class TrainState:
  """What the loop carries: static structure plus the sharded arrays."""

  graphdef: Any
  params: Any  # nnx.State of nnx.Param, sharded by the rules
  opt_state: Any
  param_shardings: Any
  opt_shardings: Any
  # Parameters that do not train (fine-tuning's base, rwkv_jax/train/finetune.py): an argument of
  # the steps, never differentiated, updated or checkpointed. None when every parameter trains.
  frozen: Any = None
  frozen_shardings: Any = None


# Builds the TrainState in place of `init_state` (fine-tuning: a loaded base and its adapters).
StateBuilder = Callable[[ml_collections.ConfigDict, Any, optax.GradientTransformation],
                        TrainState]


def with_frozen(params, frozen):
  """All of the model's parameters: `params`, and the frozen ones if there are any."""
  return params if frozen is None else nnx.merge_state(params, frozen)


def merged_model(state: TrainState) -> nnx.Module:
  """The model of `state`, its trained and frozen parameters together."""
  return nnx.merge(state.graphdef, with_frozen(state.params, state.frozen))


class _WithFrozen:
  """A jitted fn(*args, frozen) called (and lowered) as fn(*args)."""

  def __init__(self, jitted, frozen):
    self._jitted, self._frozen = jitted, frozen

  def __call__(self, *args):
    return self._jitted(*args, self._frozen)

  def lower(self, *args):
    return self._jitted.lower(*args, self._frozen)


def _jit_with_frozen(fn, state: TrainState, in_shardings: tuple, **kwargs):
  """jax.jit of fn(*args, frozen), taking the frozen parameters of `state` as an argument of
  the program (not constants compiled into it); called as fn(*args)."""
  if state.frozen is None:
    return jax.jit(functools.wraps(fn)(lambda *args: fn(*args, None)),
                   in_shardings=in_shardings, **kwargs)
  return _WithFrozen(jax.jit(fn, in_shardings=(*in_shardings, state.frozen_shardings), **kwargs),
                     state.frozen)


def abstract_state(config: ml_collections.ConfigDict, mesh, tx,
                   make_model: ModelBuilder = build_model,
                   rules: sharding.Rules = sharding.PARAM_RULES) -> TrainState:
  """The TrainState's structure, shapes and shardings, with no array allocated.

  `rules` place the parameters and the optimizer state that mirrors them (rwkv_jax/sharding.py);
  a model other than RWKV passes its own.
  """
  abstract_model = nnx.eval_shape(lambda: make_model(config, nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  return TrainState(graphdef, abstract_params, abstract_opt,
                    sharding.param_shardings(mesh, abstract_params, rules),
                    sharding.tree_shardings(mesh, abstract_opt, rules))


def init_state(config: ml_collections.ConfigDict, mesh, tx,
               make_model: ModelBuilder = build_model,
               rules: sharding.Rules = sharding.PARAM_RULES) -> TrainState:
  """Creates params and optimizer state directly in their sharded layout (no host copy)."""
  abstract = abstract_state(config, mesh, tx, make_model, rules)

  @functools.partial(jax.jit, out_shardings=abstract.param_shardings)
  def init_params():
    return nnx.state(make_model(config, nnx.Rngs(config.train.seed)), nnx.Param)

  params = init_params()
  opt_state = jax.jit(tx.init, out_shardings=abstract.opt_shardings)(params)
  return dataclasses.replace(abstract, params=params, opt_state=opt_state)


def make_train_step(state: TrainState, tx, mesh, *, accumulate_steps: int, l2wrap: float,
                    impl: str, chunk_len: int = 0, bptt: str = "full") -> Callable:
  """Returns step(params, opt_state, batch) -> (params, opt_state, metrics), jitted and sharded.

  This is the one gradient-accumulation path: with accumulate_steps = k the batch [b, t] is
  split into k micro-batches whose gradients are averaged before one optimizer update. A
  `lax.scan` runs them, so one micro-batch's activations are alive at a time, and each
  micro-batch stays spread over the data axes of the mesh. With chunk_len > 0 each window runs
  in chunks that carry the state (rwkv_jax/train/bptt.py, `bptt` "full" or "truncated"), so one
  chunk's activations are alive at a time.

  A batch may carry "mask" (float [b, t], 1 on the targets to count; the JSONL document
  pipeline's, rwkv_jax/data/pipeline.py): the loss, accuracy and num_tokens then count only
  those targets, over the whole batch. Micro-batches are weighted by their share of the counted
  targets, so accumulation gives the whole batch's masked mean and its gradient; L2Wrap keeps
  its per-position strength. A batch without "mask" is trained exactly as before masks existed.
  """
  graphdef = state.graphdef
  # The step's frozen parameters, while it is traced (the loss merges them with the trained).
  tracing = {"frozen": None}

  def loss_fn(params, inputs_bt, targets_bt, mask_bt=None, *, l2wrap=l2wrap):
    params = with_frozen(params, tracing["frozen"])
    return bptt_lib.window_loss(graphdef, params, inputs_bt, targets_bt, mask_bt,
                                chunk_len=chunk_len, bptt=bptt, l2wrap_factor=l2wrap, impl=impl)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def masked_micro_loss(params, inputs_bt, targets_bt, mask_bt, counted):
    """A micro-batch's masked mean, times its share of the batch's `counted` targets.

    L2Wrap's backward term ignores the loss's scale (losses.py), so its factor is divided by
    the number of micro-batches instead: per position it is the whole batch's.
    """
    loss, metrics = loss_fn(params, inputs_bt, targets_bt, mask_bt,
                            l2wrap=l2wrap / accumulate_steps)
    share = jnp.sum(mask_bt.astype(jnp.float32)) / counted
    return loss * share, {"loss": metrics["loss"] * share,
                          "accuracy": metrics["accuracy"] * share,
                          "num_tokens": metrics["num_tokens"]}

  masked_grad_fn = jax.value_and_grad(masked_micro_loss, has_aux=True)

  def step(params, opt_state, batch, frozen):
    tracing["frozen"] = frozen
    inputs, targets, mask = batch["inputs"], batch["targets"], batch.get("mask")
    if accumulate_steps == 1:
      (_, metrics), grads = grad_fn(params, inputs, targets, mask)
    elif mask is not None:
      b, t = inputs.shape
      split = lambda x: x.reshape(b // accumulate_steps, accumulate_steps, t).swapaxes(0, 1)
      counted = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)

      def masked_micro(carry, mb):
        (_, m), g = masked_grad_fn(params, *mb, counted)
        return jax.tree.map(jnp.add, carry, (g, m)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      zero_metrics = {k: jnp.zeros((), jnp.float32) for k in ("loss", "accuracy", "num_tokens")}
      (grads, metrics), _ = jax.lax.scan(masked_micro, (zeros, zero_metrics),
                                         (split(inputs), split(targets), split(mask)))
    else:
      b, t = inputs.shape
      # [b, t] -> [k, b/k, t] keeping each micro-batch spread over the data axes.
      split = lambda x: x.reshape(b // accumulate_steps, accumulate_steps, t).swapaxes(0, 1)

      def micro(carry, mb):
        (_, m), g = grad_fn(params, *mb)
        return jax.tree.map(jnp.add, carry, (g, m)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      zero_metrics = {"loss": 0.0, "accuracy": 0.0, "num_tokens": 0.0}
      zero_metrics = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), zero_metrics)
      (grads, metrics), _ = jax.lax.scan(micro, (zeros, zero_metrics),
                                         (split(inputs), split(targets)))
      grads = jax.tree.map(lambda g: g / accumulate_steps, grads)
      metrics = {k: v / accumulate_steps if k != "num_tokens" else v
                 for k, v in metrics.items()}
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    tracing["frozen"] = None  # no tracer outlives the trace
    return params, opt_state, metrics

  batch_sh = sharding.batch_sharding(mesh)
  return _jit_with_frozen(step, state, (state.param_shardings, state.opt_shardings, batch_sh),
                          out_shardings=(state.param_shardings, state.opt_shardings, None),
                          donate_argnums=(0, 1))


def make_eval_step(state: TrainState, mesh, impl: str) -> Callable:
  """Returns step(params, batch) -> (the batch's summed cross-entropy, the targets it counts).

  The counted targets are all of them, or those of the batch's "mask": summing both over the
  batches (`loop.evaluate`) gives the mean per target, whatever each batch counts.
  """
  graphdef = state.graphdef

  def step(params, batch, frozen):
    model = nnx.merge(graphdef, with_frozen(params, frozen))
    model.eval()  # no dropout (LoRA's, rwkv_jax/train/adapters.py) in evaluation
    logits, _ = model(batch["inputs"], impl=impl)
    nll_bt = losses.token_losses(logits, batch["targets"])
    mask = batch.get("mask")
    weights_bt = jnp.ones_like(nll_bt) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(nll_bt * weights_bt), jnp.sum(weights_bt)

  return _jit_with_frozen(step, state, (state.param_shardings, sharding.batch_sharding(mesh)))

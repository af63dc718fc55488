"""The official RWKV-4 optimizer recipe: schedule, LR multipliers, weight decay, clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rwkv_jax.config import RWKVConfig
from rwkv_jax.model import RWKV
from rwkv_jax.train import optim

SCHED = dict(lr_init=6e-4, lr_final=1e-5, warmup_steps=10, total_steps=110)
SCHEDULE = optim.learning_rate_schedule(**SCHED)


def _official_lr(step, lr_init, lr_final, warmup_steps, total_steps):
  """The official trainer's arithmetic, step by step in Python floats."""
  if lr_final == lr_init:
    lr = lr_init
  else:
    progress = min(1, max(0, (step - warmup_steps + 1) / (total_steps - warmup_steps)))
    if lr_final == 0 or lr_init == 0:
      lr = lr_init + (lr_final - lr_init) * progress
    else:
      lr = lr_init * math.exp(math.log(lr_final / lr_init) * progress)
  if step < warmup_steps:
    lr = lr * (0.2 + 0.8 * step / warmup_steps)
  return lr


@pytest.mark.parametrize("sched", [
    SCHED,
    dict(SCHED, lr_final=0.0),  # linear decay to zero
    dict(SCHED, lr_final=6e-4),  # constant after warmup
    dict(SCHED, warmup_steps=0),
])
def test_schedule_matches_official_formula(sched):
  schedule = optim.learning_rate_schedule(**sched)
  for step in [0, 1, 5, 9, 10, 11, 50, 108, 109, 110, 500]:
    np.testing.assert_allclose(schedule(step), _official_lr(step, **sched), rtol=1e-5, atol=1e-12,
                               err_msg=f"step {step}")


def test_schedule_key_values():
  s = optim.learning_rate_schedule(**SCHED)
  np.testing.assert_allclose(s(0), 0.2 * 6e-4, rtol=1e-6)  # warmup starts at 20%
  np.testing.assert_allclose(s(5), 0.6 * 6e-4, rtol=1e-6)
  np.testing.assert_allclose(s(109), 1e-5, rtol=1e-5)  # decay ends at total_steps - 1
  np.testing.assert_allclose(s(10_000), 1e-5, rtol=1e-5)  # constant afterwards
  mid = s(59)  # progress 0.5: the geometric mean
  np.testing.assert_allclose(mid, math.sqrt(6e-4 * 1e-5), rtol=1e-5)


def test_schedule_rejects_total_not_after_warmup():
  with pytest.raises(ValueError, match="total_steps"):
    optim.learning_rate_schedule(lr_init=1e-3, lr_final=1e-4, warmup_steps=10, total_steps=10)


def _toy_params():
  """Dict pytree with nnx-like paths; every leaf starts at 1 and gets the same gradient."""
  return {
      "blocks": {0: {"att": {
          "time_decay": jnp.ones((4,)), "time_first": jnp.ones((4,)), "time_mix_k": jnp.ones((4,)),
          "key": {"kernel": jnp.ones((4, 4))}}}},
      "ln0": {"scale": jnp.ones((4,))},
      "squeezable": jnp.ones((1, 4)),  # 2-D storage, 1-D after squeeze: no decay, as official
  }


def _step(tx, params, grads):
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  return updates


def test_time_decay_moves_2x_and_time_first_3x_for_identical_gradients():
  params = _toy_params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.37), params)
  tx = optim.make_optimizer(SCHEDULE, grad_clip=0.0)
  u = _step(tx, params, grads)
  plain = u["blocks"][0]["att"]["time_mix_k"]
  assert float(jnp.abs(plain).min()) > 0
  np.testing.assert_allclose(u["blocks"][0]["att"]["time_decay"], 2 * plain, rtol=1e-6)
  np.testing.assert_allclose(u["blocks"][0]["att"]["time_first"], 3 * plain, rtol=1e-6)
  np.testing.assert_allclose(u["ln0"]["scale"], plain, rtol=1e-6)
  # Adam's first step is -lr * sign(g) (eps aside); lr at step 0 is 20% of lr_init.
  np.testing.assert_allclose(plain, -0.2 * 6e-4, rtol=1e-5)


def test_layerwise_lr_off_moves_everything_alike():
  params = _toy_params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.37), params)
  u = _step(optim.make_optimizer(SCHEDULE, grad_clip=0.0, layerwise_lr=False), params, grads)
  for leaf in jax.tree.leaves(u):
    np.testing.assert_allclose(leaf, -0.2 * 6e-4, rtol=1e-5)


def test_weight_decay_applies_only_to_2d_parameters():
  params = jax.tree.map(lambda p: 3.0 * p, _toy_params())
  grads = jax.tree.map(jnp.zeros_like, params)  # Adam step is 0: only decay remains
  lr0, wd = 0.2 * 6e-4, 0.1
  u = _step(optim.make_optimizer(SCHEDULE, weight_decay=wd, grad_clip=0.0), params, grads)
  np.testing.assert_allclose(u["blocks"][0]["att"]["key"]["kernel"], -lr0 * wd * 3.0, rtol=1e-5)
  for path in [("ln0", "scale"), ("squeezable",)]:
    leaf = u
    for k in path:
      leaf = leaf[k]
    np.testing.assert_array_equal(leaf, 0.0)
  assert float(jnp.abs(u["blocks"][0]["att"]["time_decay"]).max()) == 0.0


def test_clipping_bounds_the_global_norm():
  # With plain SGD-like behaviour hidden by Adam, check the clipped gradient that Adam sees:
  # the first moment after one step is (1 - b1) * clipped_grad.
  params = _toy_params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 10.0), params)
  tx = optim.make_optimizer(SCHEDULE, grad_clip=1.0)
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  adam_state = state[1]  # chain: (clip, adam, lr, multipliers)
  assert isinstance(adam_state, optax.ScaleByAdamState)
  clipped = jax.tree.map(lambda m: m / 0.1, adam_state.mu)
  np.testing.assert_allclose(optax.tree.norm(clipped), 1.0, rtol=1e-5)
  ratio = jax.tree.map(lambda c, g: c / g, clipped, grads)
  np.testing.assert_allclose(jnp.concatenate([r.ravel() for r in jax.tree.leaves(ratio)]),
                             1.0 / float(optax.tree.norm(grads)), rtol=1e-5)


@pytest.mark.slow
def test_works_on_an_nnx_state_and_labels_groups():
  model = RWKV(RWKVConfig(n_layer=2, n_embd=8, vocab_size=16), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  labels = optim.param_labels(params)
  att = labels["blocks"][1]["att"]
  assert att["time_decay"].get_value() == "lr_2x"
  assert att["time_first"].get_value() == "lr_3x"
  assert att["time_mix_k"].get_value() == "lr_1x"
  assert labels["head"]["kernel"].get_value() == "lr_1x"
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optim.make_optimizer(SCHEDULE, weight_decay=0.01)
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  assert isinstance(new, nnx.State)
  att = updates["blocks"][0]["att"]
  np.testing.assert_allclose(att["time_decay"][...], 2 * att["time_mix_k"][...], rtol=1e-6)
  kernel = params["head"]["kernel"][...]
  np.testing.assert_allclose(new["head"]["kernel"][...] - kernel,
                             updates["head"]["kernel"][...], atol=2e-7)  # f32 rounding of p + u


def test_group_learning_rates_for_logging():
  s = optim.learning_rate_schedule(**SCHED)
  rates = optim.group_learning_rates(s, 20)
  np.testing.assert_allclose([rates.lr_1x * 2, rates.lr_1x * 3], [rates.lr_2x, rates.lr_3x])

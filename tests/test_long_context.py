"""Long windows trained in chunks (rwkv_jax/train/bptt.py): the same loss and gradients as one call."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rwkv_jax import model as model_lib
from rwkv_jax import sharding
from rwkv_jax.config import RWKVConfig
from rwkv_jax.data import pipeline as data_pipeline
from rwkv_jax.data import sources as data_sources
from rwkv_jax.train import bptt
from rwkv_jax.train import config as train_config
from rwkv_jax.train import loop as train_loop
from rwkv_jax.train import losses
from rwkv_jax.train import step as step_lib
from training_util import TOTAL, N, latest_params
from training_util import losses as logged_losses
from training_util import tiny_config

# One layer: the model's own tests pin that each layer carries its own state; one keeps the
# compilations here short.
CFG = RWKVConfig(n_layer=1, n_embd=16, vocab_size=37, ctx_len=64, dtype="float32")
T = 24  # window length


def _random_model(seed: int):
  """(graphdef, params) with every parameter perturbed: the official init zeroes the output
  projections, which would hide whatever flows through the state."""
  graphdef, params = nnx.split(model_lib.RWKV(CFG, rngs=nnx.Rngs(seed)), nnx.Param)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(np.float32), params)
  return graphdef, params


def _batch(seed: int, b: int = 3, t: int = T):
  tokens = np.random.default_rng(seed + 100).integers(0, CFG.vocab_size, (b, t + 1))
  return jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32)


def _one_call(graphdef, params, inputs, targets, impl="scan"):
  logits, _ = nnx.merge(graphdef, params)(inputs, impl=impl)
  return losses.lm_loss(logits, targets)


def _chunks_in_a_loop(graphdef, params, inputs, targets, chunk_len, stop_state_gradient):
  """The obvious reference: a Python loop of model calls, no scan, no rematerialization."""
  model = nnx.merge(graphdef, params)
  t = inputs.shape[1]
  state, loss = None, 0.0
  for start in range(0, t, chunk_len):
    if stop_state_gradient and state is not None:
      state = jax.lax.stop_gradient(state)
    logits, state = model(inputs[:, start:start + chunk_len], state, impl="scan")
    c = logits.shape[1]
    part, _ = losses.lm_loss(logits, targets[:, start:start + chunk_len],
                             l2wrap_factor=losses.L2WRAP_FACTOR * c / t)
    loss = loss + part * c / t
  return loss, None


def _value_and_grad(loss_fn, params):
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


def _assert_trees_close(got, want, rtol=2e-5):
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    scale = float(np.abs(w).max()) or 1.0
    np.testing.assert_allclose(g, w, rtol=0, atol=rtol * scale, err_msg=sharding.path_name(path))


@pytest.mark.slow
def test_full_bptt_in_chunks_gives_the_one_call_loss_and_gradients():
  graphdef, params = _random_model(0)
  inputs, targets = _batch(0)
  (want_loss, want_metrics), want_grads = _value_and_grad(
      lambda p: _one_call(graphdef, p, inputs, targets), params)
  for chunk_len in (4, 7):  # 6 chunks of 4; 3 of 7 and a last one of 3
    (loss, metrics), grads = _value_and_grad(
        lambda p: bptt.window_loss(graphdef, p, inputs, targets, chunk_len=chunk_len,
                                   impl="scan"), params)

    assert float(loss) == pytest.approx(float(want_loss), rel=1e-6), chunk_len
    for name in ("loss", "accuracy", "num_tokens"):
      assert float(metrics[name]) == pytest.approx(float(want_metrics[name]), rel=1e-6), name
    _assert_trees_close(grads, want_grads)


@pytest.mark.slow
def test_truncated_bptt_equals_chunks_with_the_state_gradient_stopped():
  chunk_len = 10  # chunks of 10, 10 and 4
  graphdef, params = _random_model(1)
  inputs, targets = _batch(1)
  (want_loss, _), want_grads = _value_and_grad(
      lambda p: _chunks_in_a_loop(graphdef, p, inputs, targets, chunk_len, True), params)
  (loss, _), grads = _value_and_grad(
      lambda p: bptt.window_loss(graphdef, p, inputs, targets, chunk_len=chunk_len,
                                 bptt="truncated", impl="scan"), params)
  _, full_grads = _value_and_grad(lambda p: _one_call(graphdef, p, inputs, targets), params)

  assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
  _assert_trees_close(grads, want_grads)
  # The stop matters: through the state, later chunks' losses reach earlier tokens' weights.
  differs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), grads,
                                         full_grads))
  assert max(differs) > 1e-3


def _gradient_temp_bytes(graphdef, params, window: int, chunk_len: int, mode: str) -> int:
  """XLA's temporary buffers (activations) of the compiled gradient of a [2, window] batch."""
  tokens = jax.ShapeDtypeStruct((2, window), jnp.int32)
  grad = jax.jit(jax.grad(lambda p, x, y: bptt.window_loss(
      graphdef, p, x, y, chunk_len=chunk_len, bptt=mode, impl="scan")[0]))
  return grad.lower(params, tokens, tokens).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_activation_memory_follows_the_chunk_not_the_window():
  graphdef, params = _random_model(2)
  one_chunk = _gradient_temp_bytes(graphdef, params, 32, 0, "full")
  one_window = _gradient_temp_bytes(graphdef, params, 1024, 0, "full")
  assert one_window > 20 * one_chunk  # one call over the window holds all of its activations
  for mode in ("full", "truncated"):
    chunked = _gradient_temp_bytes(graphdef, params, 1024, 32, mode)
    # 32 chunks: one chunk's activations plus 32 boundary states and the tokens.
    assert chunked < 1.5 * one_chunk, mode


# "scan" is the implementation of the tests above. Chunks rest on two things every
# implementation has: the state out, and the gradient of the incoming state, which
# tests/test_kernels*.py check for every kernel against float64 eq. 16 and the scan. Here each
# kind of path trains in chunks: XLA's parallel scan, and a kernel's custom VJP in its interpreter.
@pytest.mark.slow
@pytest.mark.parametrize("impl", ["associative", "pallas"])
def test_every_wkv_implementation_trains_in_chunks_exactly(impl):
  graphdef, params = _random_model(3)
  inputs, targets = _batch(3, b=2, t=13)
  (want, _), want_grads = _value_and_grad(
      lambda p: _one_call(graphdef, p, inputs, targets, impl=impl), params)
  (loss, _), grads = _value_and_grad(
      lambda p: bptt.window_loss(graphdef, p, inputs, targets, chunk_len=5, impl=impl), params)
  assert float(loss) == pytest.approx(float(want), rel=1e-6)
  _assert_trees_close(grads, want_grads, rtol=1e-4)


def _first_update(config, batch_np):
  """(loss, the parameters after one optimizer update) of `config`'s train step."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  tx, _ = step_lib.build_optimizer(config)
  state = step_lib.init_state(config, mesh, tx)
  t = config.train
  step = step_lib.make_train_step(state, tx, mesh, accumulate_steps=t.accumulate_steps,
                               l2wrap=config.optim.l2wrap, impl=t.impl, chunk_len=t.chunk_len,
                               bptt=t.bptt)
  params, _, metrics = step(state.params, state.opt_state, sharding.shard_batch(mesh, batch_np))
  return jax.device_get(metrics), jax.device_get(nnx.to_pure_dict(params))


@pytest.mark.slow
def test_chunked_step_on_a_sharded_mesh_with_accumulation_matches_the_one_call_step(
    corpus, compile_cache):
  config = tiny_config(corpus)  # ctx_len 16
  config.mesh.update(data=2, fsdp=2, tensor=2)
  batch = next(iter(data_pipeline.make_dataset(data_sources.open_source(corpus), ctx_len=16, batch_size=8,
                                          seed=0)))
  want, want_params = _first_update(config, batch)
  config.train.update(chunk_len=5, accumulate_steps=2)
  got, params = _first_update(config, batch)

  assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
  assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
  # Adam's first update is about lr * sign(g): rounding moves it where g is near zero.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), params,
               want_params)


@pytest.mark.parametrize("overrides, match", [
    (dict(bptt="tbptt"), r"--config.train.bptt='tbptt' is not one of \('full', 'truncated'\)"),
    (dict(chunk_len=-1), r"--config.train.chunk_len=-1 must be an integer from 0"),
    (dict(chunk_len=17), r"--config.train.chunk_len=17 .* --config.model.ctx_len=16"),
])
def test_bad_chunking_flags_are_refused_naming_the_field(overrides, match, tmp_path):
  config = tiny_config(tmp_path / "unused.txt", **overrides)
  with pytest.raises(ValueError, match=match):
    train_config.check(config)


@pytest.mark.slow
def test_a_chunked_run_resumes_and_ends_as_the_one_call_run(full_run, corpus, tmp_path):
  # Stopped after N steps and resumed to TOTAL, in chunks of 5 of the 16-token windows.
  train_loop.train_and_evaluate(tiny_config(corpus, steps=N, chunk_len=5), tmp_path)
  train_loop.train_and_evaluate(tiny_config(corpus, chunk_len=5), tmp_path)

  resumed, whole = logged_losses(tmp_path), logged_losses(full_run)
  assert sorted(resumed) == list(range(1, TOTAL + 1))
  for step in range(1, TOTAL + 1):
    assert resumed[step] == pytest.approx(whole[step], abs=1e-5), step
  got, want = latest_params(tmp_path), latest_params(full_run)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_context_runner_records_loss_by_position_for_every_window(tmp_path):
  from experiments import long_context  # pylint: disable=g-import-not-at-top

  record = long_context.run("tiny", tmp_path / "runs")
  path = long_context.save(record, tmp_path / "out", "tiny")
  saved = json.loads(path.read_text())

  assert (tmp_path / "out" / "context_tiny.png").is_file()
  assert saved["environment"]["command"] and saved["spans"] == ["1-8", "9-16", "17-32"]
  assert list(saved["runs"]) == ["ctx8", "ctx16", "ctx32"]
  for window, run in zip((8, 16, 32), saved["runs"].values()):
    assert run["window"] == window and run["steps"] == 3
    assert run["chunk_len"] == (8 if window > 8 else 0)  # longer windows train in chunks
    assert run["tokens"] == 3 * 256  # the same tokens per step for every window
    # Every position up to 32 is scored, on the same 4 held-out segments.
    assert sum(b["tokens"] for b in run["buckets"]) == 4 * 32
    assert all(np.isfinite(b["mean_loss"]) for b in run["buckets"])
  assert set(saved["mean_loss_17-32"]) == {"ctx8", "ctx16", "ctx32"}
  again = long_context.run("tiny", tmp_path / "runs")  # finished: read back, not trained again
  assert again["runs"]["ctx8"]["wall_s"] == record["runs"]["ctx8"]["wall_s"]
  assert again["runs"]["ctx8"]["buckets"] == record["runs"]["ctx8"]["buckets"]


@pytest.mark.slow
def test_chunks_are_refused_for_a_model_without_a_recurrent_state():
  from experiments.baselines import transformer as tf  # pylint: disable=g-import-not-at-top

  cfg = tf.TransformerConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=CFG.vocab_size)
  graphdef, params = nnx.split(tf.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  inputs, targets = _batch(4, b=1, t=8)
  with pytest.raises(ValueError, match=r"train.chunk_len=4 .* Transformer has none"):
    bptt.window_loss(graphdef, params, inputs, targets, chunk_len=4)

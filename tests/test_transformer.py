"""The Transformer baseline: the KV-cache decode equals the parallel forward, and it is causal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.baselines import transformer as tf

CFG = tf.TransformerConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=53, ctx_len=64)


def _model(cfg=CFG):
  return tf.Transformer(cfg, rngs=nnx.Rngs(0))


def _tokens(b, t, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)), jnp.int32)


@pytest.mark.slow
def test_token_by_token_with_cache_equals_the_parallel_forward():
  model = _model()
  tokens = _tokens(3, 19)
  full, _ = model(tokens)
  cache = tf.empty_cache(CFG, 3, 19)
  step = nnx.jit(lambda m, tok, c: m.step(tok, c))
  out = []
  for i in range(19):
    logits, cache = step(model, tokens[:, i], cache)
    out.append(logits)
  np.testing.assert_allclose(np.stack(out, 1), full, atol=2e-5, rtol=2e-5)
  assert int(cache.length) == 19


@pytest.mark.slow
def test_prefill_then_grow_then_decode_equals_one_pass():
  model = _model()
  tokens = _tokens(2, 24, seed=1)
  full, _ = model(tokens)
  logits_a, cache = model(tokens[:, :10], tf.empty_cache(CFG, 2, 16))
  cache = tf.grow(cache, 32)
  logits_b, cache = model(tokens[:, 10:], cache)
  np.testing.assert_allclose(jnp.concatenate([logits_a, logits_b], 1), full, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_future_tokens_do_not_change_past_logits():
  model = _model()
  a = _tokens(1, 12, seed=2)
  b = a.at[:, 7:].set((a[:, 7:] + 1) % CFG.vocab_size)
  la, _ = model(a)
  lb, _ = model(b)
  np.testing.assert_array_equal(la[:, :7], lb[:, :7])
  assert not np.allclose(la[:, 7:], lb[:, 7:])


@pytest.mark.slow
def test_num_params_counts_every_parameter():
  model = _model()
  counted = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert CFG.num_params() == counted


def test_a_full_cache_is_refused_with_what_to_do():
  model = _model()
  with pytest.raises(ValueError, match="grow"):
    model(_tokens(1, 5), tf.empty_cache(CFG, 1, 4))


def test_heads_must_split_the_width_evenly():
  with pytest.raises(ValueError, match="n_head"):
    tf.TransformerConfig(n_layer=1, n_embd=30, n_head=4, vocab_size=10)


@pytest.mark.slow
def test_figure7_records_cumulative_time_and_memory_for_both_models():
  from experiments import figure7  # pylint: disable=g-import-not-at-top
  rec = figure7.run(n_layer=1, n_embd=32, n_head=4, vocab_size=17, tokens=20, chunk=8, batch=2,
                    dtype="float32")
  assert rec["generated_tokens"] == [8, 16, 24]
  for name in ("rwkv_cumulative_s", "transformer_cumulative_s"):
    assert len(rec[name]) == 3 and all(b > a > 0 for a, b in zip(rec[name], rec[name][1:]))
  mem = rec["memory_per_sequence_bytes"]
  assert mem["rwkv_state"] == 5 * 1 * 32 * 4  # five float32 [C] vectors per layer
  assert mem["transformer_kv_cache"] == [2 * 1 * n * 32 * 4 for n in (8, 16, 24)]

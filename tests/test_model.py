"""The NNX model: parallel, recurrent and chunked evaluation agree; initialization; bad input."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rwkv_jax import quant
from rwkv_jax.config import RWKVConfig
from rwkv_jax.model import RWKV, abstract_model, empty_state
import training_util

CFG = RWKVConfig(n_layer=3, n_embd=32, vocab_size=61)


def random_model(cfg=CFG, seed=0, **kwargs):
  return training_util.random_model(cfg, seed, **kwargs)


def tokens(b, t, seed=0, vocab=CFG.vocab_size):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


@pytest.fixture(scope="module")
def model():
  return random_model()


def assert_states_close(s1, s2, atol=2e-5):
  # num/den are scaled by exp(-max_exp); compare what they mean.
  np.testing.assert_allclose(s1.att_x_prev, s2.att_x_prev, atol=atol)
  np.testing.assert_allclose(s1.ffn_x_prev, s2.ffn_x_prev, atol=atol)
  np.testing.assert_allclose(s1.num / s1.den, s2.num / s2.den, atol=atol, rtol=1e-4)
  np.testing.assert_allclose(jnp.log(s1.den) + s1.max_exp, jnp.log(s2.den) + s2.max_exp,
                             atol=atol, rtol=1e-5)


def test_parallel_and_recurrent_logits_are_identical(model):
  toks = tokens(2, 23)
  logits, state = model(toks)
  assert logits.shape == (2, 23, CFG.vocab_size) and logits.dtype == jnp.float32
  step = jax.jit(lambda m, t, s: m.step(t, s))
  s = None
  for i in range(23):
    out, s = step(model, toks[:, i], s)
    np.testing.assert_allclose(out, logits[:, i], atol=2e-5, rtol=1e-5)
  assert_states_close(s, state)


@pytest.mark.slow
@pytest.mark.parametrize("cuts", [[1], [7, 8], [5, 11, 20], [22]])
def test_any_split_into_chunks_gives_the_same_logits(model, cuts):
  toks = tokens(3, 23, seed=1)
  full, full_state = model(toks)
  bounds = [0] + cuts + [23]
  state, outs = None, []
  for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    out, state = model(toks[:, lo:hi], state, impl="scan" if n % 2 else "associative")
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=1e-5)
  assert_states_close(state, full_state)


@pytest.mark.slow
def test_last_only_gives_the_last_logits_and_the_same_state(model):
  toks = tokens(2, 9, seed=3)
  full, s_full = model(toks)
  last, s_last = model(toks, last_only=True)
  assert last.shape == (2, 1, CFG.vocab_size)
  np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-6)
  for a, b in zip(s_full, s_last):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_empty_state_equals_no_state(model):
  toks = tokens(2, 5)
  a, _ = model(toks)
  b, _ = model(toks, empty_state(CFG, 2))
  np.testing.assert_array_equal(a, b)


# The kernels run in their interpreters on CPU: the model's training path through each of them.
@pytest.mark.slow
@pytest.mark.parametrize("impl", ["associative", "pallas", "triton"])
def test_every_wkv_path_gives_the_scans_logits_state_and_gradients(impl):
  model = random_model(seed=3)
  toks = tokens(2, 17, seed=2)
  state = model(tokens(2, 5, seed=4), impl="scan")[1]

  def loss(m, impl):
    logits, out = m(toks, state, impl=impl)
    return jnp.mean(jax.nn.logsumexp(logits, -1)) + jnp.mean(out.num), (logits, out)

  (_, (logits, out)), grads = jax.value_and_grad(loss, has_aux=True)(model, impl)
  (_, (logits_ref, out_ref)), grads_ref = jax.value_and_grad(loss, has_aux=True)(model, "scan")
  np.testing.assert_allclose(logits, logits_ref, atol=2e-5, rtol=1e-5)
  assert_states_close(out, out_ref)
  for a, b in zip(jax.tree.leaves(nnx.state(grads)), jax.tree.leaves(nnx.state(grads_ref))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


RAGGED_LENGTHS = (13, 5, 1, 8)


@functools.lru_cache(maxsize=None)
def _ragged_case():
  """Padded prompts, a starting state, and each prompt run alone (the reference)."""
  model = random_model()
  toks = tokens(4, 13, seed=7)
  # Rows 0 and 1 continue from a non-empty state, rows 2 and 3 start empty.
  prefix = model(tokens(4, 3, seed=8), impl="scan")[1]
  state = jax.tree.map(lambda p, e: p.at[:, 2:].set(e[:, 2:]), prefix, empty_state(CFG, 4))
  alone = []
  for row, n in enumerate(RAGGED_LENGTHS):
    row_state = jax.tree.map(lambda s: s[:, row:row + 1], state) if row < 2 else None
    alone.append(model(toks[row:row + 1, :n], row_state, impl="scan"))
  return model, toks, state, alone


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["scan", "associative", "pallas", "triton"])
def test_ragged_prompts_prefill_as_if_alone(impl):
  model, toks, state, alone = _ragged_case()

  @jax.jit  # lengths traced
  def run(m, t, s, n):
    return m(t, s, impl=impl, lengths=n), m(t, s, impl=impl, lengths=n, last_only=True)

  (logits, out), (last, out_last) = run(model, toks, state, jnp.array(RAGGED_LENGTHS))
  for row, (n, (alone_logits, alone_state)) in enumerate(zip(RAGGED_LENGTHS, alone)):
    np.testing.assert_allclose(logits[row, :n], alone_logits[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(last[row, 0], alone_logits[0, -1], atol=2e-5, rtol=1e-5)
    for got in (out, out_last):
      assert_states_close(jax.tree.map(lambda s: s[:, row:row + 1], got), alone_state)


@pytest.mark.slow
def test_padding_never_reaches_the_state(model):
  toks = tokens(2, 9, seed=9)
  junk = toks.at[:, 4:].set(tokens(2, 5, seed=10))
  lengths = jnp.array([4, 4])
  _, clean = model(toks, lengths=lengths)
  _, dirty = model(junk, lengths=lengths)
  for a, b in zip(clean, dirty):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("lengths,match", [
    (jnp.array([3]), r"shape \(2,\)"),
    (jnp.array([0, 3]), r"lengths must be in \[1, 4\]"),
    (jnp.array([5, 3]), r"lengths must be in \[1, 4\]"),
    (jnp.array([1.0, 3.0]), "integer array"),
])
def test_bad_lengths_are_reported(model, lengths, match):
  with pytest.raises(ValueError, match=match):
    model(tokens(2, 4), lengths=lengths)


@pytest.mark.parametrize("case", ["float32", "int8", "ragged, from a state", "bfloat16"])
def test_blocks_as_one_loop_give_the_unrolled_results(case):
  """loop_layers=True (the chunk programs on CPU) runs the same blocks in a lax.scan: the same
  logits and state, with the state and the padding as the unrolled form handles them."""
  float_model = random_model(CFG.replace(dtype="bfloat16") if case == "bfloat16" else CFG, seed=7)
  model = (quant.quantize_model(float_model, abstract_model(CFG.with_precision("int8")))
           if case == "int8" else float_model)
  toks, state, lengths = tokens(3, 13, seed=8), None, None
  if case.startswith("ragged"):
    state, lengths = model(tokens(3, 5, seed=9))[1], jnp.asarray([13, 4, 9])
  run = jax.jit(lambda m, loop: m(toks, state, lengths=lengths, loop_layers=loop),
                static_argnums=1)
  unrolled, looped = run(model, False), run(model, True)
  if case == "bfloat16":
    # XLA rounds the two programs' bfloat16 intermediates in different places: each form is as
    # close to the float32 model as the other (0.16 in the logits here), and closer to it.
    reference = run(random_model(CFG, seed=7), False)
    for got, want, ref in zip(jax.tree.leaves(looped), jax.tree.leaves(unrolled),
                              jax.tree.leaves(reference)):
      assert np.abs(got - want).max() <= np.abs(want - ref).max()
      assert np.abs(got - ref).max() <= 1.25 * np.abs(want - ref).max()
    return
  for got, want in zip(jax.tree.leaves(looped), jax.tree.leaves(unrolled)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_blocks_that_differ_in_structure_stay_unrolled():
  toks = tokens(2, 6, seed=10)
  products = lambda m: jax.jit(lambda m: m(toks, loop_layers=True)).lower(m).as_text().count(
      "dot_general")
  # Seven matrix products per block and the head: one block in the loop, one per layer unrolled.
  assert products(random_model(seed=7)) == 7 + 1
  model = random_model(CFG.replace(rescale_every=2), seed=7)  # float16's per-layer rescale
  assert products(model) == 7 * CFG.n_layer + 1
  np.testing.assert_allclose(model(toks, loop_layers=True)[0], model(toks)[0], rtol=1e-6)


@pytest.mark.slow
def test_remat_changes_memory_not_results():
  toks = tokens(2, 9, seed=4)
  plain, remat = random_model(seed=5), random_model(seed=5, remat=True)
  loss = lambda m: jnp.mean(m(toks)[0] ** 2)
  for a, b in zip(jax.tree.leaves(nnx.state(jax.grad(loss)(plain))),
                  jax.tree.leaves(nnx.state(jax.grad(loss)(remat)))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_logits_and_state():
  cfg = CFG.replace(dtype="bfloat16")
  m16, m32 = random_model(cfg, seed=6), random_model(seed=6)
  toks = tokens(2, 11, seed=5)
  (l16, s16), (l32, _) = m16(toks), m32(toks)
  assert l16.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in s16)
  assert jax.tree.leaves(nnx.state(m16, nnx.Param))[0].dtype == jnp.float32  # master weights
  p16, p32 = jax.nn.softmax(l16), jax.nn.softmax(l32)
  assert float(jnp.abs(p16 - p32).max()) < 0.05


def test_official_init_follows_the_v4neo_trainer():
  cfg = RWKVConfig(n_layer=4, n_embd=16, vocab_size=40)
  m = RWKV(cfg, rngs=nnx.Rngs(0), emb_scale=1e-3)
  for i, blk in enumerate(m.blocks):
    ratio_0_to_1, ratio_1_to_0 = i / 3, 1 - i / 4
    h = np.arange(16) / 15
    np.testing.assert_allclose(blk.att.time_decay[...], -5 + 8 * h ** (0.7 + 1.3 * ratio_0_to_1),
                               rtol=1e-6)
    zigzag = 0.5 * (((np.arange(16) + 1) % 3) - 1)
    np.testing.assert_allclose(blk.att.time_first[...], math.log(0.3) + zigzag, rtol=1e-6)
    ramp = np.arange(16) / 16
    np.testing.assert_allclose(blk.att.time_mix_k[...], ramp ** ratio_1_to_0, rtol=1e-6)
    np.testing.assert_allclose(blk.att.time_mix_v[...], ramp ** ratio_1_to_0 + 0.3 * ratio_0_to_1,
                               rtol=1e-6)
    np.testing.assert_allclose(blk.att.time_mix_r[...], ramp ** (0.5 * ratio_1_to_0), rtol=1e-6)
    np.testing.assert_allclose(blk.ffn.time_mix_r[...], ramp ** ratio_1_to_0, rtol=1e-6)
    for zero in (blk.att.key, blk.att.receptance, blk.att.output, blk.ffn.receptance, blk.ffn.value):
      assert not np.any(zero.kernel[...])
    # Orthogonal with gain sqrt(out/in) for the wide ffn.key: columns of [in, out] have norm 1 * gain
    # ... i.e. kernel^T kernel is gain^2 * I on the smaller side.
    kk = np.asarray(blk.ffn.key.kernel[...])  # [16, 64]
    np.testing.assert_allclose(kk @ kk.T, 4.0 * np.eye(16), atol=1e-4)
  emb = np.asarray(m.emb.embedding[...])
  assert emb.min() >= -1e-3 and emb.max() <= 1e-3 and emb.std() > 3e-4
  head = np.asarray(m.head.kernel[...])  # [16, 40]: gain 0.5 * sqrt(40/16)
  np.testing.assert_allclose(head @ head.T, 0.25 * 40 / 16 * np.eye(16), atol=1e-4)


def test_paper_init_differs_where_appendix_e_does():
  cfg = RWKVConfig(n_layer=2, n_embd=16, vocab_size=40)
  official, paper = RWKV(cfg, rngs=nnx.Rngs(0)), RWKV(cfg, rngs=nnx.Rngs(0), init="paper")
  ramp = np.arange(16) / 16
  np.testing.assert_allclose(paper.blocks[0].att.time_mix_r[...], 0.5 * ramp, rtol=1e-6)
  assert np.abs(np.asarray(paper.emb.embedding[...])).max() <= 1e-4
  np.testing.assert_array_equal(official.blocks[1].att.time_decay[...],
                                paper.blocks[1].att.time_decay[...])
  with pytest.raises(ValueError, match="init='kaiming' is not one of"):
    RWKV(cfg, rngs=nnx.Rngs(0), init="kaiming")


@pytest.mark.parametrize("toks,match", [
    (jnp.array([[1, 2, 61]]), r"token ids must be in \[0, 61\); found \[61\]"),
    (jnp.array([[-1, 2]]), r"found \[-1\]"),
    (jnp.zeros((1, 0), jnp.int32), "tokens is empty"),
    (jnp.array([1, 2, 3]), r"\[batch, time\] integer array"),
    (jnp.array([[1.0, 2.0]]), "must be integers"),
])
def test_bad_tokens_are_reported(model, toks, match):
  with pytest.raises(ValueError, match=match):
    model(toks)

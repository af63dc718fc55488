"""WKV implementations against eq. 16 evaluated term by term in float64, and against each other."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax import wkv as wkv_lib
from rwkv_jax.reference import wkv_float64, wkv_reference
from rwkv_jax.wkv import WKVState
from wkv_util import rel_err

IMPLS = {"scan": wkv_lib.wkv_scan, "associative": wkv_lib.wkv_associative}


def state_invariants(state: WKVState):
  """What the state means, independent of its scaling: num/den and log(true denominator)."""
  return state.num / state.den, jnp.log(state.den) + state.max_exp


def random_inputs(seed, b, t, c, *, k_scale=1.0, decay_range=(-9.0, 4.0)):
  rng = np.random.default_rng(seed)
  time_decay = rng.uniform(*decay_range, size=c)
  return dict(
      w=np.exp(time_decay).astype(np.float32),
      u=rng.normal(size=c).astype(np.float32),
      k=(rng.uniform(-1, 1, size=(b, t, c)) * k_scale).astype(np.float32),
      v=rng.normal(size=(b, t, c)).astype(np.float32),
      state=WKVState(rng.normal(size=(b, c)).astype(np.float32),
                     rng.uniform(0.5, 2.0, size=(b, c)).astype(np.float32),
                     (rng.normal(size=(b, c)) * 5).astype(np.float32)),
  )


def _loss(fn, weights):
  """A scalar that depends on y and on the final state, through its meaning only."""
  g_y, g_ratio, g_logden = weights

  def loss(w, u, k, v, state):
    y, final = fn(w, u, k, v, state)
    ratio, log_den = state_invariants(final)
    return (jnp.sum(y * g_y) + jnp.sum(ratio * g_ratio) + jnp.sum(log_den * g_logden))

  return loss


SHAPES = [(1, 1, 1), (2, 7, 5), (3, 64, 16), (2, 129, 3)]


@functools.lru_cache(maxsize=None)
def _case(b, t, c, k_scale):
  """Inputs, loss weights and the float64 reference (computed once for both implementations)."""
  inputs = random_inputs(b * 1000 + t * 10 + c + int(k_scale), b, t, c, k_scale=k_scale)
  args = (inputs["w"], inputs["u"], inputs["k"], inputs["v"], inputs["state"])
  rng = np.random.default_rng(1)
  weights = (rng.normal(size=(b, t, c)), rng.normal(size=(b, c)), rng.normal(size=(b, c)))
  with jax.enable_x64(True):
    args64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), args)
    y_ref, final_ref = jax.jit(wkv_reference)(*args64)
    ratio_ref, logden_ref = state_invariants(final_ref)
    grads_ref = jax.jit(jax.grad(_loss(wkv_reference, weights), argnums=(0, 1, 2, 3, 4)))(*args64)
    ref = jax.tree.map(np.asarray, (y_ref, ratio_ref, logden_ref, grads_ref))
  return args, weights, ref


@pytest.mark.slow
@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("b,t,c", SHAPES)
@pytest.mark.parametrize("k_scale", [1.0, 60.0])
def test_forward_and_gradients_match_float64_eq16(impl, b, t, c, k_scale):
  args, weights, (y_ref, ratio_ref, logden_ref, grads_ref) = _case(b, t, c, k_scale)
  fn = IMPLS[impl]
  y, final = jax.jit(fn)(*args)
  ratio, log_den = state_invariants(final)
  assert y.dtype == jnp.float32 and final.num.dtype == jnp.float32
  # float32 rounds max_exp to ~1e-7 relative at every step; with |k| ~ 60 that is ~5e-6 absolute
  # in an exponent, which accumulates over the sequence (the official kernel behaves the same).
  atol = 2e-5 if k_scale <= 1 else 2e-4
  np.testing.assert_allclose(y, y_ref, atol=atol, rtol=1e-5)
  np.testing.assert_allclose(ratio, ratio_ref, atol=atol, rtol=1e-5)
  np.testing.assert_allclose(log_den, logden_ref, atol=1e-4, rtol=1e-5)

  weights32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), weights)
  grads = jax.jit(jax.grad(_loss(fn, weights32), argnums=(0, 1, 2, 3, 4)))(*args)
  names = ["w", "u", "k", "v", "state.num", "state.den", "state.max_exp"]
  flat, flat_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
  for name, g, g_ref in zip(names, flat, flat_ref):
    assert np.all(np.isfinite(g)), name
    assert rel_err(g, g_ref) < (2e-4 if k_scale <= 1 else 2e-3), (name, rel_err(g, g_ref))


@pytest.mark.slow
@pytest.mark.parametrize("t", [1, 2, 1000, 4096])
def test_long_sequences_match_float64_eq16(t):
  b, c = 2, 8
  inputs = random_inputs(t, b, t, c, k_scale=60.0)
  y_ref, (num, den, p) = wkv_float64(inputs["w"], inputs["u"], inputs["k"], inputs["v"],
                                     inputs["state"])
  # The sequential form rounds max_exp - w at every step (|max_exp| ~ 60 here, so an ulp is
  # ~4e-6 against w as small as 1e-4): it drifts like the official kernel, ~3e-4 after 4096 steps.
  # The associative form sums the decays first and rounds once: ~4e-6.
  for name, fn in IMPLS.items():
    atol = 1e-3 if name == "scan" else 2e-5
    y, final = jax.jit(fn)(inputs["w"], inputs["u"], inputs["k"], inputs["v"], inputs["state"])
    np.testing.assert_allclose(y, y_ref, atol=atol)
    np.testing.assert_allclose(final.num / final.den, num / den, atol=atol)
    np.testing.assert_allclose(np.log(final.den) + final.max_exp, np.log(den) + p, atol=2 * atol)


@pytest.mark.slow
def test_scan_and_associative_gradients_agree_at_length_4096():
  b, t, c = 1, 4096, 4
  inputs = random_inputs(7, b, t, c, k_scale=20.0)
  args = (inputs["w"], inputs["u"], inputs["k"], inputs["v"], inputs["state"])
  rng = np.random.default_rng(2)
  weights = tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(b, t, c), (b, c), (b, c)])
  g_scan = jax.jit(jax.grad(_loss(wkv_lib.wkv_scan, weights), argnums=range(5)))(*args)
  g_assoc = jax.jit(jax.grad(_loss(wkv_lib.wkv_associative, weights), argnums=range(5)))(*args)
  for g1, g2 in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_assoc)):
    assert rel_err(g2, g1) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("splits", [[1], [5, 6], [3, 17, 30], [31]])
def test_chunked_evaluation_equals_one_shot(splits):
  inputs = random_inputs(3, 2, 32, 6, k_scale=10.0)
  w, u, k, v = inputs["w"], inputs["u"], inputs["k"], inputs["v"]
  y_full, s_full = wkv_lib.wkv_associative(w, u, k, v)
  ys, state = [], None
  bounds = [0] + splits + [32]
  for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    fn = wkv_lib.wkv_scan if n % 2 else wkv_lib.wkv_associative  # mixing paths must not matter
    y, state = fn(w, u, k[:, lo:hi], v[:, lo:hi], state)
    ys.append(y)
  np.testing.assert_allclose(np.concatenate(ys, axis=1), y_full, atol=2e-5)
  for a, b in zip(state_invariants(state), state_invariants(s_full)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_token_by_token_steps_equal_parallel():
  inputs = random_inputs(4, 3, 20, 5)
  w, u, k, v = inputs["w"], inputs["u"], inputs["k"], inputs["v"]
  y_full, _ = wkv_lib.wkv_associative(w, u, k, v, inputs["state"])
  state = inputs["state"]
  for i in range(20):
    y, state = wkv_lib.wkv_step(w, u, k[:, i], v[:, i], state)
    np.testing.assert_allclose(y, y_full[:, i], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("k_scale", [1.0, 60.0])
def test_state_after_each_rows_length_equals_the_scan_of_that_prefix(k_scale):
  b, t, c = 4, 33, 5
  inputs = random_inputs(9, b, t, c, k_scale=k_scale)
  w, k, v = inputs["w"], inputs["k"], inputs["v"]
  lengths = np.array([33, 1, 17, 2])
  rng = np.random.default_rng(3)
  g_ratio, g_logden = rng.normal(size=(2, c))

  def meaning(state):  # a scalar through the state's meaning only, for the gradients
    ratio, log_den = state_invariants(state)
    return jnp.sum(ratio * g_ratio) + jnp.sum(log_den * g_logden)

  for state in (inputs["state"], None):
    after = jax.jit(wkv_lib.wkv_state_after)(w, k, v, state, jnp.asarray(lengths))
    grads = jax.grad(lambda *a: meaning(wkv_lib.wkv_state_after(*a, jnp.asarray(lengths))),
                     argnums=(0, 1, 2))(w, k, v, state)
    g_w = 0.0  # w is shared by the rows: its gradient is the sum of theirs
    for row, n in enumerate(lengths):
      row_state = None if state is None else WKVState(*(s[row:row + 1] for s in state))
      args = (w, k[row:row + 1, :n], v[row:row + 1, :n], row_state)
      _, ref = wkv_lib.wkv_scan(w, inputs["u"], *args[1:])
      got = WKVState(*(s[row:row + 1] for s in after))
      np.testing.assert_allclose(got.max_exp, ref.max_exp, rtol=1e-6, atol=1e-5)
      for a, r in zip(state_invariants(got), state_invariants(ref)):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)
      g_ref = jax.grad(lambda w, k, v, s: meaning(wkv_lib.wkv_scan(w, inputs["u"], k, v, s)[1]),
                       argnums=(0, 1, 2))(*args)
      np.testing.assert_allclose(grads[1][row, :n], g_ref[1][0], rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(grads[2][row, :n], g_ref[2][0], rtol=1e-4, atol=1e-5)
      assert not np.any(grads[1][row, n:]) and not np.any(grads[2][row, n:])  # padding
      g_w = g_w + g_ref[0]
    np.testing.assert_allclose(grads[0], g_w, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_bfloat16_inputs_keep_float32_state_and_accumulation(impl):
  inputs = random_inputs(5, 2, 50, 8, k_scale=5.0)
  k16 = jnp.asarray(inputs["k"], jnp.bfloat16)
  v16 = jnp.asarray(inputs["v"], jnp.bfloat16)
  y16, s16 = IMPLS[impl](inputs["w"], inputs["u"], k16, v16, inputs["state"])
  y32, s32 = IMPLS[impl](inputs["w"], inputs["u"], k16.astype(jnp.float32),
                         v16.astype(jnp.float32), inputs["state"])
  assert y16.dtype == jnp.bfloat16
  assert all(s.dtype == jnp.float32 for s in s16)
  np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=2e-2, rtol=1e-2)
  for a, b in zip(s16, s32):  # state computed in float32 from the same bf16 values: identical
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_empty_state_is_a_no_op_prefix():
  inputs = random_inputs(6, 2, 9, 4)
  w, u, k, v = inputs["w"], inputs["u"], inputs["k"], inputs["v"]
  y_none, _ = wkv_lib.wkv_scan(w, u, k, v, None)
  y_empty, _ = wkv_lib.wkv_scan(w, u, k, v, WKVState.empty(2, 4))
  np.testing.assert_array_equal(y_none, y_empty)
  # The first output with an empty state is v_0 exactly: only the current token contributes.
  np.testing.assert_allclose(y_none[:, 0], v[:, 0], rtol=1e-6)


def test_dispatcher_auto_picks_by_platform_and_unknown_names_fail():
  assert wkv_lib.resolve("auto", platform="cpu") == "scan"
  assert wkv_lib.resolve("auto", platform="tpu") == "associative"
  assert wkv_lib.resolve("auto", platform="gpu") == "pallas_chunked"
  assert {"scan", "associative", "pallas", "triton", "pallas_chunked", "triton_chunked"} <= set(
      wkv_lib.implementations())
  with pytest.raises(ValueError, match="Unknown WKV implementation 'flash'"):
    wkv_lib.wkv(*[jnp.ones(s) for s in [(3,), (3,), (1, 2, 3), (1, 2, 3)]], impl="flash")


def test_dispatcher_runs_registered_implementation():
  calls = []

  def traced(*args):
    calls.append(1)
    return wkv_lib.wkv_scan(*args)

  wkv_lib.register("test_traced", traced)
  inputs = random_inputs(8, 1, 4, 3)
  y, _ = wkv_lib.wkv(inputs["w"], inputs["u"], inputs["k"], inputs["v"], impl="test_traced")
  assert calls and y.shape == (1, 4, 3)


def test_bad_shapes_are_reported():
  with pytest.raises(ValueError, match=r"w and u must be \[3\]"):
    wkv_lib.wkv_scan(jnp.ones(4), jnp.ones(3), jnp.ones((1, 2, 3)), jnp.ones((1, 2, 3)))
  with pytest.raises(ValueError, match="batch, time, channels"):
    wkv_lib.wkv_associative(jnp.ones(3), jnp.ones(3), jnp.ones((2, 3)), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="state tensors must be"):
    wkv_lib.wkv_scan(jnp.ones(3), jnp.ones(3), jnp.ones((1, 2, 3)), jnp.ones((1, 2, 3)),
                     WKVState.empty(2, 3))

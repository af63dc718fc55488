"""The WKV kernels against the sequential scan and a float64 evaluation of eq. 16.

One base class holds the checks; subclasses pick the kernel and how it runs: the Pallas kernels in
the interpreter (CPU, CI), compiled on a GPU, and the jax-triton kernel (GPU only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax import wkv as wkv_lib
from rwkv_jax.reference import wkv_float64
from rwkv_jax.wkv import WKVState
from rwkv_jax_kernels import wkv_pallas
from wkv_util import random_inputs, rel_err

_ON_GPU = jax.default_backend() in ("gpu", "cuda")

# Errors are measured relative to the largest magnitude of the reference tensor.
_TOL = {  # dtype -> (forward, gradients)
    jnp.float32: (5e-5, 2e-4),
    jnp.bfloat16: (1e-2, 3e-2),
}


def _loss_grad(fn):
  """Gradients of a loss that reads y, the final state, and a second call continued from it."""

  def loss(w, u, k, v, state):
    y, out = fn(w, u, k, v, state)
    y2, _ = fn(w, u, k[:, ::-1], v, out)
    f32 = lambda x: x.astype(jnp.float32)
    weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return (jnp.sum(f32(y) * weights) + jnp.sum(f32(y2) * f32(v)) + jnp.sum(out.num / out.den)
            + jnp.sum(jnp.log(out.den) + out.max_exp) * 0.1 + jnp.sum(jnp.sin(out.max_exp)))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


class _WKVKernelChecks:
  """Checks shared by every kernel; a subclass names the kernel through `wkv`."""

  def wkv(self, w, u, k, v, state=None, block_sizes=None):
    raise NotImplementedError

  @pytest.mark.slow
  @pytest.mark.parametrize("b,t,c,dtype,time_decay,k_max,blocks", [
      pytest.param(2, 37, 48, jnp.float32, (-3.0, 1.0), 3.0, None, id="t_and_c_not_multiples"),
      pytest.param(1, 1, 5, jnp.float32, (-3.0, 1.0), 3.0, None, id="single_token"),
      pytest.param(3, 19, 12, jnp.float32, (-3.0, 1.0), 3.0, (4, 8), id="many_chunks_and_blocks"),
      pytest.param(2, 20, 24, jnp.float32, (-9.0, 4.0), 60.0, None, id="extreme_values"),
      pytest.param(2, 24, 40, jnp.bfloat16, (-3.0, 1.0), 3.0, None, id="bfloat16"),
  ])
  def test_forward_and_gradients_match_scan(self, b, t, c, dtype, time_decay, k_max, blocks):
    w, u, k, v, state = random_inputs(0, b, t, c, dtype, time_decay, k_max)
    kernel = functools.partial(self.wkv, block_sizes=blocks)
    y, out = kernel(w, u, k, v, state)
    y_ref, out_ref = wkv_lib.wkv_scan(w, u, k, v, state)
    tol_fwd, tol_grad = _TOL[dtype]
    assert y.dtype == k.dtype and y.shape == k.shape
    assert all(s.dtype == jnp.float32 and s.shape == (b, c) for s in out)
    for name, x, ref in zip(("y", "num", "den", "max_exp"), (y, *out), (y_ref, *out_ref)):
      assert rel_err(x, ref) < tol_fwd, (name, rel_err(x, ref))
    grads = _loss_grad(kernel)(w, u, k, v, state)
    grads_ref = _loss_grad(wkv_lib.wkv_scan)(w, u, k, v, state)
    names = ("w", "u", "k", "v", "state.num", "state.den", "state.max_exp")
    for name, g, g_ref in zip(names, jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
      assert g.dtype == g_ref.dtype and np.all(np.isfinite(np.asarray(g, np.float32))), name
      assert rel_err(g, g_ref) < tol_grad, (name, rel_err(g, g_ref))

  @pytest.mark.parametrize("time_decay,k_max", [((-3.0, 1.0), 3.0), ((-9.0, 4.0), 60.0)])
  def test_matches_float64_eq16(self, time_decay, k_max):
    w, u, k, v, state = random_inputs(1, 2, 21, 16, jnp.float32, time_decay, k_max)
    y, out = self.wkv(w, u, k, v, state, block_sizes=(8, 32))
    y64, (num64, den64, max64) = wkv_float64(w, u, k, v, state)
    assert rel_err(y, y64) < 2e-5
    # The state's split into mantissa and exponent is the same by construction (a max).
    np.testing.assert_allclose(out.max_exp, max64, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(out.num / out.den, num64 / den64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.den, den64, rtol=1e-4)

  @pytest.mark.slow
  def test_chunked_calls_equal_one_call(self):
    w, u, k, v, state = random_inputs(2, 2, 45, 24, jnp.float32)
    y_full, out_full = self.wkv(w, u, k, v, state)
    ys, out = [], state
    for start, stop in ((0, 7), (7, 23), (23, 24), (24, 45)):
      y, out = self.wkv(w, u, k[:, start:stop], v[:, start:stop], out)
      ys.append(y)
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), y_full, rtol=1e-5, atol=1e-5)
    for s, s_full in zip(out, out_full):
      np.testing.assert_allclose(s, s_full, rtol=1e-5, atol=1e-5)

  def test_no_state_means_empty_state(self):
    w, u, k, v, _ = random_inputs(3, 1, 9, 8, jnp.float32)
    y, out = self.wkv(w, u, k, v)
    y_ref, out_ref = wkv_lib.wkv_scan(w, u, k, v)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.max_exp, out_ref.max_exp, rtol=1e-6)


class TestWKVPallasInterpret(_WKVKernelChecks):
  INTERPRET = True
  IMPL = "pallas_chunked"

  def wkv(self, w, u, k, v, state=None, block_sizes=None):
    blocks = wkv_pallas.BlockSizes(*block_sizes) if block_sizes else wkv_pallas.BlockSizes()
    return wkv_pallas.wkv_pallas(w, u, k, v, state, block_sizes=blocks,
                                 interpret=self.INTERPRET)

  def test_dispatcher_runs_it_by_name(self):
    w, u, k, v, state = random_inputs(4, 2, 5, 6, jnp.float32)
    y, _ = wkv_lib.wkv(w, u, k, v, state, impl=self.IMPL)
    np.testing.assert_allclose(y, wkv_lib.wkv_scan(w, u, k, v, state)[0], rtol=1e-5, atol=1e-6)

  def test_rejects_block_sizes_that_are_not_powers_of_two(self):
    with pytest.raises(ValueError, match="block_t=12 must be a power of two"):
      wkv_pallas.BlockSizes(block_t=12)

  def test_rejects_mismatched_shapes(self):
    w, u, k, v, state = random_inputs(5, 2, 5, 6, jnp.float32)
    with pytest.raises(ValueError, match="w and u must be"):
      self.wkv(w[:4], u, k, v, state)
    with pytest.raises(ValueError, match="state tensors must be"):
      self.wkv(w, u, k, v, WKVState(*(s[:1] for s in state)))


def compiled(interpreted: type, marker: str, available: bool, why: str) -> type:
  """The checks of `interpreted` with the kernels compiled, marked `marker`; skipped elsewhere."""
  cls = type(interpreted.__name__.replace("Interpret", "Compiled"), (interpreted,),
             {"INTERPRET": False})
  reason = f"{why}; CPU runs the same checks in an interpreter ({interpreted.__name__})"
  return getattr(pytest.mark, marker)(pytest.mark.skipif(not available, reason=reason)(cls))


TestWKVPallasCompiled = compiled(TestWKVPallasInterpret, "gpu", _ON_GPU,
                                 "compiled Pallas kernels need a GPU")


class TestWKVTritonInterpret(TestWKVPallasInterpret):
  """The Triton kernels, launched from JAX through Triton's interpreter (jax-triton on a GPU)."""
  IMPL = "triton_chunked"

  def wkv(self, w, u, k, v, state=None, block_sizes=None):
    from rwkv_jax_kernels import wkv_triton  # pylint: disable=g-import-not-at-top
    blocks = wkv_triton.BlockSizes(*block_sizes) if block_sizes else wkv_triton.BlockSizes()
    return wkv_triton.wkv_triton(w, u, k, v, state, block_sizes=blocks, interpret=self.INTERPRET)


TestWKVTritonCompiled = compiled(TestWKVTritonInterpret, "gpu", _ON_GPU,
                                 "jax-triton needs a GPU build of jax")

"""Eq. 16 evaluated as written: the slow WKV that every fast path is measured against.

Each output is the weighted average of eq. 16 formed from its whole list of terms - the incoming
state decayed to that token, every earlier token decayed by its distance, the current token with
its bonus u - shifted once by their largest exponent. There is no recurrence and no merging of
partial sums, so it shares no arithmetic (and no rounding) with `rwkv_jax.wkv` or the kernels.
O(t^2) work: fine for tests and for t of a few thousand.

`wkv_reference` is traceable and differentiable in the dtype it is given (tests take float64
gradients of it under `jax.enable_x64`); `wkv_float64` runs it in float64 on numpy arrays.

Shapes: b = batch, t = time, c = channels, n = terms of a sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax import wkv as wkv_lib
from rwkv_jax.wkv import WKVState

Array = jax.Array

_ELEMENTS_PER_BATCH = 2**22  # bounds the [outputs, n, b, c] terms built at once


def _shifted_sums(exps_nbc, nums_nbc, dens_nbc):
  """(num, den, max_exp): sum_n e^{exp_n} (num_n, den_n) = e^{max_exp} (num, den)."""
  max_exp = jnp.max(exps_nbc, axis=0)
  e = jnp.exp(exps_nbc - max_exp)
  return jnp.sum(e * nums_nbc, axis=0), jnp.sum(e * dens_nbc, axis=0), max_exp


def wkv_reference(w: Array, u: Array, k: Array, v: Array, state: WKVState | None = None
                  ) -> tuple[Array, WKVState]:
  """Eq. 16 with the incoming state, term by term, in the inputs' common dtype.

  Args:
    w, u, k, v, state: as for `rwkv_jax.wkv.wkv`; state None means empty.

  Returns:
    y [b, t, c] and the state after the last token, in the inputs' common dtype. The state's
    max_exp is the largest exponent among its terms, as in every implementation.
  """
  wkv_lib.check_inputs(w, u, k, v, state)
  dtype = jnp.result_type(w, u, k, v, *(() if state is None else state))
  w, u, k, v = (jnp.asarray(x, dtype) for x in (w, u, k, v))
  b, t, c = k.shape
  if state is None:
    state = (jnp.zeros((b, c), dtype), jnp.zeros((b, c), dtype),
             jnp.full((b, c), wkv_lib.EMPTY_MAX_EXP, dtype))
  num0, den0, max0 = (jnp.asarray(s, dtype) for s in state)
  k_tbc, v_tbc = jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)
  i = jnp.arange(t)[:, None, None]  # the token in each row of k_tbc, v_tbc

  def terms_before(s):
    """The state decayed s steps, and token i < s decayed s - 1 - i steps (later tokens: e^-inf)."""
    past = jnp.where(i < s, k_tbc - (s - 1 - i) * w, -jnp.inf)
    return (jnp.concatenate([(max0 - s * w)[None], past]),
            jnp.concatenate([num0[None], v_tbc]),
            jnp.concatenate([den0[None], jnp.ones_like(v_tbc)]))

  def output(s):
    exps, nums, dens = terms_before(s)
    bonus = ((u + k_tbc[s])[None], v_tbc[s][None], jnp.ones_like(v_tbc[s])[None])
    num, den, _ = _shifted_sums(*(jnp.concatenate(pair) for pair in zip((exps, nums, dens), bonus)))
    return num / den

  batch = max(1, min(t, _ELEMENTS_PER_BATCH // ((t + 2) * b * c)))
  y_tbc = jax.lax.map(output, jnp.arange(t), batch_size=batch)
  return jnp.swapaxes(y_tbc, 0, 1), WKVState(*_shifted_sums(*terms_before(t)))


_reference_jit = jax.jit(wkv_reference)


def wkv_float64(w, u, k, v, state=None) -> tuple[np.ndarray, WKVState]:
  """`wkv_reference` in float64 on float64 copies of the inputs; returns numpy float64 arrays."""
  f64 = lambda x: np.asarray(x, np.float64)
  with jax.enable_x64(True):
    y, out = _reference_jit(f64(w), f64(u), f64(k), f64(v),
                            None if state is None else WKVState(*map(f64, state)))
    return f64(y), WKVState(*map(f64, out))

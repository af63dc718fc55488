"""WKV forward as a hand-written Triton kernel called through jax-triton (GPU only).

One program per (batch row, block of `block_c` channels) walks the sequence in order, keeping the
float32 state (num, den, max_exp) in registers and applying the same two log-space merges as
`rwkv_jax.wkv.wkv_step` per token: the readout with the bonus e^{u + k_t}, then the decay by
e^{-w} and the addition of the token. This is the official CUDA kernel's schedule (sequential in
time, parallel over batch and channels) without its T_MAX limit and with the state passed in and
out, so any T works and calls can be chained. It is latency-bound for long single sequences; the
chunked Pallas kernels (`wkv_pallas.py`) are parallel in time as well.

The backward pass is not a Triton kernel: it is the vjp of `rwkv_jax.wkv.wkv_associative` (pure
JAX, O(log t) depth), recomputed from the saved inputs.

The kernel body is in `wkv_triton_kernel.py` (Triton only, no JAX), so it can also be compiled
for a GPU architecture and run in Triton's interpreter on a machine without a GPU.

Importing this module needs `triton` and a GPU build of jax with `jax_triton`; the dispatcher
imports it only when impl="triton" is asked for, and treats an ImportError as
"backend unavailable".

Shapes: b = batch, t = time, c = channels, cb = block_c.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import jax_triton as jt
import triton

from rwkv_jax import wkv as wkv_lib
from rwkv_jax.wkv import WKVState
from rwkv_jax_kernels import wkv_triton_kernel

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Channels per program (a power of two) and warps per program."""

  block_c: int = wkv_triton_kernel.BLOCK_C
  num_warps: int = wkv_triton_kernel.NUM_WARPS

  def __post_init__(self):
    if self.block_c < 1 or self.block_c & (self.block_c - 1):
      raise ValueError(f"BlockSizes.block_c={self.block_c} must be a power of two.")


# ----------------------------------------------------------------------------------------------
# Public entry.


@functools.partial(jax.jit, static_argnames=("block_sizes",))
def wkv_triton(w: Array, u: Array, k: Array, v: Array, state: WKVState | None = None, *,
               block_sizes: BlockSizes = BlockSizes()) -> tuple[Array, WKVState]:
  """WKV with the Triton forward kernel; the contract of `rwkv_jax.wkv.wkv_scan`.

  Args:
    w: [c] per-step decay rate, exp(time_decay) > 0.
    u: [c] bonus of the current token (time_first).
    k, v: [b, t, c] keys and values, float32 or bfloat16.
    state: incoming WKVState (float32 [b, c] each) or None for an empty one.
    block_sizes: channels and warps per program.

  Returns:
    y [b, t, c] in k's dtype, and the float32 state after the last token.
  """
  state = wkv_lib.check_inputs(w, u, k, v, state)
  b, t, c = k.shape
  if t == 0:
    return k, state
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  y, num, den, max_exp = _wkv(f32(w), f32(u), k, v, *state, block_sizes)
  return y, WKVState(num, den, max_exp)


# ----------------------------------------------------------------------------------------------
# custom_vjp: Triton forward, associative-scan backward.


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _wkv(w, u, k, v, num, den, max_exp, block_sizes):
  return _forward_call(w, u, k, v, num, den, max_exp, block_sizes)


def _wkv_fwd(w, u, k, v, num, den, max_exp, block_sizes):
  out = _forward_call(w, u, k, v, num, den, max_exp, block_sizes)
  return out, (w, u, k, v, num, den, max_exp)


def _wkv_bwd(block_sizes, residuals, cotangents):
  del block_sizes

  def associative(w, u, k, v, num, den, max_exp):
    y, out = wkv_lib.wkv_associative(w, u, k, v, WKVState(num, den, max_exp))
    return (y, *out)

  _, vjp = jax.vjp(associative, *residuals)
  return vjp(tuple(cotangents))


_wkv.defvjp(_wkv_fwd, _wkv_bwd)


def _forward_call(w, u, k, v, num, den, max_exp, block_sizes):
  b, t, c = k.shape
  block_c = min(block_sizes.block_c, triton.next_power_of_2(c))
  state_shape = jax.ShapeDtypeStruct((b, c), jnp.float32)
  return jt.triton_call(
      w, u, k, v, num, den, max_exp, t, c,
      kernel=wkv_triton_kernel.wkv_forward_kernel,
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), state_shape, state_shape, state_shape),
      grid=wkv_triton_kernel.grid(b, c, block_c),
      num_warps=block_sizes.num_warps,
      num_stages=1,
      block_c=block_c,
  )


# ----------------------------------------------------------------------------------------------


def wkv_triton_reference(w: Array, u: Array, k: Array, v: Array, state: WKVState | None = None,
                         *, block_sizes: BlockSizes = BlockSizes()) -> tuple[Array, WKVState]:
  """The sequential scan the kernel must match; same signature as `wkv_triton`."""
  del block_sizes
  return wkv_lib.wkv_scan(w, u, k, v, state)


wkv_lib.register("triton", wkv_triton)

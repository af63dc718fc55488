"""Chunked WKV (paper eq. 16, Appendix D) as Pallas kernels, parallel over batch, channels and time.

The algorithm, its three steps (per-chunk summaries, chaining over chunks, per-chunk outputs) and
its custom VJP are in `chunked.py`, shared with the Triton kernels (`wkv_triton.py`); this module
supplies the four kernels as Pallas calls over inputs padded to whole tiles.

The grid is (batch, channel blocks, chunks), so even one long sequence fills the GPU; the cost is
O(block_t) exponentials per token instead of one, which is cheap next to the memory traffic this
op is bound by.

Backend choice: Pallas's Triton lowering, selected explicitly by `pallas.triton.CompilerParams`,
although JAX 0.11 deprecates it in favour of Mosaic GPU, because
  * it runs on the GPUs users train RWKV on, A100 (sm_80) as well as H100/H200 (sm_90); Mosaic
    GPU targets Hopper and later, and its API is documented as unstable from week to week;
  * the same kernel source lowers with jax 0.10 (CI) and 0.11 (the GPU machines), and it can be
    compiled to sm_80 and sm_90a machine code on a machine without a GPU
    (`experiments/gpu_compile.py`, tests/test_kernel_compile.py), which is how CI checks that it
    still lowers;
  * the kernels use only refs, `BlockSpec`s and jnp arithmetic (broadcasts, exp, max/sum
    reductions), which also run anywhere with `interpret=True`: CI checks their numbers on CPU.
A Mosaic GPU port would keep the same three steps (`chunked.py`) and only replace this file.
Hand-written Triton lives in `wkv_triton.py`.

Shapes: b = batch, t = time, c = channels, n = chunks, l = block_t (tokens of one chunk),
cb = block_c.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from rwkv_jax import wkv as wkv_lib
from rwkv_jax.wkv import WKVState
from rwkv_jax_kernels import chunked

Array = jax.Array

# Exponent of masked terms: exp(_MASKED - anything finite) == 0 without inf - inf.
_MASKED = wkv_lib.EMPTY_MAX_EXP


BlockSizes = chunked.BlockSizes


# ----------------------------------------------------------------------------------------------
# Public entry.


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def wkv_pallas(w: Array, u: Array, k: Array, v: Array, state: WKVState | None = None, *,
               block_sizes: BlockSizes = BlockSizes(), interpret: bool | None = None
               ) -> tuple[Array, WKVState]:
  """WKV with the chunked Pallas kernels; the contract of `rwkv_jax.wkv.wkv_scan`.

  Args:
    w, u, k, v, state: as for `rwkv_jax.wkv.wkv_scan` (k, v float32 or bfloat16).
    block_sizes: tile sizes.
    interpret: run the kernels in the Pallas interpreter; None means "only if JAX runs on CPU"
      (on a TPU that is an error: the TPU kernel is `wkv_pallas_tpu`).

  Returns:
    y [b, t, c] in k's dtype, and the float32 state after the last token.
  """
  interpret = chunked.interpret_off_gpu(interpret)
  state = wkv_lib.check_inputs(w, u, k, v, state)
  b, t, c = k.shape
  if t == 0:
    return k, state

  blocks = block_sizes.fit(c)
  block_t, block_c = blocks.block_t, blocks.block_c
  n = pl.cdiv(t, block_t)
  pad_t, pad_c = n * block_t - t, pl.cdiv(c, block_c) * block_c - c
  # Padded channels get a harmless w = 1, u = 0, k = v = 0 and an empty state; padded tokens are
  # masked out of the summaries and their outputs are dropped.
  pad_kv = lambda x: jnp.pad(x, ((0, 0), (0, pad_t), (0, pad_c)))
  pad_vec = lambda x, value: jnp.pad(jnp.asarray(x, jnp.float32), (0, pad_c),
                                     constant_values=value)
  pad_bc = lambda x, value: jnp.pad(x, ((0, 0), (0, pad_c)), constant_values=value)
  kernels = chunked.ChunkKernels(
      summary=functools.partial(_summary_call, seq_len=t, blocks=blocks, interpret=interpret),
      output=functools.partial(_output_call, blocks=blocks, interpret=interpret),
      output_bwd=functools.partial(_output_bwd_call, blocks=blocks, interpret=interpret),
      summary_bwd=functools.partial(_summary_bwd_call, seq_len=t, blocks=blocks,
                                    interpret=interpret))
  y, num, den, max_exp = chunked.chunked_wkv(
      kernels, block_t, t, pad_vec(w, 1.0), pad_vec(u, 0.0), pad_kv(k), pad_kv(v),
      pad_bc(state.num, 0.0), pad_bc(state.den, 0.0),
      pad_bc(state.max_exp, wkv_lib.EMPTY_MAX_EXP))
  return y[:, :t, :c], WKVState(num[:, :c], den[:, :c], max_exp[:, :c])


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers. Grid (b, channel block, chunk); every program owns one [l, cb] tile.


def _specs(blocks: BlockSizes):
  l, cb = blocks.block_t, blocks.block_c
  tile = pl.BlockSpec((None, l, cb), lambda b, c, n: (b, n, c))      # [b, t, c] -> [l, cb]
  chunk = pl.BlockSpec((None, None, cb), lambda b, c, n: (b, n, c))  # [b, n, c] -> [cb]
  channel = pl.BlockSpec((cb,), lambda b, c, n: (c,))                # [c] -> [cb]
  return tile, chunk, channel


def _grid(k, blocks):
  b, t, c = k.shape
  return (b, c // blocks.block_c, t // blocks.block_t)


def _params(blocks):
  return pl_triton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _summary_call(k, v, w, seq_len, blocks, interpret):
  tile, chunk, channel = _specs(blocks)
  b, t, c = k.shape
  per_chunk = jax.ShapeDtypeStruct((b, t // blocks.block_t, c), jnp.float32)
  return pl.pallas_call(
      functools.partial(_summary_kernel, seq_len=seq_len, block_t=blocks.block_t),
      out_shape=(per_chunk,) * 3, grid=_grid(k, blocks), in_specs=[tile, tile, channel],
      out_specs=(chunk,) * 3, interpret=interpret, compiler_params=_params(blocks),
      name="wkv_summary")(k, v, w)


def _output_call(num, den, max_exp, k, v, w, u, blocks, interpret):
  tile, chunk, channel = _specs(blocks)
  return pl.pallas_call(
      functools.partial(_output_kernel, block_t=blocks.block_t),
      out_shape=jax.ShapeDtypeStruct(k.shape, k.dtype), grid=_grid(k, blocks),
      in_specs=[chunk, chunk, chunk, tile, tile, channel, channel], out_specs=tile,
      interpret=interpret, compiler_params=_params(blocks), name="wkv_output",
  )(num, den, max_exp, k, v, w, u)


def _output_bwd_call(num, den, max_exp, k, v, w, u, dy, blocks, interpret):
  tile, chunk, channel = _specs(blocks)
  b, t, c = k.shape
  per_token = jax.ShapeDtypeStruct(k.shape, jnp.float32)
  per_chunk = jax.ShapeDtypeStruct((b, t // blocks.block_t, c), jnp.float32)
  dk, dv, dnum, dden, dmax, dw, du = pl.pallas_call(
      functools.partial(_output_bwd_kernel, block_t=blocks.block_t),
      out_shape=(per_token, per_token) + (per_chunk,) * 5, grid=_grid(k, blocks),
      in_specs=[chunk, chunk, chunk, tile, tile, channel, channel, tile],
      out_specs=(tile, tile) + (chunk,) * 5, interpret=interpret,
      compiler_params=_params(blocks), name="wkv_output_bwd",
  )(num, den, max_exp, k, v, w, u, dy)
  return dk, dv, (dnum, dden, dmax), dw, du


def _summary_bwd_call(k, v, w, dnum, dden, dmax, dk_in, dv_in, seq_len, blocks, interpret):
  tile, chunk, channel = _specs(blocks)
  b, t, c = k.shape
  per_chunk = jax.ShapeDtypeStruct((b, t // blocks.block_t, c), jnp.float32)
  per_token = jax.ShapeDtypeStruct(k.shape, k.dtype)
  return pl.pallas_call(
      functools.partial(_summary_bwd_kernel, seq_len=seq_len, block_t=blocks.block_t),
      out_shape=(per_token, per_token, per_chunk), grid=_grid(k, blocks),
      in_specs=[tile, tile, channel, chunk, chunk, chunk, tile, tile],
      out_specs=(tile, tile, chunk), interpret=interpret, compiler_params=_params(blocks),
      name="wkv_summary_bwd",
  )(k, v, w, dnum, dden, dmax, dk_in, dv_in)


# ----------------------------------------------------------------------------------------------
# Kernel bodies. Inside a chunk: s = token index in [0, l), i = an earlier token of the chunk.


def _iota(shape, dim):
  return jax.lax.broadcasted_iota(jnp.int32, shape, dim).astype(jnp.float32)


def _summary_terms(k, w, chunk_len, block_t):
  """Exponents k_i - (len - 1 - i) w of each token in the chunk's end state, masked past len."""
  i = _iota((block_t, 1), 0)
  dist = chunk_len - 1.0 - i                              # [l, 1] decay steps to the chunk's end
  valid = i < chunk_len
  e = jnp.where(valid, k - dist * w[None, :], _MASKED)    # [l, cb]
  max_exp = jnp.max(e, axis=0)                            # [cb]
  weight = jnp.exp(e - max_exp[None, :])                  # [l, cb], 0 where masked
  return e, valid, dist, max_exp, weight


def _chunk_len(seq_len, block_t):
  start = pl.program_id(2) * block_t
  return jnp.minimum(block_t, seq_len - start).astype(jnp.float32)


def _summary_kernel(k_ref, v_ref, w_ref, num_ref, den_ref, max_ref, *, seq_len, block_t):
  k = k_ref[...].astype(jnp.float32)
  v = v_ref[...].astype(jnp.float32)
  _, _, _, max_exp, weight = _summary_terms(k, w_ref[...], _chunk_len(seq_len, block_t), block_t)
  num_ref[...] = jnp.sum(weight * v, axis=0)
  den_ref[...] = jnp.sum(weight, axis=0)
  max_ref[...] = max_exp


def _summary_bwd_kernel(k_ref, v_ref, w_ref, dnum_ref, dden_ref, dmax_ref, dk_in_ref, dv_in_ref,
                        dk_ref, dv_ref, dw_ref, *, seq_len, block_t):
  k = k_ref[...].astype(jnp.float32)
  v = v_ref[...].astype(jnp.float32)
  dnum, dden = dnum_ref[...][None, :], dden_ref[...][None, :]
  e, valid, dist, max_exp, weight = _summary_terms(
      k, w_ref[...], _chunk_len(seq_len, block_t), block_t)
  de = weight * (dnum * v + dden)                          # through weight = exp(e - max_exp)
  # max_exp is both an output and the shift inside weight; it depends on the argmax exponent.
  dmax = dmax_ref[...] - jnp.sum(de, axis=0)
  is_max = jnp.where(valid & (e == max_exp[None, :]), 1.0, 0.0)
  de = de + is_max * (dmax / jnp.sum(is_max, axis=0))[None, :]
  dk_ref[...] = (dk_in_ref[...] + de).astype(dk_ref.dtype)
  dv_ref[...] = (dv_in_ref[...] + weight * dnum).astype(dv_ref.dtype)
  dw_ref[...] = -jnp.sum(de * dist, axis=0)


def _output_terms(num0, den0, max0, k, v, w, u, block_t):
  """Eq. 16 inside one chunk, each row shifted by its largest exponent.

  Returns the weights of the incoming state [l, cb], of earlier tokens [l, l, cb] and of the
  current token [l, cb], the step counts they were decayed by, and numerator and denominator.
  """
  s = _iota((block_t, 1), 0)                                 # [l, 1]
  lag = _iota((block_t, block_t, 1), 0) - 1.0 - _iota((block_t, block_t, 1), 1)  # s - 1 - i
  e_state = max0[None, :] - s * w[None, :]                   # [l, cb]
  e_pair = jnp.where(lag >= 0.0, k[None, :, :] - lag * w[None, None, :], _MASKED)  # [l, l, cb]
  e_bonus = u[None, :] + k                                   # [l, cb]
  shift = jnp.maximum(jnp.maximum(e_state, e_bonus), jnp.max(e_pair, axis=1))
  w_state = jnp.exp(e_state - shift)
  w_pair = jnp.exp(e_pair - shift[:, None, :])
  w_bonus = jnp.exp(e_bonus - shift)
  num = w_state * num0[None, :] + jnp.sum(w_pair * v[None, :, :], axis=1) + w_bonus * v
  den = w_state * den0[None, :] + jnp.sum(w_pair, axis=1) + w_bonus
  return s, lag, w_state, w_pair, w_bonus, num, den


def _output_kernel(num_ref, den_ref, max_ref, k_ref, v_ref, w_ref, u_ref, y_ref, *, block_t):
  *_, num, den = _output_terms(
      num_ref[...], den_ref[...], max_ref[...], k_ref[...].astype(jnp.float32),
      v_ref[...].astype(jnp.float32), w_ref[...], u_ref[...], block_t)
  y_ref[...] = (num / den).astype(y_ref.dtype)


def _output_bwd_kernel(num_ref, den_ref, max_ref, k_ref, v_ref, w_ref, u_ref, dy_ref,
                       dk_ref, dv_ref, dnum_ref, dden_ref, dmax_ref, dw_ref, du_ref, *, block_t):
  num0, den0 = num_ref[...], den_ref[...]
  k = k_ref[...].astype(jnp.float32)
  v = v_ref[...].astype(jnp.float32)
  s, lag, w_state, w_pair, w_bonus, num, den = _output_terms(
      num0, den0, max_ref[...], k, v, w_ref[...], u_ref[...], block_t)
  # y = num / den and the shift cancels, so each term with weight W, exponent e and coefficients
  # (c_num, c_den) gets dL/dW = g (c_num - y c_den) with g = dy / den, and dL/de = W dL/dW.
  y = num / den
  g = dy_ref[...].astype(jnp.float32) / den                  # [l, cb]
  g_pair = w_pair * g[:, None, :]                            # [l, l, cb]: dL/d(v_i) per row
  de_pair = g_pair * (v[None, :, :] - y[:, None, :])
  g_bonus = w_bonus * g
  de_bonus = g_bonus * (v - y)
  g_state = w_state * g
  de_state = g_state * (num0[None, :] - y * den0[None, :])
  dk_ref[...] = jnp.sum(de_pair, axis=0) + de_bonus
  dv_ref[...] = jnp.sum(g_pair, axis=0) + g_bonus
  dnum_ref[...] = jnp.sum(g_state, axis=0)
  dden_ref[...] = -jnp.sum(g_state * y, axis=0)
  dmax_ref[...] = jnp.sum(de_state, axis=0)
  dw_ref[...] = -(jnp.sum(jnp.sum(de_pair * lag, axis=1), axis=0) + jnp.sum(de_state * s, axis=0))
  du_ref[...] = jnp.sum(de_bonus, axis=0)


# ----------------------------------------------------------------------------------------------


def wkv_pallas_reference(w: Array, u: Array, k: Array, v: Array, state: WKVState | None = None,
                         *, block_sizes: BlockSizes = BlockSizes(), interpret: bool | None = None
                         ) -> tuple[Array, WKVState]:
  """The sequential scan the kernels must match; same signature as `wkv_pallas`."""
  del block_sizes, interpret
  return wkv_lib.wkv_scan(w, u, k, v, state)


# Explicit per platform, so that tracing on any machine never picks the interpreter by accident:
# compiled on GPUs, interpreted on CPU; TPUs get the Mosaic kernel (wkv_pallas_tpu.py).
wkv_lib.register("pallas_chunked", functools.partial(wkv_pallas, interpret=False),
                 ("cuda", "rocm"))
wkv_lib.register("pallas_chunked", functools.partial(wkv_pallas, interpret=True), ("cpu",))

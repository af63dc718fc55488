"""Chunked WKV as hand-written Triton kernels launched through jax-triton.

The same algorithm as the Pallas kernels (`chunked.py`: per-chunk summaries, chaining over chunks,
per-chunk outputs, and the two backward kernels), written in the Triton language
(`wkv_triton_kernel.py`) and launched with `jax_triton.triton_call`. Parallel over batch, channel
blocks and chunks of time, so one long sequence fills the GPU too; any t and any c, because tiles
past the end are masked inside the kernels rather than padded.

`interpret=True` runs the same kernels in Triton's interpreter instead (`triton_launch.py`): slow,
but it checks everything this module does (launch arguments, grids, masks, the custom VJP) on a
machine without a GPU. None (the default) interprets unless JAX runs on a GPU.

Needs `triton`; a GPU launch also needs `jax_triton` (imported only then: it fails to import on a
CPU-only jax) and the interpreter needs `torch`. The dispatcher imports this module only when
impl="triton" is asked for and treats an ImportError as "backend unavailable".

Shapes: b = batch, t = time, c = channels, n = chunks.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import triton

from rwkv_jax import wkv as wkv_lib
from rwkv_jax.wkv import WKVState
from rwkv_jax_kernels import chunked
from rwkv_jax_kernels import triton_launch
from rwkv_jax_kernels import wkv_triton_kernel as kernels_lib

Array = jax.Array


BlockSizes = chunked.BlockSizes


# ----------------------------------------------------------------------------------------------
# Public entry.


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def wkv_triton(w: Array, u: Array, k: Array, v: Array, state: WKVState | None = None, *,
               block_sizes: BlockSizes = BlockSizes(), interpret: bool | None = None
               ) -> tuple[Array, WKVState]:
  """WKV with the chunked Triton kernels; the contract of `rwkv_jax.wkv.wkv_scan`.

  Args:
    w, u, k, v, state: as for `rwkv_jax.wkv.wkv_scan` (k, v float32 or bfloat16).
    block_sizes: tile sizes and warps per program.
    interpret: run the kernels in Triton's interpreter; None means "unless on a GPU".

  Returns:
    y [b, t, c] in k's dtype, and the float32 state after the last token.
  """
  interpret = chunked.interpret_off_gpu(interpret)
  state = wkv_lib.check_inputs(w, u, k, v, state)
  t, c = k.shape[1:]
  if t == 0:
    return k, state
  blocks = block_sizes.fit(c)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  on = dict(blocks=blocks, interpret=interpret)
  kernels = chunked.ChunkKernels(
      summary=functools.partial(_summary, **on), output=functools.partial(_output, **on),
      output_bwd=functools.partial(_output_bwd, **on),
      summary_bwd=functools.partial(_summary_bwd, **on))
  y, num, den, max_exp = chunked.chunked_wkv(kernels, blocks.block_t, t, f32(w), f32(u), k, v,
                                             *state)
  return y, WKVState(num, den, max_exp)


# ----------------------------------------------------------------------------------------------
# The four kernels of chunked.ChunkKernels.


def _per_chunk(k, blocks, count):
  b, t, c = k.shape
  return (jax.ShapeDtypeStruct((b, triton.cdiv(t, blocks.block_t), c), jnp.float32),) * count


def _summary(k, v, w, *, blocks, interpret):
  t, c = k.shape[1:]
  return _launch(kernels_lib.wkv_summary_kernel, k, v, w, t, c, seq=k,
                 out_shape=_per_chunk(k, blocks, 3), blocks=blocks, interpret=interpret)


def _output(num, den, max_exp, k, v, w, u, *, blocks, interpret):
  t, c = k.shape[1:]
  (y,) = _launch(kernels_lib.wkv_output_kernel, num, den, max_exp, k, v, w, u, t, c, seq=k,
                 out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype),), blocks=blocks,
                 interpret=interpret)
  return y


def _output_bwd(num, den, max_exp, k, v, w, u, dy, *, blocks, interpret):
  t, c = k.shape[1:]
  per_token = jax.ShapeDtypeStruct(k.shape, jnp.float32)
  dk, dv, dnum, dden, dmax, dw, du = _launch(
      kernels_lib.wkv_output_bwd_kernel, num, den, max_exp, k, v, w, u, dy, t, c, seq=k,
      out_shape=(per_token, per_token) + _per_chunk(k, blocks, 5), blocks=blocks,
      interpret=interpret)
  return dk, dv, (dnum, dden, dmax), dw, du


def _summary_bwd(k, v, w, dnum, dden, dmax, dk_in, dv_in, *, blocks, interpret):
  t, c = k.shape[1:]
  per_token = jax.ShapeDtypeStruct(k.shape, k.dtype)
  return _launch(kernels_lib.wkv_summary_bwd_kernel, k, v, w, dnum, dden, dmax, dk_in, dv_in, t,
                 c, seq=k, out_shape=(per_token, per_token) + _per_chunk(k, blocks, 1),
                 blocks=blocks, interpret=interpret)


# ----------------------------------------------------------------------------------------------
# Launching: jax-triton on a GPU, Triton's interpreter elsewhere.


def _launch(kernel, *args, seq: Array, out_shape: Sequence[jax.ShapeDtypeStruct],
            blocks: BlockSizes, interpret: bool) -> tuple[Array, ...]:
  """Runs `kernel(*args, *outputs)` over the grid of `seq`'s [b, t, c] tiles."""
  b, t, c = seq.shape
  return triton_launch.launch(
      kernel, *args, out_shape=out_shape, grid=kernels_lib.grid(b, t, c, blocks.block_t,
                                                                blocks.block_c),
      constexprs=dict(block_t=blocks.block_t, block_c=blocks.block_c),
      num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=interpret)


# ----------------------------------------------------------------------------------------------


def wkv_triton_reference(w: Array, u: Array, k: Array, v: Array, state: WKVState | None = None,
                         *, block_sizes: BlockSizes = BlockSizes(), interpret: bool | None = None
                         ) -> tuple[Array, WKVState]:
  """The sequential scan the kernels must match; same signature as `wkv_triton`."""
  del block_sizes, interpret
  return wkv_lib.wkv_scan(w, u, k, v, state)


wkv_lib.register("triton_chunked", wkv_triton)

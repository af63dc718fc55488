"""Sequential-in-kernel WKV as Triton-language kernels launched through jax-triton.

The design shared with the Pallas kernels (`sequential.py`: the state carried in registers through
a loop over time, checkpoints every `block_t` tokens, a backward that recomputes each block from
its checkpoint and sweeps it in reverse, time segments when batch x channel blocks leaves the GPU
idle), written in the Triton language (`wkv_triton_seq_kernel.py`). Any t and any c: tokens and
channels past the end are masked inside the kernels, nothing is padded.

Launches, per direction: one kernel with one segment; with several, a summary kernel and the main
kernel, which folds the summaries of the other segments in a loop before running its own.

`interpret=True` runs the kernels in Triton's interpreter (`triton_launch.py`); None (the default)
interprets unless JAX runs on a GPU. Needs `triton`; a GPU launch also needs `jax_triton`, the
interpreter `torch`. The dispatcher imports this module for impl="triton".

Shapes: b = batch, t = time, c = channels, n = checkpoint blocks, s = segments.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import triton

from rwkv_jax import wkv as wkv_lib
from rwkv_jax.wkv import WKVState
from rwkv_jax_kernels import chunked
from rwkv_jax_kernels import sequential
from rwkv_jax_kernels import triton_launch
from rwkv_jax_kernels import wkv_triton_seq_kernel as kernels_lib

Array = jax.Array

BlockSizes = sequential.BlockSizes


# ----------------------------------------------------------------------------------------------
# Public entry.


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def wkv_triton_seq(w: Array, u: Array, k: Array, v: Array, state: WKVState | None = None, *,
                   block_sizes: BlockSizes = BlockSizes(), interpret: bool | None = None
                   ) -> tuple[Array, WKVState]:
  """WKV with the sequential Triton kernels; the contract of `rwkv_jax.wkv.wkv_scan`.

  Args:
    w, u, k, v, state: as for `rwkv_jax.wkv.wkv_scan` (k, v float32 or bfloat16).
    block_sizes: checkpoint interval, channels per program, warps, time segments (None: the rule
      `sequential.num_segments` for this GPU).
    interpret: run the kernels in Triton's interpreter; None means "unless on a GPU".

  Returns:
    y [b, t, c] in k's dtype, and the float32 state after the last token.
  """
  interpret = chunked.interpret_off_gpu(interpret)
  state = wkv_lib.check_inputs(w, u, k, v, state)
  b, t, c = k.shape
  if t == 0:
    return k, state
  blocks = block_sizes.fit(c)
  segments = blocks.num_segments
  if segments is None:
    device = None if interpret else jax.devices()[0].device_kind
    segments = sequential.num_segments(b, t, c, blocks.block_c, device)
  seg_len = sequential.segment_length(t, segments, blocks.block_t)
  on = dict(blocks=blocks, seg_blocks=seg_len // blocks.block_t,
            segments=triton.cdiv(t, seg_len), interpret=interpret)
  kernels = sequential.SeqKernels(forward=functools.partial(_forward, **on),
                                  backward=functools.partial(_backward, **on))
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  y, num, den, max_exp = sequential.sequential_wkv(kernels, f32(w), f32(u), k, v, *state)
  return y, WKVState(num, den, max_exp)


# ----------------------------------------------------------------------------------------------
# The two directions of sequential.SeqKernels.


def _forward(w, u, k, v, num0, den0, max0, *, blocks, seg_blocks, segments, interpret):
  b, t, c = k.shape
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  scalars = (t, c, seg_blocks, segments)
  launch = functools.partial(_launch, batch=b, channels=c, blocks=blocks,
                             interpret=interpret)
  if segments > 1:
    summaries = launch(kernels_lib.wkv_seq_summary_kernel, w, k, v, *scalars,
                       out_shape=(f32(b, segments, c),) * 3, segments=segments - 1)
  else:  # Not read: nothing comes before the only segment.
    summaries = (num0, den0, max0)
  ckpt = f32(b, triton.cdiv(t, blocks.block_t), c)
  y, ckpt_n, ckpt_d, ckpt_m, num, den, max_exp = launch(
      kernels_lib.wkv_seq_forward_kernel, w, u, k, v, num0, den0, max0, *summaries, *scalars,
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), ckpt, ckpt, ckpt) + (f32(b, c),) * 3,
      segments=segments)
  return y, (num, den, max_exp), (ckpt_n, ckpt_d, ckpt_m)


def _backward(w, u, k, v, num0, den0, max0, checkpoints, final, dy, dnum, dden, dmax, *, blocks,
              seg_blocks, segments, interpret):
  b, t, c = k.shape
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  scalars = (t, c, seg_blocks, segments)
  launch = functools.partial(_launch, batch=b, channels=c, blocks=blocks,
                             interpret=interpret)
  if segments > 1:
    summaries = launch(kernels_lib.wkv_seq_backward_summary_kernel, w, u, k, v, dy,
                       *checkpoints, *scalars, out_shape=(f32(b, segments, c),) * 4,
                       segments=segments - 1)
  else:  # Not read: nothing comes after the only segment.
    summaries = (num0, den0, max0, num0)
  per_token = jax.ShapeDtypeStruct(k.shape, k.dtype)
  dk, dv, dw, du, dnum0, dden0, dmax0 = launch(
      kernels_lib.wkv_seq_backward_kernel, w, u, k, v, dy, *checkpoints, num0, den0, max0,
      *final, dnum, dden, dmax, *summaries, *scalars,
      out_shape=(per_token, per_token, f32(b, segments, c), f32(b, segments, c)) + (f32(b, c),) * 3,
      segments=segments)
  return dw.sum((0, 1)), du.sum((0, 1)), dk, dv, dnum0, dden0, dmax0


def _launch(kernel, *args, out_shape, segments: int, batch: int, channels: int,
            blocks: BlockSizes, interpret: bool) -> tuple[Array, ...]:
  """Runs `kernel` over (batch, channel blocks, `segments`)."""
  return triton_launch.launch(
      kernel, *args, out_shape=out_shape,
      grid=kernels_lib.grid(batch, channels, segments, blocks.block_c),
      constexprs=dict(block_t=blocks.block_t, block_c=blocks.block_c),
      num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=interpret)


# ----------------------------------------------------------------------------------------------


def wkv_triton_seq_reference(w: Array, u: Array, k: Array, v: Array,
                             state: WKVState | None = None, *,
                             block_sizes: BlockSizes = BlockSizes(),
                             interpret: bool | None = None) -> tuple[Array, WKVState]:
  """The sequential scan the kernels must match; same signature as `wkv_triton_seq`."""
  del block_sizes, interpret
  return wkv_lib.wkv_scan(w, u, k, v, state)


wkv_lib.register("triton", wkv_triton_seq)

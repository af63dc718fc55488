"""Sequential-in-kernel WKV (paper eq. 16, Appendix D) as Pallas kernels for GPUs (Triton lowering).

The algorithm, the per-token arithmetic and the custom VJP are in `sequential.py`; this module
supplies its two directions as Pallas calls. Grid (batch, channel block, time segment): each
program walks its tokens in a `lax.fori_loop` over blocks of block_t tokens, the state (or the
reverse carry) in registers. A block is unrolled: its rows of k, v (and dy) are loaded, one row of
block_c channels per token, before the dependent steps use them, so their latency is paid once
per block; the forward loads block i + 1 while block i runs. Tokens past t are never visited (the
partial last block is unrolled to its own length) and channels past c are masked in the loads and
stores, so nothing is padded or sliced outside the kernels.

  forward, 1 segment:    `wkv_seq_forward` writes y, a checkpoint every block_t tokens and the
                         final state (reads k, v; writes y: 3 passes over the array).
  forward, n segments:   `wkv_seq_summary` gives each segment's own final state; then
                         `wkv_seq_forward` folds those of the earlier segments into the incoming
                         state in a loop before running its segment.
  backward, 1 segment:   `wkv_seq_backward` walks the blocks from last to first, recomputes each
                         block's states from its checkpoint (kept in registers: the block is
                         unrolled), then sweeps it in reverse (reads k, v, dy; writes dk, dv in
                         k's dtype: 5 passes), with dw, du as per-program partial sums.
  backward, n segments:  `wkv_seq_reverse_summary` gives each segment's reverse carry from zero
                         (and whether the max path crosses it); `wkv_seq_backward` folds those of
                         the later segments before its sweep.

Shapes: b = batch, t = time, c = channels, cb = block_c.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from rwkv_jax import wkv as wkv_lib
from rwkv_jax.wkv import WKVState
from rwkv_jax_kernels import chunked
from rwkv_jax_kernels import sequential

Array = jax.Array

_EMPTY = wkv_lib.EMPTY_MAX_EXP

BlockSizes = sequential.BlockSizes
# A block is unrolled with its recomputed states in registers: at block_t 16 the backward reaches
# the 255-register limit, at 8 it needs about 140 (experiments/gpu_compile.py).
DEFAULT_BLOCK_SIZES = BlockSizes(block_t=8)


# ----------------------------------------------------------------------------------------------
# Public entry.


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def wkv_pallas_seq(w: Array, u: Array, k: Array, v: Array, state: WKVState | None = None, *,
                   block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES, interpret: bool | None = None
                   ) -> tuple[Array, WKVState]:
  """WKV with the sequential Pallas kernels; the contract of `rwkv_jax.wkv.wkv_scan`.

  Args:
    w, u, k, v, state: as for `rwkv_jax.wkv.wkv_scan` (k, v float32 or bfloat16).
    block_sizes: tiles, warps and (optionally) the number of time segments.
    interpret: run the kernels in the Pallas interpreter; None means "only if JAX runs on CPU"
      (on a TPU that is an error).

  Returns:
    y [b, t, c] in k's dtype, and the float32 state after the last token.
  """
  interpret = chunked.interpret_off_gpu(interpret)
  state = wkv_lib.check_inputs(w, u, k, v, state)
  b, t, c = k.shape
  if t == 0:
    return k, state
  blocks = block_sizes.fit(c)
  segments = blocks.num_segments or sequential.num_segments(b, t, c, blocks.block_c,
                                                            _device_kind())
  seg_len = sequential.segment_length(t, segments, blocks.block_t)
  plan = _Plan(t=t, c=c, seg_len=seg_len, segments=pl.cdiv(t, seg_len), blocks=blocks,
               interpret=interpret)
  kernels = sequential.SeqKernels(forward=functools.partial(_forward, plan),
                                  backward=functools.partial(_backward, plan))
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  y, num, den, max_exp = sequential.sequential_wkv(kernels, f32(w), f32(u), k, v, *state)
  return y, WKVState(num, den, max_exp)


def _device_kind() -> str | None:
  """The GPU that will run the kernel, for the segment rule; None when tracing elsewhere."""
  if jax.default_backend() != "gpu":
    return None
  return jax.devices()[0].device_kind


class _Plan:
  """Static sizes of one call: tokens, channels, segments and tiles."""

  def __init__(self, *, t, c, seg_len, segments, blocks, interpret):
    self.t, self.c, self.seg_len, self.segments = t, c, seg_len, segments
    self.block_t, self.block_c = blocks.block_t, blocks.block_c
    self.num_blocks = pl.cdiv(t, blocks.block_t)
    self.blocks, self.interpret = blocks, interpret

  def grid(self, b):
    return (b, pl.cdiv(self.c, self.block_c), self.segments)

  def call(self, kernel, name, out_shape, in_specs, out_specs):
    return pl.pallas_call(
        functools.partial(kernel, plan=self), out_shape=out_shape, in_specs=in_specs,
        out_specs=out_specs, grid=self.grid(out_shape[0].shape[0]), interpret=self.interpret,
        compiler_params=plgpu.CompilerParams(num_warps=self.blocks.num_warps,
                                             num_stages=self.blocks.num_stages),
        name=name)


# ----------------------------------------------------------------------------------------------
# The two directions (`sequential.SeqKernels`) and their pallas_calls. Grid (b, channel block,
# segment); every BlockSpec keeps whole time axes, which the kernels index row by row.


def _specs(plan: _Plan, t_rows: int):
  """Blocks of [b, rows, c] arrays: all rows of one channel block."""
  return pl.BlockSpec((None, t_rows, plan.block_c), lambda b, c, s: (b, 0, c))


def _chan(plan):
  return pl.BlockSpec((plan.block_c,), lambda b, c, s: (c,))


def _state(plan):
  return pl.BlockSpec((None, plan.block_c), lambda b, c, s: (b, c))


def _own_segment(plan):
  """[b, segments, c]: the program's own segment's row."""
  return pl.BlockSpec((None, None, plan.block_c), lambda b, c, s: (b, s, c))


def _forward(plan: _Plan, w, u, k, v, num0, den0, max0):
  b = k.shape[0]
  seq, chan, state = _specs(plan, plan.t), _chan(plan), _state(plan)
  per_seg = jax.ShapeDtypeStruct((b, plan.segments, plan.c), jnp.float32)
  per_bc = jax.ShapeDtypeStruct((b, plan.c), jnp.float32)
  fold_in, fold_specs = (), []
  if plan.segments > 1:
    fold_in = plan.call(_summary_kernel, "wkv_seq_summary", (per_seg,) * 3,
                        [chan, seq, seq], (_own_segment(plan),) * 3)(w, k, v)
    fold_specs = [_specs(plan, plan.segments)] * 3
  per_block = jax.ShapeDtypeStruct((b, plan.num_blocks, plan.c), jnp.float32)
  y, *rest = plan.call(
      _forward_kernel, "wkv_seq_forward",
      (jax.ShapeDtypeStruct(k.shape, k.dtype),) + (per_block,) * 3 + (per_bc,) * 3,
      [chan, chan, seq, seq, state, state, state, *fold_specs],
      (seq,) + (_specs(plan, plan.num_blocks),) * 3 + (state,) * 3,
  )(w, u, k, v, num0, den0, max0, *fold_in)
  checkpoints, final = tuple(rest[:3]), tuple(rest[3:])
  return y, final, checkpoints


def _backward(plan: _Plan, w, u, k, v, num0, den0, max0, checkpoints, final, dy, dnum, dden,
              dmax):
  del num0, den0, max0  # The first checkpoint is the incoming state.
  b = k.shape[0]
  seq, chan, state = _specs(plan, plan.t), _chan(plan), _state(plan)
  ckpt = _specs(plan, plan.num_blocks)
  per_seg = jax.ShapeDtypeStruct((b, plan.segments, plan.c), jnp.float32)
  per_bc = jax.ShapeDtypeStruct((b, plan.c), jnp.float32)
  common = (w, u, k, v, dy, *checkpoints)
  common_specs = [chan, chan, seq, seq, seq, ckpt, ckpt, ckpt]
  fold_in, fold_specs = (), []
  if plan.segments > 1:
    fold_in = plan.call(_reverse_summary_kernel, "wkv_seq_reverse_summary", (per_seg,) * 4,
                        common_specs, (_own_segment(plan),) * 4)(*common)
    fold_specs = [_specs(plan, plan.segments)] * 4
  per_token = jax.ShapeDtypeStruct(k.shape, k.dtype)
  dk, dv, dw, du, dnum0, dden0, dmax0 = plan.call(
      _backward_kernel, "wkv_seq_backward", (per_token,) * 2 + (per_seg,) * 2 + (per_bc,) * 3,
      common_specs + [state] * 6 + fold_specs,
      (seq, seq) + (_own_segment(plan),) * 2 + (state,) * 3,
  )(*common, *final, dnum, dden, dmax, *fold_in)
  return dw.sum((0, 1)), du.sum((0, 1)), dk, dv, dnum0, dden0, dmax0


# ----------------------------------------------------------------------------------------------
# Kernel bodies. Values are [cb] rows; `tok` is a token index in [0, t), `i` a checkpoint block.


def _mask(plan):
  """Channels of this program that exist (the last channel block may be partial)."""
  col = pl.program_id(1) * plan.block_c + jax.lax.broadcasted_iota(jnp.int32, (plan.block_c,), 0)
  return col < plan.c


def _io(plan):
  """(load, store) of one [cb] row, masked to the existing channels; loads return float32."""
  mask = _mask(plan)

  def load(ref):
    return plgpu.load(ref, mask=mask, other=0).astype(jnp.float32)

  def store(ref, x):
    plgpu.store(ref, x.astype(ref.dtype), mask=mask)

  return load, store


def _segment_blocks(plan):
  """This program's whole checkpoint blocks [lo, hi); the partial block at the end of the sequence
  (if t is not a multiple of block_t) belongs to the last segment and is run apart."""
  per_segment = plan.seg_len // plan.block_t
  lo = pl.program_id(2) * per_segment
  return lo, jnp.minimum(lo + per_segment, plan.t // plan.block_t)


def _is_last_segment():
  return pl.program_id(2) == pl.num_programs(2) - 1


def _segment_len(plan, s):
  """Tokens of segment s, float32 (decay exponents are multiples of it)."""
  return jnp.minimum(plan.seg_len, plan.t - s * plan.seg_len).astype(jnp.float32)


def _rows(load, refs, i, plan, length):
  """Rows i * block_t + [0, length) of each ref, all loads issued before any use."""
  return tuple([load(ref.at[i * plan.block_t + j]) for j in range(length)] for ref in refs)


def _summary_kernel(w_ref, k_ref, v_ref, num_ref, den_ref, max_ref, *, plan):
  """The state the program's segment alone leaves behind (from the empty state). The last
  segment's is never folded, so its partial block is skipped."""
  load, store = _io(plan)
  w = load(w_ref)

  def block(i, carry):
    for k, v in zip(*_rows(load, (k_ref, v_ref), i, plan, plan.block_t)):
      carry = sequential.update(*carry, w, k, v)
    return carry

  zeros = jnp.zeros((plan.block_c,), jnp.float32)
  final = jax.lax.fori_loop(*_segment_blocks(plan), block,
                            (zeros, zeros, jnp.full_like(zeros, _EMPTY)))
  for ref, x in zip((num_ref, den_ref, max_ref), final):
    store(ref, x)


def _forward_kernel(w_ref, u_ref, k_ref, v_ref, num0_ref, den0_ref, max0_ref, *refs, plan):
  """y, checkpoints and (last segment) the final state; with segments, the earlier ones' summaries
  are first folded into the incoming state.

  The rows of block i + 1 are loaded while block i runs (carried by the loop), so the loads'
  latency overlaps block_t dependent steps.
  """
  if plan.segments > 1:
    summary_refs, refs = refs[:3], refs[3:]
  y_ref, *refs = refs
  ckpt_refs, final_refs = refs[:3], refs[3:]
  load, store = _io(plan)
  w, u = load(w_ref), load(u_ref)
  carry = tuple(load(ref) for ref in (num0_ref, den0_ref, max0_ref))
  if plan.segments > 1:

    def fold(s, carry):
      num, den, max_exp = carry
      return sequential.merge(num, den, max_exp - _segment_len(plan, s) * w,
                              *(load(ref.at[s]) for ref in summary_refs))

    carry = jax.lax.fori_loop(0, pl.program_id(2), fold, carry)

  def run(i, carry, rows):
    for ref, x in zip(ckpt_refs, carry):
      store(ref.at[i], x)
    for j, (k, v) in enumerate(zip(*rows)):
      y, carry = sequential.forward_step(*carry, w, u, k, v)
      store(y_ref.at[i * plan.block_t + j], y)
    return carry

  lo, hi = _segment_blocks(plan)

  def block(i, carry):
    carry, rows = carry
    # The next block's rows (the last block re-reads itself: the loads stay in bounds).
    following = _rows(load, (k_ref, v_ref), jnp.minimum(i + 1, hi - 1), plan, plan.block_t)
    return run(i, carry, rows), following

  if plan.t >= plan.block_t:
    first = _rows(load, (k_ref, v_ref), jnp.minimum(lo, hi - 1), plan, plan.block_t)
    carry, _ = jax.lax.fori_loop(lo, hi, block, (carry, first))

  @pl.when(_is_last_segment())
  def _():
    final, i, tail = carry, plan.t // plan.block_t, plan.t % plan.block_t
    if tail:
      i = jnp.int32(i)
      final = run(i, final, _rows(load, (k_ref, v_ref), i, plan, tail))
    for ref, x in zip(final_refs, final):
      store(ref, x)


def _sweep(plan, refs, carry, write):
  """The reverse sweep over the program's segment, block by block from its last.

  Each block's states are recomputed from its checkpoint and kept in registers (the block is
  unrolled), then the block is swept in reverse.
  refs: (w, u, k, v, dy, ckpt num/den/max, dk, dv) refs; carry: (a, b, r, gm) after the segment.
  Returns the carry before the segment and its sums of dw and du terms; writes dk, dv if `write`.
  """
  w_ref, u_ref, k_ref, v_ref, dy_ref, *refs = refs
  ckpt_refs, (dk_ref, dv_ref) = refs[:3], refs[3:]
  load, store = _io(plan)
  w, u = load(w_ref), load(u_ref)

  def run(i, carry, length):
    ks, vs, gs = _rows(load, (k_ref, v_ref, dy_ref), i, plan, length)
    states = [tuple(load(ref.at[i]) for ref in ckpt_refs)]
    for k, v in zip(ks[:-1], vs[:-1]):
      states.append(sequential.update(*states[-1], w, k, v))
    *reverse, dw, du = carry
    for j in reversed(range(length)):
      dk, dv, du_t, dw_t, reverse = sequential.reverse_step(*states[j], w, u, ks[j], vs[j],
                                                            gs[j], *reverse)
      if write:
        store(dk_ref.at[i * plan.block_t + j], dk)
        store(dv_ref.at[i * plan.block_t + j], dv)
      dw, du = dw + dw_t, du + du_t
    return (*reverse, dw, du)

  zeros = jnp.zeros((plan.block_c,), jnp.float32)
  carry = (*carry, zeros, zeros)
  if plan.t % plan.block_t:
    tail = lambda carry: run(jnp.int32(plan.t // plan.block_t), carry, plan.t % plan.block_t)
    if plan.segments == 1:
      carry = tail(carry)
    else:
      carry = jax.lax.cond(_is_last_segment(), tail, lambda carry: carry, carry)
  lo, hi = _segment_blocks(plan)
  *carry, dw, du = jax.lax.fori_loop(
      0, hi - lo, lambda n, carry: run(hi - 1 - n, carry, plan.block_t), carry)
  return tuple(carry), dw, du


def _reverse_summary_kernel(w_ref, u_ref, k_ref, v_ref, dy_ref, cn_ref, cd_ref, cm_ref,
                            a_ref, b_ref, r_ref, pass_ref, *, plan):
  """The reverse carry the program's segment alone gives at its start (from zero after it), and
  1 where the max path crosses the whole segment, else 0."""
  zeros = jnp.zeros((plan.block_c,), jnp.float32)
  carry = (zeros, zeros, jnp.full_like(zeros, _EMPTY), jnp.ones_like(zeros))
  carry, _, _ = _sweep(plan, (w_ref, u_ref, k_ref, v_ref, dy_ref, cn_ref, cd_ref, cm_ref,
                              None, None), carry, write=False)
  _, store = _io(plan)
  for ref, x in zip((a_ref, b_ref, r_ref, pass_ref), carry):
    store(ref, x)


def _backward_kernel(w_ref, u_ref, k_ref, v_ref, dy_ref, cn_ref, cd_ref, cm_ref,
                     num_t_ref, den_t_ref, max_t_ref, dnum_t_ref, dden_t_ref, dmax_t_ref, *refs,
                     plan):
  """dk, dv of the program's segment, its dw, du sums, and (first segment) the incoming state's
  cotangents; with segments, the later ones' reverse summaries are first folded into the carry."""
  if plan.segments > 1:
    summary_refs, refs = refs[:4], refs[4:]
  dk_ref, dv_ref, dw_ref, du_ref, dnum0_ref, dden0_ref, dmax0_ref = refs
  load, store = _io(plan)
  carry = sequential.reverse_init(*(load(ref) for ref in (num_t_ref, den_t_ref, max_t_ref,
                                                          dnum_t_ref, dden_t_ref, dmax_t_ref)))
  seg = pl.program_id(2)
  if plan.segments > 1:
    w = load(w_ref)

    def fold(n, carry):
      s = plan.segments - 1 - n
      a, b, r, gm = carry
      a_s, b_s, r_s, pass_s = (load(ref.at[s]) for ref in summary_refs)
      a, b, r = sequential.merge(a_s, b_s, r_s, a, b, r - _segment_len(plan, s) * w)
      return a, b, r, gm * pass_s

    carry = jax.lax.fori_loop(0, plan.segments - 1 - seg, fold, carry)
  ckpt_refs = (cn_ref, cd_ref, cm_ref)
  carry, dw, du = _sweep(plan, (w_ref, u_ref, k_ref, v_ref, dy_ref, *ckpt_refs, dk_ref, dv_ref),
                         carry, write=True)
  store(dw_ref, dw)
  store(du_ref, du)

  @pl.when(seg == 0)
  def _():
    state0 = (load(ref.at[jnp.int32(0)]) for ref in ckpt_refs)
    for ref, x in zip((dnum0_ref, dden0_ref, dmax0_ref),
                      sequential.state_cotangents(*state0, *carry)):
      store(ref, x)


# ----------------------------------------------------------------------------------------------


def wkv_pallas_seq_reference(w: Array, u: Array, k: Array, v: Array,
                             state: WKVState | None = None, *,
                             block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES,
                             interpret: bool | None = None) -> tuple[Array, WKVState]:
  """The sequential scan the kernels must match; same signature as `wkv_pallas_seq`."""
  del block_sizes, interpret
  return wkv_lib.wkv_scan(w, u, k, v, state)


# Explicit per platform, so that tracing on any machine never picks the interpreter by accident:
# compiled on GPUs, interpreted on CPU; TPUs get the Mosaic kernel (wkv_pallas_tpu_seq.py).
wkv_lib.register("pallas", functools.partial(wkv_pallas_seq, interpret=False), ("cuda", "rocm"))
wkv_lib.register("pallas", functools.partial(wkv_pallas_seq, interpret=True), ("cpu",))

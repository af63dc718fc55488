"""Sequential-in-kernel WKV (paper eq. 16, Appendix D) as Pallas kernels for TPUs (Mosaic).

The algorithm and its custom VJP are `sequential.py`'s (read its docstring for the math): each
program walks its tokens in order with the state (n, d, m) in registers, one exponential per
merge; the backward recomputes each block of tokens from a checkpoint and sweeps it in reverse.
This module supplies the two kernels, written for the TPU:

  * channels on the 128-wide lane axis; one program owns one batch row and one block of
    `block_c` channels, and every per-token value is a [1, block_c] row. Putting 8 batch rows on
    the sublanes would fill the vector registers 8x better, but the rows of k live in different
    (t, c) tiles: gathering them means either an XLA transpose to [t, b, c] (two more full-array
    passes per direction) or an 8x8 sublane shuffle per group of tokens, whose Mosaic layout
    only a TPU can check. A TPU run (`scripts/tpu_check.sh`) says whether the step's latency or
    its vector work is what limits this kernel;
  * grid (batch, channel block, time block), the time axis "arbitrary" (sequential on one core)
    and the others "parallel". A time block of `block_t` tokens is one [block_t, block_c] tile of
    k, v (and y, dy, dk, dv), moved by Pallas's pipeline while the previous block computes; the
    state crosses time blocks in VMEM scratch, initialised from the incoming state at block 0;
  * inside a program a `fori_loop` over groups of 8 tokens (16 for 16-bit inputs, one packed
    tile): each group is one aligned [8, block_c] load of k and v, its rows are taken apart by
    static slices, the 8 dependent steps are unrolled, and the outputs are put together with
    selects into one aligned store. No dynamic single-row access, no rolls;
  * checkpoints: the state before each time block, [b, n_blocks, 1, c] float32 (the unit
    dimension keeps a block's last two dimensions (1, block_c), a whole dimension, as Mosaic's
    tiling asks); the final state at the last time block. Tokens at t and beyond, in the last
    block's tile past the end of the array, are masked out of the state (only when t is not a
    multiple of block_t), so k and v are never padded. Channels need no padding either: a
    partial last channel block computes on lanes whose results are never written back, and no
    value mixes lanes;
  * backward: the same grid with the time blocks visited from last to first (index maps); a
    program recomputes the states before each of its block's tokens from the block's checkpoint
    into a [block_t, block_c] VMEM scratch, then sweeps the block in reverse, carrying
    (a~, b~, q) and the max-path cotangent in scratch across time blocks. dk, dv are written in
    k's dtype; dw, du are per-(batch row, channel) partials [b, 1, c], summed over the batch
    outside; the incoming state's gradients are written after the first block.

One time segment per program (`sequential.py`'s `num_segments` is for GPUs): a TPU core runs the
programs of a grid one after another, so splitting the sequence would add a pass over k, v and
no parallelism; b x (c / 128) programs already feed both cores of a megacore chip.

Shapes: b = batch, t = time, c = channels, l = block_t, cb = block_c, g = tokens of one group
(8 or 16), nt = time blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from rwkv_jax import wkv as wkv_lib
from rwkv_jax.wkv import WKVState
from rwkv_jax_kernels import sequential
# One rule for when Pallas's TPU interpreter runs (never unasked on an accelerator).
from rwkv_jax_kernels.wkv_pallas_tpu import _interpret_mode  # pylint: disable=protected-access

Array = jax.Array

_LANES = 128
_SUBLANES = 8
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the sequential TPU kernels."""

  # Tokens per time block (multiple of 16, a whole tile of 16-bit values): one grid step, one
  # checkpoint, and the backward's recompute scratch ([block_t, block_c] float32, three of them).
  block_t: int = 256
  block_c: int = _LANES  # Channels per program (multiple of 128, the lane width).

  def __post_init__(self):
    for name, unit in (("block_t", 2 * _SUBLANES), ("block_c", _LANES)):
      size = getattr(self, name)
      if size < unit or size % unit:
        raise ValueError(f"BlockSizes.{name}={size} must be a positive multiple of {unit}.")


# ----------------------------------------------------------------------------------------------
# Public entry.


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def wkv_pallas_tpu_seq(w: Array, u: Array, k: Array, v: Array, state: WKVState | None = None, *,
                       block_sizes: BlockSizes = BlockSizes(), interpret: bool | None = None
                       ) -> tuple[Array, WKVState]:
  """WKV with the sequential Pallas TPU kernels; the contract of `rwkv_jax.wkv.wkv_scan`.

  Args:
    w, u, k, v, state: as for `rwkv_jax.wkv.wkv_scan` (k, v float32 or bfloat16).
    block_sizes: tile sizes.
    interpret: run the kernels in Pallas's TPU interpreter; None means "only if JAX runs on
      CPU" (compiled with Mosaic on a TPU; any other backend is an error).

  Returns:
    y [b, t, c] in k's dtype, and the float32 state after the last token.
  """
  interpret = _interpret_mode(interpret)
  state = wkv_lib.check_inputs(w, u, k, v, state)
  b, t, c = k.shape
  if t == 0:
    return k, state
  tiles = _Tiles.fit(block_sizes, t, c, k.dtype)
  call = lambda fn: functools.partial(fn, tiles=tiles, interpret=interpret)
  kernels = sequential.SeqKernels(forward=call(_forward), backward=call(_backward))
  f32 = lambda x: jnp.asarray(x, _F32)
  y, *final = sequential.sequential_wkv(kernels, f32(w), f32(u), k, v, *state)
  return y, WKVState(*final)


@dataclasses.dataclass(frozen=True)
class _Tiles:
  seq_len: int
  block_t: int  # l
  block_c: int  # cb
  group: int    # g: tokens per aligned load

  @classmethod
  def fit(cls, sizes: BlockSizes, t: int, c: int, dtype) -> _Tiles:
    group = _SUBLANES * max(1, 4 // jnp.dtype(dtype).itemsize)  # one (8 or 16, 128) tile
    # A short sequence is one block of whole groups (the tile past t is masked).
    block_t = min(sizes.block_t, pl.cdiv(t, group) * group)
    # Fewer than 128 channels: one block of all of them (a block equal to the array's dim).
    block_c = c if c < _LANES else sizes.block_c
    return cls(t, block_t, block_c, group)

  @property
  def time_blocks(self) -> int:
    return pl.cdiv(self.seq_len, self.block_t)

  @property
  def masked(self) -> bool:
    """Whether the last time block reaches past the sequence (its extra tokens are masked)."""
    return self.seq_len % self.block_t != 0


# ----------------------------------------------------------------------------------------------
# The two directions (`sequential.SeqKernels`): [b, c] states and [c] vectors in and out, as
# [b, 1, c] and [1, c] rows for the kernels.


def _as_rows(b: int, *xs: Array) -> list[Array]:
  return [x.reshape(b, 1, -1) for x in xs]


def _forward(w, u, k, v, num0, den0, max0, *, tiles: _Tiles, interpret):
  b, _, c = k.shape
  y, ckpt, final = _forward_call(w.reshape(1, c), u.reshape(1, c), k, v,
                                 *_as_rows(b, num0, den0, max0), tiles=tiles,
                                 interpret=interpret)
  return y, tuple(x.reshape(b, c) for x in final), (ckpt, final)


def _backward(w, u, k, v, num0, den0, max0, residuals, final, dy, dnum, dden, dmax, *,
              tiles: _Tiles, interpret):
  del num0, den0, max0, final  # the first checkpoint and the kernel's [b, 1, c] final state
  b, _, c = k.shape
  ckpt, final_rows = residuals
  dk, dv, dw, du, dstate = _backward_call(
      w.reshape(1, c), u.reshape(1, c), k, v, dy, ckpt, final_rows,
      _as_rows(b, dnum, dden, dmax), tiles=tiles, interpret=interpret)
  return (dw.sum((0, 1)), du.sum((0, 1)), dk, dv, *(x.reshape(b, c) for x in dstate))


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers. Grid (b, channel block, time block), time "arbitrary".


def _specs(tiles: _Tiles, reverse: bool):
  l, cb, nt = tiles.block_t, tiles.block_c, tiles.time_blocks
  when = (lambda i: nt - 1 - i) if reverse else (lambda i: i)
  token = pl.BlockSpec((None, l, cb), lambda b, c, i: (b, when(i), c))             # [b, t, c]
  ckpt = pl.BlockSpec((None, None, 1, cb), lambda b, c, i: (b, when(i), 0, c))     # [b, nt, 1, c]
  state = pl.BlockSpec((None, 1, cb), lambda b, c, i: (b, 0, c))                   # [b, 1, c]
  channel = pl.BlockSpec((1, cb), lambda b, c, i: (0, c))                          # [1, c]
  return token, ckpt, state, channel


def _pallas_call(kernel, tiles: _Tiles, k: Array, out_shape, in_specs, out_specs, scratch,
                 interpret, name):
  b, _, c = k.shape
  grid = (b, pl.cdiv(c, tiles.block_c), tiles.time_blocks)
  return pl.pallas_call(
      functools.partial(kernel, tiles=tiles), out_shape=out_shape, grid=grid,
      in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch, interpret=interpret,
      name=name, compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")))


def _forward_call(w, u, k, v, num0, den0, max0, tiles: _Tiles, interpret):
  b, _, c = k.shape
  token, ckpt, state, channel = _specs(tiles, reverse=False)
  rows = jax.ShapeDtypeStruct((b, 1, c), _F32)
  ckpts = jax.ShapeDtypeStruct((b, tiles.time_blocks, 1, c), _F32)
  y, *rest = _pallas_call(
      _forward_kernel, tiles, k,
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype),) + (ckpts,) * 3 + (rows,) * 3,
      in_specs=[channel, channel, token, token, state, state, state],
      out_specs=(token,) + (ckpt,) * 3 + (state,) * 3,
      scratch=[pltpu.VMEM((1, tiles.block_c), _F32)] * 3, interpret=interpret,
      name="wkv_tpu_seq_forward")(w, u, k, v, num0, den0, max0)
  return y, tuple(rest[:3]), tuple(rest[3:])


def _backward_call(w, u, k, v, dy, ckpt, final, dfinal, tiles: _Tiles, interpret):
  b, _, c = k.shape
  token, ckpt_spec, state, channel = _specs(tiles, reverse=True)
  rows = jax.ShapeDtypeStruct((b, 1, c), _F32)
  per_token = jax.ShapeDtypeStruct(k.shape, k.dtype)
  l, cb = tiles.block_t, tiles.block_c
  dk, dv, dw, du, *dstate = _pallas_call(
      _backward_kernel, tiles, k, out_shape=(per_token,) * 2 + (rows,) * 5,
      in_specs=[channel, channel, token, token, token] + [ckpt_spec] * 3 + [state] * 6,
      out_specs=(token,) * 2 + (state,) * 5,
      scratch=[pltpu.VMEM((l, cb), _F32)] * 3 + [pltpu.VMEM((1, cb), _F32)] * 6,
      interpret=interpret, name="wkv_tpu_seq_backward",
  )(w, u, k, v, dy, *ckpt, *final, *dfinal)
  return dk, dv, dw, du, dstate


# ----------------------------------------------------------------------------------------------
# Kernel bodies. Every value is a [1, cb] row (one token, or the state) or a [g, cb] group of
# tokens. A group is one aligned load; its token j is the static slice [j, j + 1).


def _exp_merge(p1, p2):
  """(e1, e2) = (exp(p1 - p), exp(p2 - p)) with p = max(p1, p2), by one exponential."""
  diff = p1 - p2
  e = jnp.exp(-jnp.abs(diff))
  first = diff >= 0
  return jnp.where(first, 1.0, e), jnp.where(first, e, 1.0)


def _output(n, d, m, u, k, v):
  """Eq. 16 from the state before the token: (y, z, b, p), Z = z e^p, b = e^{u + k - p}."""
  a, b = _exp_merge(m, u + k)
  z = a * d + b
  return (a * n + b * v) / z, z, b, jnp.maximum(m, u + k)


def _update(n, d, m, w, k, v):
  """The state after the token, and the update's factors (e^{m - w - m'}, e^{k - m'})."""
  a, b = _exp_merge(m - w, k)
  return a * n + b * v, a * d + b, jnp.maximum(m - w, k), a, b


class _Group:
  """A group of g tokens of a [l, cb] tile: its aligned loads and stores, its token rows."""

  def __init__(self, index, tiles: _Tiles, remaining):
    g = tiles.group
    self.start = pl.multiple_of(index * g, g)
    self.slice = pl.ds(self.start, g)
    self.rows = jax.lax.broadcasted_iota(jnp.int32, (g, tiles.block_c), 0)
    # Tokens of the group still inside the sequence, as a [g, cb] count per row (> 0: valid).
    self.left = None if remaining is None else remaining - self.start - self.rows

  def load(self, ref) -> Array:
    return ref[self.slice, :].astype(_F32)

  def store(self, ref, x: Array) -> None:
    ref[self.slice, :] = x.astype(ref.dtype)

  def put(self, tile: Array, j: int, row: Array) -> Array:
    """`tile` [g, cb] with row j replaced by `row` [1, cb]."""
    return jnp.where(self.rows == j, row, tile)

  def keep(self, j: int, new, old):
    """`new` where token j is inside the sequence, else `old` (tuples of rows)."""
    if self.left is None:
      return new
    valid = self.left[j:j + 1] > 0
    return tuple(jnp.where(valid, x, y) for x, y in zip(new, old))


def _time_block(tiles: _Tiles, reverse: bool):
  """The time block this program owns, and its tokens inside the sequence (None: all of it).

  Read at the kernel's top level, outside any loop."""
  i = pl.program_id(2)
  block = tiles.time_blocks - 1 - i if reverse else i
  remaining = (tiles.seq_len - block * tiles.block_t) if tiles.masked else None
  return i, remaining


def _forward_kernel(w_ref, u_ref, k_ref, v_ref, n0_ref, d0_ref, m0_ref,
                    y_ref, ckpt_n_ref, ckpt_d_ref, ckpt_m_ref, n_out_ref, d_out_ref, m_out_ref,
                    n_ref, d_ref, m_ref, *, tiles: _Tiles):
  i, remaining = _time_block(tiles, reverse=False)
  w, u = w_ref[...], u_ref[...]

  @pl.when(i == 0)
  def _():
    n_ref[...], d_ref[...], m_ref[...] = n0_ref[...], d0_ref[...], m0_ref[...]

  state = n_ref[...], d_ref[...], m_ref[...]
  ckpt_n_ref[...], ckpt_d_ref[...], ckpt_m_ref[...] = state

  def group(index, state):
    grp = _Group(index, tiles, remaining)
    ks, vs = grp.load(k_ref), grp.load(v_ref)
    ys = jnp.zeros(ks.shape, _F32)
    for j in range(tiles.group):
      n, d, m = state
      k, v = ks[j:j + 1], vs[j:j + 1]
      y, *_ = _output(n, d, m, u, k, v)
      ys = grp.put(ys, j, y)
      state = grp.keep(j, _update(n, d, m, w, k, v)[:3], state)
    grp.store(y_ref, ys)
    return state

  state = jax.lax.fori_loop(0, tiles.block_t // tiles.group, group, state)
  n_ref[...], d_ref[...], m_ref[...] = state

  @pl.when(i == tiles.time_blocks - 1)
  def _():
    n_out_ref[...], d_out_ref[...], m_out_ref[...] = state


def _backward_kernel(w_ref, u_ref, k_ref, v_ref, dy_ref, ckpt_n_ref, ckpt_d_ref, ckpt_m_ref,
                     n_t_ref, d_t_ref, m_t_ref, dn_t_ref, dd_t_ref, dm_t_ref,
                     dk_ref, dv_ref, dw_out_ref, du_out_ref, dn0_ref, dd0_ref, dm0_ref,
                     sn_ref, sd_ref, sm_ref, a_ref, b_ref, q_ref, gm_ref, dw_ref, du_ref, *,
                     tiles: _Tiles):
  """One time block, last to first. Carried across blocks: alpha = dL/dN = a~ e^{-q} and
  beta = dL/dD = b~ e^{-q} after the block, the cotangent gm of the running max m still on
  its chain of maxima, and the sums of dw and du."""
  i, remaining = _time_block(tiles, reverse=True)
  w, u = w_ref[...], u_ref[...]
  n_groups = tiles.block_t // tiles.group

  @pl.when(i == 0)
  def _():
    dn, dd = dn_t_ref[...], dd_t_ref[...]
    a_ref[...], b_ref[...], q_ref[...] = dn, dd, m_t_ref[...]
    # The part of max_exp's cotangent that does not rescale (num, den).
    gm_ref[...] = dm_t_ref[...] - dn * n_t_ref[...] - dd * d_t_ref[...]
    dw_ref[...] = jnp.zeros(dw_ref.shape, _F32)
    du_ref[...] = jnp.zeros(du_ref.shape, _F32)

  # Recompute: the state before each token of the block, from the block's checkpoint.
  def recompute(index, state):
    grp = _Group(index, tiles, remaining)
    ks, vs = grp.load(k_ref), grp.load(v_ref)
    slabs = [jnp.zeros(ks.shape, _F32)] * 3
    for j in range(tiles.group):
      slabs = [grp.put(slab, j, x) for slab, x in zip(slabs, state)]
      state = grp.keep(j, _update(*state, w, ks[j:j + 1], vs[j:j + 1])[:3], state)
    for ref, tile in zip((sn_ref, sd_ref, sm_ref), slabs):
      grp.store(ref, tile)
    return state

  ckpt = ckpt_n_ref[...], ckpt_d_ref[...], ckpt_m_ref[...]
  jax.lax.fori_loop(0, n_groups, recompute, ckpt)

  # Reverse sweep.
  def sweep(index_from_end, carry):
    grp = _Group(n_groups - 1 - index_from_end, tiles, remaining)
    ks, vs, gs = grp.load(k_ref), grp.load(v_ref), grp.load(dy_ref)
    ns, ds, ms = grp.load(sn_ref), grp.load(sd_ref), grp.load(sm_ref)
    dks = dvs = jnp.zeros(ks.shape, _F32)
    for j in reversed(range(tiles.group)):
      at, bt, q, gm, dw, du = carry
      n, d, m, k, v, g = (x[j:j + 1] for x in (ns, ds, ms, ks, vs, gs))
      y, z, b_out, p = _output(n, d, m, u, k, v)
      _, _, m_next, a_upd, b_upd = _update(n, d, m, w, k, v)
      # alpha_t e^{k}, alpha_t e^{m - w} relative to alpha's scale: exponents <= 0 (q >= m').
      scale = jnp.exp(m_next - q)
      ek, ew = b_upd * scale, a_upd * scale
      g_z = g / z                              # g / Z_t in units of e^{-p}
      g_bonus = g_z * b_out                    # dL/dv_t through y_t: g e^{u + k - p} / z
      de_bonus = g_bonus * (v - y)             # dL/d(u + k_t) through y_t
      k_won = k > m - w                        # k_t set m_t: gm stops here
      dk = de_bonus + ek * (at * v + bt) + jnp.where(k_won, gm, 0.0)
      dv = g_bonus + ek * at
      dw = dw - ew * (at * n + bt * d) - jnp.where(k_won, 0.0, gm)
      du = du + de_bonus
      gm = jnp.where(k_won, 0.0, gm)
      # alpha_{t-1} = g / Z + e^{-w} alpha_t: exponents -p and -w - q, merged.
      fresh, old = _exp_merge(-p, -w - q)
      at, bt = fresh * g_z + old * at, -fresh * g_z * y + old * bt
      q = jnp.minimum(p, w + q)
      carry = grp.keep(j, (at, bt, q, gm, dw, du), carry)
      dks, dvs = grp.put(dks, j, dk), grp.put(dvs, j, dv)
    grp.store(dk_ref, dks)
    grp.store(dv_ref, dvs)
    return carry

  refs = (a_ref, b_ref, q_ref, gm_ref, dw_ref, du_ref)
  carry = jax.lax.fori_loop(0, n_groups, sweep, tuple(ref[...] for ref in refs))
  for ref, x in zip(refs, carry):
    ref[...] = x

  @pl.when(i == tiles.time_blocks - 1)
  def _():
    at, bt, q, gm, dw, du = carry
    n0, d0, m0 = ckpt  # this is the first block: its checkpoint is the incoming state
    scale = jnp.exp(m0 - q)
    dn0_ref[...], dd0_ref[...] = at * scale, bt * scale
    dm0_ref[...] = (at * n0 + bt * d0) * scale + gm
    dw_out_ref[...], du_out_ref[...] = dw, du


# ----------------------------------------------------------------------------------------------


def wkv_pallas_tpu_seq_reference(w: Array, u: Array, k: Array, v: Array,
                                 state: WKVState | None = None, *,
                                 block_sizes: BlockSizes = BlockSizes(),
                                 interpret: bool | None = None) -> tuple[Array, WKVState]:
  """The sequential scan the kernels must match; same signature as `wkv_pallas_tpu_seq`."""
  del block_sizes, interpret
  return wkv_lib.wkv_scan(w, u, k, v, state)


# Compiled (Mosaic) only: this registration serves lowering for TPU, where nothing interprets.
wkv_lib.register("pallas", functools.partial(wkv_pallas_tpu_seq, interpret=False), ("tpu",),
                 per_shard=True)

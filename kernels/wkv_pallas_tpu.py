"""Chunked WKV (paper eq. 16, Appendix D) as Pallas kernels for TPUs (Mosaic).

The same three steps and custom VJP as the GPU kernels (`chunked.py`: per-chunk summaries,
chaining over chunks, per-chunk outputs); this module supplies the four kernels, written for the
TPU's vector layout:
  * channels on the 128-wide lane axis, tokens on sublanes: every value in a kernel body is
    [l, 128] (a chunk of `block_t` tokens, l a multiple of 8), [1, 128] (one per chunk) or a
    whole per-chunk tile, so that no op should need a relayout;
  * one program owns `chunks_per_block` chunks of one 128-channel block ([g l, 128] tiles of
    k, v, dy in VMEM; [g, 128] tiles of the per-chunk values, g a multiple of 8) and walks them
    in a loop: chunk slices stay sublane-aligned and programs are few and large;
  * inside a chunk the pairs (token s, earlier token s - d) are visited by distance d: for each
    d = 1 .. l-1 one sublane rotation (`pltpu.roll`) of k and v and a few dense [l, 128] ops,
    instead of a loop over tokens. That is O(block_t) exponentials per token, as on GPU, spent
    on the VPU/EUP while the HBM traffic stays one read of the inputs and one write of the
    outputs per kernel. Whether that stays memory-bound at the default block_t=16 (v5e's vector
    units are small; block_t=8 halves the work) is unmeasured: `scripts/tpu_check.sh`.
The grid (batch, channel block, time block) is parallel in every dimension: the programs are
independent, the chaining between chunks happens outside the kernels.

Inputs are padded to whole tiles: channels to a multiple of block_c with w = 1, u = 0, k = v = 0
and an empty state; tokens to whole blocks of chunks. Padded tokens are masked out of the
summaries (a wholly padded chunk summarises to the empty state over zero steps, the identity of
the chaining), and their outputs are dropped.

Shapes: b = batch, t = time, c = channels, n = chunks, l = block_t (tokens of one chunk),
g = chunks_per_block, cb = block_c; tiles are [g * l, cb] (tokens) and [g, cb] (per chunk).
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
from rwkv_jax_kernels import chunked

Array = jax.Array

# Exponent of masked terms: exp(_MASKED - anything finite) == 0 without inf - inf.
_MASKED = wkv_lib.EMPTY_MAX_EXP
_LANES = 128
_SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the TPU kernels."""

  block_t: int = 16  # Tokens per chunk (multiple of 8): each token costs O(block_t) exps.
  block_c: int = _LANES  # Channels per program (multiple of 128, the lane width).
  # Chunks per program (multiple of 8: the per-chunk tiles are [chunks_per_block, block_c]);
  # fewer when the sequence has fewer chunks.
  chunks_per_block: int = 8

  def __post_init__(self):
    for name, unit in (("block_t", _SUBLANES), ("block_c", _LANES),
                       ("chunks_per_block", _SUBLANES)):
      size = getattr(self, name)
      if size < unit or size % unit:
        raise ValueError(f"BlockSizes.{name}={size} must be a positive multiple of {unit}.")


def _interpret_mode(interpret: bool | None):
  """The `interpret` argument of pallas_call: Pallas's TPU interpreter only on CPU or on request."""
  if interpret is None:
    backend = jax.default_backend()
    if backend not in ("cpu", "tpu"):
      raise ValueError(
          f"wkv_pallas_tpu is the TPU (Mosaic) kernel and JAX runs on {backend!r}: use "
          "rwkv_jax_kernels.wkv_pallas there (or wkv(..., impl='pallas'), which picks the "
          "kernel by platform), or pass interpret=True to run the TPU kernel's interpreter.")
    interpret = backend == "cpu"
  if not interpret:
    return False
  if jax.sharding.get_abstract_mesh().manual_axes:
    # Inside a shard_map the TPU interpreter meets its simulated devices at thread barriers,
    # which can hang when XLA:CPU runs fewer device threads at once; the kernels do no
    # communication, so the generic interpreter checks the same thing there.
    return True
  return pltpu.InterpretParams()


# ----------------------------------------------------------------------------------------------
# Public entry.


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def wkv_pallas_tpu(w: Array, u: Array, k: Array, v: Array, state: WKVState | None = None, *,
                   block_sizes: BlockSizes = BlockSizes(), interpret: bool | None = None
                   ) -> tuple[Array, WKVState]:
  """WKV with the chunked Pallas TPU kernels; the contract of `rwkv_jax.wkv.wkv_scan`.

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

  block_t = block_sizes.block_t
  if jnp.dtype(k.dtype).itemsize < 4 and block_t % 16:
    raise ValueError(f"BlockSizes.block_t={block_t} must be a multiple of 16 for {k.dtype} "
                     "inputs: each chunk must start on a whole (16, 128) tile of 16-bit values.")
  n = pl.cdiv(t, block_t)
  # Short sequences: one program holds all their chunks (a block equal to the array's dim).
  cpb = min(block_sizes.chunks_per_block, n)
  tiles = _Tiles(block_t, block_sizes.block_c, cpb)
  pad_t = pl.cdiv(n, cpb) * cpb * block_t - t
  pad_c = pl.cdiv(c, tiles.block_c) * tiles.block_c - c
  pad_kv = lambda x: jnp.pad(x, ((0, 0), (0, pad_t), (0, pad_c)))
  pad_vec = lambda x, value: jnp.pad(jnp.asarray(x, jnp.float32), (0, pad_c),
                                     constant_values=value)
  pad_bc = lambda x, value: jnp.pad(x, ((0, 0), (0, pad_c)), constant_values=value)
  call = lambda fn, **kw: functools.partial(fn, tiles=tiles, interpret=interpret, **kw)
  kernels = chunked.ChunkKernels(
      summary=call(_summary_call, seq_len=t), output=call(_output_call),
      output_bwd=call(_output_bwd_call), summary_bwd=call(_summary_bwd_call, seq_len=t))
  y, num, den, max_exp = chunked.chunked_wkv(
      kernels, block_t, t, pad_vec(w, 1.0), pad_vec(u, 0.0), pad_kv(k), pad_kv(v),
      pad_bc(state.num, 0.0), pad_bc(state.den, 0.0),
      pad_bc(state.max_exp, wkv_lib.EMPTY_MAX_EXP))
  return y[:, :t, :c], WKVState(num[:, :c], den[:, :c], max_exp[:, :c])


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers. Grid (b, channel block, time block); every program owns g chunks.


@dataclasses.dataclass(frozen=True)
class _Tiles:
  block_t: int
  block_c: int
  chunks: int  # per program


def _specs(tiles: _Tiles):
  l, cb, g = tiles.block_t, tiles.block_c, tiles.chunks
  token = pl.BlockSpec((None, g * l, cb), lambda b, c, n: (b, n, c))  # [b, t, c] -> [g l, cb]
  chunk = pl.BlockSpec((None, g, cb), lambda b, c, n: (b, n, c))      # [b, n, c] -> [g, cb]
  channel = pl.BlockSpec((1, cb), lambda b, c, n: (0, c))             # [1, c] -> [1, cb]
  return token, chunk, channel


def _pallas_call(kernel, tiles: _Tiles, k: Array, out_shape, in_specs, out_specs, interpret,
                 name):
  b, t, c = k.shape
  grid = (b, c // tiles.block_c, t // (tiles.chunks * tiles.block_t))
  return pl.pallas_call(
      functools.partial(kernel, tiles=tiles), out_shape=out_shape, grid=grid,
      in_specs=in_specs, out_specs=out_specs, interpret=interpret, name=name,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3))


def _per_chunk(k: Array, tiles: _Tiles) -> jax.ShapeDtypeStruct:
  b, t, c = k.shape
  return jax.ShapeDtypeStruct((b, t // tiles.block_t, c), jnp.float32)


def _row(x: Array) -> Array:
  return x.reshape(1, -1)  # [c] -> [1, c]: a vector as one row of lanes


def _summary_call(k, v, w, seq_len, tiles, interpret):
  token, chunk, channel = _specs(tiles)
  return _pallas_call(
      functools.partial(_summary_kernel, seq_len=seq_len), tiles, k,
      out_shape=(_per_chunk(k, tiles),) * 3, in_specs=[token, token, channel],
      out_specs=(chunk,) * 3, interpret=interpret, name="wkv_tpu_summary")(k, v, _row(w))


def _output_call(num, den, max_exp, k, v, w, u, tiles, interpret):
  token, chunk, channel = _specs(tiles)
  return _pallas_call(
      _output_kernel, tiles, k, out_shape=jax.ShapeDtypeStruct(k.shape, k.dtype),
      in_specs=[chunk, chunk, chunk, token, token, channel, channel], out_specs=token,
      interpret=interpret, name="wkv_tpu_output",
  )(num, den, max_exp, k, v, _row(w), _row(u))


def _output_bwd_call(num, den, max_exp, k, v, w, u, dy, tiles, interpret):
  token, chunk, channel = _specs(tiles)
  per_token = jax.ShapeDtypeStruct(k.shape, jnp.float32)
  dk, dv, dnum, dden, dmax, dw, du = _pallas_call(
      _output_bwd_kernel, tiles, k, out_shape=(per_token,) * 2 + (_per_chunk(k, tiles),) * 5,
      in_specs=[chunk, chunk, chunk, token, token, channel, channel, token],
      out_specs=(token,) * 2 + (chunk,) * 5, interpret=interpret, name="wkv_tpu_output_bwd",
  )(num, den, max_exp, k, v, _row(w), _row(u), dy)
  return dk, dv, (dnum, dden, dmax), dw, du


def _summary_bwd_call(k, v, w, dnum, dden, dmax, dk_in, dv_in, seq_len, tiles, interpret):
  token, chunk, channel = _specs(tiles)
  per_token = jax.ShapeDtypeStruct(k.shape, k.dtype)
  return _pallas_call(
      functools.partial(_summary_bwd_kernel, seq_len=seq_len), tiles, k,
      out_shape=(per_token, per_token, _per_chunk(k, tiles)),
      in_specs=[token, token, channel, chunk, chunk, chunk, token, token],
      out_specs=(token, token, chunk), interpret=interpret, name="wkv_tpu_summary_bwd",
  )(k, v, _row(w), dnum, dden, dmax, dk_in, dv_in)


# ----------------------------------------------------------------------------------------------
# Kernel bodies. Every value is [l, cb] (tokens of one chunk) or [1, cb] (one per chunk); inside a
# chunk s = token index in [0, l), and the pair (s, s - d) is an earlier token at distance d.
# A program walks its g chunks in a loop (code size independent of g): chunk i is the
# sublane-aligned rows [i l, (i + 1) l) of a token tile, and row i of a per-chunk tile, which is
# read and written through masks (no dynamic single-row access, no relayout).


def _rows(shape) -> Array:
  return jax.lax.broadcasted_iota(jnp.int32, shape, 0)


def _for_each_chunk(tiles: _Tiles, body, *carry):
  return jax.lax.fori_loop(0, tiles.chunks, lambda i, c: body(i, *c), carry)


def _chunk(ref, i, tiles: _Tiles) -> Array:
  """Chunk i of a [g l, cb] token tile, as float32 [l, cb]."""
  l = tiles.block_t
  return ref[pl.ds(pl.multiple_of(i * l, l), l), :].astype(jnp.float32)


def _set_chunk(ref, i, tiles: _Tiles, x: Array) -> None:
  l = tiles.block_t
  ref[pl.ds(pl.multiple_of(i * l, l), l), :] = x.astype(ref.dtype)


def _chunk_row(ref, i) -> Array:
  """Row i of a [g, cb] per-chunk tile, as [1, cb]."""
  tile = ref[...]
  return jnp.sum(jnp.where(_rows(tile.shape) == i, tile, 0.0), axis=0, keepdims=True)


def _set_row(tile: Array, i, row: Array) -> Array:
  """The [g, cb] tile with row i replaced by `row` [1, cb]."""
  return jnp.where(_rows(tile.shape) == i, row, tile)


def _empty_rows(ref, count: int) -> tuple[Array, ...]:
  return (jnp.zeros(ref.shape, jnp.float32),) * count


def _chunk_lens(seq_len: int, tiles: _Tiles):
  """i -> the tokens of this program's chunk i inside the sequence (0 for wholly padded ones)."""
  first = pl.program_id(2) * tiles.chunks  # read outside the chunk loop
  return lambda i: jnp.clip(seq_len - (first + i) * tiles.block_t, 0, tiles.block_t)


def _summary_terms(k, w, chunk_len):
  """Exponents k_i - (len - 1 - i) w of each token in the chunk's end state, masked past len."""
  i = _rows(k.shape)
  valid = i < chunk_len
  dist = (chunk_len - 1 - i).astype(jnp.float32)           # decay steps to the chunk's end
  e = jnp.where(valid, k - dist * w, _MASKED)
  max_exp = jnp.max(e, axis=0, keepdims=True)
  weight = jnp.where(valid, jnp.exp(e - max_exp), 0.0)     # 0 also in a wholly masked chunk
  return e, valid, dist, max_exp, weight


def _summary_kernel(k_ref, v_ref, w_ref, num_ref, den_ref, max_ref, *, seq_len, tiles):
  w, chunk_len = w_ref[...], _chunk_lens(seq_len, tiles)

  def chunk(i, nums, dens, maxes):
    k, v = _chunk(k_ref, i, tiles), _chunk(v_ref, i, tiles)
    _, _, _, max_exp, weight = _summary_terms(k, w, chunk_len(i))
    return (_set_row(nums, i, jnp.sum(weight * v, axis=0, keepdims=True)),
            _set_row(dens, i, jnp.sum(weight, axis=0, keepdims=True)),
            _set_row(maxes, i, max_exp))

  num_ref[...], den_ref[...], max_ref[...] = _for_each_chunk(tiles, chunk,
                                                             *_empty_rows(num_ref, 3))


def _summary_bwd_kernel(k_ref, v_ref, w_ref, dnum_ref, dden_ref, dmax_ref, dk_in_ref, dv_in_ref,
                        dk_ref, dv_ref, dw_ref, *, seq_len, tiles):
  w, chunk_len = w_ref[...], _chunk_lens(seq_len, tiles)

  def chunk(i, dws):
    k, v = _chunk(k_ref, i, tiles), _chunk(v_ref, i, tiles)
    dnum, dden, dmax_out = (_chunk_row(ref, i) for ref in (dnum_ref, dden_ref, dmax_ref))
    e, valid, dist, max_exp, weight = _summary_terms(k, w, chunk_len(i))
    de = weight * (dnum * v + dden)                        # through weight = exp(e - max_exp)
    # max_exp is both an output and the shift inside weight; it depends on the argmax exponent.
    dmax = dmax_out - jnp.sum(de, axis=0, keepdims=True)
    is_max = jnp.where(valid & (e == max_exp), 1.0, 0.0)
    ties = jnp.maximum(jnp.sum(is_max, axis=0, keepdims=True), 1.0)  # 0 in a masked chunk
    de = de + is_max * (dmax / ties)
    _set_chunk(dk_ref, i, tiles, _chunk(dk_in_ref, i, tiles) + de)
    _set_chunk(dv_ref, i, tiles, _chunk(dv_in_ref, i, tiles) + weight * dnum)
    return (_set_row(dws, i, -jnp.sum(de * dist, axis=0, keepdims=True)),)

  dw_ref[...], = _for_each_chunk(tiles, chunk, *_empty_rows(dw_ref, 1))


class _OutputTerms:
  """Eq. 16 inside one chunk, each row shifted by its largest exponent.

  The weights (exp of exponent minus the row's shift) of the incoming state, of the earlier
  token at each distance d (`pairs[d - 1]`, [l, cb], 0 where s < d) and of the current token,
  with the values rolled to match the pairs, and the numerator and denominator.
  """

  def __init__(self, num0, den0, max0, k, v, w, u):
    l = k.shape[0]
    rows = _rows(k.shape)
    self.s = rows.astype(jnp.float32)
    # Token s - d decayed over d - 1 steps; rows s < d wrap around and are masked.
    self.rolled_v = [pltpu.roll(v, d, 0) for d in range(1, l)]
    e_pairs = [jnp.where(rows >= d, pltpu.roll(k, d, 0) - (d - 1) * w, _MASKED)
               for d in range(1, l)]
    e_state = max0 - self.s * w
    e_bonus = u + k
    shift = jnp.maximum(e_state, e_bonus)
    for e in e_pairs:
      shift = jnp.maximum(shift, e)
    self.w_state = jnp.exp(e_state - shift)
    self.w_bonus = jnp.exp(e_bonus - shift)
    self.pairs = [jnp.exp(e - shift) for e in e_pairs]
    num = self.w_state * num0 + self.w_bonus * v
    den = self.w_state * den0 + self.w_bonus
    for weight, v_d in zip(self.pairs, self.rolled_v):
      num += weight * v_d
      den += weight
    self.num, self.den = num, den


def _output_kernel(num_ref, den_ref, max_ref, k_ref, v_ref, w_ref, u_ref, y_ref, *, tiles):
  w, u = w_ref[...], u_ref[...]

  def chunk(i):
    state = (_chunk_row(ref, i) for ref in (num_ref, den_ref, max_ref))
    terms = _OutputTerms(*state, _chunk(k_ref, i, tiles), _chunk(v_ref, i, tiles), w, u)
    _set_chunk(y_ref, i, tiles, terms.num / terms.den)
    return ()

  _for_each_chunk(tiles, chunk)


def _output_bwd_kernel(num_ref, den_ref, max_ref, k_ref, v_ref, w_ref, u_ref, dy_ref,
                       dk_ref, dv_ref, dnum_ref, dden_ref, dmax_ref, dw_ref, du_ref, *, tiles):
  w, u, l = w_ref[...], u_ref[...], tiles.block_t
  sum_rows = lambda x: jnp.sum(x, axis=0, keepdims=True)

  def chunk(i, *per_chunk):
    num0, den0, max0 = (_chunk_row(ref, i) for ref in (num_ref, den_ref, max_ref))
    k, v, dy = (_chunk(ref, i, tiles) for ref in (k_ref, v_ref, dy_ref))
    terms = _OutputTerms(num0, den0, max0, k, v, w, u)
    # y = num / den and the shift cancels, so each term with weight W, exponent e and
    # coefficients (c_num, c_den) gets dL/dW = g (c_num - y c_den) with g = dy / den, and
    # dL/de = W dL/dW.
    y = terms.num / terms.den
    g = dy / terms.den
    g_state = terms.w_state * g
    de_state = g_state * (num0 - y * den0)
    g_bonus = terms.w_bonus * g
    de_bonus = g_bonus * (v - y)
    dk, dv, de_lag = de_bonus, g_bonus, jnp.zeros_like(k)
    for d, (weight, v_d) in enumerate(zip(terms.pairs, terms.rolled_v), start=1):
      g_pair = weight * g                                  # dL/d(v of token s - d), at row s
      de_pair = g_pair * (v_d - y)
      # Back to the earlier token's row: rolling by l - d moves row s to s - d; the rows s < d
      # are zero and wrap onto tokens with no pair at distance d.
      dk += pltpu.roll(de_pair, l - d, 0)
      dv += pltpu.roll(g_pair, l - d, 0)
      de_lag += de_pair * (d - 1)
    _set_chunk(dk_ref, i, tiles, dk)
    _set_chunk(dv_ref, i, tiles, dv)
    rows = (sum_rows(g_state), -sum_rows(g_state * y), sum_rows(de_state),
            -sum_rows(de_lag + de_state * terms.s), sum_rows(de_bonus))
    return tuple(_set_row(tile, i, row) for tile, row in zip(per_chunk, rows))

  outs = (dnum_ref, dden_ref, dmax_ref, dw_ref, du_ref)
  for ref, tile in zip(outs, _for_each_chunk(tiles, chunk, *_empty_rows(dnum_ref, 5))):
    ref[...] = tile


# ----------------------------------------------------------------------------------------------


def wkv_pallas_tpu_reference(w: Array, u: Array, k: Array, v: Array,
                             state: WKVState | None = None, *,
                             block_sizes: BlockSizes = BlockSizes(),
                             interpret: bool | None = None) -> tuple[Array, WKVState]:
  """The sequential scan the kernels must match; same signature as `wkv_pallas_tpu`."""
  del block_sizes, interpret
  return wkv_lib.wkv_scan(w, u, k, v, state)


# Compiled (Mosaic) only: this registration serves lowering for TPU, where nothing interprets.
wkv_lib.register("pallas_chunked", functools.partial(wkv_pallas_tpu, interpret=False), ("tpu",),
                 per_shard=True)

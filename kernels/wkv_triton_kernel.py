"""The Triton-language bodies of the chunked WKV kernels (`chunked.py`), with no JAX import.

`wkv_triton.py` launches them through `jax_triton.triton_call` on a GPU, or through Triton's
interpreter on CPU. Keeping them apart from JAX also lets them be compiled for a GPU architecture
on any machine (`experiments/gpu_compile.py`).

Each program owns one tile: one batch row, `block_t` tokens (one chunk) and `block_c` channels;
the launch grid is (b, cdiv(c, block_c), cdiv(t, block_t)). Tokens past the end of the sequence
and channels past c are masked, so no input needs padding; per-chunk values have one row per chunk.
The arithmetic is that of the Pallas kernels (`wkv_pallas.py`), term for term.

Arguments follow jax-triton's convention: inputs, then integer scalars, then outputs, then
constexprs. Arrays are row-major and contiguous: k[b, t, c] is at (b * seq_len + t) * channels + c,
per-chunk values [b, n, c] at (b * n + chunk) * channels + c.

Shapes: l = block_t (tokens of a chunk), cb = block_c.
"""

import triton
import triton.language as tl

# Exponent of masked terms: exp(MASKED - anything finite) == 0 without inf - inf
# (rwkv_jax.wkv.EMPTY_MAX_EXP; a constexpr because Triton kernels read only constexpr globals).
MASKED = tl.constexpr(-1e38)


def grid(batch: int, seq_len: int, channels: int, block_t: int, block_c: int
         ) -> tuple[int, int, int]:
  """The launch grid of every kernel here."""
  return batch, triton.cdiv(channels, block_c), triton.cdiv(seq_len, block_t)


# tl.sum and tl.max are @triton.jit functions themselves, compiled or interpreted as `triton` was
# imported; tl.reduce with their combine functions is the same code, and Triton's interpreter
# runs it with numpy whichever way `triton` was imported (see triton_launch._interpreted_module).
@triton.jit
def _sum(x, axis: tl.constexpr):
  return tl.reduce(x, axis, tl.standard._sum_combine)  # pylint: disable=protected-access


@triton.jit
def _max(x, axis: tl.constexpr):
  return tl.reduce(x, axis, tl.standard._elementwise_max)  # pylint: disable=protected-access


@triton.jit
def _tile(seq_len, channels, block_t: tl.constexpr, block_c: tl.constexpr):
  """This program's channels, their mask, token mask, token and chunk offsets, chunk length."""
  row = tl.program_id(0).to(tl.int64)
  chunk = tl.program_id(2)
  c = tl.program_id(1) * block_c + tl.arange(0, block_c)
  c_in = c < channels
  t = chunk * block_t + tl.arange(0, block_t)
  t_in = t < seq_len
  at_token = (row * seq_len + t[:, None]) * channels + c[None, :]   # [l, cb]
  at_chunk = (row * tl.num_programs(2) + chunk) * channels + c      # [cb]
  chunk_len = tl.minimum(seq_len - chunk * block_t, block_t).to(tl.float32)
  return c, c_in, t_in, at_token, t_in[:, None] & c_in[None, :], at_chunk, chunk_len


@triton.jit
def _load_f32(ptr, offsets, mask, other):
  return tl.load(ptr + offsets, mask=mask, other=other).to(tl.float32)


@triton.jit
def _summary_terms(k, w, t_in, chunk_len, block_t: tl.constexpr):
  """Exponents k_i - (len - 1 - i) w of each token in the chunk's end state, masked past len."""
  dist = chunk_len - 1.0 - tl.arange(0, block_t).to(tl.float32)         # [l]
  e = tl.where(t_in[:, None], k - dist[:, None] * w[None, :], MASKED)    # [l, cb]
  max_exp = _max(e, axis=0)                                            # [cb]
  weight = tl.exp(e - max_exp[None, :])                                  # [l, cb], 0 if masked
  return e, dist, max_exp, weight


@triton.jit
def _load_kvw(k_ptr, v_ptr, w_ptr, c, c_in, at_token, tile_in):
  """The tile's keys and values and its channels' decays, float32 (masked: 0, 0 and 1)."""
  return (_load_f32(k_ptr, at_token, tile_in, 0.0), _load_f32(v_ptr, at_token, tile_in, 0.0),
          _load_f32(w_ptr, c, c_in, 1.0))


@triton.jit
def wkv_summary_kernel(k_ptr, v_ptr, w_ptr, seq_len, channels, num_ptr, den_ptr, max_ptr,
                       block_t: tl.constexpr, block_c: tl.constexpr):
  """Step 1: the state each chunk alone leaves behind."""
  c, c_in, t_in, at_token, tile_in, at_chunk, chunk_len = _tile(seq_len, channels, block_t,
                                                                block_c)
  k, v, w = _load_kvw(k_ptr, v_ptr, w_ptr, c, c_in, at_token, tile_in)
  _, _, max_exp, weight = _summary_terms(k, w, t_in, chunk_len, block_t)
  tl.store(num_ptr + at_chunk, _sum(weight * v, axis=0), mask=c_in)
  tl.store(den_ptr + at_chunk, _sum(weight, axis=0), mask=c_in)
  tl.store(max_ptr + at_chunk, max_exp, mask=c_in)


@triton.jit
def wkv_summary_bwd_kernel(k_ptr, v_ptr, w_ptr, dnum_ptr, dden_ptr, dmax_ptr, dk_in_ptr,
                           dv_in_ptr, seq_len, channels, dk_ptr, dv_ptr, dw_ptr,
                           block_t: tl.constexpr, block_c: tl.constexpr):
  """Step 1 backward, plus the step-3 gradients dk_in, dv_in of the same tokens."""
  c, c_in, t_in, at_token, tile_in, at_chunk, chunk_len = _tile(seq_len, channels, block_t,
                                                                block_c)
  k, v, w = _load_kvw(k_ptr, v_ptr, w_ptr, c, c_in, at_token, tile_in)
  dnum = _load_f32(dnum_ptr, at_chunk, c_in, 0.0)[None, :]
  dden = _load_f32(dden_ptr, at_chunk, c_in, 0.0)[None, :]
  e, dist, max_exp, weight = _summary_terms(k, w, t_in, chunk_len, block_t)
  de = weight * (dnum * v + dden)                           # through weight = exp(e - max_exp)
  # max_exp is both an output and the shift inside weight; it depends on the argmax exponent.
  dmax = _load_f32(dmax_ptr, at_chunk, c_in, 0.0) - _sum(de, axis=0)
  is_max = tl.where(t_in[:, None] & (e == max_exp[None, :]), 1.0, 0.0)
  de = de + is_max * (dmax / _sum(is_max, axis=0))[None, :]
  dk = _load_f32(dk_in_ptr, at_token, tile_in, 0.0) + de
  dv = _load_f32(dv_in_ptr, at_token, tile_in, 0.0) + weight * dnum
  tl.store(dk_ptr + at_token, dk.to(dk_ptr.dtype.element_ty), mask=tile_in)
  tl.store(dv_ptr + at_token, dv.to(dv_ptr.dtype.element_ty), mask=tile_in)
  tl.store(dw_ptr + at_chunk, -_sum(de * dist[:, None], axis=0), mask=c_in)


@triton.jit
def _output_terms(num0, den0, max0, k, v, w, u, block_t: tl.constexpr):
  """Eq. 16 inside one chunk, each row s shifted by its largest exponent.

  Returns the weights of the incoming state [l, cb], of earlier tokens i [l, l, cb] and of the
  current token [l, cb], the step counts they were decayed by, and numerator and denominator.
  """
  s = tl.arange(0, block_t).to(tl.float32)                             # [l]
  lag = (s[:, None] - 1.0 - s[None, :])[:, :, None]                    # [l, l, 1]: s - 1 - i
  e_state = max0[None, :] - s[:, None] * w[None, :]                    # [l, cb]
  e_pair = tl.where(lag >= 0.0, k[None, :, :] - lag * w[None, None, :], MASKED)  # [l, l, cb]
  e_bonus = u[None, :] + k                                             # [l, cb]
  shift = tl.maximum(tl.maximum(e_state, e_bonus), _max(e_pair, axis=1))
  w_state = tl.exp(e_state - shift)
  w_pair = tl.exp(e_pair - shift[:, None, :])
  w_bonus = tl.exp(e_bonus - shift)
  num = w_state * num0[None, :] + _sum(w_pair * v[None, :, :], axis=1) + w_bonus * v
  den = w_state * den0[None, :] + _sum(w_pair, axis=1) + w_bonus
  return s, lag, w_state, w_pair, w_bonus, num, den


@triton.jit
def wkv_output_kernel(num_ptr, den_ptr, max_ptr, k_ptr, v_ptr, w_ptr, u_ptr, seq_len, channels,
                      y_ptr, block_t: tl.constexpr, block_c: tl.constexpr):
  """Step 3: the outputs of one chunk from the state entering it."""
  c, c_in, _, at_token, tile_in, at_chunk, _ = _tile(seq_len, channels, block_t, block_c)
  _, _, _, _, _, num, den = _output_terms(
      _load_f32(num_ptr, at_chunk, c_in, 0.0), _load_f32(den_ptr, at_chunk, c_in, 0.0),
      _load_f32(max_ptr, at_chunk, c_in, MASKED), _load_f32(k_ptr, at_token, tile_in, 0.0),
      _load_f32(v_ptr, at_token, tile_in, 0.0), _load_f32(w_ptr, c, c_in, 1.0),
      _load_f32(u_ptr, c, c_in, 0.0), block_t)
  tl.store(y_ptr + at_token, (num / den).to(y_ptr.dtype.element_ty), mask=tile_in)


@triton.jit
def wkv_output_bwd_kernel(num_ptr, den_ptr, max_ptr, k_ptr, v_ptr, w_ptr, u_ptr, dy_ptr,
                          seq_len, channels, dk_ptr, dv_ptr, dnum_ptr, dden_ptr, dmax_ptr,
                          dw_ptr, du_ptr, block_t: tl.constexpr, block_c: tl.constexpr):
  """Step 3 backward: token gradients, the incoming state's, and per-chunk parts of dw, du."""
  c, c_in, _, at_token, tile_in, at_chunk, _ = _tile(seq_len, channels, block_t, block_c)
  num0 = _load_f32(num_ptr, at_chunk, c_in, 0.0)
  den0 = _load_f32(den_ptr, at_chunk, c_in, 0.0)
  k = _load_f32(k_ptr, at_token, tile_in, 0.0)
  v = _load_f32(v_ptr, at_token, tile_in, 0.0)
  s, lag, w_state, w_pair, w_bonus, num, den = _output_terms(
      num0, den0, _load_f32(max_ptr, at_chunk, c_in, MASKED), k, v,
      _load_f32(w_ptr, c, c_in, 1.0), _load_f32(u_ptr, c, c_in, 0.0), block_t)
  # y = num / den and the shift cancels, so each term with weight W, exponent e and coefficients
  # (c_num, c_den) gets dL/dW = g (c_num - y c_den) with g = dy / den, and dL/de = W dL/dW.
  y = num / den
  g = _load_f32(dy_ptr, at_token, tile_in, 0.0) / den                 # [l, cb]
  g_pair = w_pair * g[:, None, :]                                      # [l, l, cb]
  de_pair = g_pair * (v[None, :, :] - y[:, None, :])
  g_bonus = w_bonus * g
  de_bonus = g_bonus * (v - y)
  g_state = w_state * g
  de_state = g_state * (num0[None, :] - y * den0[None, :])
  tl.store(dk_ptr + at_token, _sum(de_pair, axis=0) + de_bonus, mask=tile_in)
  tl.store(dv_ptr + at_token, _sum(g_pair, axis=0) + g_bonus, mask=tile_in)
  tl.store(dnum_ptr + at_chunk, _sum(g_state, axis=0), mask=c_in)
  tl.store(dden_ptr + at_chunk, -_sum(g_state * y, axis=0), mask=c_in)
  tl.store(dmax_ptr + at_chunk, _sum(de_state, axis=0), mask=c_in)
  dw = _sum(_sum(de_pair * lag, axis=1), axis=0) + _sum(de_state * s[:, None], axis=0)
  tl.store(dw_ptr + at_chunk, -dw, mask=c_in)
  tl.store(du_ptr + at_chunk, _sum(de_bonus, axis=0), mask=c_in)

"""The Triton-language bodies of the sequential-in-kernel WKV, with no JAX import.

The design is that of `sequential.py`, shared with the Pallas kernels: each program owns one batch
row, `block_c` channels and one time segment, and carries the state (n, d, m) in registers
through a loop over its tokens (true sums N = n e^m, D = d e^m). `wkv_triton_seq.py`
launches these kernels through `jax_triton.triton_call` on a GPU or Triton's interpreter on CPU;
`experiments/gpu_compile.py` compiles them for a GPU architecture on any machine.

Forward: every `block_t` tokens the state entering the block is written as a checkpoint
([b, cdiv(t, block_t), c], 1/block_t of the array); the block's tokens are an unrolled
`tl.static_range`, so their loads do not depend on the recurrence and are issued ahead of it.
Backward: blocks are visited last to first; each is recomputed from its checkpoint (the states
before each token kept in registers as tuples) and swept in reverse, carrying the reverse
accumulators alpha = dL/dN, beta = dL/dD as (a, b, r) with alpha = a e^r, beta = b e^r, and the
cotangent of the final max exponent along the argmax chain of m_t = max(m_{t-1} - w, k_t).
Every merge of two scaled terms costs one exponential, as one of the two factors is 1.

Time segments: with several segments per row, a summary kernel first gives each segment's effect
alone (forward: its end state from empty; backward: its alpha, beta at its start from zero, and
whether the max chain passes through it), and the main kernel of segment j folds the summaries of
the segments before it (forward) or after it (backward) in a loop before running its own tokens.
Segments are whole checkpoint blocks; only the last may be short.

Arguments follow jax-triton's convention: inputs, then integer scalars, then outputs, then
constexprs. Arrays are row-major and contiguous: k[b, t, c] at (b * seq_len + t) * channels + c,
checkpoints [b, n, c] at (b * num_blocks + block) * channels + c, per-segment values [b, s, c]
and state [b, c] likewise. Tokens past seq_len and channels past `channels` are masked.

Shapes: cb = block_c.
"""

import triton
import triton.language as tl

# Exponent of "nothing": rwkv_jax.wkv.EMPTY_MAX_EXP (a constexpr: kernels read only constexpr
# globals). exp(MASKED - anything finite) == 0, without inf - inf.
MASKED = tl.constexpr(-1e38)


def grid(batch: int, channels: int, segments: int, block_c: int) -> tuple[int, int, int]:
  """The launch grid: (batch, channel blocks, segments)."""
  return batch, triton.cdiv(channels, block_c), segments


@triton.jit
def _factors(p1, p2):
  """(f1, f2, p) with p = max(p1, p2), f_i = e^{p_i - p}: one exponential, the other factor is 1.

  Ties and p1 == p2 == MASKED give (1, 1).
  """
  first = p1 >= p2
  e = tl.exp(-tl.abs(p1 - p2))
  return tl.where(first, 1.0, e), tl.where(first, e, 1.0), tl.maximum(p1, p2)


@triton.jit
def _merge(a1, b1, p1, a2, b2, p2):
  """(a, b, p) with e^p (a, b) = e^p1 (a1, b1) + e^p2 (a2, b2) (rwkv_jax.wkv.merge)."""
  f1, f2, p = _factors(p1, p2)
  return f1 * a1 + f2 * a2, f1 * b1 + f2 * b2, p


@triton.jit
def _program(channels, block_c: tl.constexpr):
  """This program's batch row (int64), channels and their mask."""
  c = tl.program_id(1) * block_c + tl.arange(0, block_c)
  return tl.program_id(0).to(tl.int64), c, c < channels


@triton.jit
def _load_f32(ptr, offsets, mask, other):
  return tl.load(ptr + offsets, mask=mask, other=other).to(tl.float32)


@triton.jit
def _num_blocks(seq_len, block_t: tl.constexpr):
  # Not tl.cdiv: that is a @triton.jit function of triton.language, compiled or interpreted as
  # `triton` was first imported, and this module also runs in the interpreter (triton_launch.py).
  return (seq_len + block_t - 1) // block_t


@triton.jit
def _segment(seg, seq_len, seg_blocks, block_t: tl.constexpr):
  """Checkpoint blocks [first, last) of segment `seg`, and its number of tokens."""
  num_blocks = _num_blocks(seq_len, block_t)
  first = seg * seg_blocks
  last = tl.minimum(first + seg_blocks, num_blocks)
  length = tl.minimum(seq_len, last * block_t) - first * block_t
  return first, last, length


@triton.jit
def _load_block(ptr, row, blk, c, c_in, seq_len, channels, block_t: tl.constexpr):
  """The token rows of checkpoint block `blk` in `ptr`, float32, as a tuple (0 past the end).

  Kernel arguments may alias for all the compiler knows, so a load is not moved above an earlier
  store: a block's rows are requested together, ahead of the steps (and stores) that use them.
  """
  rows = ()
  for s in tl.static_range(block_t):
    t = blk * block_t + s
    rows = rows + (_load_f32(ptr, (row * seq_len + t) * channels + c, c_in & (t < seq_len), 0.0),)
  return rows


@triton.jit
def _forward_blocks(n, d, m, w, u, k_ptr, v_ptr, y_ptr, ckpt_n_ptr, ckpt_d_ptr, ckpt_m_ptr, row,
                    c, c_in, seq_len, channels, first, last, block_t: tl.constexpr,
                    write: tl.constexpr):
  """Runs blocks [first, last) from state (n, d, m); writes y and checkpoints if `write`."""
  num_blocks = _num_blocks(seq_len, block_t)
  ks = _load_block(k_ptr, row, first, c, c_in, seq_len, channels, block_t)
  vs = _load_block(v_ptr, row, first, c, c_in, seq_len, channels, block_t)
  for blk in range(first, last):
    # The next block's keys and values are in flight while this block's dependent steps run.
    ks_next = _load_block(k_ptr, row, blk + 1, c, c_in, seq_len, channels, block_t)
    vs_next = _load_block(v_ptr, row, blk + 1, c, c_in, seq_len, channels, block_t)
    if write:
      at_ckpt = (row * num_blocks + blk) * channels + c
      tl.store(ckpt_n_ptr + at_ckpt, n, mask=c_in)
      tl.store(ckpt_d_ptr + at_ckpt, d, mask=c_in)
      tl.store(ckpt_m_ptr + at_ckpt, m, mask=c_in)
    for s in tl.static_range(block_t):
      t = blk * block_t + s
      valid = t < seq_len
      k, v = ks[s], vs[s]
      if write:
        y_num, y_den, _ = _merge(n, d, m, v, 1.0, u + k)
        tl.store(y_ptr + (row * seq_len + t) * channels + c,
                 (y_num / y_den).to(y_ptr.dtype.element_ty), mask=c_in & valid)
      n_next, d_next, m_next = _merge(n, d, m - w, v, 1.0, k)
      # Tokens past the end leave the state as it is.
      n = tl.where(valid, n_next, n)
      d = tl.where(valid, d_next, d)
      m = tl.where(valid, m_next, m)
    ks, vs = ks_next, vs_next
  return n, d, m


@triton.jit
def wkv_seq_summary_kernel(w_ptr, k_ptr, v_ptr, seq_len, channels, seg_blocks, num_segs,
                           sum_n_ptr, sum_d_ptr, sum_m_ptr, block_t: tl.constexpr,
                           block_c: tl.constexpr):
  """Forward, several segments: the state each segment leaves from an empty one.

  The grid's third axis runs over segments 0 .. num_segs - 2 (the last one's is never needed).
  """
  row, c, c_in = _program(channels, block_c)
  seg = tl.program_id(2)
  w = _load_f32(w_ptr, c, c_in, 1.0)
  zero = tl.full([block_c], 0.0, tl.float32)
  first, last, _ = _segment(seg, seq_len, seg_blocks, block_t)
  n, d, m = _forward_blocks(zero, zero, zero + MASKED, w, w, k_ptr, v_ptr, k_ptr, w_ptr, w_ptr,
                            w_ptr, row, c, c_in, seq_len, channels, first, last, block_t, False)
  at_seg = (row * num_segs + seg) * channels + c
  tl.store(sum_n_ptr + at_seg, n, mask=c_in)
  tl.store(sum_d_ptr + at_seg, d, mask=c_in)
  tl.store(sum_m_ptr + at_seg, m, mask=c_in)


@triton.jit
def wkv_seq_forward_kernel(w_ptr, u_ptr, k_ptr, v_ptr, num0_ptr, den0_ptr, max0_ptr, sum_n_ptr,
                           sum_d_ptr, sum_m_ptr, seq_len, channels, seg_blocks, num_segs, y_ptr,
                           ckpt_n_ptr, ckpt_d_ptr, ckpt_m_ptr, num_ptr, den_ptr, max_ptr,
                           block_t: tl.constexpr, block_c: tl.constexpr):
  """Forward: y, the checkpoints of this segment's blocks and (last segment) the final state.

  The state entering segment j is the incoming state with the summaries of segments 0 .. j-1
  folded in (sum_*: [b, num_segs, c], unread with one segment).
  """
  row, c, c_in = _program(channels, block_c)
  seg = tl.program_id(2)
  w = _load_f32(w_ptr, c, c_in, 1.0)
  u = _load_f32(u_ptr, c, c_in, 0.0)
  at_state = row * channels + c
  n = _load_f32(num0_ptr, at_state, c_in, 0.0)
  d = _load_f32(den0_ptr, at_state, c_in, 0.0)
  m = _load_f32(max0_ptr, at_state, c_in, MASKED)
  for i in range(0, seg):
    _, _, length = _segment(i, seq_len, seg_blocks, block_t)
    at_seg = (row * num_segs + i) * channels + c
    n, d, m = _merge(n, d, m - length.to(tl.float32) * w, _load_f32(sum_n_ptr, at_seg, c_in, 0.0),
                     _load_f32(sum_d_ptr, at_seg, c_in, 0.0),
                     _load_f32(sum_m_ptr, at_seg, c_in, MASKED))
  first, last, _ = _segment(seg, seq_len, seg_blocks, block_t)
  n, d, m = _forward_blocks(n, d, m, w, u, k_ptr, v_ptr, y_ptr, ckpt_n_ptr, ckpt_d_ptr,
                            ckpt_m_ptr, row, c, c_in, seq_len, channels, first, last, block_t,
                            True)
  final = c_in & (seg == num_segs - 1)
  tl.store(num_ptr + at_state, n, mask=final)
  tl.store(den_ptr + at_state, d, mask=final)
  tl.store(max_ptr + at_state, m, mask=final)


@triton.jit
def _backward_blocks(a, b, r, g_max, w, u, k_ptr, v_ptr, dy_ptr, ckpt_n_ptr, ckpt_d_ptr,
                     ckpt_m_ptr, dk_ptr, dv_ptr, row, c, c_in, seq_len, channels, first, last,
                     block_t: tl.constexpr, block_c: tl.constexpr, write: tl.constexpr):
  """The reverse sweep over blocks last-1 .. first, each recomputed from its checkpoint.

  Carries (a, b, r): alpha = dL/dN_t = a e^r and beta = dL/dD_t = b e^r after the current token,
  and g_max, the cotangent of the running max exponent m_t beyond its role as the sums' scale.
  Writes dk, dv if `write`; returns the carries and this range's sums of dL/dw and dL/du.
  """
  num_blocks = _num_blocks(seq_len, block_t)
  dw = tl.full([block_c], 0.0, tl.float32)
  du = tl.full([block_c], 0.0, tl.float32)
  for i in range(0, last - first):
    blk = last - 1 - i
    at_ckpt = (row * num_blocks + blk) * channels + c
    n = _load_f32(ckpt_n_ptr, at_ckpt, c_in, 0.0)
    d = _load_f32(ckpt_d_ptr, at_ckpt, c_in, 0.0)
    m = _load_f32(ckpt_m_ptr, at_ckpt, c_in, MASKED)
    ks = _load_block(k_ptr, row, blk, c, c_in, seq_len, channels, block_t)
    vs = _load_block(v_ptr, row, blk, c, c_in, seq_len, channels, block_t)
    # The state before each token of the block stays in registers, with its key and value. (dy
    # is loaded token by token below: holding the block's dy too would spill on sm_80.)
    ns, ds, ms = (), (), ()
    for s in tl.static_range(block_t):
      valid = blk * block_t + s < seq_len
      k, v = ks[s], vs[s]
      ns, ds, ms = ns + (n,), ds + (d,), ms + (m,)
      n_next, d_next, m_next = _merge(n, d, m - w, v, 1.0, k)
      n = tl.where(valid, n_next, n)
      d = tl.where(valid, d_next, d)
      m = tl.where(valid, m_next, m)
    for s in tl.static_range(block_t - 1, -1, -1):
      t = blk * block_t + s
      valid = t < seq_len
      at = (row * seq_len + t) * channels + c
      n, d, m, k, v = ns[s], ds[s], ms[s], ks[s], vs[s]
      g = _load_f32(dy_ptr, at, c_in & valid, 0.0)
      # Output: Z = D + e^{u+k} = z e^p, y = (N + e^{u+k} v) / Z; f_now = e^{u+k-p}.
      f_state, f_now, p = _factors(m, u + k)
      z = f_state * d + f_now
      y = (f_state * n + f_now * v) / z
      g_z = g / z
      dv_out = g_z * f_now                              # dL/dv through y
      dk_out = dv_out * (v - y)                         # dL/dk through y (= dL/du)
      # Update: N_t = e^{-w} N_{t-1} + e^{k} v; m_t = max(m - w, k). alpha e^{m_t} <= |a| as
      # r <= -m_t, so e^{k + r} = g_new e^{m_t + r} and e^{m - w + r} = g_old e^{m_t + r}.
      g_old, g_new, m_t = _factors(m - w, k)
      scale = tl.exp(m_t + r)
      dk = dk_out + g_new * scale * (a * v + b)
      dv = dv_out + g_new * scale * a
      dw_t = -(a * n + b * d) * g_old * scale
      # The max path: into k where k_t set m_t (and it stops there), else into w and on.
      state_won = m - w >= k
      dk += tl.where(state_won, 0.0, g_max)
      dw_t -= tl.where(state_won, g_max, 0.0)
      if write:
        tl.store(dk_ptr + at, dk.to(dk_ptr.dtype.element_ty), mask=c_in & valid)
        tl.store(dv_ptr + at, dv.to(dv_ptr.dtype.element_ty), mask=c_in & valid)
      dw += tl.where(valid, dw_t, 0.0)
      du += tl.where(valid, dk_out, 0.0)
      # alpha_{t-1} = g / Z + e^{-w} alpha_t, beta_{t-1} = -g y / Z + e^{-w} beta_t.
      a_prev, b_prev, r_prev = _merge(g_z, -g_z * y, -p, a, b, r - w)
      a = tl.where(valid, a_prev, a)
      b = tl.where(valid, b_prev, b)
      r = tl.where(valid, r_prev, r)
      g_max = tl.where(valid & state_won, g_max, tl.where(valid, 0.0, g_max))
  return a, b, r, g_max, dw, du


@triton.jit
def wkv_seq_backward_summary_kernel(w_ptr, u_ptr, k_ptr, v_ptr, dy_ptr, ckpt_n_ptr, ckpt_d_ptr,
                                    ckpt_m_ptr, seq_len, channels, seg_blocks, num_segs,
                                    sum_a_ptr, sum_b_ptr, sum_r_ptr, sum_pass_ptr,
                                    block_t: tl.constexpr, block_c: tl.constexpr):
  """Backward, several segments: each segment's alpha, beta at its start from zero at its end,
  and 1 where the max chain crosses the whole segment (0 where some k_t set it).

  The grid's third axis runs over segments 1 .. num_segs - 1 (segment 0's is never needed).
  """
  row, c, c_in = _program(channels, block_c)
  seg = tl.program_id(2) + 1
  w = _load_f32(w_ptr, c, c_in, 1.0)
  u = _load_f32(u_ptr, c, c_in, 0.0)
  zero = tl.full([block_c], 0.0, tl.float32)
  first, last, _ = _segment(seg, seq_len, seg_blocks, block_t)
  a, b, r, passes, _, _ = _backward_blocks(
      zero, zero, zero + MASKED, zero + 1.0, w, u, k_ptr, v_ptr, dy_ptr, ckpt_n_ptr, ckpt_d_ptr,
      ckpt_m_ptr, k_ptr, v_ptr, row, c, c_in, seq_len, channels, first, last, block_t, block_c,
      False)
  at_seg = (row * num_segs + seg) * channels + c
  tl.store(sum_a_ptr + at_seg, a, mask=c_in)
  tl.store(sum_b_ptr + at_seg, b, mask=c_in)
  tl.store(sum_r_ptr + at_seg, r, mask=c_in)
  tl.store(sum_pass_ptr + at_seg, passes, mask=c_in)


@triton.jit
def wkv_seq_backward_kernel(w_ptr, u_ptr, k_ptr, v_ptr, dy_ptr, ckpt_n_ptr, ckpt_d_ptr,
                            ckpt_m_ptr, num0_ptr, den0_ptr, max0_ptr, num_ptr, den_ptr, max_ptr,
                            dnum_ptr, dden_ptr, dmax_ptr, sum_a_ptr, sum_b_ptr, sum_r_ptr,
                            sum_pass_ptr, seq_len, channels, seg_blocks, num_segs, dk_ptr, dv_ptr,
                            dw_ptr, du_ptr, dnum0_ptr, dden0_ptr, dmax0_ptr,
                            block_t: tl.constexpr, block_c: tl.constexpr):
  """Backward: dk, dv of this segment's tokens, its parts of dw, du ([b, num_segs, c]) and
  (segment 0) the incoming state's gradients.

  (num, den, max) is the final state and (dnum, dden, dmax) its cotangent; the reverse summaries
  of the segments after this one (sum_*, unread with one segment) are folded in first.
  """
  row, c, c_in = _program(channels, block_c)
  seg = tl.program_id(2)
  w = _load_f32(w_ptr, c, c_in, 1.0)
  u = _load_f32(u_ptr, c, c_in, 0.0)
  at_state = row * channels + c
  # L(n_T, d_T, m_T) with n_T = N_T e^{-m_T}: alpha_T = dn_T e^{-m_T}, and m_T's own cotangent
  # is what is left of dm_T once the rescaling of n_T and d_T is accounted for.
  a = _load_f32(dnum_ptr, at_state, c_in, 0.0)
  b = _load_f32(dden_ptr, at_state, c_in, 0.0)
  m_final = _load_f32(max_ptr, at_state, c_in, 0.0)
  g_max = (_load_f32(dmax_ptr, at_state, c_in, 0.0)
           - a * _load_f32(num_ptr, at_state, c_in, 0.0)
           - b * _load_f32(den_ptr, at_state, c_in, 0.0))
  r = -m_final
  for i in range(0, num_segs - 1 - seg):
    later = num_segs - 1 - i
    _, _, length = _segment(later, seq_len, seg_blocks, block_t)
    at_seg = (row * num_segs + later) * channels + c
    a, b, r = _merge(_load_f32(sum_a_ptr, at_seg, c_in, 0.0),
                     _load_f32(sum_b_ptr, at_seg, c_in, 0.0),
                     _load_f32(sum_r_ptr, at_seg, c_in, MASKED), a, b,
                     r - length.to(tl.float32) * w)
    g_max = g_max * _load_f32(sum_pass_ptr, at_seg, c_in, 0.0)
  first, last, _ = _segment(seg, seq_len, seg_blocks, block_t)
  a, b, r, g_max, dw, du = _backward_blocks(
      a, b, r, g_max, w, u, k_ptr, v_ptr, dy_ptr, ckpt_n_ptr, ckpt_d_ptr, ckpt_m_ptr, dk_ptr,
      dv_ptr, row, c, c_in, seq_len, channels, first, last, block_t, block_c, True)
  at_seg = (row * num_segs + seg) * channels + c
  tl.store(dw_ptr + at_seg, dw, mask=c_in)
  tl.store(du_ptr + at_seg, du, mask=c_in)
  # N_0 = n_0 e^{m_0}: dn_0 = alpha_0 e^{m_0}, dm_0 = alpha_0 N_0 + beta_0 D_0 + the max path.
  n0 = _load_f32(num0_ptr, at_state, c_in, 0.0)
  d0 = _load_f32(den0_ptr, at_state, c_in, 0.0)
  scale = tl.exp(_load_f32(max0_ptr, at_state, c_in, MASKED) + r)
  first_seg = c_in & (seg == 0)
  tl.store(dnum0_ptr + at_state, a * scale, mask=first_seg)
  tl.store(dden0_ptr + at_state, b * scale, mask=first_seg)
  tl.store(dmax0_ptr + at_state, (a * n0 + b * d0) * scale + g_max, mask=first_seg)

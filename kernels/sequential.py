"""The sequential-in-kernel WKV shared by the GPU and TPU backends, with its custom VJP.

Each program owns a block of channels of one batch row (and, for long sequences on few rows, one
time segment) and walks its tokens in order, carrying the state (n, d, m) in registers, where
N = n e^m and D = d e^m are the true sums of eq. 16. Per token the two merges of
`rwkv_jax.wkv.merge` cost one exponential each, since one of the two factors is always 1:

  output:  e = exp(-|m - (u + k_t)|); (a, b) = (1, e) if m >= u + k_t else (e, 1)
           y_t = (a n + b v_t) / (a d + b)
  update:  the same with m - w against k_t, then n = a n + b v_t, d = a d + b,
           m = max(m - w, k_t).

Forward: every `block_t` tokens the program writes a checkpoint, the state before that block
([b, ceil(t / block_t), c] float32, 1/block_t of the array), and at the end the final state. Tokens
past t are never visited, so nothing is padded in time.

Backward: blocks are walked from last to first; each is recomputed from its checkpoint (block_t
forward steps, kept in registers or a small scratch) and then swept in reverse, carrying
alpha = dL/dN and beta = dL/dD as (a~, b~) e^{-q} with their own exponent q:

  alpha_{t-1} = g_t / Z_t + e^{-w} alpha_t,  beta_{t-1} = -g_t y_t / Z_t + e^{-w} beta_t,

with Z_t = D_{t-1} + e^{u + k_t} = z_t e^{p_t}, p_t = max(m_{t-1}, u + k_t); each step merges the
two terms with one exponential. dk_t and dv_t come out once, in k's dtype; dw and du are summed
per program and reduced once outside. The loss may read max_exp itself: the part of its cotangent
that is not a rescaling of (num, den) follows the chain of maxima m_t = max(m_{t-1} - w, k_t)
backwards, into dk at the token that set it, or into dw and on to the incoming state.

Time segments: when batch x channel blocks is too few programs for the device, the sequence is cut
into segments (`num_segments`). The forward then runs twice: a pass giving each segment's own
final state (from the empty state), and a pass in which each program first folds the summaries of
the segments before its own (and the incoming state) in a loop, then runs its segment. The
backward likewise: each segment's reverse summary, then the fold and the sweep. A backend supplies
both directions as a `SeqKernels`; this module owns the custom VJP and the choice of segments.

Shapes: b = batch, t = time, c = channels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# Streaming multiprocessors of the GPUs the rule knows, by a substring of jax's device_kind.
_GPU_CORES = {"H100": 132, "H200": 132, "H800": 132, "GH200": 132, "B200": 148, "A100": 108,
              "A800": 108, "A10": 72, "L40": 142, "L4": 58, "V100": 80, "MI300": 304}
# Unknown devices (and exports from a CPU machine) are planned for an H100-class GPU.
_DEFAULT_CORES = 132
# Programs per core the rule aims for: with one warp per program, two per core already hide part
# of the latency of the loop's dependent steps; more segments cost a second pass over k, v.
PROGRAMS_PER_CORE = 2
# Shortest segment worth a second pass: below this the fold and the second kernel dominate.
MIN_SEGMENT = 256


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the sequential kernels (block_t and block_c powers of two, as Triton needs)."""

  block_t: int = 16  # Tokens between checkpoints: the backward recomputes this many at a time.
  block_c: int = 32  # Channels per program (clipped to C rounded up to a power of two).
  num_warps: int = 1  # One channel per thread at block_c=32, as in the official CUDA kernel.
  num_stages: int = 1
  num_segments: int | None = None  # Time segments; None: `num_segments` chooses.

  def __post_init__(self):
    for name in ("block_t", "block_c"):
      size = getattr(self, name)
      if size < 1 or size & (size - 1):
        raise ValueError(f"BlockSizes.{name}={size} must be a power of two.")
    if self.num_segments is not None and self.num_segments < 1:
      raise ValueError(f"BlockSizes.num_segments={self.num_segments} must be >= 1 (or None).")

  def fit(self, channels: int) -> BlockSizes:
    """block_c no larger than `channels` rounded up to a power of two."""
    rounded = 1 << (max(channels, 1) - 1).bit_length()
    return dataclasses.replace(self, block_c=min(self.block_c, rounded))


def device_cores(device_kind_or_cores: str | int | None) -> int:
  """Cores (SMs) of a device given as jax's device_kind, a count, or None (unknown)."""
  if isinstance(device_kind_or_cores, int):
    return max(1, device_kind_or_cores)
  kind = (device_kind_or_cores or "").upper()
  # Longest names first, so that "L40" is not read as "L4".
  for name in sorted(_GPU_CORES, key=len, reverse=True):
    if name in kind:
      return _GPU_CORES[name]
  return _DEFAULT_CORES


def num_segments(b: int, t: int, c: int, block_c: int,
                 device_kind_or_cores: str | int | None = None) -> int:
  """Time segments for a [b, t, c] WKV: 1 unless batch x channel blocks leaves cores idle.

  Then as many as bring the programs to PROGRAMS_PER_CORE per core, with segments of at least
  MIN_SEGMENT tokens.
  """
  programs = b * -(-c // block_c)
  want = -(-PROGRAMS_PER_CORE * device_cores(device_kind_or_cores) // programs)
  if programs >= device_cores(device_kind_or_cores) or want <= 1:
    return 1
  return max(1, min(want, t // MIN_SEGMENT))


def segment_length(t: int, segments: int, block_t: int) -> int:
  """Tokens per segment: whole checkpoint blocks, the last segment taking the rest."""
  blocks = -(-t // block_t)
  return -(-blocks // max(1, segments)) * block_t


class SeqKernels(NamedTuple):
  """The two directions of one backend; all state tensors float32 [b, c]."""

  # (w, u, k, v, num0, den0, max0) -> (y, (num_t, den_t, max_t), residuals): y in k's dtype,
  # residuals whatever the backward needs (the checkpoints).
  forward: Callable[..., tuple[Array, tuple[Array, Array, Array], Any]]
  # (w, u, k, v, num0, den0, max0, residuals, (num_t, den_t, max_t), dy, dnum_t, dden_t, dmax_t)
  # -> (dw, du, dk, dv, dnum0, dden0, dmax0): dw, du float32 [c], dk, dv in k's dtype.
  backward: Callable[..., tuple[Array, ...]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def sequential_wkv(kernels: SeqKernels, w, u, k, v, num0, den0, max0):
  """y and the final (num, den, max_exp) of k, v from the state (num0, den0, max0)."""
  y, final, _ = kernels.forward(w, u, k, v, num0, den0, max0)
  return (y, *final)


def _sequential_wkv_fwd(kernels, w, u, k, v, num0, den0, max0):
  y, final, residuals = kernels.forward(w, u, k, v, num0, den0, max0)
  return (y, *final), (w, u, k, v, num0, den0, max0, residuals, final)


def _sequential_wkv_bwd(kernels, saved, cotangents):
  w, u, k, v, num0, den0, max0, residuals, final = saved
  return tuple(kernels.backward(w, u, k, v, num0, den0, max0, residuals, final, *cotangents))


sequential_wkv.defvjp(_sequential_wkv_fwd, _sequential_wkv_bwd)


# ----------------------------------------------------------------------------------------------
# The per-token arithmetic, in jnp on [c]-shaped values, shared by every backend's kernel body.


def merge(a1, b1, p1, a2, b2, p2):
  """`rwkv_jax.wkv.merge` with one exponential: the factor of the larger exponent is 1."""
  first = p1 >= p2
  e = jnp.exp(-jnp.abs(p1 - p2))
  f1, f2 = jnp.where(first, 1.0, e), jnp.where(first, e, 1.0)
  return f1 * a1 + f2 * a2, f1 * b1 + f2 * b2, jnp.maximum(p1, p2)


def update(n, d, m, w, k, v):
  """The state after one token (decay by e^{-w}, add e^k (v, 1))."""
  return merge(n, d, m - w, v, 1.0, k)


def forward_step(n, d, m, w, u, k, v):
  """y_t (eq. 16: the state plus the token with its bonus) and the state after the token."""
  num, den, _ = merge(n, d, m, v, 1.0, u + k)
  return num / den, update(n, d, m, w, k, v)


def reverse_init(num_t, den_t, max_t, dnum_t, dden_t, dmax_t):
  """The reverse carry at the end: alpha = dL/dN = dnum e^{-max}, beta likewise, as (a, b, r) with
  alpha = a e^r, and gm, the cotangent of max_exp that is not a rescaling of num and den."""
  return dnum_t, dden_t, -max_t, dmax_t - dnum_t * num_t - dden_t * den_t


def reverse_step(n, d, m, w, u, k, v, g, a, b, r, gm):
  """One token of the backward, from the state (n, d, m) before it and the carry after it.

  (a, b, r): alpha_t = a e^r and beta_t = b e^r, the cotangents of the true sums after the token;
  gm: the max path's cotangent of m_t; g = dL/dy_t.

  Returns:
    dk_t, dv_t, the token's terms of du and dw, and the carry before the token.
  """
  # The output: p = max(m, u + k), Z = z e^p, fb = e^{u + k - p}.
  first = m >= u + k
  e = jnp.exp(-jnp.abs(m - (u + k)))
  fa, fb = jnp.where(first, 1.0, e), jnp.where(first, e, 1.0)
  z = fa * d + fb
  y = (fa * n + fb * v) / z
  gz = g * fb / z                                   # g e^{u + k} / Z
  du = gz * (v - y)
  # The update: m_t = max(m - w, k); e^{m - w - m_t}, e^{k - m_t}; ties go to the state, as in
  # `update`.
  k_wins = k > m - w
  e = jnp.exp(-jnp.abs((m - w) - k))
  fs, fk = jnp.where(k_wins, e, 1.0), jnp.where(k_wins, 1.0, e)
  s = jnp.exp(jnp.maximum(m - w, k) + r)            # e^{m_t + r} <= 1 (r <= -m_t)
  dk = du + s * fk * (a * v + b) + jnp.where(k_wins, gm, 0.0)
  dv = gz + s * fk * a
  dw = -s * fs * (a * n + b * d) - jnp.where(k_wins, 0.0, gm)
  gm = jnp.where(k_wins, 0.0, gm)
  # alpha_{t-1} = g / Z + e^{-w} alpha_t, beta_{t-1} = -g y / Z + e^{-w} beta_t.
  a, b, r = merge(g / z, -g * y / z, -jnp.maximum(m, u + k), a, b, r - w)
  return dk, dv, du, dw, (a, b, r, gm)


def state_cotangents(num0, den0, max0, a, b, r, gm):
  """dL/d(num0, den0, max0) from the carry before the first token."""
  scale = jnp.exp(r + max0)                         # <= 1 (r <= -max0)
  return a * scale, b * scale, scale * (a * num0 + b * den0) + gm

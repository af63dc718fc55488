"""The chunked WKV algorithm shared by the Pallas and the Triton kernels, with its custom VJP.

The sequential recurrence is cut into chunks of `block_t` tokens. Within a chunk every output is
an explicit sum over at most `block_t` earlier tokens of the same chunk plus the state carried in,
so each chunk is independent once its incoming state is known:

  1. summary: for every chunk in parallel, the state the chunk alone leaves behind (started
     empty), as (num, den, max_exp) with the max-exponent trick.
  2. chaining (here, plain JAX): the chunk summaries are combined with the monoid
     `rwkv_jax.wkv.combine` by a `lax.associative_scan` over the chunk axis, giving the state
     entering each chunk and the final state. It touches 1/block_t of the data.
  3. output: for every chunk in parallel, y_t = (state term + sum over earlier tokens of the chunk
     + bonus term) / (same with ones), each row shifted by its own maximum exponent.

The backward pass runs two more kernels with the hand-derived gradients of steps 3 and 1
(output_bwd, summary_bwd); step 2 is differentiated by JAX. A backend supplies the four kernels
as a `ChunkKernels`; the arrays they see are [b, t, c] tokens and [b, n, c] per-chunk values
(n = cdiv(t, block_t)), either padded to whole tiles (Pallas) or masked inside the kernel (Triton).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from rwkv_jax import wkv as wkv_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of both backends: block_t and block_c must be powers of two (Triton's block shapes)."""

  block_t: int = 16  # Tokens per chunk: each token costs O(block_t) exps.
  block_c: int = 32  # Channels per program (clipped to C rounded up to a power of two).
  num_warps: int = 4
  num_stages: int = 1

  def __post_init__(self):
    for name in ("block_t", "block_c"):
      size = getattr(self, name)
      if size < 1 or size & (size - 1):
        raise ValueError(f"BlockSizes.{name}={size} must be a power of two.")

  def fit(self, channels: int) -> BlockSizes:
    """block_c no larger than `channels` rounded up to a power of two."""
    rounded = 1 << (max(channels, 1) - 1).bit_length()
    return dataclasses.replace(self, block_c=min(self.block_c, rounded))


def interpret_off_gpu(interpret: bool | None) -> bool:
  """A GPU kernel's `interpret` argument: None means "only if JAX runs on CPU".

  An interpreter never runs unasked on an accelerator: on a TPU this is an error that names the
  TPU kernel.
  """
  if interpret is None:
    backend = jax.default_backend()
    if backend not in ("cpu", "gpu", "cuda", "rocm"):
      raise ValueError(
          f"This WKV kernel is compiled for GPUs and JAX runs on {backend!r}: use "
          "wkv(..., impl='pallas'), which runs rwkv_jax_kernels.wkv_pallas_tpu_seq on TPUs, or "
          "impl='associative'; pass interpret=True to run this kernel's interpreter anyway.")
    return backend == "cpu"
  return interpret


class ChunkKernels(NamedTuple):
  """The four kernels of one backend (see the module docstring for what each computes)."""

  # (k, v, w) -> (num, den, max_exp), each float32 [b, n, c].
  summary: Callable[..., tuple[Array, Array, Array]]
  # (num_in, den_in, max_in, k, v, w, u) -> y [b, t, c] in k's dtype; *_in the state entering
  # each chunk, [b, n, c].
  output: Callable[..., Array]
  # (num_in, den_in, max_in, k, v, w, u, dy) -> (dk, dv, (dnum_in, dden_in, dmax_in), dw, du);
  # dk, dv float32 [b, t, c]; dw, du float32 [b, n, c] per-chunk partial sums.
  output_bwd: Callable[..., tuple[Any, ...]]
  # (k, v, w, dnum, dden, dmax, dk_in, dv_in) -> (dk, dv, dw): the summary's gradients plus
  # dk_in, dv_in; dk, dv in k's dtype, dw float32 [b, n, c].
  summary_bwd: Callable[..., tuple[Array, Array, Array]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def chunked_wkv(kernels: ChunkKernels, block_t: int, seq_len: int, w, u, k, v, num, den, max_exp):
  """y and the final (num, den, max_exp) of the first `seq_len` tokens of k, v."""
  y, final, _ = _forward(kernels, block_t, seq_len, w, u, k, v, num, den, max_exp)
  return (y, *final)


def _forward(kernels, block_t, seq_len, w, u, k, v, num, den, max_exp):
  summary = kernels.summary(k, v, w)
  incoming, final = chain_chunks(summary, (num, den, max_exp), w, seq_len, block_t)
  y = kernels.output(*incoming, k, v, w, u)
  return y, final, (summary, incoming)


def _chunked_wkv_fwd(kernels, block_t, seq_len, w, u, k, v, num, den, max_exp):
  y, final, (summary, incoming) = _forward(
      kernels, block_t, seq_len, w, u, k, v, num, den, max_exp)
  return (y, *final), (w, u, k, v, (num, den, max_exp), summary, incoming)


def _chunked_wkv_bwd(kernels, block_t, seq_len, residuals, cotangents):
  w, u, k, v, state, summary, incoming = residuals
  dy, *dfinal = cotangents
  # Step 3 backward: gradients of the outputs, including those w.r.t. each chunk's incoming state.
  dk_out, dv_out, dincoming, dw_out, du_out = kernels.output_bwd(*incoming, k, v, w, u, dy)
  # Step 2 backward: through the chaining, by JAX.
  _, chain_vjp = jax.vjp(
      lambda s, s0, w_: chain_chunks(s, s0, w_, seq_len, block_t), summary, state, w)
  dsummary, dstate, dw_chain = chain_vjp((dincoming, tuple(dfinal)))
  # Step 1 backward, adding the step-3 gradients of k and v in the same pass.
  dk, dv, dw_summary = kernels.summary_bwd(k, v, w, *dsummary, dk_out, dv_out)
  dw = dw_chain + dw_out.sum((0, 1)) + dw_summary.sum((0, 1))
  return (dw, du_out.sum((0, 1)), dk, dv, *dstate)


chunked_wkv.defvjp(_chunked_wkv_fwd, _chunked_wkv_bwd)


def chain_chunks(summary, state, w, seq_len: int, block_t: int):
  """Step 2: the states entering each chunk ([b, n, c] x 3) and the final state ([b, c] x 3)."""
  num, den, max_exp = summary
  n = num.shape[1]
  # Chunks wholly past seq_len (a backend's padding to whole tiles) last zero steps.
  chunk_len = jnp.clip(seq_len - block_t * jnp.arange(n), 0, block_t).astype(jnp.float32)
  log_decay = jnp.broadcast_to(-chunk_len[None, :, None] * w, num.shape)
  num, den, max_exp, decay = jax.lax.associative_scan(
      wkv_lib.combine, (num, den, max_exp, log_decay), axis=1)
  s0 = [s[:, None, :] for s in state]
  after = wkv_lib.merge(s0[0], s0[1], s0[2] + decay, num, den, max_exp)
  incoming = tuple(jnp.concatenate([s, x[:, :-1]], axis=1) for s, x in zip(s0, after))
  final = tuple(x[:, -1] for x in after)
  return incoming, final

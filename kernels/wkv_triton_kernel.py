"""The Triton-language body of the WKV forward kernel, with no JAX import.

`wkv_triton.py` launches it through `jax_triton.triton_call`. Keeping the kernel apart lets it be
compiled for a GPU architecture (`rwkv_jax_kernels.gpu_compile`) and run in Triton's interpreter
on CPU, neither of which needs a GPU build of JAX.

One program per (batch row, block of `block_c` channels) walks the sequence in order, keeping the
float32 state (num, den, max_exp) in registers and applying the same two log-space merges as
`rwkv_jax.wkv.wkv_step` per token.

Arguments follow jax-triton's convention (inputs, then scalars, then outputs, then constexprs).
Arrays are row-major and contiguous: k[b, t, c] is at (b * seq_len + t) * channels + c; the state
tensors are [b, channels]. Launch grid: (b, cdiv(channels, block_c)).
"""

import triton
import triton.language as tl

# rwkv_jax.wkv.EMPTY_MAX_EXP, the max exponent of an empty state (a constexpr: Triton kernels may
# only read constexpr globals).
EMPTY_MAX_EXP = tl.constexpr(-1e38)

# Default launch: channels per program (a power of two) and warps per program.
BLOCK_C = 32
NUM_WARPS = 1


def grid(batch: int, channels: int, block_c: int) -> tuple[int, int]:
  """The launch grid of `wkv_forward_kernel`."""
  return batch, triton.cdiv(channels, block_c)


@triton.jit
def wkv_forward_kernel(w_ptr, u_ptr, k_ptr, v_ptr, num_ptr, den_ptr, max_ptr, seq_len, channels,
                       y_ptr, num_out_ptr, den_out_ptr, max_out_ptr,
                       block_c: tl.constexpr):
  row = tl.program_id(0).to(tl.int64)
  c = tl.program_id(1) * block_c + tl.arange(0, block_c)
  in_range = c < channels
  w = tl.load(w_ptr + c, mask=in_range, other=1.0)
  u = tl.load(u_ptr + c, mask=in_range, other=0.0)
  at_state = row * channels + c
  num = tl.load(num_ptr + at_state, mask=in_range, other=0.0)
  den = tl.load(den_ptr + at_state, mask=in_range, other=0.0)
  max_exp = tl.load(max_ptr + at_state, mask=in_range, other=EMPTY_MAX_EXP)
  at_token = row * seq_len * channels + c
  for _ in range(seq_len):
    k = tl.load(k_ptr + at_token, mask=in_range, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + at_token, mask=in_range, other=0.0).to(tl.float32)
    # Readout (eq. 16): the state plus the current token with its bonus.
    bonus = u + k
    shift = tl.maximum(max_exp, bonus)
    e_state = tl.exp(max_exp - shift)
    e_token = tl.exp(bonus - shift)
    y = (e_state * num + e_token * v) / (e_state * den + e_token)
    tl.store(y_ptr + at_token, y.to(y_ptr.dtype.element_ty), mask=in_range)
    # Update: decay the state by e^{-w}, then add the token with weight e^{k}.
    decayed = max_exp - w
    max_exp = tl.maximum(decayed, k)
    e_state = tl.exp(decayed - max_exp)
    e_token = tl.exp(k - max_exp)
    num = e_state * num + e_token * v
    den = e_state * den + e_token
    at_token += channels
  tl.store(num_out_ptr + at_state, num, mask=in_range)
  tl.store(den_out_ptr + at_state, den, mask=in_range)
  tl.store(max_out_ptr + at_state, max_exp, mask=in_range)

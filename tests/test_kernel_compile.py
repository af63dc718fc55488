"""The GPU kernels on a machine without a GPU.

* Both kernels compiled to machine code for sm_80 (A100) and sm_90a (H100/H200): the Pallas
  kernels lowered by JAX to Triton IR and compiled by the `triton` package, the jax-triton kernel
  compiled from its Triton source (`rwkv_jax_kernels.gpu_compile`).
* The Triton kernel's numerics in Triton's interpreter (torch CPU tensors) against the sequential
  scan: odd channel counts, extreme decays and keys, an incoming state, chained calls, bfloat16.
  The Pallas kernels get the same checks in Pallas's interpreter (tests/test_kernels.py).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from triton.runtime import interpreter as triton_interpreter

from rwkv_jax import wkv as wkv_lib
from rwkv_jax.wkv import WKVState
from rwkv_jax_kernels import gpu_compile
from rwkv_jax_kernels import wkv_pallas
from rwkv_jax_kernels import wkv_triton_kernel
from wkv_util import random_inputs, rel_err

_PALLAS_KERNELS = ["wkv_summary", "wkv_output", "wkv_output_bwd", "wkv_summary_bwd"]


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 37, 48), (8, 1024, 768)], ids=["odd", "train"])
def test_pallas_kernels_compile_for_gpu(shape, dtype, arch):
  builds = gpu_compile.compile_wkv_pallas(shape, dtype, arch)
  assert [b.name for b in builds] == _PALLAS_KERNELS
  for build in builds:
    assert build.arch == arch and build.cubin_bytes > 0
    assert 0 < build.registers <= 255 and build.num_warps == wkv_pallas.BlockSizes().num_warps


def test_pallas_block_sizes_reach_the_compiler():
  blocks = wkv_pallas.BlockSizes(block_t=8, block_c=64, num_warps=8)
  builds = gpu_compile.compile_wkv_pallas((1, 100, 200), jnp.float32, 90, blocks)
  assert [b.name for b in builds] == _PALLAS_KERNELS
  assert all(b.num_warps == 8 for b in builds)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_triton_kernel_compiles_for_gpu(dtype, arch):
  build = gpu_compile.compile_wkv_triton(dtype, arch)
  assert build.name == "wkv_forward_kernel" and build.arch == arch and build.cubin_bytes > 0
  # Sequential in time: the state lives in registers, nothing may spill.
  assert build.spill_store_bytes == 0 and build.spill_load_bytes == 0


# ----------------------------------------------------------------------------------------------
# The Triton kernel in Triton's interpreter.


@pytest.fixture(scope="module")
def interpreted_kernel():
  """`wkv_forward_kernel` run by Triton's interpreter.

  Triton 3.6's interpreter turns scalar arguments into 1-element arrays and reads loop bounds
  with int(array), an error since numpy 2.4; while the interpreter runs, `__index__` reads the
  element instead.
  """
  original = triton_interpreter._patch_lang_tensor  # pylint: disable=protected-access

  def patch(tensor, scope):
    original(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

  triton_interpreter._patch_lang_tensor = patch  # pylint: disable=protected-access
  try:
    yield triton_interpreter.InterpretedFunction(wkv_triton_kernel.wkv_forward_kernel.fn)
  finally:
    triton_interpreter._patch_lang_tensor = original  # pylint: disable=protected-access


def _run_interpreted(kernel, w, u, k, v, state, block_c):
  """Launches the kernel as `wkv_triton` does, on torch CPU tensors; returns numpy y and state."""
  b, t, c = k.shape
  torch_dtype = {jnp.dtype(jnp.float32): torch.float32, jnp.dtype(jnp.bfloat16): torch.bfloat16}
  dtype = torch_dtype[jnp.dtype(k.dtype)]
  f32 = lambda x: torch.from_numpy(np.array(x, np.float32))
  seq = lambda x: f32(jnp.asarray(x, jnp.float32)).to(dtype)
  y = torch.empty((b, t, c), dtype=dtype)
  out = [torch.empty((b, c)) for _ in range(3)]
  kernel[wkv_triton_kernel.grid(b, c, block_c)](
      f32(w), f32(u), seq(k), seq(v), *(f32(s) for s in state), t, c, y, *out, block_c=block_c)
  return y.float().numpy(), WKVState(*(s.numpy() for s in out))


@pytest.mark.parametrize("b,t,c,dtype,time_decay,k_max,block_c,tol", [
    pytest.param(2, 37, 48, jnp.float32, (-3.0, 1.0), 3.0, 32, 1e-6, id="c_not_a_multiple"),
    pytest.param(1, 1, 5, jnp.float32, (-3.0, 1.0), 3.0, 32, 1e-6, id="single_token"),
    pytest.param(2, 40, 24, jnp.float32, (-9.0, 4.0), 60.0, 8, 1e-6, id="extreme_values"),
    pytest.param(2, 24, 40, jnp.bfloat16, (-3.0, 1.0), 3.0, 16, 1e-2, id="bfloat16"),
])
def test_interpreted_triton_kernel_matches_scan(interpreted_kernel, b, t, c, dtype, time_decay,
                                                k_max, block_c, tol):
  w, u, k, v, state = random_inputs(0, b, t, c, dtype, time_decay, k_max)
  y, out = _run_interpreted(interpreted_kernel, w, u, k, v, state, block_c)
  y_ref, out_ref = wkv_lib.wkv_scan(w, u, k.astype(jnp.float32), v.astype(jnp.float32), state)
  assert rel_err(y, y_ref) < tol, rel_err(y, y_ref)
  for name, s, s_ref in zip(("num", "den", "max_exp"), out, out_ref):
    assert rel_err(s, s_ref) < 1e-6, (name, rel_err(s, s_ref))


def test_interpreted_triton_kernel_chains_through_its_state(interpreted_kernel):
  w, u, k, v, _ = random_inputs(1, 2, 30, 20)
  empty = wkv_lib.check_inputs(w, u, k, v, None)
  y_full, out_full = _run_interpreted(interpreted_kernel, w, u, k, v, empty, 16)
  ys, out = [], empty
  for start, stop in ((0, 11), (11, 12), (12, 30)):
    y, out = _run_interpreted(interpreted_kernel, w, u, k[:, start:stop], v[:, start:stop], out,
                              16)
    ys.append(y)
  np.testing.assert_allclose(np.concatenate(ys, axis=1), y_full, rtol=1e-6, atol=1e-6)
  for s, s_full in zip(out, out_full):
    np.testing.assert_allclose(s, s_full, rtol=1e-6, atol=1e-6)

"""The GPU kernels compiled to machine code on a machine without a GPU.

The Pallas kernels are lowered by JAX to Triton IR and compiled by the `triton` package; the
Triton kernels are compiled from their source (`experiments.gpu_compile`); both for sm_80
(A100) and sm_90a (H100/H200), fp32 and bf16 inputs. Their numbers are checked in the Pallas and
Triton interpreters by tests/test_kernels.py.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import pytest

from experiments import gpu_compile
from rwkv_jax_kernels import sequential
from rwkv_jax_kernels import wkv_pallas
from rwkv_jax_kernels import wkv_pallas_seq

_PALLAS_KERNELS = ["wkv_summary", "wkv_output", "wkv_output_bwd", "wkv_summary_bwd"]


@pytest.mark.slow
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
def test_triton_kernels_compile_for_gpu(dtype, arch):
  builds = gpu_compile.compile_wkv_triton(dtype, arch)
  assert [b.name for b in builds] == [name + "_kernel" for name in _PALLAS_KERNELS]
  for build in builds:
    assert build.arch == arch and build.cubin_bytes > 0 and 0 < build.registers <= 255


_SEQ_KERNELS = ["wkv_seq_forward", "wkv_seq_backward"]
_SEQ_SEGMENTED_KERNELS = ["wkv_seq_summary", "wkv_seq_forward", "wkv_seq_reverse_summary",
                          "wkv_seq_backward"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,segments,names", [
    ((2, 37, 48), None, _SEQ_KERNELS),
    ((8, 1024, 768), None, _SEQ_KERNELS),
    ((1, 1000, 768), 3, _SEQ_SEGMENTED_KERNELS),
], ids=["odd", "train", "segments"])
def test_sequential_pallas_kernels_compile_for_gpu_without_spills(shape, segments, names, dtype,
                                                                  arch):
  blocks = dataclasses.replace(wkv_pallas_seq.DEFAULT_BLOCK_SIZES, num_segments=segments)
  builds = gpu_compile.compile_wkv_pallas_seq(shape, dtype, arch, blocks)
  assert [b.name for b in builds] == names
  for build in builds:
    assert build.arch == arch and build.cubin_bytes > 0 and 0 < build.registers <= 255
    assert build.spill_store_bytes == build.spill_load_bytes == 0, build
    assert build.num_warps == blocks.num_warps


def test_sequential_pallas_kernels_compile_for_hopper():
  builds = gpu_compile.compile_wkv_pallas_seq((1, 100, 200), jnp.float32, 90,
                                              wkv_pallas_seq.BlockSizes(block_t=4, block_c=64,
                                                                        num_warps=2))
  assert [b.name for b in builds] == _SEQ_KERNELS
  assert all(b.num_warps == 2 and b.spill_store_bytes == 0 for b in builds)


_TRITON_SEQ_KERNELS = ["wkv_seq_summary_kernel", "wkv_seq_forward_kernel",
                       "wkv_seq_backward_summary_kernel", "wkv_seq_backward_kernel"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_sequential_triton_kernels_compile_for_gpu_without_spills(dtype, arch):
  blocks = sequential.BlockSizes()
  builds = gpu_compile.compile_wkv_triton_seq(dtype, arch, blocks)
  assert [b.name for b in builds] == _TRITON_SEQ_KERNELS
  for build in builds:
    assert build.arch == arch and build.cubin_bytes > 0 and 0 < build.registers <= 255
    assert build.spill_store_bytes == build.spill_load_bytes == 0, build
    assert build.num_warps == blocks.num_warps

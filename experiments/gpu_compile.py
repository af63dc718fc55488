"""Compile the WKV kernels to NVIDIA machine code on any machine, GPU or not.

Everything here runs on the CPU:

* Pallas: lowering a jitted function for the "cuda" platform
  (`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`) works with a CPU-only jaxlib and
  turns each `pallas_call` into a Triton IR (TTIR) module; `pallas_ttir` captures those modules.
* Triton (the `triton` package): TTIR, or a `@triton.jit` kernel, goes through Triton's own
  pipeline (TTGIR, LLVM IR, PTX) to a cubin for `GPUTarget("cuda", arch, 32)`, assembled by the
  `ptxas` that ships in the triton wheel; `ptxas -v` then reports each kernel's registers, spills
  and stack.

On a GPU, XLA compiles the Pallas TTIR with the Triton it bundles rather than the `triton` package,
so this shows that the IR is valid Triton that compiles for the architecture and what each kernel
costs in registers and shared memory; it runs nothing. The numbers are checked in Pallas's and
Triton's interpreters on CPU and compiled on a GPU (`tests/test_kernels.py`,
`scripts/gpu_check.sh`).

`triton` is needed (it is in requirements-test.txt); JAX's GPU build and `jax_triton` are not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import subprocess
import tempfile
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import triton
from triton.backends.compiler import GPUTarget

from rwkv_jax_kernels import chunked
from rwkv_jax_kernels import sequential
from rwkv_jax_kernels import wkv_pallas
from rwkv_jax_kernels import wkv_pallas_seq
from rwkv_jax_kernels import wkv_triton_kernel
from rwkv_jax_kernels import wkv_triton_seq_kernel

_TRITON_TYPES = {jnp.dtype(jnp.float32): "fp32", jnp.dtype(jnp.bfloat16): "bf16",
                 jnp.dtype(jnp.float16): "fp16"}


@dataclasses.dataclass(frozen=True)
class KernelBuild:
  """One kernel compiled for one architecture, with what `ptxas -v` reports."""

  name: str
  arch: int               # compute capability, e.g. 90 for H100/H200 (sm_90a)
  num_warps: int
  registers: int          # per thread
  spill_store_bytes: int
  spill_load_bytes: int
  stack_bytes: int
  shared_bytes: int       # shared memory Triton allocated for the kernel
  cubin_bytes: int

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Pallas -> TTIR.


@contextlib.contextmanager
def _capture_triton_modules() -> Iterator[list[str]]:
  """Collects the TTIR text of every pallas_call lowered for the GPU inside the block."""
  # pylint: disable-next=g-import-not-at-top
  from jax._src.pallas.triton import lowering  # private: the one hook between Pallas and Triton
  modules = []
  original = lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = original(*args, **kwargs)
    modules.append(result.module.operation.get_asm())
    return result

  lowering.lower_jaxpr_to_triton_module = capture
  try:
    yield modules
  finally:
    lowering.lower_jaxpr_to_triton_module = original


def pallas_ttir(fn: Callable[..., Any], *args) -> list[str]:
  """TTIR of each Pallas kernel in `jax.jit(fn)(*args)`, lowered for CUDA; args may be abstract."""
  with _capture_triton_modules() as modules:
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  return modules


def wkv_pallas_ttir(shape: tuple[int, int, int], dtype=jnp.float32,
                    block_sizes: chunked.BlockSizes = chunked.BlockSizes()) -> list[str]:
  """The four WKV Pallas kernels (forward: summary, output; backward: output, summary) as TTIR."""
  # The backward pass re-runs the forward kernels, so one gradient lowers all four.
  return _wkv_grad_ttir(
      functools.partial(wkv_pallas.wkv_pallas, block_sizes=block_sizes, interpret=False), shape,
      dtype)


def wkv_pallas_seq_ttir(shape: tuple[int, int, int], dtype=jnp.float32,
                        block_sizes: sequential.BlockSizes = wkv_pallas_seq.DEFAULT_BLOCK_SIZES
                        ) -> list[str]:
  """The sequential WKV Pallas kernels as TTIR: forward and backward with one time segment;
  summary, forward, reverse summary and backward with several."""
  return _wkv_grad_ttir(
      functools.partial(wkv_pallas_seq.wkv_pallas_seq, block_sizes=block_sizes,
                        interpret=False), shape, dtype)


def _wkv_grad_ttir(wkv: Callable[..., Any], shape: tuple[int, int, int], dtype) -> list[str]:
  """TTIR of the kernels in the gradient of a loss of y and the final state of `wkv`."""
  b, t, c = shape
  vec = jax.ShapeDtypeStruct((c,), jnp.float32)
  seq = jax.ShapeDtypeStruct((b, t, c), dtype)

  def loss(w, u, k, v):
    y, state = wkv(w, u, k, v)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state.num)

  return pallas_ttir(jax.grad(loss, argnums=(0, 1, 2, 3)), vec, vec, seq, seq)


# ----------------------------------------------------------------------------------------------
# Triton -> cubin, and what ptxas says about it.


def _ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
  ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.ptx")
    with open(path, "w") as f:
      f.write(ptx)
    suffix = "a" if arch >= 90 else ""
    report = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
  number = lambda pattern: int(re.search(pattern, report).group(1))
  return dict(registers=number(r"Used (\d+) registers"),
              stack_bytes=number(r"(\d+) bytes stack frame"),
              spill_store_bytes=number(r"(\d+) bytes spill stores"),
              spill_load_bytes=number(r"(\d+) bytes spill loads"))


def _build(compiled, arch: int, num_warps: int) -> KernelBuild:
  return KernelBuild(name=compiled.metadata.name, arch=arch, num_warps=num_warps,
                     shared_bytes=compiled.metadata.shared,
                     cubin_bytes=len(compiled.asm["cubin"]),
                     **_ptxas_usage(compiled.asm["ptx"], arch))


def compile_ttir(ttir: str, arch: int = 90, num_warps: int = 4, num_stages: int = 1
                 ) -> KernelBuild:
  """Compiles one TTIR module to a cubin for sm_<arch> with the `triton` package."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.ttir")
    with open(path, "w") as f:
      f.write(ttir)
    compiled = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
  return _build(compiled, arch, num_warps)


def compile_wkv_pallas(shape: tuple[int, int, int], dtype=jnp.float32, arch: int = 90,
                       block_sizes: chunked.BlockSizes = chunked.BlockSizes()
                       ) -> list[KernelBuild]:
  """The four WKV Pallas kernels compiled for sm_<arch>, with the launch options they use."""
  return [compile_ttir(ttir, arch, block_sizes.num_warps, block_sizes.num_stages)
          for ttir in wkv_pallas_ttir(shape, dtype, block_sizes)]


def compile_wkv_pallas_seq(shape: tuple[int, int, int], dtype=jnp.float32, arch: int = 90,
                           block_sizes: sequential.BlockSizes = wkv_pallas_seq.DEFAULT_BLOCK_SIZES
                           ) -> list[KernelBuild]:
  """The sequential WKV Pallas kernels compiled for sm_<arch>, with the launch options they use."""
  return [compile_ttir(ttir, arch, block_sizes.num_warps, block_sizes.num_stages)
          for ttir in wkv_pallas_seq_ttir(shape, dtype, block_sizes)]


# Pointer arguments in k's dtype; every other pointer is float32, every other argument an int32
# or a constexpr.
_TRITON_IO_POINTERS = {
    "wkv_summary_kernel": {"k_ptr", "v_ptr"},
    "wkv_output_kernel": {"k_ptr", "v_ptr", "y_ptr"},
    "wkv_output_bwd_kernel": {"k_ptr", "v_ptr", "dy_ptr"},
    "wkv_summary_bwd_kernel": {"k_ptr", "v_ptr", "dk_ptr", "dv_ptr"},
}


def _compile_triton(kernel, io_pointers: set[str], dtype, arch: int, constexprs: dict[str, int],
                    num_warps: int, num_stages: int) -> KernelBuild:
  """One @triton.jit kernel for sm_<arch>: pointers in `io_pointers` of `dtype`, others float32."""
  io = "*" + _TRITON_TYPES[jnp.dtype(dtype)]
  signature = {p.name: ("constexpr" if p.is_constexpr else
                        (io if p.name in io_pointers else "*fp32") if p.name.endswith("_ptr")
                        else "i32") for p in kernel.params}
  source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
  compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
  return _build(compiled, arch, num_warps)


def compile_wkv_triton(dtype=jnp.float32, arch: int = 90,
                       block_sizes: chunked.BlockSizes = chunked.BlockSizes()
                       ) -> list[KernelBuild]:
  """The four chunked WKV Triton kernels compiled for sm_<arch>, as `wkv_triton` launches them."""
  return [_compile_triton(getattr(wkv_triton_kernel, name), io_pointers, dtype, arch,
                          dict(block_t=block_sizes.block_t, block_c=block_sizes.block_c),
                          block_sizes.num_warps, block_sizes.num_stages)
          for name, io_pointers in _TRITON_IO_POINTERS.items()]


# The same for the sequential kernels (wkv_triton_seq_kernel), in the order of a forward (with
# segments), then a backward.
_TRITON_SEQ_IO_POINTERS = {
    "wkv_seq_summary_kernel": {"k_ptr", "v_ptr"},
    "wkv_seq_forward_kernel": {"k_ptr", "v_ptr", "y_ptr"},
    "wkv_seq_backward_summary_kernel": {"k_ptr", "v_ptr", "dy_ptr"},
    "wkv_seq_backward_kernel": {"k_ptr", "v_ptr", "dy_ptr", "dk_ptr", "dv_ptr"},
}


def compile_wkv_triton_seq(dtype=jnp.float32, arch: int = 90,
                           block_sizes: sequential.BlockSizes = sequential.BlockSizes()
                           ) -> list[KernelBuild]:
  """The four sequential WKV Triton kernels compiled for sm_<arch>, as `wkv_triton_seq` launches
  them."""
  return [_compile_triton(getattr(wkv_triton_seq_kernel, name), io_pointers, dtype, arch,
                          dict(block_t=block_sizes.block_t, block_c=block_sizes.block_c),
                          block_sizes.num_warps, block_sizes.num_stages)
          for name, io_pointers in _TRITON_SEQ_IO_POINTERS.items()]

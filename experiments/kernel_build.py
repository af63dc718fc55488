r"""Compiles the WKV GPU kernels (Pallas and Triton) for sm_80 and sm_90a on this machine (no GPU
needed) and records what each costs: registers per thread, spills, stack, shared memory, cubin size.

  python -m experiments.kernel_build [--out=experiments/results/kernel_build.json]

Records every kernel at its default tile sizes for fp32 and bf16 inputs, and the register use of
the Pallas kernels over a sweep of (block_t, block_c, num_warps): a register-bound tile
(255 registers, or spills) lowers occupancy, which matters for an op bound by memory bandwidth.
How `experiments.gpu_compile` gets there, and what it does not check, is in its docstring.
"""

import itertools
import pathlib
import sys

from absl import flags

from experiments import _cli

flags.DEFINE_string("out", "experiments/results/kernel_build.json", "Output JSON.")
flags.DEFINE_list("archs", ["80", "90"], "Compute capabilities to compile for.")
flags.DEFINE_list("shape", ["8", "1024", "768"], "B,T,C the Pallas kernels are lowered at.")
FLAGS = flags.FLAGS
_REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv):
  del argv
  import jax.numpy as jnp
  import triton

  from experiments import benchlib
  from experiments import gpu_compile
  from rwkv_jax_kernels import chunked

  shape = tuple(int(x) for x in FLAGS.shape)
  archs = [int(a) for a in FLAGS.archs]
  defaults = []
  for arch, (dtype_name, dtype) in itertools.product(
      archs, [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)]):
    for backend, builds in (("pallas", gpu_compile.compile_wkv_pallas(shape, dtype, arch)),
                            ("triton", gpu_compile.compile_wkv_triton(dtype, arch))):
      for build in builds:
        defaults.append({"backend": backend, "dtype": dtype_name, **build.as_dict()})
        print(f"sm_{arch} {dtype_name:8s} {build.name:24s} {build.registers:3d} registers "
              f"{build.spill_store_bytes:4d} B spilled {build.shared_bytes:6d} B shared")

  sweep = []
  for block_t, block_c, num_warps in itertools.product((8, 16, 32), (32, 64), (4, 8)):
    blocks = chunked.BlockSizes(block_t=block_t, block_c=block_c, num_warps=num_warps)
    for build in gpu_compile.compile_wkv_pallas(shape, jnp.float32, max(archs), blocks):
      sweep.append({"block_t": block_t, "block_c": block_c, **build.as_dict()})

  record = {
      "benchmark": "kernel_build",
      "environment": {**benchlib.environment(sys.argv), "triton": triton.__version__},
      "note": "Compiled ahead of time on the machine named in environment; nothing ran on a GPU.",
      "pallas_lowered_at_shape": list(shape),
      "default_tiles": vars(chunked.BlockSizes()),  # both backends
      "builds": defaults,
      "pallas_tile_sweep_fp32": sweep,
  }
  print(benchlib.write_json(_REPO / FLAGS.out, record))


if __name__ == "__main__":
  _cli.run(main)

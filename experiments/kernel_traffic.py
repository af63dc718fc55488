r"""What a WKV implementation costs on an accelerator, read from its program alone (no device).

  python -m experiments.kernel_traffic                       # impl=pallas, the issue's shapes
  python -m experiments.kernel_traffic --impls=pallas,pallas_chunked --shapes=8x1024x4096

Two measures of forward+backward (`jax.value_and_grad` of sum(y * g) with respect to w, u, k, v
and the incoming state), for a lowering platform ("cuda" or "tpu"):

  structure  `jax.export` of the step for the platform: the kernel calls (`stablehlo.custom_call`
             ops: Triton on cuda, Mosaic on tpu) and every other `stablehlo.` op in the module,
             which is the XLA glue around the kernels (pads, slices, reductions, the chaining).
  traffic    for each `pallas_call`, the bytes it reads and writes according to its BlockSpecs:
             per operand, the number of distinct blocks its index map visits over the grid times
             the block's bytes (an operand with no blocking counts as read or written once
             whole). The sum over the kernels is divided by the bytes of one [b, t, c] array in
             k's dtype: "full-array passes". Traffic of the XLA glue is not counted; `structure`
             bounds how much of it there is.

The kernel for a platform is the function the dispatcher registered for it
(`rwkv_jax.wkv.for_platform`), traced with its compiled (non-interpreted) settings. Writes
experiments/results/kernel_traffic.json (with the environment and the command).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import _cli, benchlib
from rwkv_jax import wkv as wkv_lib
from rwkv_jax.wkv import WKVState

Shape = tuple[int, int, int]

# The shapes and bounds of the structural targets.
STRUCTURE_SHAPES: tuple[Shape, ...] = ((8, 1024, 768), (1, 16384, 768))
TRAFFIC_SHAPE: Shape = (8, 1024, 4096)
MAX_KERNEL_CALLS = 4
MAX_GLUE_OPS = 150
MAX_PASSES = 9.0

# One op per line of the printed module: "%x = stablehlo.op ...", "stablehlo.return ...", or the
# generic form '"stablehlo.op"(...)'.
_OP = re.compile(r'^\s*(?:%[^=]*=\s*)?"?stablehlo\.([a-z_0-9]+)')

@dataclasses.dataclass(frozen=True)
class Structure:
  kernel_calls: int
  glue_ops: int
  glue_by_op: dict[str, int]

  def meets_targets(self) -> bool:
    return self.kernel_calls <= MAX_KERNEL_CALLS and self.glue_ops <= MAX_GLUE_OPS


@dataclasses.dataclass(frozen=True)
class KernelTraffic:
  name: str
  grid: tuple[int, ...]
  read_bytes: int
  write_bytes: int


def _inputs(shape: Shape, dtype) -> tuple[jax.ShapeDtypeStruct, ...]:
  b, _, c = shape
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  kv = jax.ShapeDtypeStruct(shape, dtype)
  return f32(c), f32(c), kv, kv, WKVState(f32(b, c), f32(b, c), f32(b, c)), kv


def fwd_bwd(wkv_fn: Callable[..., Any]) -> Callable[..., Any]:
  """(w, u, k, v, state, g) -> (loss, grads of w, u, k, v, state): what training runs."""

  def loss(w, u, k, v, state, g):
    y, _ = wkv_fn(w, u, k, v, state)
    return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32))

  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))


def structure(impl: str, shape: Shape, platform: str, dtype=jnp.float32) -> Structure:
  """Kernel calls and other StableHLO ops of fwd+bwd of wkv(impl=...) exported for `platform`."""
  fn = fwd_bwd(lambda *args: wkv_lib.wkv(*args, impl=impl))
  # Triton calls carry no stable-export guarantee; the module is only read here.
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
      *_inputs(shape, dtype))
  return count_ops(exported.mlir_module())


def count_ops(module_text: str) -> Structure:
  """Counts `stablehlo.custom_call` ops and all other `stablehlo.` ops in a module's text.

  Kernel bodies are opaque attributes of their custom calls (serialized Triton or Mosaic), so
  every other StableHLO op counted is outside the kernels; ops inside XLA regions (a reduction's
  body) count too.
  """
  counts: dict[str, int] = {}
  for line in module_text.splitlines():
    m = _OP.match(line)
    if m:
      counts[m.group(1)] = counts.get(m.group(1), 0) + 1
  calls = counts.pop("custom_call", 0)
  return Structure(calls, sum(counts.values()), dict(sorted(counts.items())))


def _pallas_calls(jaxpr) -> list[Any]:
  """Every pallas_call equation in a jaxpr, looking inside nested jaxprs (jit, custom_vjp,
  cond, scan)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      found.append(eqn)
      continue
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found.extend(_pallas_calls(inner))
  return found


def _block_bytes(mapping) -> int:
  aval = mapping.transformed_block_aval
  inner = getattr(aval, "inner_aval", aval)
  return math.prod(inner.shape) * jnp.dtype(inner.dtype).itemsize


def _distinct_blocks(mapping, grid: tuple[int, ...]) -> int:
  """How many different blocks the index map visits over the whole grid."""
  points = np.indices(grid).reshape(len(grid), -1).T.astype(np.int32) if grid else np.zeros(
      (1, 0), np.int32)
  closed = mapping.index_map_jaxpr
  if len(closed.in_avals) != len(grid):  # scalar-prefetch operands: assume every block differs
    return len(points)
  index_fn = lambda idx: jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *idx)
  blocks = jax.jit(jax.vmap(index_fn))(tuple(jnp.asarray(points[:, i]) for i in range(len(grid))))
  blocks = np.stack([np.broadcast_to(np.asarray(x), (len(points),)) for x in blocks], axis=1)
  return len(np.unique(blocks, axis=0)) if blocks.size else 1


def traffic(wkv_fn: Callable[..., Any], shape: Shape, dtype=jnp.float32) -> list[KernelTraffic]:
  """Bytes read and written by each pallas_call of fwd+bwd of `wkv_fn`, from its BlockSpecs."""
  return traffic_of(fwd_bwd(wkv_fn), *_inputs(shape, dtype))


def traffic_of(fn: Callable[..., Any], *args: Any) -> list[KernelTraffic]:
  """Bytes read and written by each pallas_call that fn(*args) runs, from its BlockSpecs."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  kernels = []
  for eqn in _pallas_calls(jaxpr.jaxpr):
    grid_mapping = eqn.params["grid_mapping"]
    grid = tuple(int(g) for g in grid_mapping.grid)
    read = write = 0
    n_in = grid_mapping.num_inputs
    for i, mapping in enumerate(grid_mapping.block_mappings):
      whole = math.prod(mapping.array_aval.shape) * jnp.dtype(mapping.array_aval.dtype).itemsize
      blocked = any(type(d).__name__ == "Blocked" for d in mapping.block_shape)
      moved = _block_bytes(mapping) * _distinct_blocks(mapping, grid) if blocked else whole
      if i < n_in:
        read += moved
      else:
        write += moved
    kernels.append(KernelTraffic(str(eqn.params.get("name", "pallas_call")), grid, read, write))
  return kernels


def passes(kernels: Sequence[KernelTraffic], shape: Shape, dtype=jnp.float32) -> float:
  """Kernel traffic in units of one [b, t, c] array of k's dtype."""
  return sum(k.read_bytes + k.write_bytes for k in kernels) / (
      math.prod(shape) * jnp.dtype(dtype).itemsize)


def _define_flags() -> None:
  # Defined when run as a program only: bench_wkv imports this module and has flags of the same
  # names.
  flags.DEFINE_list("impls", ["pallas"], "WKV implementations (registered per platform).")
  flags.DEFINE_list("platforms", ["cuda", "tpu"], "Lowering platforms.")
  flags.DEFINE_list("shapes", None, "BxTxC shapes; default: the targets' shapes.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "k and v dtype.")
  flags.DEFINE_string("out", "experiments/results/kernel_traffic.json", "Output JSON.")


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise _cli.UsageError(f"Unexpected arguments: {argv[1:]}")
  out = _cli.output_path("out", f.out)
  dtype = jnp.dtype(f.dtype)
  shapes = [tuple(int(x) for x in s.lower().split("x")) for s in f.shapes] if (
      f.shapes) else [*STRUCTURE_SHAPES, TRAFFIC_SHAPE]
  record: dict[str, Any] = {
      "benchmark": "kernel_traffic", "environment": benchlib.environment(sys.argv),
      "dtype": f.dtype, "targets": {"max_kernel_calls": MAX_KERNEL_CALLS,
                                         "max_glue_ops": MAX_GLUE_OPS, "max_passes": MAX_PASSES},
      "entries": []}
  for impl in f.impls:
    for platform in f.platforms:
      for shape in shapes:
        entry: dict[str, Any] = {"impl": impl, "platform": platform, "shape": list(shape)}
        s = structure(impl, shape, platform, dtype)
        entry.update(kernel_calls=s.kernel_calls, glue_ops=s.glue_ops, glue_by_op=s.glue_by_op)
        kernels = traffic(wkv_lib.for_platform(impl, platform), shape, dtype)
        entry.update(passes=passes(kernels, shape, dtype),
                     kernels=[dataclasses.asdict(k) for k in kernels])
        record["entries"].append(entry)
        print(f"{impl:16s} {platform:5s} {'x'.join(map(str, shape)):14s} "
              f"calls {s.kernel_calls}  glue ops {s.glue_ops:4d}  passes {entry['passes']:.2f}",
              flush=True)
  benchlib.write_json(out, record)


if __name__ == "__main__":
  _define_flags()
  _cli.run(main)

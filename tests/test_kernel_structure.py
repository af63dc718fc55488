"""The WKV kernels' structural targets, read from their programs on CPU (experiments/kernel_traffic).

Forward+backward of wkv(impl="pallas") exported for cuda and for tpu: at most 4 kernel calls and
at most 150 StableHLO ops around them; the kernels' BlockSpec traffic at most 9 full-array passes.
The measures themselves are checked on programs whose answer is known.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from experiments import kernel_traffic as kt
from rwkv_jax import wkv as wkv_lib


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("shape", kt.STRUCTURE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_exported_forward_and_backward_is_a_few_kernels_and_little_glue(shape, platform):
  s = kt.structure("pallas", shape, platform)
  assert s.kernel_calls <= kt.MAX_KERNEL_CALLS, s
  assert s.glue_ops <= kt.MAX_GLUE_OPS, s


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernel_traffic_is_at_most_nine_passes(platform):
  shape = kt.TRAFFIC_SHAPE
  kernels = kt.traffic(wkv_lib.for_platform("pallas", platform), shape)
  assert 1 <= len(kernels) <= kt.MAX_KERNEL_CALLS
  # Reading k, v, dy and writing y, dk, dv is six passes: no kernel layout gets below that.
  assert 6 <= kt.passes(kernels, shape) <= kt.MAX_PASSES, kernels


def test_the_chunked_kernels_miss_the_targets_the_measures_are_not_blind():
  shape = (8, 1024, 768)
  s = kt.structure("pallas_chunked", shape, "cuda")
  assert s.kernel_calls == 4 and s.glue_ops > 1000  # the XLA chaining over chunks
  kernels = kt.traffic(wkv_lib.for_platform("pallas_chunked", "cuda"), shape)
  assert kt.passes(kernels, shape) > 16


def _copy_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[...] * 2


def _left_half_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[:, :128] * 2


def test_traffic_of_a_copy_is_two_passes_and_revisits_count_once():
  x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
  spec = pl.BlockSpec((16, 128), lambda i, j: (i, j))
  copy = pl.pallas_call(_copy_kernel, out_shape=x, grid=(4, 2), in_specs=[spec], out_specs=spec)
  [kernel] = kt.traffic_of(copy, x)
  assert kernel.read_bytes == kernel.write_bytes == 64 * 256 * 4
  # The same input block for every j: read once per i.
  row = pl.BlockSpec((16, 256), lambda i, j: (i, 0))
  reread = pl.pallas_call(_left_half_kernel, out_shape=x, grid=(4, 2), in_specs=[row],
                          out_specs=spec)
  [kernel] = kt.traffic_of(reread, x)
  assert kernel.read_bytes == 64 * 256 * 4


def test_count_ops_separates_kernel_calls_from_glue():
  def f(x):
    return jnp.sum(jnp.exp(x) + 1.0)

  text = jax.export.export(jax.jit(f), platforms=["cuda"])(
      jax.ShapeDtypeStruct((4, 8), jnp.float32)).mlir_module()
  s = kt.count_ops(text)
  assert s.kernel_calls == 0
  assert s.glue_by_op.get("exponential") == 1 and s.glue_by_op.get("reduce") == 1, s
  assert s.glue_ops >= 4  # constant, exponential, add, reduce (+ its region's add and return)
  fake = text + '\n    %9 = stablehlo.custom_call @kernel(%8) : (tensor<f32>) -> tensor<f32>\n'
  assert kt.count_ops(fake).kernel_calls == 1

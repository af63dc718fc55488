"""Weight-only int8: every matrix but the embedding (the blocks' and the head) as int8 with float
scales, as the rwkv package's int8 strategies quantise them.

A kernel w [in, out] is cut along `in` into groups of GROUP_SIZE rows (one group when `in` is not a
multiple of it); each (group, output channel) gets the symmetric scale max|w| / 127 and
q = round(w / scale) in [-127, 127]. The matrix product dequantises inside:

    y[..., o] = sum_g scale[g, o] * (x[..., g, :] @ q[g, :, o])

so the full-precision weight is never stored; the int8 weight is what is read from memory.
(Written as the dequantised weight times x, the form XLA can fuse into the product on GPU. XLA's
CPU backend instead writes the float weight out first, which made int8 slower than float32 there,
so on CPU a decoding step's products run in a C++ kernel (`rwkv_jax_kernels.int8_cpu`) that
converts the int8 weight in registers: at 169M, batch 1, about 2x float32's tokens/s.)
Groups of 16 keep one outlier from coarsening a whole column: on Gaussian weights the RMS error is
about 0.0047 sigma against 0.0065-0.0085 for one scale per output channel, 0.0054 for groups of
32 and 0.0055-0.0073 for the rwkv package's row-and-column scheme (fp32i8), at one float32 scale
per 16 weights (1.25 bytes per weight instead of 4). On a deep model the logit error is what
grows from these (tests/test_precision.py compares it with the package's).

`Int8Dense` is the module; `quantize` / `dequantize` the arithmetic, used at load time
(`weights.load(..., dtype="int8")`) and by `quantize_model` for models already in memory.

Shapes: i = in, o = out, g = groups, n = rows per group.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

_log = logging.getLogger(__name__)

GROUP_SIZE = 16
QMAX = 127
# Leaf names of a quantised matrix, beside the float `kernel` they replace.
QKERNEL, QSCALE = "qkernel", "qscale"


def num_groups(d_in: int) -> int:
  return d_in // GROUP_SIZE if d_in % GROUP_SIZE == 0 else 1


def quantize(w_io) -> tuple[Any, Any]:
  """int8 q [i, o] and float32 scales [g, o] of a float kernel w [i, o]; numpy in, numpy out (on
  the host, as checkpoints are read), jax arrays in, jax arrays out (inside a traced init)."""
  xp = np if isinstance(w_io, np.ndarray) else jnp
  w = xp.asarray(w_io, np.float32)
  d_in, d_out = w.shape
  g = num_groups(d_in)
  w_gno = w.reshape(g, d_in // g, d_out)
  scale_go = xp.abs(w_gno).max(axis=1) / QMAX
  scale_go = xp.where(scale_go > 0, scale_go, 1.0).astype(np.float32)  # an all-zero column
  q = xp.clip(xp.rint(w_gno / scale_go[:, None]), -QMAX, QMAX).astype(np.int8)
  return q.reshape(d_in, d_out), scale_go


def dequantize(q_io, scale_go) -> np.ndarray:
  """The float32 kernel [i, o] that (q, scale) stands for."""
  q = np.asarray(q_io, np.float32)
  g = scale_go.shape[0]
  return (q.reshape(g, -1, q.shape[1]) * np.asarray(scale_go)[:, None]).reshape(q.shape)


# Rows (batch x time) up to which the CPU kernel is used. Its time grows with the rows (it is
# not a blocked matrix-matrix kernel), XLA's (write the float weight out, then multiply) much
# less: on 12 layer pairs of 169M's FFN (2 cores) the kernel took 2.8 / 7.9 / 26 / 97 / 192 ms
# at 1 / 16 / 64 / 256 / 512 rows, XLA's form 65 / 65 / 76 / 124 / 184 ms.
CPU_KERNEL_MAX_ROWS = 256


def _xla_matmul(x: Array, q_io: Array, scale_go: Array) -> Array:
  g, d_out = scale_go.shape
  w_gno = q_io.astype(x.dtype).reshape(g, -1, d_out) * scale_go.astype(x.dtype)[:, None]
  return jnp.dot(x, w_gno.reshape(q_io.shape))


# The C++ product's backend: a module of the kernels package with `available()` (builds the
# kernel on first use) and `int8_matmul(x_mi, q_io, scale_go)`. Loaded by name, on first use.
CPU_KERNEL_BACKEND = "rwkv_jax_kernels.int8_cpu"


@functools.cache
def _cpu_kernel():
  """The CPU kernel's backend module, or None (the reason logged) where it cannot be used."""
  try:
    backend = importlib.import_module(CPU_KERNEL_BACKEND)
  except Exception as e:  # pylint: disable=broad-except  (a broken backend must not stop int8)
    _log.warning("int8 CPU kernel %s cannot be imported (%s: %s); int8 products use XLA's form.",
                 CPU_KERNEL_BACKEND, type(e).__name__, e)
    return None
  return backend if backend.available() else None


@jax.custom_vjp
def _cpu_kernel_matmul(x: Array, q_io: Array, scale_go: Array) -> Array:
  y = _cpu_kernel().int8_matmul(x.reshape(-1, x.shape[-1]), q_io, scale_go)
  return y.reshape(*x.shape[:-1], q_io.shape[1]).astype(x.dtype)


def _cpu_kernel_fwd(x, q_io, scale_go):
  return _cpu_kernel_matmul(x, q_io, scale_go), (x, q_io, scale_go)


def _cpu_kernel_bwd(residuals, dy):
  # The kernel has no derivative of its own; XLA's form computes the same product.
  return jax.vjp(_xla_matmul, *residuals)[1](dy)


_cpu_kernel_matmul.defvjp(_cpu_kernel_fwd, _cpu_kernel_bwd)


def _use_cpu_kernel(x: Array) -> bool:
  # Off a CPU backend the kernel is not even built (platform_dependent below keeps it out of
  # what is lowered for other platforms anyway).
  if jax.default_backend() != "cpu" or math.prod(x.shape[:-1]) > CPU_KERNEL_MAX_ROWS:
    return False
  return _cpu_kernel() is not None


def matmul(x: Array, q_io: Array, scale_go: Array) -> Array:
  """x [..., i] @ dequantize(q, scale) in x's dtype (int8 values are exact in bfloat16 and
  float16; the scales are rounded to x's dtype).

  On CPU, for up to CPU_KERNEL_MAX_ROWS rows (decoding, short prefill chunks), the product is
  the C++ kernel of `CPU_KERNEL_BACKEND`, which reads the int8 weight as it is (in
  float32 whatever x's dtype); elsewhere, and where that kernel could not be built, XLA's form.
  The choice is made per platform when lowering, so a program exported for GPU or TPU never
  holds the kernel.
  """
  if not _use_cpu_kernel(x):
    return _xla_matmul(x, q_io, scale_go)
  return jax.lax.platform_dependent(x, q_io, scale_go, cpu=_cpu_kernel_matmul,
                                    default=_xla_matmul)


class Int8Dense(nnx.Module):
  """A bias-free linear layer with an int8 kernel [in, out] and float32 scales [groups, out]."""

  def __init__(self, d_in: int, d_out: int, *, kernel_init: Any, dtype: Any, rngs: nnx.Rngs):
    q, scale = quantize(kernel_init(rngs.params(), (d_in, d_out), jnp.float32))
    self.qkernel = nnx.Param(jnp.asarray(q))
    self.qscale = nnx.Param(jnp.asarray(scale))
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    return matmul(x.astype(self.dtype), self.qkernel[...], self.qscale[...])


def leaf_path(kernel_path: tuple, leaf: str) -> tuple:
  """The path of a quantised matrix's `leaf` (QKERNEL or QSCALE) given its float kernel path."""
  return (*kernel_path[:-1], leaf)


def quantize_model(model, int8_model):
  """`int8_model` (an int8 model's structure, e.g. `model.abstract_model(config)` with
  config.quant == "int8") filled with `model`'s weights: every float kernel quantised, every
  other parameter cast to the target's dtype."""
  floats = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  graphdef, abstract = nnx.split(int8_model)
  filled, done = [], {}
  for path, var in nnx.to_flat_state(abstract):
    if path[-1] in (QKERNEL, QSCALE):
      kernel_path = (*path[:-1], "kernel")
      if kernel_path not in done:
        # On the host, as at load time, so both give the same bits.
        done[kernel_path] = quantize(np.asarray(floats[kernel_path].get_value()))
      value = done[kernel_path][0 if path[-1] == QKERNEL else 1]
    else:
      value = floats[path].get_value()
    filled.append((path, var.replace(jnp.asarray(value, var.get_value().dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(filled))

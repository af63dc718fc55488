"""Launching Triton-language kernels from JAX: jax-triton on a GPU, Triton's interpreter elsewhere.

`interpret=True` runs a kernel in Triton's interpreter from a `jax.pure_callback` on torch CPU
tensors: slow, but it checks everything a backend does (launch arguments, grids, masks, its custom
VJP) on a machine without a GPU. A GPU launch needs `jax_triton` (imported only then: it fails to
import on a CPU-only jax); the interpreter needs `torch`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import threading
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_INTERPRETER_LOCK = threading.Lock()


def launch(kernel, *args, out_shape: Sequence[jax.ShapeDtypeStruct], grid: tuple[int, ...],
           constexprs: dict[str, int], num_warps: int, num_stages: int, interpret: bool
           ) -> tuple[Array, ...]:
  """Runs `kernel(*args, *outputs, **constexprs)` over `grid` and returns the outputs.

  Args follow jax-triton's convention: arrays and integer scalars, outputs appended after them.
  """
  if interpret:
    return _interpret(kernel, args, tuple(out_shape), grid, constexprs)
  import jax_triton  # pylint: disable=g-import-not-at-top  (needs a GPU build of jax)
  return tuple(jax_triton.triton_call(
      *args, kernel=kernel, out_shape=tuple(out_shape), grid=grid, num_warps=num_warps,
      num_stages=num_stages, **constexprs))


def _interpret(kernel, args: Sequence[Any], out_shape: tuple[jax.ShapeDtypeStruct, ...],
               grid: tuple[int, ...], constexprs: dict[str, int]) -> tuple[Array, ...]:
  """The kernel in Triton's interpreter, on torch CPU copies of the arrays."""
  array_at = [i for i, arg in enumerate(args) if isinstance(arg, jax.Array)]

  interpreted = getattr(_interpreted_module(kernel.fn.__module__), kernel.fn.__name__)

  def host(*arrays):
    full = list(args)
    for i, array in zip(array_at, arrays):
      full[i] = _to_torch(np.asarray(array))
    outs = [_to_torch(np.zeros(s.shape, s.dtype)) for s in out_shape]
    # The interpreter patches triton.language while it runs: one kernel at a time, although XLA
    # may run independent callbacks on several threads.
    with _INTERPRETER_LOCK, _scalar_loop_bounds():
      interpreted[grid](*full, *outs, **constexprs)
    return tuple(_to_numpy(o, s.dtype) for o, s in zip(outs, out_shape))

  return jax.pure_callback(host, out_shape, *(args[i] for i in array_at))


@contextlib.contextmanager
def _scalar_loop_bounds() -> Iterator[None]:
  """Lets `range(n)` take a kernel's scalar n in Triton's interpreter with numpy 2.

  The interpreter holds scalars as one-element arrays and converts a loop bound with int(), which
  numpy 2 refuses for arrays with a dimension; `.item()` is the same number.
  """
  from triton.runtime import interpreter  # pylint: disable=g-import-not-at-top
  original = getattr(interpreter, "_patch_lang_tensor", None)
  if original is None:  # another Triton: nothing to mend
    yield
    return

  def patch(tensor, scope):
    original(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

  interpreter._patch_lang_tensor = patch  # pylint: disable=protected-access
  try:
    yield
  finally:
    interpreter._patch_lang_tensor = original  # pylint: disable=protected-access


@functools.cache
def _interpreted_module(name: str):
  """A second copy of the kernel module `name` whose functions (helpers too) Triton interprets.

  `triton.jit` picks compiled or interpreted when it decorates, from TRITON_INTERPRET; the copy is
  imported with it set, so the compiled module stays as it is.
  """
  spec = importlib.util.spec_from_file_location(name + "_interpreted", sys.modules[name].__file__)
  module = importlib.util.module_from_spec(spec)
  previous = os.environ.get("TRITON_INTERPRET")
  os.environ["TRITON_INTERPRET"] = "1"
  try:
    spec.loader.exec_module(module)
  finally:
    if previous is None:
      del os.environ["TRITON_INTERPRET"]
    else:
      os.environ["TRITON_INTERPRET"] = previous
  return module


def _to_torch(x: np.ndarray):
  import torch  # pylint: disable=g-import-not-at-top
  if x.dtype == jnp.bfloat16:  # numpy has no bfloat16 of its own: move the bits
    return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(np.array(x))


def _to_numpy(x, dtype) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  if x.dtype == torch.bfloat16:
    return x.view(torch.int16).numpy().view(dtype)
  return x.numpy()

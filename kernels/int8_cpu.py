"""The weight-only int8 product on CPU as an XLA FFI custom call (`int8_matmul_cpu.cc`).

XLA:CPU computes `x @ (q * scale)` by writing the float32 weight out and then multiplying, which
reads and writes more bytes than a float32 model reads: int8 decoding ran slower than float32.
The C++ kernel converts the int8 weight in registers, so decoding reads a quarter of the bytes.

The library is compiled on first use with the host's C++ compiler (`$CXX`, else `c++`;
`-O3 -march=native`, C++20) into the cache directory (`rwkv_jax.files.cache_dir()`), once per
source, jaxlib version and CPU, and registered with XLA. Concurrent first uses (test workers,
several processes) each compile to a temporary file and rename it into place. When there is no
compiler, or `RWKV_JAX_INT8_KERNEL=0`, `available()` is False and `rwkv_jax.quant.matmul` keeps
XLA's own path (with one warning saying why, when compiling failed).

Only the CPU lowering uses the kernel (`rwkv_jax.quant.matmul` picks it with
`lax.platform_dependent`), so a program exported for "cuda" or "tpu" never contains it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import warnings

import jax
import jax.numpy as jnp

from rwkv_jax import files

TARGET = "rwkv_int8_matmul"
SOURCE = pathlib.Path(__file__).with_name("int8_matmul_cpu.cc")
ENV = "RWKV_JAX_INT8_KERNEL"  # "0" turns the kernel off
FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-fno-math-errno")


def _cpu_id() -> str:
  """What -march=native depends on: the machine and its CPU's model and feature flags."""
  text = ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith(("model name", "flags", "Features")):
          text += line
        if line.strip() == "":
          break  # the first processor is enough
  except OSError:
    pass
  return f"{platform.machine()}|{platform.system()}|{text}"


def library_path() -> pathlib.Path:
  """Where the compiled library for this source, jaxlib and CPU lives (whether built or not)."""
  digest = hashlib.sha256()
  digest.update(SOURCE.read_bytes())
  digest.update(jax.lib.__version__.encode() if hasattr(jax.lib, "__version__") else b"")
  digest.update(jax.__version__.encode())
  digest.update(" ".join(FLAGS).encode())
  digest.update(_cpu_id().encode())
  return files.cache_dir() / "kernels" / f"int8_matmul_cpu_{digest.hexdigest()[:16]}.so"


def compiler() -> str | None:
  """The C++ compiler the kernel is built with: $CXX, else c++ or g++ on the PATH, else None."""
  return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build(path: pathlib.Path | None = None) -> pathlib.Path:
  """Compiles the library to `path` (default `library_path()`) unless it is there already.

  Raises:
    RuntimeError: no C++ compiler, or it failed (its message included).
  """
  path = path or library_path()
  if path.is_file():
    return path
  cxx = compiler()
  if not cxx:
    raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
  with files.atomic_path(path) as tmp:
    try:
      proc = subprocess.run(
          [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(tmp)],
          capture_output=True, text=True, check=False, timeout=600)
    except subprocess.TimeoutExpired:
      raise RuntimeError(f"{cxx} took more than 10 minutes on {SOURCE.name}") from None
    if proc.returncode != 0:
      raise RuntimeError(f"{cxx} failed on {SOURCE.name}:\n{proc.stderr[-2000:]}")
  return path


@functools.cache
def available() -> bool:
  """Whether the kernel is compiled and registered (compiling it on the first call)."""
  if os.environ.get(ENV, "1") == "0":
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
  except (RuntimeError, OSError) as e:
    warnings.warn(f"The int8 CPU kernel is not available, so int8 models use XLA's slower "
                  f"product on CPU: {e}", RuntimeWarning, stacklevel=2)
    return False
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.RwkvInt8Matmul), platform="cpu")
  return True


def int8_matmul(x_mi: jax.Array, q_io: jax.Array, scale_go: jax.Array) -> jax.Array:
  """float32 [m, o] = x [m, i] @ dequantize(q, scale), on CPU only; `available()` must be True.

  Args:
    x_mi: float32 [m, i].
    q_io: int8 [i, o].
    scale_go: float32 [g, o]; g divides i (rows of q in groups of i // g).
  """
  if not available():  # registers the FFI target on first use (building the library if needed)
    raise RuntimeError("The int8 CPU kernel is not available (see the warning above, or "
                       f"{ENV}=0); use rwkv_jax.quant.matmul, which falls back to XLA's product.")
  m, d_in = x_mi.shape
  d_out = q_io.shape[1]
  if q_io.shape[0] != d_in or scale_go.shape[1] != d_out or d_in % scale_go.shape[0]:
    raise ValueError(f"int8_matmul: x {x_mi.shape}, q {q_io.shape} and scale "
                     f"{scale_go.shape} do not fit [m, i], [i, o], [g, o] with g dividing i.")
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, d_out), jnp.float32),
                          vmap_method="sequential")
  return call(x_mi.astype(jnp.float32), q_io.astype(jnp.int8), scale_go.astype(jnp.float32))


def reference(x_mi, q_io, scale_go):
  """The same product in plain JAX (dequantised weight, then a float32 dot)."""
  g, d_out = scale_go.shape
  w = (q_io.astype(jnp.float32).reshape(g, -1, d_out) * scale_go[:, None]).reshape(q_io.shape)
  return jnp.dot(x_mi.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)

"""The int8 CPU kernel (rwkv_jax_kernels.int8_cpu): its product against float64, where
quant.matmul uses it, its gradient, what lowers for GPU and TPU, and the fallback to XLA."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rwkv_jax import model as model_lib
from rwkv_jax import quant
from rwkv_jax_kernels import int8_cpu

# Only a machine without a compiler skips; a compiler that fails on the source fails the tests.
pytestmark = pytest.mark.skipif(int8_cpu.compiler() is None,
                                reason="no C++ compiler ($CXX, c++ or g++): the kernel cannot be built")


def test_the_kernel_builds_and_registers():
  assert int8_cpu.build().is_file()  # raises with the compiler's message if the source is broken
  assert int8_cpu.available()


def float64_product(x, q, scale):
  x, q, scale = (np.asarray(a, np.float64) for a in (x, q, scale))
  g = scale.shape[0]
  w = (q.reshape(g, -1, q.shape[1]) * scale[:, None]).reshape(q.shape)
  return x @ w


def random_operands(rng, m, d_in, d_out, groups, x_scale=1.0, s_range=(1e-3, 1e-1)):
  x = (x_scale * rng.standard_normal((m, d_in))).astype(np.float32)
  q = rng.integers(-127, 128, (d_in, d_out)).astype(np.int8)
  scale = np.exp(rng.uniform(*np.log(s_range), (groups, d_out))).astype(np.float32)
  return x, q, scale


# (m, in, out, groups): widths below, at and around the 64-column block, rows around the 4-row
# pass, one group (in not a multiple of 16), the shapes of a 169M model and its head.
SHAPES = [(1, 16, 1, 1), (1, 37, 19, 1), (3, 48, 64, 3), (4, 48, 65, 3), (5, 64, 130, 4),
          (7, 80, 200, 5), (8, 768, 3072, 48), (2, 3072, 768, 192), (1, 768, 50277, 48),
          (16, 32, 257, 2), (13, 33, 129, 1)]


@pytest.mark.parametrize("m,d_in,d_out,groups", SHAPES)
def test_kernel_equals_the_float64_product(m, d_in, d_out, groups):
  rng = np.random.default_rng(m * 1000 + d_out)
  x, q, scale = random_operands(rng, m, d_in, d_out, groups)
  y = np.asarray(jax.jit(int8_cpu.int8_matmul)(x, q, scale))
  want = float64_product(x, q, scale)
  # float32 sums of d_in terms: relative to the size of the terms, not of the (cancelling) sum.
  bound = 2e-6 * np.sqrt(d_in) * float64_product(np.abs(x), np.abs(q), scale)
  assert y.dtype == np.float32 and y.shape == (m, d_out)
  assert np.all(np.abs(y - want) <= bound + 1e-30)


def test_kernel_at_extremes():
  rng = np.random.default_rng(7)
  # The largest int8 values, scales over 12 decades, inputs of 1e-20 and 1e15, exact zeros.
  q = np.where(rng.random((64, 96)) < 0.5, 127, -127).astype(np.int8)
  scale = np.exp(rng.uniform(np.log(1e-6), np.log(1e6), (4, 96))).astype(np.float32)
  x = np.stack([np.full(64, 1e-20), np.full(64, 1e15), np.zeros(64),
                rng.standard_normal(64)]).astype(np.float32)
  x[0, ::2] *= -1
  y = np.asarray(int8_cpu.int8_matmul(x, q, scale))
  want = float64_product(x, q, scale)
  assert np.all(np.isfinite(y))
  np.testing.assert_array_equal(y[2], 0.0)
  row_size = np.abs(want).max(axis=1, keepdims=True)
  assert np.all(np.abs(y - want) <= 1e-5 * np.abs(want) + 1e-6 * row_size)
  # Overflow is float32's, as in any float32 product.
  assert np.all(np.isinf(int8_cpu.int8_matmul(np.full((1, 16), 3e38, np.float32),
                                              np.full((16, 64), 127, np.int8),
                                              np.ones((1, 64), np.float32))))


def test_kernel_rejects_operands_that_do_not_fit():
  with pytest.raises(ValueError, match="do not fit"):
    int8_cpu.int8_matmul(jnp.ones((1, 32)), jnp.ones((32, 8), jnp.int8), jnp.ones((3, 8)))
  with pytest.raises(ValueError, match="do not fit"):
    int8_cpu.int8_matmul(jnp.ones((1, 32)), jnp.ones((16, 8), jnp.int8), jnp.ones((1, 8)))


def ffi_targets(fn, *args) -> set[str]:
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "ffi_call":
        found.add(eqn.params["target_name"])
      for param in eqn.params.values():
        for inner in param if isinstance(param, (tuple, list)) else (param,):
          inner = getattr(inner, "jaxpr", inner)
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize("lead", [(1,), (2, 3), (4, 1, 4), (17,), (2, 64), (2, 150), (300,)])
def test_quant_matmul_uses_the_kernel_for_decoding_and_xla_above(lead):
  rng = np.random.default_rng(len(lead))
  x = rng.standard_normal((*lead, 48)).astype(np.float32)
  q, scale = quant.quantize(rng.standard_normal((48, 40)).astype(np.float32))
  uses_kernel = int(np.prod(lead)) <= quant.CPU_KERNEL_MAX_ROWS
  assert (int8_cpu.TARGET in ffi_targets(quant.matmul, x, q, scale)) == uses_kernel
  y = jax.jit(quant.matmul)(x, q, scale)
  assert y.shape == (*lead, 40)
  np.testing.assert_allclose(y, float64_product(x.reshape(-1, 48), q, scale).reshape(y.shape),
                             rtol=1e-5, atol=1e-5)


def test_gradient_through_the_kernel_equals_xla_form():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 48)).astype(np.float32)
  q, scale = quant.quantize(rng.standard_normal((48, 70)).astype(np.float32))
  cotangent = rng.standard_normal((2, 70)).astype(np.float32)
  loss = lambda f: lambda x: jnp.sum(f(x, q, scale) * cotangent)
  g_kernel = jax.grad(loss(quant.matmul))(x)
  g_xla = jax.grad(loss(int8_cpu.reference))(x)
  np.testing.assert_allclose(g_kernel, g_xla, rtol=1e-5, atol=1e-5)
  assert int8_cpu.TARGET in ffi_targets(jax.grad(loss(quant.matmul)), x)


def test_kernel_under_vmap():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((3, 2, 32)).astype(np.float32)
  q, scale = quant.quantize(rng.standard_normal((32, 24)).astype(np.float32))
  y = jax.vmap(int8_cpu.int8_matmul, in_axes=(0, None, None))(x, q, scale)
  for b in range(3):
    np.testing.assert_allclose(y[b], float64_product(x[b], q, scale), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def int8_model():
  config = model_lib.RWKVConfig(n_layer=2, n_embd=32, vocab_size=70).with_precision(
      "int8", platform="cpu")
  model = model_lib.RWKV(config, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  # Official init leaves several matrices at zero: make every one non-trivial.
  nnx.update(model, jax.tree.unflatten(treedef, [
      x if x.dtype == jnp.int8 else x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)]))
  nnx.update(model, jax.tree.unflatten(treedef, [
      jax.random.randint(k, x.shape, -127, 128).astype(jnp.int8) if x.dtype == jnp.int8 else x
      for x, k in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), keys)]))
  return model


def step_fn(model):
  graphdef, params = nnx.split(model)

  def step(params, token, state):
    return nnx.merge(graphdef, params).step(token, state)

  state = model_lib.empty_state(model.config, 2)
  return step, (params, jnp.asarray([3, 5], jnp.int32), state)


@pytest.mark.slow
def test_a_decoding_step_with_the_kernel_equals_xla_form(int8_model, monkeypatch):
  step, args = step_fn(int8_model)
  assert int8_cpu.TARGET in ffi_targets(step, *args)
  logits, state = jax.jit(step)(*args)
  monkeypatch.setattr(quant, "_use_cpu_kernel", lambda x: False)
  step, args = step_fn(int8_model)  # a new function: jax caches traces per function
  assert int8_cpu.TARGET not in ffi_targets(step, *args)
  logits_xla, state_xla = jax.jit(step)(*args)
  # Two float32 summation orders through two layers of random int8 weights (logits up to ~50).
  for a, b in zip((logits, *state), (logits_xla, *state_xla)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_programs_lowered_for_accelerators_do_not_hold_the_kernel(int8_model, platform):
  step, args = step_fn(int8_model)
  # jax.export refuses custom calls it does not know unless told; the CPU program needs that.
  allow = [jax.export.DisabledSafetyCheck.custom_call(int8_cpu.TARGET)]
  cpu = jax.export.export(jax.jit(step), platforms=["cpu"], disabled_checks=allow)(*args)
  assert int8_cpu.TARGET in cpu.mlir_module()
  accel = jax.export.export(jax.jit(step), platforms=[platform])(*args).mlir_module()
  assert int8_cpu.TARGET not in accel and "dot_general" in accel


def run_python(code: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**os.environ, **env}, timeout=timeout, check=False)


CHECK = ("import warnings\n"
         "from rwkv_jax_kernels import int8_cpu\n"
         "with warnings.catch_warnings(record=True) as w:\n"
         "  warnings.simplefilter('always')\n"
         "  print(int8_cpu.available(), len(w), w[0].message if w else '')\n")


def test_without_a_compiler_int8_falls_back_to_xla_with_one_warning(tmp_path):
  proc = run_python(CHECK, CXX=str(tmp_path / "no-such-compiler"),
                    RWKV_JAX_CACHE=str(tmp_path / "cache"))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("False 1 The int8 CPU kernel is not available"), proc.stdout
  assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-written left


def test_the_kernel_can_be_turned_off():
  proc = run_python(CHECK, RWKV_JAX_INT8_KERNEL="0")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["False", "0"]


@pytest.mark.slow
def test_a_fresh_cache_builds_the_library_once(tmp_path, monkeypatch):
  proc = run_python(CHECK, RWKV_JAX_CACHE=str(tmp_path))
  assert proc.stdout.split() == ["True", "0"], proc.stdout + proc.stderr
  monkeypatch.setenv("RWKV_JAX_CACHE", str(tmp_path))
  assert list(tmp_path.rglob("*.so")) == [int8_cpu.library_path()]
  mtime = int8_cpu.library_path().stat().st_mtime_ns
  assert run_python(CHECK, RWKV_JAX_CACHE=str(tmp_path)).stdout.split() == ["True", "0"]
  assert int8_cpu.library_path().stat().st_mtime_ns == mtime  # reused, not rebuilt


BATCH_DECODE = ("import jax, numpy as np\n"
                "from flax import nnx\n"
                "from rwkv_jax import model as model_lib\n"
                "from rwkv_jax.infer import sampling\n"
                "from rwkv_jax_kernels import int8_cpu\n"
                "assert int8_cpu.available()\n"
                "cfg = model_lib.RWKVConfig(n_layer=4, n_embd=512, vocab_size=512)\n"
                "model = model_lib.RWKV(cfg.with_precision('int8', platform='cpu'),\n"
                "                       rngs=nnx.Rngs(0))\n"
                "greedy = sampling.SamplingConfig(temperature=0.0)\n"
                "out = sampling.generate(model, np.ones((64, 4), np.int32), 16,\n"
                "                        jax.random.key(0), sampling=greedy)\n"
                "print(out.tokens.shape)\n")


@pytest.mark.slow
def test_batched_decoding_does_not_deadlock():
  # XLA runs independent products of a step (key, value, receptance) at once on its thread pool,
  # and each hands shares of its work to that pool: a call that waited for a share no thread had
  # taken hung this decode for good. (A hang shows as subprocess.TimeoutExpired.)
  proc = run_python(BATCH_DECODE, timeout=180, XLA_FLAGS="")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["(64,", "16)"]

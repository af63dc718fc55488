"""The WKV kernels against the sequential scan and a float64 evaluation of eq. 16.

One base class holds the checks; subclasses pick the kernel and how it runs: the Pallas kernels in
the interpreter (CPU, CI), compiled on a GPU, and the jax-triton kernel (GPU only). The sequential
Pallas kernels (impl="pallas") also have checks of long and ragged sequences against float64
eq. 16, of time segments, of the segment rule, and of their export for cuda.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import kernel_traffic
from rwkv_jax import wkv as wkv_lib
from rwkv_jax.reference import wkv_float64, wkv_reference
from rwkv_jax.wkv import WKVState
from rwkv_jax_kernels import sequential
from rwkv_jax_kernels import wkv_pallas
from rwkv_jax_kernels import wkv_pallas_seq
from wkv_util import random_inputs, rel_err

_ON_GPU = jax.default_backend() in ("gpu", "cuda")

# Errors are measured relative to the largest magnitude of the reference tensor.
_TOL = {  # dtype -> (forward, gradients)
    jnp.float32: (5e-5, 2e-4),
    jnp.bfloat16: (1e-2, 3e-2),
}


def _loss_grad(fn):
  """Gradients of a loss that reads y, the final state, and a second call continued from it."""

  def loss(w, u, k, v, state):
    y, out = fn(w, u, k, v, state)
    y2, _ = fn(w, u, k[:, ::-1], v, out)
    f32 = lambda x: x.astype(jnp.float32)
    weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return (jnp.sum(f32(y) * weights) + jnp.sum(f32(y2) * f32(v)) + jnp.sum(out.num / out.den)
            + jnp.sum(jnp.log(out.den) + out.max_exp) * 0.1 + jnp.sum(jnp.sin(out.max_exp)))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


class _WKVKernelChecks:
  """Checks shared by every kernel; a subclass names the kernel through `wkv`."""

  def wkv(self, w, u, k, v, state=None, block_sizes=None):
    raise NotImplementedError

  @pytest.mark.slow
  @pytest.mark.parametrize("b,t,c,dtype,time_decay,k_max,blocks", [
      pytest.param(2, 37, 48, jnp.float32, (-3.0, 1.0), 3.0, None, id="t_and_c_not_multiples"),
      pytest.param(1, 1, 5, jnp.float32, (-3.0, 1.0), 3.0, None, id="single_token"),
      pytest.param(3, 19, 12, jnp.float32, (-3.0, 1.0), 3.0, (4, 8), id="many_chunks_and_blocks"),
      pytest.param(2, 20, 24, jnp.float32, (-9.0, 4.0), 60.0, None, id="extreme_values"),
      pytest.param(2, 24, 40, jnp.bfloat16, (-3.0, 1.0), 3.0, None, id="bfloat16"),
  ])
  def test_forward_and_gradients_match_scan(self, b, t, c, dtype, time_decay, k_max, blocks):
    w, u, k, v, state = random_inputs(0, b, t, c, dtype, time_decay, k_max)
    kernel = functools.partial(self.wkv, block_sizes=blocks)
    y, out = kernel(w, u, k, v, state)
    y_ref, out_ref = wkv_lib.wkv_scan(w, u, k, v, state)
    tol_fwd, tol_grad = _TOL[dtype]
    assert y.dtype == k.dtype and y.shape == k.shape
    assert all(s.dtype == jnp.float32 and s.shape == (b, c) for s in out)
    for name, x, ref in zip(("y", "num", "den", "max_exp"), (y, *out), (y_ref, *out_ref)):
      assert rel_err(x, ref) < tol_fwd, (name, rel_err(x, ref))
    grads = _loss_grad(kernel)(w, u, k, v, state)
    grads_ref = _loss_grad(wkv_lib.wkv_scan)(w, u, k, v, state)
    names = ("w", "u", "k", "v", "state.num", "state.den", "state.max_exp")
    for name, g, g_ref in zip(names, jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
      assert g.dtype == g_ref.dtype and np.all(np.isfinite(np.asarray(g, np.float32))), name
      assert rel_err(g, g_ref) < tol_grad, (name, rel_err(g, g_ref))

  @pytest.mark.parametrize("time_decay,k_max", [((-3.0, 1.0), 3.0), ((-9.0, 4.0), 60.0)])
  def test_matches_float64_eq16(self, time_decay, k_max):
    w, u, k, v, state = random_inputs(1, 2, 21, 16, jnp.float32, time_decay, k_max)
    y, out = self.wkv(w, u, k, v, state, block_sizes=(8, 32))
    y64, (num64, den64, max64) = wkv_float64(w, u, k, v, state)
    assert rel_err(y, y64) < 2e-5
    # The state's split into mantissa and exponent is the same by construction (a max).
    np.testing.assert_allclose(out.max_exp, max64, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(out.num / out.den, num64 / den64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.den, den64, rtol=1e-4)

  @pytest.mark.slow
  def test_chunked_calls_equal_one_call(self):
    w, u, k, v, state = random_inputs(2, 2, 45, 24, jnp.float32)
    y_full, out_full = self.wkv(w, u, k, v, state)
    ys, out = [], state
    for start, stop in ((0, 7), (7, 23), (23, 24), (24, 45)):
      y, out = self.wkv(w, u, k[:, start:stop], v[:, start:stop], out)
      ys.append(y)
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), y_full, rtol=1e-5, atol=1e-5)
    for s, s_full in zip(out, out_full):
      np.testing.assert_allclose(s, s_full, rtol=1e-5, atol=1e-5)

  def test_no_state_means_empty_state(self):
    w, u, k, v, _ = random_inputs(3, 1, 9, 8, jnp.float32)
    y, out = self.wkv(w, u, k, v)
    y_ref, out_ref = wkv_lib.wkv_scan(w, u, k, v)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.max_exp, out_ref.max_exp, rtol=1e-6)


class TestWKVPallasInterpret(_WKVKernelChecks):
  INTERPRET = True
  IMPL = "pallas_chunked"

  def wkv(self, w, u, k, v, state=None, block_sizes=None):
    blocks = wkv_pallas.BlockSizes(*block_sizes) if block_sizes else wkv_pallas.BlockSizes()
    return wkv_pallas.wkv_pallas(w, u, k, v, state, block_sizes=blocks,
                                 interpret=self.INTERPRET)

  def test_dispatcher_runs_it_by_name(self):
    w, u, k, v, state = random_inputs(4, 2, 5, 6, jnp.float32)
    y, _ = wkv_lib.wkv(w, u, k, v, state, impl=self.IMPL)
    np.testing.assert_allclose(y, wkv_lib.wkv_scan(w, u, k, v, state)[0], rtol=1e-5, atol=1e-6)

  def test_rejects_block_sizes_that_are_not_powers_of_two(self):
    with pytest.raises(ValueError, match="block_t=12 must be a power of two"):
      wkv_pallas.BlockSizes(block_t=12)

  def test_rejects_mismatched_shapes(self):
    w, u, k, v, state = random_inputs(5, 2, 5, 6, jnp.float32)
    with pytest.raises(ValueError, match="w and u must be"):
      self.wkv(w[:4], u, k, v, state)
    with pytest.raises(ValueError, match="state tensors must be"):
      self.wkv(w, u, k, v, WKVState(*(s[:1] for s in state)))


def gradients_and_references(kernel, inputs, f64_grads: bool):
  """(name, kernel's, scan's, reference's) for each gradient of `_loss_grad`; the reference is
  float64 eq. 16 where differentiating it fits in memory (O(t^2)), else the scan."""
  grads = _loss_grad(kernel)(*inputs)
  grads_scan = _loss_grad(wkv_lib.wkv_scan)(*inputs)
  grads_ref = grads_scan
  if f64_grads:
    with jax.enable_x64(True):
      f64 = lambda x: jnp.asarray(x, jnp.float64)
      grads_ref = _loss_grad(wkv_reference)(*jax.tree.map(f64, inputs))
  names = ("w", "u", "k", "v", "state.num", "state.den", "state.max_exp")
  return list(zip(names, *map(jax.tree.leaves, (grads, grads_scan, grads_ref))))


def compiled(interpreted: type, marker: str, available: bool, why: str) -> type:
  """The checks of `interpreted` with the kernels compiled, marked `marker`; skipped elsewhere."""
  cls = type(interpreted.__name__.replace("Interpret", "Compiled"), (interpreted,),
             {"INTERPRET": False})
  reason = f"{why}; CPU runs the same checks in an interpreter ({interpreted.__name__})"
  return getattr(pytest.mark, marker)(pytest.mark.skipif(not available, reason=reason)(cls))


TestWKVPallasCompiled = compiled(TestWKVPallasInterpret, "gpu", _ON_GPU,
                                 "compiled Pallas kernels need a GPU")


LONG_CASES = [
    pytest.param(3, 1, 7, jnp.float32, 16, True, id="t1"),
    pytest.param(2, 37, 20, jnp.float32, 8, True, id="t37"),
    pytest.param(2, 77, 20, jnp.bfloat16, 16, True, marks=pytest.mark.slow, id="t77_bf16"),
    pytest.param(1, 1000, 8, jnp.float32, 16, True, marks=pytest.mark.slow, id="t1000"),
    pytest.param(1, 4096, 8, jnp.float32, 16, False, marks=pytest.mark.slow, id="t4096"),
]  # bfloat16 changes the loads and stores, which 77 tokens check; the arithmetic is float32.


class TestWKVPallasSeqInterpret(_WKVKernelChecks):
  """The sequential-in-kernel Pallas kernels (impl="pallas" on GPUs and CPU)."""
  INTERPRET = True
  IMPL = "pallas"

  def wkv(self, w, u, k, v, state=None, block_sizes=None, num_segments=None):
    blocks = (wkv_pallas_seq.BlockSizes(*block_sizes) if block_sizes
              else wkv_pallas_seq.DEFAULT_BLOCK_SIZES)
    blocks = dataclasses.replace(blocks, num_segments=num_segments)
    return wkv_pallas_seq.wkv_pallas_seq(w, u, k, v, state, block_sizes=blocks,
                                         interpret=self.INTERPRET)

  def test_dispatcher_runs_it_by_name(self):
    w, u, k, v, state = random_inputs(4, 2, 5, 6, jnp.float32)
    y, _ = wkv_lib.wkv(w, u, k, v, state, impl=self.IMPL)
    np.testing.assert_allclose(y, wkv_lib.wkv_scan(w, u, k, v, state)[0], rtol=1e-5, atol=1e-6)

  @pytest.mark.parametrize("b,t,c,dtype,block_t,f64_grads", LONG_CASES)
  def test_long_and_ragged_sequences_match_float64_eq16(self, b, t, c, dtype, block_t,
                                                        f64_grads):
    # Extreme decays and |k| up to 60; t and c multiples of no block.
    w, u, k, v, state = random_inputs(11, b, t, c, dtype, (-9.0, 4.0), 60.0)
    kernel = functools.partial(self.wkv, block_sizes=(block_t, 32))
    tol_fwd, tol_grad = _TOL[dtype]
    # A sequential float32 form drifts with t: it rounds max_exp - w at every step (the scan
    # too: ~1e-3 relative after 4096 steps at |k| ~ 60, tests/test_wkv.py). The kernel's merges
    # round differently from the scan's, so both comparisons allow for it.
    drift = 1e-6 * t
    y, out = kernel(w, u, k, v, state)
    y_scan, out_scan = wkv_lib.wkv_scan(w, u, k, v, state)
    y64, out64 = wkv_float64(w, u, k, v, state)
    assert y.dtype == k.dtype and rel_err(y, y_scan) < tol_fwd + drift
    assert rel_err(y, y64) < tol_fwd + drift
    for x, x_scan in zip(out, out_scan):
      assert rel_err(x, x_scan) < tol_fwd + drift
    np.testing.assert_allclose(out.max_exp, out64.max_exp, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(out.num / out.den, out64.num / out64.den, rtol=1e-4 + drift,
                               atol=1e-4)
    np.testing.assert_allclose(out.den, out64.den, rtol=1e-4 + drift)
    for name, g, g_scan, g_ref in gradients_and_references(kernel, (w, u, k, v, state),
                                                           f64_grads):
      assert g.dtype == (k.dtype if name in ("k", "v") else jnp.float32), name
      assert rel_err(g, g_scan) < tol_grad + drift, (name, rel_err(g, g_scan))
      assert rel_err(g, g_ref) < tol_grad + drift, (name, rel_err(g, g_ref))

  @pytest.mark.parametrize("segments", [2, 7])
  def test_several_time_segments_equal_one_segment(self, segments):
    if self.INTERPRET:
      pytest.skip("compiled kernels only: in the interpreters, segments are checked against "
                  "float64 and the scan over 1000 tokens (test_long_and_ragged_sequences_match_"
                  "float64_eq16[t1000], 3 segments by the rule; Triton: "
                  "test_time_segments_of_a_long_sequence_match_float64_eq16)")
    w, u, k, v, state = random_inputs(12, 2, 100, 20, jnp.float32, (-9.0, 4.0), 60.0)
    one = functools.partial(self.wkv, block_sizes=(8, 16), num_segments=1)
    several = functools.partial(self.wkv, block_sizes=(8, 16), num_segments=segments)
    # Equal up to rounding: a segment's decay is rounded once (max_exp - length * w), not at
    # every token.
    tol_fwd, tol_grad = _TOL[jnp.float32]
    for x, x_one in zip(jax.tree.leaves(several(w, u, k, v, state)),
                        jax.tree.leaves(one(w, u, k, v, state))):
      assert rel_err(x, x_one) < tol_fwd, rel_err(x, x_one)
    grads = _loss_grad(several)(w, u, k, v, state)
    names = ("w", "u", "k", "v", "state.num", "state.den", "state.max_exp")
    for name, g, g_one, g_scan in zip(names, *map(jax.tree.leaves, (
        grads, _loss_grad(one)(w, u, k, v, state),
        _loss_grad(wkv_lib.wkv_scan)(w, u, k, v, state)))):
      assert rel_err(g, g_one) < tol_grad, (name, rel_err(g, g_one))
      assert rel_err(g, g_scan) < tol_grad, (name, rel_err(g, g_scan))

  def test_rejects_bad_block_sizes(self):
    with pytest.raises(ValueError, match="block_c=48 must be a power of two"):
      wkv_pallas_seq.BlockSizes(block_c=48)
    with pytest.raises(ValueError, match="num_segments=0 must be >= 1"):
      wkv_pallas_seq.BlockSizes(num_segments=0)


TestWKVPallasSeqCompiled = compiled(TestWKVPallasSeqInterpret, "gpu", _ON_GPU,
                                    "compiled Pallas kernels need a GPU")


def test_time_segments_only_when_batch_and_channels_leave_cores_idle():
  # 8 x 24 channel blocks fill an H100's 132 cores: one segment, one pass each way.
  assert sequential.num_segments(8, 1024, 768, 32, "NVIDIA H100 80GB HBM3") == 1
  # One row has 24 programs: segments bring them to about two per core...
  segments = sequential.num_segments(1, 16384, 768, 32, "NVIDIA H100 80GB HBM3")
  assert segments == 11 and segments * 24 >= 2 * 132
  # ... but never shorter than MIN_SEGMENT tokens, and fewer cores want fewer segments.
  assert sequential.num_segments(1, 1000, 768, 32, None) == 1000 // sequential.MIN_SEGMENT
  assert sequential.num_segments(1, 100, 768, 32, None) == 1
  assert sequential.num_segments(1, 16384, 768, 32, "NVIDIA A100-SXM4-40GB") == 9
  assert sequential.num_segments(1, 16384, 768, 32, 24) == 1
  # Segments are whole checkpoint blocks, and the last one is not empty.
  length = sequential.segment_length(16384, 11, 16)
  assert length % 16 == 0 and 10 * length < 16384 <= 11 * length


@pytest.mark.parametrize("shape,dtype,names", [
    ((8, 1024, 768), jnp.float32, ["wkv_seq_forward", "wkv_seq_backward"]),
    pytest.param((8, 1024, 768), jnp.bfloat16, ["wkv_seq_forward", "wkv_seq_backward"],
                 marks=pytest.mark.slow),
    ((1, 16384, 768), jnp.float32, ["wkv_seq_summary", "wkv_seq_forward",
                                    "wkv_seq_reverse_summary", "wkv_seq_backward"]),
], ids=["8x1024x768", "8x1024x768_bf16", "1x16384x768"])
def test_sequential_pallas_exports_for_cuda_as_at_most_four_kernels_and_little_glue(
    shape, dtype, names):
  b, _, c = shape
  vec, bc = jax.ShapeDtypeStruct((c,), jnp.float32), jax.ShapeDtypeStruct((b, c), jnp.float32)
  seq = jax.ShapeDtypeStruct(shape, dtype)
  kernel = functools.partial(wkv_pallas_seq.wkv_pallas_seq, interpret=False)
  step = kernel_traffic.fwd_bwd(kernel)
  exported = jax.export.export(
      jax.jit(step), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          vec, vec, seq, seq, WKVState(bc, bc, bc), seq)
  text = exported.mlir_module()
  structure = kernel_traffic.count_ops(text)
  assert structure.kernel_calls == len(names) <= 4, structure
  assert structure.glue_ops <= 150, structure
  # The Triton kernels in call order (their names are in each call's attributes).
  assert re.findall(r'name = "(wkv_seq_\w+)"', text) == names


class TestWKVTritonInterpret(TestWKVPallasInterpret):
  """The Triton kernels, launched from JAX through Triton's interpreter (jax-triton on a GPU)."""
  IMPL = "triton_chunked"

  def wkv(self, w, u, k, v, state=None, block_sizes=None):
    from rwkv_jax_kernels import wkv_triton  # pylint: disable=g-import-not-at-top
    blocks = wkv_triton.BlockSizes(*block_sizes) if block_sizes else wkv_triton.BlockSizes()
    return wkv_triton.wkv_triton(w, u, k, v, state, block_sizes=blocks, interpret=self.INTERPRET)


TestWKVTritonCompiled = compiled(TestWKVTritonInterpret, "gpu", _ON_GPU,
                                 "jax-triton needs a GPU build of jax")


class TestWKVTritonSeqInterpret(TestWKVPallasSeqInterpret):
  """The sequential-in-kernel Triton kernels (impl="triton"), launched from JAX through Triton's
  interpreter (jax-triton on a GPU); the checks of the sequential Pallas kernels."""
  IMPL = "triton"

  segments = None  # when a check names none (None: the rule)

  def wkv(self, w, u, k, v, state=None, block_sizes=None, num_segments=None):
    from rwkv_jax_kernels import wkv_triton_seq  # pylint: disable=g-import-not-at-top
    blocks = (wkv_triton_seq.BlockSizes(*block_sizes) if block_sizes
              else wkv_triton_seq.BlockSizes())
    blocks = dataclasses.replace(blocks, num_segments=num_segments or self.segments)
    return wkv_triton_seq.wkv_triton_seq(w, u, k, v, state, block_sizes=blocks,
                                         interpret=self.INTERPRET)

  @pytest.mark.parametrize("segments,block_t", [(2, 16), (3, 4)])
  def test_time_segments_with_a_short_last_one_equal_one_segment(self, segments, block_t):
    # 37 tokens: the last segment is short and ends inside a checkpoint block.
    w, u, k, v, state = random_inputs(13, 2, 37, 24, jnp.float32, (-9.0, 4.0), 60.0)
    one = functools.partial(self.wkv, block_sizes=(block_t, 16), num_segments=1)
    several = functools.partial(self.wkv, block_sizes=(block_t, 16), num_segments=segments)
    # Equal up to rounding: a segment's decay is one product L w, not L subtractions of w, and
    # with w up to e^4 and |k| up to 60 an exponent's last bit is worth about 1e-5.
    tol_fwd, tol_grad = _TOL[jnp.float32]
    for x, x_one in zip(jax.tree.leaves(several(w, u, k, v, state)),
                        jax.tree.leaves(one(w, u, k, v, state))):
      assert rel_err(x, x_one) < tol_fwd, rel_err(x, x_one)
    for g, g_one in zip(jax.tree.leaves(_loss_grad(several)(w, u, k, v, state)),
                        jax.tree.leaves(_loss_grad(one)(w, u, k, v, state))):
      assert rel_err(g, g_one) < tol_grad, rel_err(g, g_one)

  def test_long_and_ragged_sequences_match_float64_eq16(self, b, t, c, dtype, block_t,
                                                        f64_grads):
    # In one segment: the inherited check holds the kernel to the scan's own rounding (max_exp - w
    # at every step). Segments decay a state by L w at once, which drifts from the scan as far as
    # the scan drifts from float64; the next test holds them to float64.
    self.segments = 1
    super().test_long_and_ragged_sequences_match_float64_eq16(b, t, c, dtype, block_t, f64_grads)

  # The cases of the Pallas kernels up to 77 tokens: Triton's interpreter takes minutes per
  # 4096 tokens. The next test runs 1000 tokens (63 blocks in 3 segments); the per-token
  # arithmetic that 4096 tokens test for drift is kernels/sequential.py's, shared with the Pallas
  # kernels, which run 4096 tokens.
  test_long_and_ragged_sequences_match_float64_eq16 = pytest.mark.parametrize(
      "b,t,c,dtype,block_t,f64_grads", [c for c in LONG_CASES if c.id not in (
          "t1000", "t4096")])(test_long_and_ragged_sequences_match_float64_eq16)

  @pytest.mark.slow
  def test_time_segments_of_a_long_sequence_match_float64_eq16(self):
    t = 1000
    w, u, k, v, state = random_inputs(11, 1, t, 8, jnp.float32, (-9.0, 4.0), 60.0)
    kernel = functools.partial(self.wkv, block_sizes=(16, 32), num_segments=3)
    tol_fwd, tol_grad = _TOL[jnp.float32]
    drift = 1e-6 * t  # as in the check above
    y, out = kernel(w, u, k, v, state)
    y64, out64 = wkv_float64(w, u, k, v, state)
    assert rel_err(y, y64) < tol_fwd + drift
    np.testing.assert_allclose(out.max_exp, out64.max_exp, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(out.num / out.den, out64.num / out64.den, rtol=1e-4 + drift,
                               atol=1e-4)
    np.testing.assert_allclose(out.den, out64.den, rtol=1e-4 + drift)
    grads = _loss_grad(kernel)(w, u, k, v, state)
    with jax.enable_x64(True):
      f64 = lambda x: jnp.asarray(x, jnp.float64)
      grads64 = _loss_grad(wkv_reference)(*jax.tree.map(f64, (w, u, k, v, state)))
    names = ("w", "u", "k", "v", "state.num", "state.den", "state.max_exp")
    for name, g, g64 in zip(names, jax.tree.leaves(grads), jax.tree.leaves(grads64)):
      assert rel_err(g, g64) < tol_grad + drift, (name, rel_err(g, g64))



TestWKVTritonSeqCompiled = compiled(TestWKVTritonSeqInterpret, "gpu", _ON_GPU,
                                    "jax-triton needs a GPU build of jax")

"""The Pallas TPU (Mosaic) WKV kernels: their numbers in Pallas's TPU interpreter on CPU, compiled
on a TPU (marked `tpu`), and what lowers for TPU from any machine (`jax.export`, which needs no
TPU).

Two kernels: the sequential one (`wkv_pallas_tpu_seq`, impl="pallas") and the chunked one
(`wkv_pallas_tpu`, impl="pallas_chunked"). The numeric checks are test_kernels.py's, shared by
every kernel, plus long and ragged sequences against float64 eq. 16; the lowering checks cover the
kernels alone, the model's training step and generation, the dispatcher's choice of kernel by the
platform the code is lowered for, and how few Mosaic calls and glue ops forward+backward exports
to (the cross-platform float32 targets are tests/test_kernel_structure.py's).
"""

from __future__ import annotations

import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_kernels import (_TOL, _loss_grad, _WKVKernelChecks, compiled,
                          gradients_and_references)

from experiments import kernel_traffic
from rwkv_jax import sharding
from rwkv_jax import wkv as wkv_lib
from rwkv_jax.infer import sampling
from rwkv_jax.reference import wkv_float64
from rwkv_jax.train import config as train_config
from rwkv_jax.train import step as step_lib
from rwkv_jax_kernels import chunked, wkv_pallas_tpu, wkv_pallas_tpu_seq
from wkv_util import random_inputs, rel_err

# impl="pallas" on CPU and GPU, imported by hand: importing the TPU kernel above registers the
# name, and the registry imports a name's modules only while the name is unregistered.
importlib.import_module("rwkv_jax_kernels.wkv_pallas_seq")

_ON_TPU = jax.default_backend() == "tpu"
_MOSAIC = "tpu_custom_call"
# Kernel names each TPU kernel's forward and backward lower to.
_SEQ_KERNELS = ("wkv_tpu_seq_forward", "wkv_tpu_seq_backward")
_CHUNKED_FORWARD = ("wkv_tpu_summary", "wkv_tpu_output")
_CHUNKED_KERNELS = _CHUNKED_FORWARD + ("wkv_tpu_output_bwd", "wkv_tpu_summary_bwd")


def _assert_mesh_of_8():
  assert len(jax.devices()) == 8, "tests/conftest.py sets up 8 fake CPU devices"


def _check_per_shard_call(fn, mesh, w, u, k, v, state):
  """fn (a kernel wrapped by sharding.wkv_per_shard) runs per shard on `mesh` and gives the
  scan's outputs and gradients."""
  with jax.set_mesh(mesh):
    (y, out), grads = jax.jit(lambda *a: fn(*a))(w, u, k, v, state), _loss_grad(fn)(
        w, u, k, v, state)
    lowered = jax.jit(fn).lower(w, u, k, v, state).as_text()
  assert "manual_computation" in lowered or "SPMDFullToShardShape" in lowered
  y_ref, out_ref = wkv_lib.wkv_scan(w, u, k, v, state)
  for x, ref in zip((y, *out), (y_ref, *out_ref)):
    assert rel_err(x, ref) < 5e-5
  grads_ref = _loss_grad(wkv_lib.wkv_scan)(w, u, k, v, state)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    assert rel_err(g, g_ref) < 2e-4


class TestWKVPallasTPUSeqInterpret(_WKVKernelChecks):
  INTERPRET = True

  def wkv(self, w, u, k, v, state=None, block_sizes=None):
    blocks = wkv_pallas_tpu_seq.BlockSizes()
    if block_sizes:  # the shared checks ask for short blocks (GPU tiles): the shortest on TPU
      blocks = wkv_pallas_tpu_seq.BlockSizes(block_t=16)
    return wkv_pallas_tpu_seq.wkv_pallas_tpu_seq(w, u, k, v, state, block_sizes=blocks,
                                                 interpret=self.INTERPRET)

  @pytest.mark.slow
  @pytest.mark.parametrize("b,t,c,dtype,block_t,f64_grads", [
      # 16 time blocks, the last one ragged, in one channel block of 20 lanes.
      pytest.param(1, 4093, 20, jnp.float32, 256, False, id="t4093_ragged"),
      # 10 time blocks; 2 channel blocks, the second 12 lanes wide.
      pytest.param(2, 301, 140, jnp.float32, 32, True, id="t301_many_blocks"),
      # bfloat16 over several blocks (its loads and stores; the arithmetic is float32).
      pytest.param(2, 77, 20, jnp.bfloat16, 32, True, id="t77_bf16"),
      pytest.param(3, 1, 7, jnp.float32, 256, True, id="t1"),
  ])
  def test_long_and_ragged_sequences_match_float64_eq16(self, b, t, c, dtype, block_t,
                                                        f64_grads):
    # Over thousands of tokens with |k| ~ 60, float32 rounding of the running max_exp adds up
    # (~1e-3 in an exponent after 4096 steps) in the scan as in the kernel: each result must be
    # as close to float64 as the scan's, within the dtype's tolerance.
    w, u, k, v, state = random_inputs(11, b, t, c, dtype, (-9.0, 4.0), 60.0)
    kernel = functools.partial(wkv_pallas_tpu_seq.wkv_pallas_tpu_seq, interpret=self.INTERPRET,
                               block_sizes=wkv_pallas_tpu_seq.BlockSizes(block_t=block_t))
    tol_fwd, tol_grad = _TOL[dtype]
    ratio = lambda s: (np.asarray(s.num, np.float64) / np.asarray(s.den, np.float64), s.den,
                       s.max_exp)
    (y, out), (y_scan, out_scan) = kernel(w, u, k, v, state), wkv_lib.wkv_scan(w, u, k, v, state)
    y64, out64 = wkv_float64(w, u, k, v, state)
    names = ("y", "num / den", "den", "max_exp")
    for name, x, x_scan, x64 in zip(names, (y, *ratio(out)), (y_scan, *ratio(out_scan)),
                                    (y64, *ratio(out64))):
      assert rel_err(x, x64) <= rel_err(x_scan, x64) + tol_fwd, (name, rel_err(x, x64))
    for name, g, g_scan, g_ref in gradients_and_references(kernel, (w, u, k, v, state),
                                                           f64_grads):
      assert g.dtype == g_scan.dtype and np.all(np.isfinite(np.asarray(g, np.float32))), name
      assert rel_err(g, g_ref) <= rel_err(g_scan, g_ref) + tol_grad, (name, rel_err(g, g_ref))

  @pytest.mark.slow
  def test_sharded_call_on_the_8_device_mesh_matches_the_scan(self):
    _assert_mesh_of_8()
    mesh = sharding.make_mesh(data=-1, fsdp=1, tensor=2)
    w, u, k, v, state = random_inputs(6, 8, 21, 260, jnp.float32)
    fn = sharding.wkv_per_shard(functools.partial(
        wkv_pallas_tpu_seq.wkv_pallas_tpu_seq, interpret=self.INTERPRET,
        block_sizes=wkv_pallas_tpu_seq.BlockSizes(block_t=16)))
    _check_per_shard_call(fn, mesh, w, u, k, v, state)

  def test_rejects_block_sizes_off_the_tpu_tiling(self):
    with pytest.raises(ValueError, match="block_t=8 must be a positive multiple of 16"):
      wkv_pallas_tpu_seq.BlockSizes(block_t=8)
    with pytest.raises(ValueError, match="block_c=192 must be a positive multiple of 128"):
      wkv_pallas_tpu_seq.BlockSizes(block_c=192)


TestWKVPallasTPUSeqCompiled = compiled(TestWKVPallasTPUSeqInterpret, "tpu", _ON_TPU,
                                       "compiled Mosaic kernels need a TPU")


class TestWKVPallasTPUInterpret(_WKVKernelChecks):
  INTERPRET = True

  def wkv(self, w, u, k, v, state=None, block_sizes=None):
    blocks = wkv_pallas_tpu.BlockSizes()
    if block_sizes:  # the shared checks name GPU tiles: keep their short chunks, on TPU tiling
      blocks = wkv_pallas_tpu.BlockSizes(block_t=max(8, -(-block_sizes[0] // 8) * 8))
    return wkv_pallas_tpu.wkv_pallas_tpu(w, u, k, v, state, block_sizes=blocks,
                                         interpret=self.INTERPRET)

  @pytest.mark.slow
  def test_many_time_blocks_and_channel_blocks(self):
    # 10 chunks of 8 -> 2 programs in time, the second with 6 wholly padded chunks; 130
    # channels -> 2 lane blocks; extreme decays and keys.
    self.test_forward_and_gradients_match_scan(2, 75, 130, jnp.float32, (-9.0, 4.0), 60.0,
                                               (8, 128))

  @pytest.mark.slow
  def test_sharded_call_matches_the_scan(self):
    _assert_mesh_of_8()
    n, tensor = 8, 2
    mesh = sharding.make_mesh(data=-1, fsdp=1, tensor=tensor)
    w, u, k, v, state = random_inputs(6, 2 * (n // tensor), 13, 24, jnp.float32)
    fn = sharding.wkv_per_shard(
        functools.partial(wkv_pallas_tpu.wkv_pallas_tpu, interpret=self.INTERPRET))
    _check_per_shard_call(fn, mesh, w, u, k, v, state)

  def test_rejects_block_sizes_off_the_tpu_tiling(self):
    with pytest.raises(ValueError, match="block_t=12 must be a positive multiple of 8"):
      wkv_pallas_tpu.BlockSizes(block_t=12)
    with pytest.raises(ValueError, match="block_c=64 must be a positive multiple of 128"):
      wkv_pallas_tpu.BlockSizes(block_c=64)
    with pytest.raises(ValueError, match="chunks_per_block=4 must be"):
      wkv_pallas_tpu.BlockSizes(chunks_per_block=4)
    w, u, k, v, state = random_inputs(5, 1, 9, 8, jnp.bfloat16)
    with pytest.raises(ValueError, match="block_t=8 must be a multiple of 16 for bfloat16"):
      wkv_pallas_tpu.wkv_pallas_tpu(w, u, k, v, state,
                                    block_sizes=wkv_pallas_tpu.BlockSizes(block_t=8))


TestWKVPallasTPUCompiled = compiled(TestWKVPallasTPUInterpret, "tpu", _ON_TPU,
                                    "compiled Mosaic kernels need a TPU")


def test_interpreters_never_run_unasked_on_an_accelerator(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(ValueError, match="impl='pallas'.*wkv_pallas_tpu"):
    chunked.interpret_off_gpu(None)  # the GPU kernels' default
  assert chunked.interpret_off_gpu(True) is True
  assert wkv_pallas_tpu._interpret_mode(None) is False  # pylint: disable=protected-access
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert chunked.interpret_off_gpu(None) is False
  with pytest.raises(ValueError, match="TPU .Mosaic. kernel and JAX runs on 'gpu'"):
    wkv_pallas_tpu._interpret_mode(None)  # pylint: disable=protected-access
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert chunked.interpret_off_gpu(None) is True
  assert wkv_pallas_tpu._interpret_mode(None)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------
# Lowering for TPU on any machine.


def _tpu_module(fn, *args) -> str:
  return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


def _kernel_names(module: str) -> list[str]:
  return re.findall(r'kernel_name = "([a-z_]+)"', module)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kernel,forward_names,names", [
    (wkv_pallas_tpu_seq.wkv_pallas_tpu_seq, _SEQ_KERNELS[:1], _SEQ_KERNELS),
    (wkv_pallas_tpu.wkv_pallas_tpu, _CHUNKED_FORWARD, _CHUNKED_KERNELS),
], ids=["seq", "chunked"])
def test_kernel_lowers_to_mosaic_forward_and_gradient(dtype, kernel, forward_names, names):
  w, u, k, v, state = random_inputs(7, 2, 37, 200, dtype)
  compiled_kernel = lambda *args: kernel(*args, interpret=False)
  forward = _tpu_module(compiled_kernel, w, u, k, v, state)
  assert sorted(_kernel_names(forward)) == sorted(forward_names)
  grads = _tpu_module(_loss_grad(compiled_kernel), w, u, k, v, state)
  # _loss_grad calls the kernel twice (the second call continues from the first's state).
  assert sorted(set(_kernel_names(grads))) == sorted(names)


@pytest.mark.parametrize("shape", kernel_traffic.STRUCTURE_SHAPES,
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_and_backward_export_as_two_mosaic_calls_and_little_glue(shape, dtype):
  structure = kernel_traffic.structure("pallas", shape, "tpu", dtype)
  assert structure.kernel_calls == 2, structure  # the forward and the backward kernel
  assert structure.glue_ops <= kernel_traffic.MAX_GLUE_OPS, structure
  # No pads or slices of k, v, y: the kernels mask the ragged ends themselves.
  assert not structure.glue_by_op.keys() & {"pad", "slice", "dynamic_slice"}, structure


def test_dispatcher_picks_the_kernel_by_lowering_platform():
  w, u, k, v, state = random_inputs(8, 2, 11, 24, jnp.float32)
  fn = lambda *args: wkv_lib.wkv(*args, impl="pallas")
  assert _kernel_names(_tpu_module(fn, w, u, k, v, state)) == list(_SEQ_KERNELS[:1])
  chunked_fn = lambda *args: wkv_lib.wkv(*args, impl="pallas_chunked")
  assert set(_kernel_names(_tpu_module(chunked_fn, w, u, k, v, state))) == set(_CHUNKED_FORWARD)
  cpu = jax.export.export(jax.jit(fn), platforms=["cpu"])(w, u, k, v, state).mlir_module()
  assert _MOSAIC not in cpu
  triton = "__gpu$xla.gpu.triton"  # the GPU kernel, compiled (no stable-export guarantee)
  cuda = jax.export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])(w, u, k, v, state)
  assert triton in cuda.mlir_module() and _MOSAIC not in cuda.mlir_module()
  y, _ = jax.jit(fn)(w, u, k, v, state)  # here: the interpreter
  np.testing.assert_allclose(y, wkv_lib.wkv_scan(w, u, k, v, state)[0], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="'pallas' has no kernel for 'metal'"):
    wkv_lib.resolve("pallas", platform="metal")


def _tiny_config():
  c = train_config.default_config()
  c.model.update(n_layer=2, n_embd=32, vocab_size=256, ctx_len=16, dtype="float32")
  c.train.update(steps=6, batch_size=8)
  c.optim.update(warmup_steps=2)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  return c


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas", "associative"])
def test_sharded_training_step_lowers_for_tpu(impl):
  _assert_mesh_of_8()
  config = _tiny_config()
  mesh = sharding.make_mesh(**config.mesh)
  tx, _ = step_lib.build_optimizer(config)
  state = step_lib.abstract_state(config, mesh, tx)
  tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=sharding.batch_sharding(mesh))
  # Under the mesh the Mosaic calls run per shard (a Mosaic kernel cannot be partitioned
  # automatically: without `jax.set_mesh` the sharded step does not lower).
  with jax.set_mesh(mesh):
    step = step_lib.make_train_step(state, tx, mesh, accumulate_steps=1, l2wrap=1e-4, impl=impl)
    exported = jax.export.export(step, platforms=["tpu"])(
        state.params, state.opt_state, {"inputs": tokens, "targets": tokens})
  assert exported.nr_devices == 8
  names = set(_kernel_names(exported.mlir_module()))
  assert names == (set(_SEQ_KERNELS) if impl == "pallas" else set()), names


def test_generation_lowers_for_tpu():
  config = _tiny_config()
  graphdef, params = nnx.split(step_lib.build_model(config, nnx.Rngs(0)))

  def generate(params, prompt_bt, key):
    model = nnx.merge(graphdef, params)
    logits, state = model(prompt_bt, impl="pallas", last_only=True)

    def decode(carry, step_key):
      logits_bv, state = carry
      token_b = sampling.sample_logits(logits_bv, step_key, temperature=0.8, top_p=0.9)
      return model.step(token_b, state), token_b

    _, tokens_nb = jax.lax.scan(decode, (logits[:, 0], state), jax.random.split(key, 4))
    return tokens_nb.T

  module = _tpu_module(generate, params, jnp.zeros((2, 5), jnp.int32), jax.random.key(0))
  # The prefill, once per layer; decoding steps one token at a time with the scan.
  assert set(_kernel_names(module)) == set(_SEQ_KERNELS[:1])

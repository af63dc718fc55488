"""The Pallas TPU (Mosaic) WKV kernel: its numbers in Pallas's TPU interpreter on CPU, compiled on a
TPU (marked `tpu`), and what lowers for TPU from any machine (`jax.export`, which needs no TPU).

The numeric checks are test_kernels.py's, shared by every kernel; the lowering checks cover the
kernel alone, the model's training step and generation, and the dispatcher's choice of kernel by
the platform the code is lowered for.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_kernels import _loss_grad, _WKVKernelChecks, compiled

from rwkv_jax import sharding
from rwkv_jax import wkv as wkv_lib
from rwkv_jax.infer import sampling
from rwkv_jax.train import config as train_config
from rwkv_jax.train import step as step_lib
from rwkv_jax_kernels import chunked, wkv_pallas_tpu
from wkv_util import random_inputs, rel_err

_ON_TPU = jax.default_backend() == "tpu"
_MOSAIC = "tpu_custom_call"


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
    n = len(jax.devices())
    tensor = 2 if n > 1 and n % 2 == 0 else 1
    mesh = sharding.make_mesh(data=-1, fsdp=1, tensor=tensor)
    w, u, k, v, state = random_inputs(6, 2 * (n // tensor), 13, 24, jnp.float32)
    fn = sharding.wkv_per_shard(
        functools.partial(wkv_pallas_tpu.wkv_pallas_tpu, interpret=self.INTERPRET))
    with jax.set_mesh(mesh):
      (y, out), grads = jax.jit(lambda *a: fn(*a))(w, u, k, v, state), _loss_grad(fn)(
          w, u, k, v, state)
      lowered = jax.jit(fn).lower(w, u, k, v, state).as_text()
    assert n == 1 or "manual_computation" in lowered or "SPMDFullToShardShape" in lowered
    y_ref, out_ref = wkv_lib.wkv_scan(w, u, k, v, state)
    for x, ref in zip((y, *out), (y_ref, *out_ref)):
      assert rel_err(x, ref) < 5e-5
    grads_ref = _loss_grad(wkv_lib.wkv_scan)(w, u, k, v, state)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
      assert rel_err(g, g_ref) < 2e-4

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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_lowers_to_mosaic_forward_and_gradient(dtype):
  w, u, k, v, state = random_inputs(7, 2, 37, 200, dtype)
  kernel = lambda *args: wkv_pallas_tpu.wkv_pallas_tpu(*args, interpret=False)
  forward = _tpu_module(kernel, w, u, k, v, state)
  for name in ("wkv_tpu_summary", "wkv_tpu_output"):
    assert f'kernel_name = "{name}"' in forward, name
  grads = _tpu_module(_loss_grad(kernel), w, u, k, v, state)
  for name in ("wkv_tpu_summary", "wkv_tpu_output", "wkv_tpu_output_bwd", "wkv_tpu_summary_bwd"):
    assert f'kernel_name = "{name}"' in grads, name


def test_dispatcher_picks_the_kernel_by_lowering_platform():
  w, u, k, v, state = random_inputs(8, 2, 11, 24, jnp.float32)
  fn = lambda *args: wkv_lib.wkv(*args, impl="pallas")
  assert _MOSAIC in _tpu_module(fn, w, u, k, v, state)
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
  if len(jax.devices()) != 8:
    pytest.skip("needs the 8-device mesh of tests/conftest.py")
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
  assert (_MOSAIC in exported.mlir_module()) == (impl == "pallas")


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
  assert _MOSAIC in module  # the prefill; decoding steps one token at a time with the scan

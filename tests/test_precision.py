"""Precisions of weights.load: float16 with the official rescale, int8 against the rwkv package's
int8, the types the matrix products run in, int8 exports, and bad dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx

from experiments import reference_models
from rwkv_jax import model as model_lib
from rwkv_jax import quant, sharding
from rwkv_jax.io import checkpoint, formats, tensor_names, weights
from rwkv_jax_kernels import int8_cpu

# The deep model (experiments/reference_models.py): batch B of the tokens every logit is
# compared on.
B = reference_models.DEEP_TOKENS_SHAPE[0]
FLOAT16_MAX = 65504.0


@pytest.fixture(scope="module")
def deep_pth(tmp_path_factory):
  path = tmp_path_factory.mktemp("deep") / "deep.pth"
  torch.save(reference_models.deep_state_dict(), path)
  return path


@pytest.fixture(scope="module")
def float32_logits(deep_pth):
  return reference_models.logits_of(weights.load(deep_pth, dtype="float32")[0])


def residual_peak(model) -> float:
  """The largest |x| of the residual stream over all blocks (float32, no rescale)."""
  x = model.ln0(model.emb(jnp.asarray(reference_models.deep_tokens())))
  state, peak = model_lib.empty_state(model.config, B), 0.0
  for i, block in enumerate(model.blocks):
    x, _ = block(x, model_lib.RWKVState(*(s[i] for s in state)), "scan")
    peak = max(peak, float(jnp.abs(x).max()))
  return peak


@pytest.mark.slow
def test_float16_rescale_keeps_a_deep_model_finite_and_close_to_float32(deep_pth, float32_logits):
  model32, _ = weights.load(deep_pth, dtype="float32")
  assert residual_peak(model32) > 2 * FLOAT16_MAX  # the test model needs the rescale
  model16, config = weights.load(deep_pth, dtype="float16")
  assert (config.dtype, config.param_dtype, config.rescale_every) == ("float16", "float16", 6)
  logits16 = reference_models.logits_of(model16)
  assert np.all(np.isfinite(logits16))
  assert np.abs(logits16 - float32_logits).max() < 0.05
  # The same float16 model without the rescale overflows: the rescale is what keeps it finite.
  unscaled = nnx.merge(nnx.graphdef(model_lib.abstract_model(config.replace(rescale_every=0))),
                       nnx.state(model16))
  assert not np.all(np.isfinite(reference_models.logits_of(unscaled)))


@pytest.mark.slow
def test_int8_is_at_least_as_close_to_float32_as_the_rwkv_package_int8(deep_pth, float32_logits):
  ours = reference_models.logits_of(weights.load(deep_pth, dtype="int8")[0])
  package = reference_models.rwkv_package_logits(deep_pth, "cpu fp32i8")
  # (Its "cpu fp32" equals our float32 on such weights: tests/test_parity.py.)
  top1 = lambda x: np.mean(x.argmax(-1) == float32_logits.argmax(-1))
  err = lambda x: np.abs(x - float32_logits).max()
  assert err(ours) <= err(package), (err(ours), err(package))
  assert top1(ours) >= top1(package), (top1(ours), top1(package))
  assert top1(ours) > 0.9  # and the comparison is between working models


@pytest.mark.slow
def test_int8_matches_float32_with_dequantised_weights(deep_pth):
  # int8's only error is the weights': the float32 model holding dequantised weights agrees.
  model8, config = weights.load(deep_pth, dtype="int8")
  flat8 = dict(nnx.to_flat_state(nnx.state(model8, nnx.Param)))
  floats = []
  for path, var in flat8.items():
    if path[-1] == quant.QSCALE:
      continue
    if path[-1] == quant.QKERNEL:
      scale = flat8[(*path[:-1], quant.QSCALE)].get_value()
      var, path = nnx.Param(jnp.asarray(quant.dequantize(var.get_value(), scale))), (
          *path[:-1], "kernel")
    floats.append((path, var))
  float_config = config.with_precision("float32")
  model = nnx.merge(nnx.graphdef(model_lib.abstract_model(float_config)),
                    nnx.from_flat_state(floats))
  np.testing.assert_allclose(reference_models.logits_of(model8),
                             reference_models.logits_of(model), atol=2e-3, rtol=1e-4)


def dot_operand_dtypes(model) -> set[str]:
  jaxpr = jax.make_jaxpr(lambda m, t: m(t))(model, jnp.zeros((1, 3), jnp.int32))
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general" or (
          eqn.primitive.name == "ffi_call" and eqn.params.get("target_name") == int8_cpu.TARGET):
        found.add(str(eqn.invars[0].aval.dtype))  # the int8 CPU kernel multiplies in x's dtype
      for param in eqn.params.values():
        # pjit, scan, remat, custom_vjp: a ClosedJaxpr or a Jaxpr; cond: a tuple of them.
        for inner in param if isinstance(param, (tuple, list)) else (param,):
          inner = getattr(inner, "jaxpr", inner)
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jaxpr.jaxpr)
  return found


SMALL = dict(n_layer=2, n_embd=32, vocab_size=50)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,compute", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                           ("float16", "float16"), ("int8", "float32")])
def test_matrix_products_run_in_the_named_type(dtype, compute):
  config = model_lib.RWKVConfig(**SMALL).with_precision(dtype, platform="cpu")
  model = model_lib.RWKV(config, rngs=nnx.Rngs(0))
  assert dot_operand_dtypes(model) == {compute}
  if dtype == "int8":
    kernels = {p[-2:]: v.get_value().dtype
               for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
               if p[-1] in ("kernel", quant.QKERNEL)}
    # Every matrix but the embedding, as in the rwkv package's int8 (head.weight included).
    assert kernels == {(name, quant.QKERNEL): jnp.int8
                       for name in ("key", "value", "receptance", "output", "head")}
  assert model_lib.RWKVConfig(**SMALL).with_precision("int8", platform="gpu").dtype == "bfloat16"


@pytest.fixture(scope="module")
def small_pth(tmp_path_factory):
  path = tmp_path_factory.mktemp("small") / "small.pth"
  model = model_lib.RWKV(model_lib.RWKVConfig(**SMALL, dim_ffn=64), rngs=nnx.Rngs(0))
  leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
  formats.save_pth(model, path)
  return path


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_every_format_loads_the_same_model_in_each_precision(small_pth, tmp_path, dtype):
  model, _ = weights.load(small_pth, dtype="float32")
  formats.save_hf(model, tmp_path / "hf")
  checkpoint.export(model, tmp_path / "orbax")
  toks = jnp.asarray(reference_models.deep_tokens()[:2, :9] % SMALL["vocab_size"])
  run = lambda m: np.asarray(m(toks)[0])
  ref, config = weights.load(small_pth, dtype=dtype)
  assert config.precision == dtype
  for path in (tmp_path / "hf", tmp_path / "orbax"):
    other, other_config = weights.load(path, dtype=dtype)
    assert other_config == config
    np.testing.assert_array_equal(run(other), run(ref))


def test_an_int8_export_is_read_back_without_requantising(small_pth, tmp_path):
  model, config = weights.load(small_pth, dtype="int8")
  checkpoint.export(model, tmp_path / "int8")
  # On disk: int8 kernels and their scales, no float kernel to quantise again.
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.restore(tmp_path / "int8" / "params")
  saved = {"/".join(map(str, p)): x for p, x in
           jax.tree_util.tree_flatten_with_path(saved)[0]}
  assert not [k for k in saved if k.endswith("kernel']") and "qkernel" not in k]
  assert any("head" in k and "qkernel" in k for k in saved)
  assert {x.dtype for k, x in saved.items() if "qkernel" in k} == {np.dtype(np.int8)}
  for dtype in (None, "int8"):
    loaded, loaded_config = weights.load(tmp_path / "int8", dtype=dtype)
    assert loaded_config == config
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                    jax.tree.leaves(nnx.state(loaded, nnx.Param))):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, b)
  with pytest.raises(tensor_names.CheckpointError, match="is an int8 export; it cannot be loaded as"):
    weights.load(tmp_path / "int8", dtype="float32")
  with pytest.raises(ValueError, match="cannot"):
    formats.save_pth(loaded, tmp_path / "x.pth")
  assert not (tmp_path / "x.pth").exists()


def test_every_int8_parameter_has_a_sharding_rule_that_follows_its_float_kernel():
  config = model_lib.RWKVConfig(**SMALL).with_precision("int8", platform="cpu")
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  state8 = nnx.state(model_lib.abstract_model(config), nnx.Param)
  state32 = nnx.state(model_lib.abstract_model(config.with_precision("float32")), nnx.Param)
  specs8 = dict(nnx.to_flat_state(sharding.param_shardings(mesh, state8)))
  specs32 = dict(nnx.to_flat_state(sharding.param_shardings(mesh, state32)))
  for path, spec in specs8.items():
    float_spec = tuple(specs32.get((*path[:-1], "kernel"), spec).spec)
    float_spec += (None,) * (2 - len(float_spec))
    if path[-1] == quant.QKERNEL:
      assert tuple(spec.spec) + (None,) * (2 - len(spec.spec)) == float_spec, path
    elif path[-1] == quant.QSCALE:  # split along out like the kernel, never along the groups
      assert (tuple(spec.spec) + (None, None))[:2] == (None, float_spec[1]), path


def test_an_unknown_dtype_is_one_line_naming_the_accepted_ones(small_pth):
  assert weights.DTYPES == ("float32", "bfloat16", "float16", "int8")
  with pytest.raises(ValueError, match=r"^dtype='fp8' is not one of float32, bfloat16, float16, "
                                       r"int8 \(or None"):
    weights.load(small_pth, dtype="fp8")

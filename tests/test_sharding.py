"""Sharded loss and gradients equal the single-device ones on every mesh; placement follows rules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rwkv_jax import model as model_lib
from rwkv_jax import sharding
from rwkv_jax.config import Preset, RWKVConfig
from rwkv_jax.model import RWKV
from rwkv_jax.train import losses, optim

B, T = 8, 16
CFG = RWKVConfig(n_layer=2, n_embd=32, vocab_size=64)


@functools.cache
def _model_and_batch():
  """A tiny RWKV with every weight perturbed (the zero-initialized ones too) and a batch."""
  graphdef, state = nnx.split(RWKV(CFG, rngs=nnx.Rngs(0)))
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  state = jax.tree.unflatten(treedef, leaves)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
  return graphdef, state, tokens[:, :-1], tokens[:, 1:]


def _loss(graphdef, state, inputs, targets):
  # The sequential WKV compiles 3x faster here than the associative one; both split channels alike.
  logits, _ = nnx.merge(graphdef, state)(inputs, impl="scan")
  return losses.lm_loss(logits, targets)[0]


@functools.cache
def _reference():
  graphdef, state, inputs, targets = _model_and_batch()
  with jax.default_device(jax.devices()[0]):
    loss, grads = jax.jit(jax.value_and_grad(functools.partial(_loss, graphdef)))(
        state, inputs, targets)
  return np.asarray(loss), jax.tree.map(np.asarray, grads)


def _assert_tree_close(got, want, rtol=1e-5):
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    g = np.asarray(g)
    scale = max(float(np.abs(w).max()), 1e-30)
    err = float(np.abs(g - w).max()) / scale
    assert err <= rtol, f"{sharding.path_name(path)}: relative error {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("data,fsdp,tensor", [
    (1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)])
def test_sharded_loss_and_grads_match_single_device(data, fsdp, tensor):
  graphdef, state, inputs, targets = _model_and_batch()
  mesh = sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[:data * fsdp * tensor])
  state_sh = sharding.param_shardings(mesh, state)
  batch_sh = sharding.batch_sharding(mesh)
  fn = jax.jit(jax.value_and_grad(functools.partial(_loss, graphdef)),
               in_shardings=(state_sh, batch_sh, batch_sh),
               out_shardings=(NamedSharding(mesh, P()), state_sh))
  state = sharding.shard_tree(mesh, state)
  loss, grads = fn(state, sharding.shard_batch(mesh, inputs), sharding.shard_batch(mesh, targets))

  want_loss, want_grads = _reference()
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  _assert_tree_close(grads, want_grads)
  assert all(float(np.abs(g).max()) > 0 for g in jax.tree.leaves(want_grads))
  kernel = grads["blocks"][0]["att"]["key"]["kernel"][...]
  assert kernel.sharding.spec == P("fsdp", "tensor")


def test_params_are_split_as_the_rules_say_on_a_tensor_mesh():
  _, state, _, _ = _model_and_batch()
  mesh = sharding.make_mesh(1, 1, 8)
  placed = sharding.shard_tree(mesh, state)
  att, ffn = placed["blocks"][1]["att"], placed["blocks"][1]["ffn"]
  shard_shape = lambda v: v[...].addressable_shards[0].data.shape
  expected = {  # [in, out] kernels; tensor splits A, F and V by 8
      "att key": (att["key"]["kernel"], P("fsdp", "tensor"), (32, 4)),
      "att output": (att["output"]["kernel"], P("tensor", "fsdp"), (4, 32)),
      "time_decay": (att["time_decay"], P("tensor"), (4,)),
      "time_first": (att["time_first"], P("tensor"), (4,)),
      "att time_mix_k": (att["time_mix_k"], P(), (32,)),
      "ffn key": (ffn["key"]["kernel"], P("fsdp", "tensor"), (32, 16)),
      "ffn value": (ffn["value"]["kernel"], P("tensor", "fsdp"), (16, 32)),
      "ffn receptance": (ffn["receptance"]["kernel"], P("fsdp", None), (32, 32)),
      "emb": (placed["emb"]["embedding"], P("tensor", "fsdp"), (8, 32)),
      "head": (placed["head"]["kernel"], P("fsdp", "tensor"), (32, 8)),
      "ln_out": (placed["ln_out"]["scale"], P(), (32,)),
  }
  for name, (var, spec, shape) in expected.items():
    assert var[...].sharding.spec == spec, name
    assert shard_shape(var) == shape, name


def test_fsdp_splits_the_input_dimension():
  _, state, _, _ = _model_and_batch()
  placed = sharding.shard_tree(sharding.make_mesh(2, 4, 1), state)
  kernel = placed["blocks"][0]["att"]["key"]["kernel"][...]
  assert kernel.addressable_shards[0].data.shape == (8, 32)
  emb = placed["emb"]["embedding"][...]
  assert emb.addressable_shards[0].data.shape == (64, 8)


def test_indivisible_dimensions_fall_back_to_replicated():
  mesh = sharding.make_mesh(1, 2, 4)
  assert sharding.spec_for("emb/embedding", (50, 32), mesh) == P(None, "fsdp")
  assert sharding.spec_for("emb/embedding", (64, 33), mesh) == P("tensor", None)
  assert sharding.spec_for("blocks/0/att/time_decay", (6,), mesh) == P(None)
  assert sharding.spec_for("blocks/0/ln1/scale", (32,), mesh) == P()
  # A rule longer than the array's rank (e.g. a factored statistic) replicates it.
  assert sharding.spec_for("head/kernel", (32,), mesh) == P()


@pytest.mark.parametrize("preset", list(Preset), ids=lambda p: p.name)
def test_every_preset_parameter_matches_a_rule_and_big_matrices_are_split(preset):
  abstract = model_lib.abstract_model(preset.config())
  params = nnx.state(abstract, nnx.Param)
  mesh = sharding.make_mesh(1, 2, 4)
  specs = {sharding.path_name(p): s.spec
           for p, s in jax.tree_util.tree_leaves_with_path(sharding.param_shardings(mesh, params))}
  shapes = {sharding.path_name(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
  assert specs.keys() == shapes.keys()
  for name, shape in shapes.items():
    axes = set(jax.tree.leaves(tuple(specs[name])))
    if len(shape) == 1:
      continue
    assert "fsdp" in axes, (name, specs[name])
    # The vocabulary (50277) is odd, so embedding and head can only be split over fsdp.
    if name.startswith("blocks/") and not name.endswith("ffn/receptance/kernel"):
      assert axes == {"fsdp", "tensor"}, (name, specs[name])
  assert specs["blocks/0/att/time_decay"] == P("tensor")
  assert specs["blocks/0/ln1/scale"] == P()


def test_a_parameter_without_a_rule_is_an_error_not_replicated():
  mesh = sharding.make_mesh(1, 2, 4)
  renamed = {"blocks": [{"att": {"keys": {"kernel": jnp.zeros((32, 32))}}}]}
  with pytest.raises(ValueError, match=r"'blocks/0/att/keys/kernel'.*PARAM_RULES"):
    sharding.param_shardings(mesh, renamed)


def test_callers_can_shard_another_model_with_their_own_rules():
  mesh = sharding.make_mesh(1, 2, 4)
  rules = ((r"(^|/)mlp/up/kernel$", P("fsdp", "tensor")), (r"(^|/)mlp/up/bias$", P("tensor")),
           *sharding.PARAM_RULES)
  params = {"mlp": {"up": {"kernel": jnp.zeros((32, 64)), "bias": jnp.zeros((64,))}},
            "ln_out": {"scale": jnp.zeros((32,))}, "count": jnp.zeros((), jnp.int32)}
  got = sharding.param_shardings(mesh, params, rules=rules)
  assert got["mlp"]["up"]["kernel"].spec == P("fsdp", "tensor")
  assert got["mlp"]["up"]["bias"].spec == P("tensor")
  assert got["ln_out"]["scale"].spec == P()
  assert got["count"].spec == P()  # scalars need no rule
  with pytest.raises(ValueError, match="mlp/up/"):
    sharding.param_shardings(mesh, params)


def test_optimizer_state_mirrors_parameter_shardings():
  _, state, _, _ = _model_and_batch()
  params = nnx.filter_state(state, nnx.Param)
  mesh = sharding.make_mesh(2, 2, 2)
  tx = optim.make_optimizer(optim.learning_rate_schedule(
      lr_init=1e-3, lr_final=1e-4, warmup_steps=2, total_steps=10))
  opt_sh = sharding.tree_shardings(mesh, jax.eval_shape(tx.init, params))
  param_sh = sharding.param_shardings(mesh, params)
  by_path = {sharding.path_name(p): s.spec
             for p, s in jax.tree_util.tree_leaves_with_path(param_sh)}
  seen = 0
  for path, s in jax.tree_util.tree_leaves_with_path(opt_sh):
    name = sharding.path_name(path)
    suffixes = [k for k in by_path if name.endswith("/" + k)]
    if suffixes:
      assert s.spec == by_path[max(suffixes, key=len)], name
      seen += 1
    else:
      assert s.spec == P(), name  # counters
  assert seen == 2 * len(by_path)  # mu and nu


@pytest.mark.slow
def test_sharded_train_step_matches_single_device():
  graphdef, state, inputs, targets = _model_and_batch()
  tx = optim.make_optimizer(
      optim.learning_rate_schedule(lr_init=1e-2, lr_final=1e-3, warmup_steps=0, total_steps=10),
      weight_decay=0.1, eps=1e-3)  # eps: no sign(g) of rounding noise

  def train_step(state, opt_state, inputs, targets):
    grads = jax.grad(functools.partial(_loss, graphdef))(state, inputs, targets)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state

  want, _ = jax.jit(train_step)(state, tx.init(state), inputs, targets)

  mesh = sharding.make_mesh(2, 2, 2)
  state_sh = sharding.param_shardings(mesh, state)
  opt_sh = sharding.tree_shardings(mesh, jax.eval_shape(tx.init, state))
  batch_sh = sharding.batch_sharding(mesh)
  step = jax.jit(train_step, in_shardings=(state_sh, opt_sh, batch_sh, batch_sh),
                 out_shardings=(state_sh, opt_sh), donate_argnums=(0, 1))
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(state)
  got, _ = step(sharding.shard_tree(mesh, state), opt_state,
                sharding.shard_batch(mesh, inputs), sharding.shard_batch(mesh, targets))
  _assert_tree_close(got, want)


def test_make_mesh_fills_and_reports_bad_sizes():
  mesh = sharding.make_mesh(-1, 2, 2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh(2, -1, 1).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  with pytest.raises(ValueError, match=r"--config\.mesh\.data"):
    sharding.make_mesh(3)
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    sharding.make_mesh(-1, 3)
  with pytest.raises(ValueError, match="Only one"):
    sharding.make_mesh(-1, -1)


def test_batches_are_split_over_data_and_fsdp():
  mesh = sharding.make_mesh(2, 2, 2)
  batch = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
  placed = sharding.shard_batch(mesh, {"tokens": batch})["tokens"]
  assert placed.addressable_shards[0].data.shape == (2, 5)
  assert len({s.index[0].start for s in placed.addressable_shards}) == 4  # replicated over tensor
  global_batch = sharding.make_global_batch(mesh, batch)  # one process: the local batch is global
  np.testing.assert_array_equal(global_batch, batch)
  assert global_batch.sharding.is_equivalent_to(placed.sharding, 2)
  with pytest.raises(ValueError, match="multiple of mesh data \\* fsdp = 4"):
    sharding.shard_batch(mesh, batch[:6])


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
              "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  assert sharding.initialize_distributed() is False
  assert sharding.initialize_distributed(num_processes=1) is False
  monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
  assert sharding.initialize_distributed() is False
  with pytest.raises(ValueError, match="process_id=2"):
    sharding.initialize_distributed("127.0.0.1:1234", num_processes=2, process_id=2)
  assert jax.process_count() == 1

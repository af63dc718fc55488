"""Fine-tuning (rwkv_jax/train/adapters.py, finetune.py, experiments/finetune.py): exactness of
untrained adapters and of merging, the frozen base, the learned state as a state file, resume,
and the one-line refusals. Real .pth files of a tiny random model; real runs of the loop."""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rwkv_jax import sharding
from rwkv_jax.config import RWKVConfig
from rwkv_jax.infer import sampling
from rwkv_jax.io import formats, state_file, weights
from rwkv_jax.train import adapters, finetune
from rwkv_jax.train import step as step_lib
from training_util import (N, REPO, TOTAL, one_line_error, random_model, run_module,
                           subprocess_env, write_pth)

CFG = RWKVConfig(n_layer=2, n_embd=32, vocab_size=256, ctx_len=16, dtype="float32")
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 13)).astype(np.int32)


@pytest.fixture(scope="module")
def base_pth(tmp_path_factory) -> pathlib.Path:
  return write_pth(random_model(CFG, scale=0.1), tmp_path_factory, "base.pth")


@pytest.fixture(scope="module")
def other_pth(tmp_path_factory) -> pathlib.Path:
  return write_pth(random_model(CFG, seed=7, scale=0.1), tmp_path_factory, "other.pth")


def _config(corpus_path, mode: str, **train):
  c = finetune.default_config()
  c.model.ctx_len = 16
  c.data.update(source="file", path=str(corpus_path), tokenizer="bytes", val_fraction=0.05)
  c.optim.update(lr_init=3e-3, lr_final=3e-3, warmup_steps=2)
  c.train.update(steps=TOTAL, batch_size=8, impl="scan", log_every=1, eval_every=0,
                 eval_batches=2, checkpoint_every=N, progress_bar=False)
  c.train.update(**train)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.finetune.update(mode=mode, r=4, lora_alpha=8.0)
  return c


def _logits(model, tokens=TOKENS, impl="scan", compiled=False):
  """The logits, op by op (each op one small program: bit for bit the same as the base's where
  an adapter adds exactly 0), or as one compiled program."""
  if not compiled:
    return np.asarray(model(jnp.asarray(tokens), impl=impl)[0])
  graphdef, params = nnx.split(model)
  run = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens, impl=impl)[0])
  return np.asarray(run(params, jnp.asarray(tokens)))


def _randomize_lora(model, seed=3):
  """Gives every LoRA B factor random values (B starts at zero)."""
  _, lora, _ = nnx.split(model, adapters.LoRAParam, ...)
  leaves, treedef = jax.tree.flatten(lora)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))


@pytest.fixture(scope="module")
def lora_state_run(tmp_path_factory, corpus, base_pth, compile_cache) -> pathlib.Path:
  """TOTAL steps of lora+state on the base, uninterrupted."""
  workdir = tmp_path_factory.mktemp("ft_run")
  finetune.train(_config(corpus, "lora+state"), workdir, str(base_pth))
  return workdir


# ----------------------------------------------------------------------------------------------
# Exactness, in memory.

@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_untrained_lora_gives_the_base_logits_exactly(base_pth, dtype):
  base, _ = weights.load(base_pth, dtype=dtype)
  want = _logits(base)
  model, _ = weights.load(base_pth, dtype=dtype)
  model = adapters.apply(model, "lora", r=4, target_modules=adapters.TARGETS)
  assert isinstance(model.blocks[0].att.key, adapters.LoRA)
  np.testing.assert_array_equal(_logits(model), want)
  # Compiled whole, XLA fuses the two programs differently: float32 rounding apart.
  np.testing.assert_allclose(_logits(model, compiled=True), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["scan", pytest.param("associative", marks=pytest.mark.slow)])
def test_untrained_state_is_the_empty_state_bit_for_bit(base_pth, impl):
  base, _ = weights.load(base_pth)
  want = _logits(base, impl=impl)
  model = adapters.apply(weights.load(base_pth)[0], "state")
  np.testing.assert_array_equal(_logits(model, impl=impl), want)


def test_learned_state_is_valid_whatever_its_parameters(base_pth):
  model = adapters.apply(weights.load(base_pth)[0], "state")
  for name in ("num", "den", "att_x_prev", "ffn_x_prev"):
    var = getattr(model.initial, name)
    var.set_value(jax.random.normal(jax.random.key(len(name)), var.get_value().shape) * 3)
  state = model.initial_state(2)
  assert (np.asarray(state.den) >= 0).all() and state.num.shape == (2, 2, 32)
  assert np.isfinite(_logits(model)).all()


@pytest.mark.slow
def test_merged_and_unmerged_agree_also_through_a_pth_file(base_pth, tmp_path):
  model = adapters.apply(weights.load(base_pth)[0], "lora", r=4,
                         target_modules=adapters.TARGETS)
  _randomize_lora(model)
  unmerged = _logits(model)
  assert np.abs(unmerged - _logits(weights.load(base_pth)[0])).max() > 1e-3  # B is not zero
  merged = adapters.merge_and_unload(model)
  assert not any(isinstance(m, adapters.LoRA) for _, m in nnx.iter_modules(merged))
  np.testing.assert_allclose(_logits(merged), unmerged, atol=1e-5, rtol=0)
  formats.save_pth(merged, tmp_path / "merged.pth")
  np.testing.assert_allclose(_logits(weights.load(tmp_path / "merged.pth")[0]), unmerged,
                             atol=1e-5, rtol=0)


@pytest.mark.parametrize("settings, message", [
    (dict(mode="prefix"), "finetune.mode='prefix' is not one of full, lora, state, lora+state"),
    (dict(mode="lora", target_modules=["att.query"]), "names 'att.query', which is no matrix"),
    (dict(mode="lora", r=0), "finetune.r=0 must be a whole number >= 1"),
    (dict(mode="lora", lora_dropout=1.0), "finetune.lora_dropout=1.0 must be in [0, 1)"),
])
def test_a_mode_target_or_rank_that_does_not_exist_is_one_line(settings, message):
  with pytest.raises(ValueError) as e:
    adapters.check_settings(**settings)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_target_suffixes_name_every_matrix_of_that_name():
  assert adapters.check_settings("lora", target_modules="key,att.output") == (
      "att.key", "att.output", "ffn.key")


# ----------------------------------------------------------------------------------------------
# The train step: the frozen base.

@pytest.mark.slow
def test_frozen_parameters_are_bit_identical_after_training_and_have_no_optimizer_state(
    base_pth, corpus):
  config = finetune.training_config(_config(corpus, "lora+state"))
  base, _ = weights.load(base_pth)
  before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(base))}
  model = adapters.apply(weights.load(base_pth)[0], "lora+state", r=4)
  mesh = sharding.make_mesh(-1, 1, 1)
  tx, _ = step_lib.build_optimizer(config)
  state = finetune.adapted_state(model, "lora+state", mesh, tx)
  n_trained = sum(x.size for x in jax.tree.leaves(state.params))
  # Adam's two moments of the trained parameters, and step counts: nothing of the frozen base.
  assert 2 * n_trained <= sum(x.size for x in jax.tree.leaves(state.opt_state)) <= 2 * n_trained + 4
  trained_before = jax.tree.map(np.asarray, state.params)
  step = step_lib.make_train_step(state, tx, mesh, accumulate_steps=1, l2wrap=1e-4, impl="scan")
  batch = {"inputs": jnp.asarray(TOKENS[:, :-1].repeat(4, 0)[:8]),
           "targets": jnp.asarray(TOKENS[:, 1:].repeat(4, 0)[:8])}
  for _ in range(2):
    state.params, state.opt_state, metrics = step(state.params, state.opt_state, batch)
  assert np.isfinite(float(metrics["loss"]))
  after = step_lib.merged_model(state)
  for path, var in nnx.to_flat_state(nnx.state(after.base)):
    if isinstance(var, (adapters.LoRAParam, adapters.StateParam)):
      continue
    base_path = tuple(p for p in path if p != "base")
    np.testing.assert_array_equal(np.asarray(var.get_value()), before[base_path])
  changed = [not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(trained_before), jax.tree.leaves(state.params))]
  assert all(changed)


# ----------------------------------------------------------------------------------------------
# Runs of the loop.

@pytest.mark.slow
def test_state_mode_with_learning_rate_0_reproduces_the_base(base_pth, corpus, tmp_path,
                                                             compile_cache):
  config = _config(corpus, "state", steps=2)
  config.optim.update(lr_init=0.0, lr_final=0.0)
  finetune.train(config, tmp_path, str(base_pth))
  model, _ = weights.load(base_pth, adapters=tmp_path / "adapters")
  assert isinstance(model, adapters.FineTuned)
  np.testing.assert_array_equal(_logits(model), _logits(weights.load(base_pth)[0]))


@pytest.mark.slow
def test_a_learned_state_file_generates_the_greedy_tokens_of_the_model_in_memory(
    lora_state_run, base_pth):
  model, config = weights.load(base_pth, adapters=lora_state_run / "adapters")
  assert np.abs(np.asarray(model.initial.num[...])).max() > 0  # it learned something
  tokens = [72, 101, 108]
  for _ in range(8):  # greedy, the whole sequence through the fine-tuned model each time
    logits, _ = model(jnp.asarray([tokens]), impl="scan")
    tokens.append(int(jnp.argmax(logits[0, -1])))
  saved = state_file.load(lora_state_run / finetune.STATE_FILE, config=config)
  result = sampling.generate(model.base, [tokens[:3]], 8, jax.random.key(0),
                             sampling=sampling.SamplingConfig(top_k=1), state=saved.state,
                             impl="scan")
  assert result.tokens[0].tolist() == tokens[3:]
  # The fine-tuned model itself starts generating from its learned state.
  result = sampling.generate(model, [tokens[:3]], 8, jax.random.key(0),
                             sampling=sampling.SamplingConfig(top_k=1), impl="scan")
  assert result.tokens[0].tolist() == tokens[3:]


@pytest.mark.slow
def test_generate_cli_serves_the_adapters_unmerged_and_refuses_them_on_another_base(
    lora_state_run, base_pth, other_pth, tmp_path):
  model, _ = weights.load(base_pth, adapters=lora_state_run / "adapters")
  prompt = [72, 101, 108]
  want = sampling.generate(model, [prompt], 8, jax.random.key(0),
                           sampling=sampling.SamplingConfig(top_k=1), impl="scan")

  def generate(checkpoint, out):
    return run_module([sys.executable, "-m", "experiments.generate", f"--checkpoint={checkpoint}",
                       f"--adapters={lora_state_run / 'adapters'}", "--tokenizer=bytes",
                       "--prompt_tokens=" + ",".join(map(str, prompt)), "--max_tokens=8",
                       "--temperature=0", "--nostop_at_eos", f"--output={out}"],
                      subprocess_env(devices=1))

  result = generate(base_pth, tmp_path / "ids.json")
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads((tmp_path / "ids.json").read_text()) == [want.tokens[0].tolist()]
  line = one_line_error(generate(other_pth, tmp_path / "other.json"))
  assert line.startswith("error: --adapters=") and "holds adapters of another base" in line
  assert not (tmp_path / "other.json").exists()


@pytest.mark.slow
def test_merge_writes_a_pth_whose_logits_are_the_unmerged_models(lora_state_run, base_pth,
                                                                 tmp_path):
  unmerged, _ = weights.load(base_pth, adapters=lora_state_run / "adapters")
  state = unmerged.initial_state(TOKENS.shape[0])
  want = np.asarray(unmerged.base(jnp.asarray(TOKENS), state, impl="scan")[0])
  finetune.merge(lora_state_run, tmp_path / "merged.pth", "pth")
  merged, _ = weights.load(tmp_path / "merged.pth")
  got = np.asarray(merged(jnp.asarray(TOKENS), state, impl="scan")[0])
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_adapters_of_another_base_are_refused_in_one_line(lora_state_run, other_pth):
  with pytest.raises(adapters.BaseMismatchError) as e:
    weights.load(other_pth, adapters=lora_state_run / "adapters")
  assert "holds adapters of another base" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_a_stopped_run_resumes_exactly(lora_state_run, base_pth, corpus, tmp_path,
                                       compile_cache):
  half = tmp_path / "half"
  finetune.train(_config(corpus, "lora+state", steps=N), half, str(base_pth))
  finetune.train(_config(corpus, "lora+state"), half, str(base_pth))
  for name in ("adapters/" + adapters.ARRAYS_FILE, finetune.STATE_FILE):
    a, b = np.load(lora_state_run / name), np.load(half / name)
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")


# ----------------------------------------------------------------------------------------------
# Bases from the Hugging Face hub, offline.

def test_an_hf_base_is_read_from_the_cache_offline(base_pth, tmp_path, monkeypatch):
  repo = tmp_path / "hub" / "models--org--tiny-rwkv"
  commit = "0" * 40
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(commit)
  (repo / "snapshots" / commit).mkdir(parents=True)
  shutil.copy(base_pth, repo / "snapshots" / commit / "model.pth")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  import huggingface_hub.constants
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  path = finetune.resolve_base("hf://org/tiny-rwkv/model.pth")
  assert path.read_bytes() == base_pth.read_bytes()
  with pytest.raises(FileNotFoundError) as e:
    finetune.resolve_base("hf://org/tiny-rwkv/missing.pth")
  assert "could not be fetched" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# The command line.

def _finetune(args, tmp_path):
  return run_module([sys.executable, "-m", "experiments.finetune", *args],
                    subprocess_env(devices=2))


@pytest.mark.slow
def test_cli_refuses_a_mode_that_does_not_exist_in_one_line(base_pth, tmp_path):
  line = one_line_error(_finetune([f"--base={base_pth}",
                                   f"--config={REPO}/experiments/configs/finetune.py",
                                   f"--workdir={tmp_path / 'w'}",
                                   "--config.finetune.mode=prefix"], tmp_path))
  assert "finetune.mode='prefix' is not one of" in line


@pytest.mark.slow
def test_cli_merge_refuses_an_existing_output_without_overwrite(lora_state_run, tmp_path):
  out = tmp_path / "merged.pth"
  out.write_bytes(b"keep me")
  line = one_line_error(_finetune([f"--workdir={lora_state_run}", "--merge",
                                   f"--output={out}"], tmp_path))
  assert "already exists; pass --overwrite" in line and out.read_bytes() == b"keep me"


@pytest.mark.slow
def test_cli_refuses_to_resume_a_run_onto_another_base(lora_state_run, other_pth, tmp_path,
                                                       corpus):
  workdir = tmp_path / "w"
  shutil.copytree(lora_state_run, workdir)
  config = tmp_path / "ft.py"
  config.write_text("import json\nimport ml_collections\n\n\ndef get_config():\n"
                    f"  return ml_collections.ConfigDict(json.loads("
                    f"{_config(corpus, 'lora+state').to_json()!r}))\n")
  line = one_line_error(_finetune([f"--base={other_pth}", f"--config={config}",
                                   f"--workdir={workdir}"], tmp_path))
  assert "was fine-tuned from another base" in line
  assert json.loads((workdir / finetune.RECORD).read_text()) == json.loads(
      (lora_state_run / finetune.RECORD).read_text())


@pytest.mark.slow
@pytest.mark.parametrize("mode, base_dtype", [("full", "float32"), ("lora", "int8")])
def test_full_and_int8_lora_runs_write_what_merge_reads(mode, base_dtype, base_pth, corpus,
                                                      tmp_path, compile_cache):
  config = _config(corpus, mode, steps=2, checkpoint_every=2)
  config.finetune.base_dtype = base_dtype
  finetune.train(config, tmp_path / "w", str(base_pth))
  assert (tmp_path / "w" / (finetune.EXPORT_DIR if mode == "full" else finetune.ADAPTERS_DIR)
          ).is_dir()
  merged, _ = weights.load(finetune.merge(tmp_path / "w", tmp_path / "m.pth", "pth"))
  assert np.abs(_logits(merged) - _logits(weights.load(base_pth)[0])).max() > 0  # it trained


@pytest.mark.slow
def test_cli_fine_tunes_and_merges_into_an_hf_directory(base_pth, corpus, tmp_path):
  config = tmp_path / "ft.py"
  config.write_text("import json\nimport ml_collections\n\n\ndef get_config():\n"
                    f"  return ml_collections.ConfigDict(json.loads("
                    f"{_config(corpus, 'state', steps=2, checkpoint_every=2).to_json()!r}))\n")
  done = _finetune([f"--base={base_pth}", f"--config={config}", f"--workdir={tmp_path / 'w'}"],
                   tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  assert (tmp_path / "w" / finetune.STATE_FILE).is_file()
  done = _finetune([f"--workdir={tmp_path / 'w'}", "--merge", f"--output={tmp_path / 'hf'}"],
                   tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  assert (tmp_path / "hf" / "config.json").is_file()


def test_lora_dropout_acts_while_training_only_and_draws_the_same_mask_for_the_same_input(
    base_pth):
  model = adapters.apply(weights.load(base_pth)[0], "lora", r=4, lora_dropout=0.5,
                         target_modules=["att.key"])
  _randomize_lora(model)
  train_a, train_b = _logits(model), _logits(model)
  np.testing.assert_array_equal(train_a, train_b)  # no random state: a resume draws the same
  model.eval()
  evaluated = _logits(model)
  assert np.abs(train_a - evaluated).max() > 1e-4
  model.train()
  np.testing.assert_array_equal(_logits(model), train_a)


@pytest.mark.parametrize("field, value, message", [
    ("base_dtype", "int4", "finetune.base_dtype='int4' is not one of"),
    ("target_modules", "att.key,qkv", "names 'qkv', which is no matrix"),
])
def test_a_bad_finetune_setting_is_one_config_error(corpus, field, value, message):
  from rwkv_jax.train import config as train_config
  config = _config(corpus, "lora")
  config.finetune[field] = value
  with pytest.raises(train_config.ConfigError) as e:
    finetune.check(config)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_full_fine_tuning_of_an_int8_base_is_refused(corpus):
  from rwkv_jax.train import config as train_config
  config = _config(corpus, "full")
  config.finetune.base_dtype = "int8"
  with pytest.raises(train_config.ConfigError, match="mode=full trains every parameter"):
    finetune.check(config)

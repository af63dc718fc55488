"""The training step and loop: gradient accumulation, logged metrics, configs, the benchmark."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import bench_train
from rwkv_jax import sharding
from rwkv_jax.config import Preset, RWKVConfig
from rwkv_jax.data import pipeline as data_pipeline
from rwkv_jax.data import sources as data_sources
from rwkv_jax.io import tensor_names
from rwkv_jax.train import config as train_config
from rwkv_jax.train import loop as train_loop
from rwkv_jax.train import metrics
from rwkv_jax.train import step as step_lib
from rwkv_jax.train import workdir as workdir_lib
from training_util import (REPO, TOTAL, N, compile_cache, copy_run, corpus,  # noqa: F401
                           damage_checkpoint, full_run, half_run, latest_params, losses,
                           tiny_config)

CONFIGS = REPO / "experiments" / "configs"


def _one_step(config, batch_np):
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  tx, _ = step_lib.build_optimizer(config)
  state = step_lib.init_state(config, mesh, tx)
  step = step_lib.make_train_step(state, tx, mesh, accumulate_steps=config.train.accumulate_steps,
                               l2wrap=config.optim.l2wrap, impl=config.train.impl)
  initial = jax.device_get(nnx.to_pure_dict(state.params))  # before the step donates the buffers
  params, _, metrics = step(state.params, state.opt_state, sharding.shard_batch(mesh, batch_np))
  return initial, jax.device_get(nnx.to_pure_dict(params)), jax.device_get(metrics)


@pytest.mark.slow
def test_gradient_accumulation_gives_the_same_first_update(corpus, compile_cache):
  config = tiny_config(corpus)
  config.mesh.update(data=2, fsdp=2, tensor=2)  # a micro-batch of 4 still splits over data x fsdp
  batch = next(iter(data_pipeline.make_dataset(data_sources.open_source(corpus), ctx_len=16, batch_size=8,
                                          seed=0)))
  initial, whole_params, whole = _one_step(config, batch)
  config.train.accumulate_steps = 2
  _, accumulated_params, accumulated = _one_step(config, batch)

  assert accumulated["loss"] == pytest.approx(whole["loss"], abs=1e-5)
  assert accumulated["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               accumulated_params, whole_params)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), initial,
                                       whole_params))
  assert max(moved) > 1e-4  # the compared update is not a no-op


def test_every_logged_step_reports_throughput(full_run):
  records = [json.loads(l) for l in (full_run / "metrics.jsonl").read_text().splitlines()]
  train_records = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train_records] == sorted(losses(full_run))
  # A step fetched right after another (e.g. at a checkpoint) once reported 0 tokens/s.
  assert all(r["perf/tokens_per_s"] > 0 for r in train_records)


@pytest.mark.slow
def test_mfu_counts_the_flops_per_token_of_the_model_trained(corpus, compile_cache, tmp_path):
  config = tiny_config(corpus, steps=3, checkpoint_every=3)
  peak = 1e9
  default = train_loop.train_and_evaluate(config, tmp_path / "rwkv", peak_flops=peak)
  rwkv_flops = step_lib.model_config(config).flops_per_token()
  assert default["perf/mfu"] == pytest.approx(
      default["perf/tokens_per_s"] * rwkv_flops / (peak * jax.device_count()))
  # Another model (the Transformer baseline) passes its own count.
  other = train_loop.train_and_evaluate(config, tmp_path / "other", peak_flops=peak,
                                   flops_per_token=3 * rwkv_flops)
  assert other["perf/mfu"] == pytest.approx(
      other["perf/tokens_per_s"] * 3 * rwkv_flops / (peak * jax.device_count()))
  lines = (tmp_path / "other" / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  logged = [r for r in records if "perf/mfu" in r]
  assert logged and all(r["perf/mfu"] == pytest.approx(
      r["perf/tokens_per_s"] * 3 * rwkv_flops / (peak * jax.device_count())) for r in logged)


def _load_config(name: str, parameter: str | None = None):
  """Loads experiments/configs/NAME like --config=FILE[:PARAMETER] does."""
  spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if parameter is None else module.get_config(parameter)


@pytest.mark.parametrize("size, preset, lr_init, lr_final", [
    ("169m", Preset.RWKV4_169M, 6e-4, 1e-5),
    ("430m", Preset.RWKV4_430M, 4e-4, 1e-5),
    ("1b5", Preset.RWKV4_1B5, 3e-4, 1e-5),
    ("3b", Preset.RWKV4_3B, 1.5e-4, 1e-5),
    ("7b", Preset.RWKV4_7B, 1.5e-4, 1e-5),
    ("14b", Preset.RWKV4_14B, 1e-4, 7e-6),
])
def test_pile_config_builds_the_paper_model(size, preset, lr_init, lr_final):
  config = _load_config("pile", size)
  model = step_lib.model_config(config)

  assert model == preset.config(ctx_len=1024, dtype="bfloat16")
  assert model.num_params() == preset.config().num_params()
  assert (config.optim.lr_init, config.optim.lr_final) == (lr_init, lr_final)
  assert config.data.source == "file" and config.data.path == ""
  assert _load_config(f"pile_{size}").to_dict() == config.to_dict()  # the per-size alias file


def test_pile_config_rejects_an_unknown_size():
  with pytest.raises(ValueError, match="169m"):
    _load_config("pile", "100m")


def test_enwik8_and_char_tiny_configs_build_valid_models():
  enwik8 = step_lib.model_config(_load_config("enwik8"))
  assert enwik8 == RWKVConfig(n_layer=12, n_embd=512, vocab_size=256, ctx_len=1024,
                              dtype="bfloat16")
  assert _load_config("enwik8").data.source == "enwik8"
  tiny = step_lib.model_config(_load_config("char_tiny"))
  assert tiny.vocab_size == 256 and tiny.num_params() > 0
  long = _load_config("char_long")
  train_config.check(long)
  assert (long.model.ctx_len, long.train.chunk_len, long.train.bptt) == (4096, 512, "full")


@pytest.mark.slow
def test_bench_train_writes_a_record_per_implementation(tmp_path, compile_cache):
  out = tmp_path / "bench.json"
  bench_train.run("char_tiny", batch_size=8, ctx_len=16, dtype="float32",
                  impls=["scan", "no_such_impl"], steps=2, repeats=1, remat=False, out=str(out),
                  command=["bench_train"])

  record = json.loads(out.read_text())
  env = record["environment"]
  assert env["platform"] == "cpu" and env["jax"] == jax.__version__ and env["date_utc"]
  assert record["model"] == "char_tiny" and record["tokens_per_step"] == 8 * 16
  scan, missing = record["results"]
  assert scan["impl"] == "scan" and scan["tokens_per_s"] > 0 and scan["step_ms_median"] > 0
  assert scan["mfu"] is None  # no known peak for a CPU
  assert np.isfinite(scan["final_loss"])
  plan = scan["memory_plan"]
  # The arguments are the fp32 parameters and the two Adam moments (plus the step count and the
  # token batch); the donated state comes back in place.
  param_bytes = 4 * step_lib.model_config(bench_train.experiment_config(
      "char_tiny", 8, 16, "float32", False)).num_params()
  assert 3 * param_bytes <= plan["argument_bytes"] < 3 * param_bytes + 4096
  assert plan["alias_bytes"] >= 3 * param_bytes and plan["temp_bytes"] > 0
  assert missing["impl"] == "no_such_impl" and "Unknown WKV implementation" in missing["error"]


@pytest.mark.slow
def test_bench_train_plan_only_is_the_plan_of_the_step_that_runs(tmp_path, compile_cache):
  args = dict(model="char_tiny", batch_size=8, ctx_len=16, dtype="float32", impls=["scan"],
              steps=1, repeats=1, remat=False, command=["bench_train"])
  bench_train.run(**args, out=str(tmp_path / "timed.json"))
  bench_train.run(**args, out=str(tmp_path / "plan.json"), plan_only=True)
  (timed,) = json.loads((tmp_path / "timed.json").read_text())["results"]
  record = json.loads((tmp_path / "plan.json").read_text())
  (planned,) = record["results"]
  assert record["plan_only"] and "tokens_per_s" not in planned
  assert planned["memory_plan"] == timed["memory_plan"]


@pytest.mark.parametrize("overrides, match", [
    (dict(steps=10), r"--config.train.steps=10 must exceed --config.optim.warmup_steps=30"),
    (dict(accumulate_steps=3), r"batch_size=8 must be a multiple of .*accumulate_steps=3"),
])
def test_inconsistent_training_flags_are_named(overrides, match):
  config = _load_config("char_tiny")
  config.train.update(overrides)
  with pytest.raises(ValueError, match=match):
    step_lib.build_optimizer(config)


def test_metric_writer_keeps_every_record_and_non_finite_values_in_the_json(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  writer.write(1, {"train/loss": 2.5})
  writer.write(2, {"train/loss": float("nan"), "val/loss": 3.0})
  writer.close()
  history = metrics.read_history(tmp_path)
  assert history[0] == {"step": 1, "train/loss": 2.5}
  assert history[1]["step"] == 2 and np.isnan(history[1]["train/loss"])
  assert list((tmp_path / "tb").iterdir())  # TensorBoard event files
  metrics.MetricWriter(tmp_path / "other", enabled=False).write(1, {"x": 1.0})
  assert not (tmp_path / "other").exists()  # processes other than 0 write nothing


def test_the_library_trains_without_importing_matplotlib():
  code = ("import sys; from rwkv_jax.data import pipeline, sources; "
          "from rwkv_jax.train import config, loop, metrics, optim; "
          "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_an_infinite_gradient_norm_stops_the_run_before_it_is_saved(corpus, compile_cache,
                                                                    tmp_path):
  # At this rate step 3's loss is still finite (~1e7) but its gradient norm is not; the run
  # used to save it and end as a success.
  config = tiny_config(corpus, steps=3, checkpoint_every=1, export=True)
  config.optim.update(lr_init=1e3, lr_final=1e3)
  with pytest.raises(train_loop.NonFiniteLossError) as error:
    train_loop.train_and_evaluate(config, tmp_path)

  message = str(error.value)
  assert "Training gradient norm is nan at step 3" in message
  assert "Checkpoint 2 holds the parameters that gave this gradient norm" in message
  assert "last good checkpoint is step 1 " in message
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [1, 2]
  assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_a_refused_resume_leaves_config_json_as_it_was(half_run, corpus, tmp_path):
  workdir = copy_run(half_run, tmp_path / "run")
  before = (workdir / "config.json").read_text()
  config = tiny_config(corpus)
  config.model.n_embd = 64
  with pytest.raises(tensor_names.CheckpointError, match="n_embd"):
    train_loop.train_and_evaluate(config, workdir)
  assert (workdir / "config.json").read_text() == before


def test_a_resumed_run_logs_each_step_once(full_run, corpus, tmp_path):
  # A run that logged steps past its last checkpoint: they are trained again after the resume.
  workdir = copy_run(full_run, tmp_path / "run")
  shutil.rmtree(workdir / "checkpoints" / str(TOTAL))
  train_loop.train_and_evaluate(tiny_config(corpus), workdir)

  steps = [r["step"] for r in metrics.read_history(workdir) if "train/loss" in r]
  assert steps == list(range(1, TOTAL + 1))


@pytest.mark.parametrize("damage", ["truncated_params", "missing_manifest"])
# Orbax abandons the other reads of a failed restore; their coroutines are reported when collected.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    full_run, corpus, tmp_path, caplog, damage):
  workdir = copy_run(full_run, tmp_path / "run")  # checkpoints N and TOTAL
  shutil.rmtree(workdir / "export")
  damage_checkpoint(workdir / "checkpoints" / str(TOTAL), damage)
  caplog.set_level(logging.WARNING)

  train_loop.train_and_evaluate(tiny_config(corpus), workdir)

  assert (f"CHECKPOINT STEP {TOTAL} IN {workdir / 'checkpoints'} IS DAMAGED; resuming from step "
          f"{N}") in caplog.text
  assert (workdir / workdir_lib.DAMAGED_DIR / str(TOTAL) / "params").is_dir()  # kept for a look
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [N, TOTAL]
  resumed, whole = losses(workdir), losses(full_run)
  for step in range(N + 1, TOTAL + 1):
    assert resumed[step] == pytest.approx(whole[step], abs=1e-6), step
  got, want = latest_params(workdir), latest_params(full_run)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)

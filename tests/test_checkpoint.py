"""Checkpoints of real training runs: exact resume, other meshes, kills, damage, exports."""

from __future__ import annotations

import gc
import pathlib
import shutil
import signal
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax.io import checkpoint as ckpt_lib
from rwkv_jax.io import formats, tensor_names, weights
from rwkv_jax.train import loop as train_loop
from training_util import CHECKPOINT_DAMAGE
from training_util import (TOTAL, N, copy_run, damage_checkpoint, flat_params, latest_params,
                           losses, run_module, subprocess_env, tiny_config, train_command,
                           write_config_file)

TMP_MARKER = "orbax-checkpoint-tmp"


def assert_params_close(got: dict, want: dict, atol: float) -> None:
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=name)


def saved_steps(workdir: pathlib.Path) -> list[int]:
  """Steps of the complete checkpoints (Orbax renames a step's directory once it is whole)."""
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_resume_continues_exactly_as_one_run(full_run, half_run, corpus, tmp_path):
  workdir = copy_run(half_run, tmp_path / "run")
  assert losses(workdir).keys() == set(range(1, N + 1))

  train_loop.train_and_evaluate(tiny_config(corpus), workdir)

  assert saved_steps(workdir)[-1] == TOTAL
  resumed, whole = losses(workdir), losses(full_run)
  for step in range(N + 1, TOTAL + 1):
    assert resumed[step] == pytest.approx(whole[step], abs=1e-6), step
  assert_params_close(latest_params(workdir), latest_params(full_run), atol=1e-6)


@pytest.mark.slow
def test_resume_on_another_mesh_matches_the_uninterrupted_run(full_run, half_run, corpus,
                                                              tmp_path):
  workdir = copy_run(half_run, tmp_path / "run")  # written on mesh (8, 1, 1)
  config = tiny_config(corpus)
  config.mesh.update(data=2, fsdp=2, tensor=2)

  train_loop.train_and_evaluate(config, workdir)

  resumed, whole = losses(workdir), losses(full_run)
  for step in range(N + 1, TOTAL + 1):
    assert resumed[step] == pytest.approx(whole[step], abs=1e-5), step
  assert_params_close(latest_params(workdir), latest_params(full_run), atol=1e-5)


# Runs `experiments.train` with Orbax's final rename of step KILL_AT_STEP's save replaced by a
# SIGKILL: the process dies with that save written in full under its temporary name, the last
# moment before it would count as a checkpoint.
_KILLED_AT_RENAME = """
import os, runpy, signal, sys
from orbax.checkpoint._src.path import async_path

_rename = async_path.rename

async def rename(src, dst):
  if dst.name == os.environ["KILL_AT_STEP"] and TMP_MARKER in src.name:
    os.kill(os.getpid(), signal.SIGKILL)
  return await _rename(src, dst)

async_path.rename = rename
sys.argv = ["train", *sys.argv[1:]]
runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)
""".replace("TMP_MARKER", repr(TMP_MARKER))


@pytest.mark.slow
def test_sigkill_during_save_resumes_from_the_last_complete_checkpoint(full_run, corpus,
                                                                       compile_cache, tmp_path):
  config_file = write_config_file(tmp_path / "config.py", tiny_config(corpus, checkpoint_every=1))
  workdir = tmp_path / "run"
  env = subprocess_env(compile_cache)

  killed = run_module([sys.executable, "-c", _KILLED_AT_RENAME, f"--config={config_file}",
                       f"--workdir={workdir}"], dict(env, KILL_AT_STEP=str(N + 1)))
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  leftovers = [p.name for p in (workdir / "checkpoints").iterdir() if TMP_MARKER in p.name]
  assert [name.split(".")[0] for name in leftovers] == [str(N + 1)]
  complete = saved_steps(workdir)
  assert complete[-1] == N  # the unfinished save is not taken for a checkpoint

  # Saving every N steps, the resumed run never writes step N + 1 again: only the clean-up at its
  # start can remove that step's leftovers (Orbax would replace them on a save of the same step).
  result = run_module(train_command(config_file, workdir, "--verbosity=0",
                                    f"--config.train.checkpoint_every={N}"), env)
  assert result.returncode == 0, result.stderr[-3000:]

  assert f"Resumed from step {complete[-1]}" in result.stderr
  assert not any(TMP_MARKER in p.name for p in (workdir / "checkpoints").iterdir())
  assert saved_steps(workdir)[-1] == TOTAL
  assert losses(workdir)[TOTAL] == pytest.approx(losses(full_run)[TOTAL], abs=1e-6)
  assert_params_close(latest_params(workdir), latest_params(full_run), atol=1e-6)


@pytest.mark.slow
def test_non_finite_loss_stops_and_names_the_last_good_checkpoint(half_run, corpus, tmp_path):
  workdir = copy_run(half_run, tmp_path / "run")
  config = tiny_config(corpus, checkpoint_every=1)
  config.optim.update(lr_init=1e30, lr_final=1e30)  # one Adam step moves every weight by ~1e30

  with pytest.raises(train_loop.NonFiniteLossError) as error:
    train_loop.train_and_evaluate(config, workdir)

  # Step N + 1 trains from the good checkpoint N and saves the exploded weights as N + 1; their
  # loss, seen at step N + 2, is the first non-finite one.
  message = str(error.value)
  assert f"at step {N + 2}" in message
  assert f"Checkpoint {N + 1} holds the parameters that gave this loss" in message
  assert f"last good checkpoint is step {N} " in message
  assert saved_steps(workdir) == [N, N + 1]
  assert max(np.abs(p).max() for p in latest_params(workdir).values()) > 1e20

  # Following the message: drop the bad step; the good one restores with finite parameters and
  # the run resumes from it at a sane rate.
  shutil.rmtree(workdir / "checkpoints" / str(N + 1))
  good = latest_params(workdir)
  assert all(np.isfinite(p).all() for p in good.values())
  assert_params_close(good, latest_params(half_run), atol=0)
  final = train_loop.train_and_evaluate(tiny_config(corpus), workdir)
  assert np.isfinite(final["train/loss"])
  assert all(np.isfinite(p).all() for p in latest_params(workdir).values())


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
# When one array of a restore fails, Orbax abandons the reads of the others; their coroutines are
# reported (never awaited) when garbage-collected. Collect here so that it happens in this test.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoint_names_the_step_and_the_remedy(half_run, corpus, tmp_path, damage):
  workdir = copy_run(half_run, tmp_path / "run")
  damage_checkpoint(workdir / "checkpoints" / str(N), damage)

  with pytest.raises(tensor_names.CheckpointError) as error:
    train_loop.train_and_evaluate(tiny_config(corpus), workdir)
  gc.collect()

  message = str(error.value)
  assert f"checkpoint step {N} in {workdir / 'checkpoints'}" in message
  assert f"delete {workdir / 'checkpoints' / str(N)}" in message


@pytest.mark.slow
def test_other_model_config_is_rejected_naming_the_field(half_run, corpus, tmp_path):
  workdir = copy_run(half_run, tmp_path / "run")
  config = tiny_config(corpus)
  config.model.n_embd = 64

  with pytest.raises(tensor_names.CheckpointError, match=r"'n_embd': \(32, 64\)"):
    train_loop.train_and_evaluate(config, workdir)


@pytest.mark.parametrize("size", [0, 10])
def test_empty_or_too_short_data_file_is_a_clear_error(tmp_path, size):
  data = tmp_path / "data.txt"
  data.write_bytes(b"x" * size)
  expected = "is empty" if size == 0 else "need at least ctx_len"
  with pytest.raises(ValueError, match=expected) as error:
    train_loop.train_and_evaluate(tiny_config(data), tmp_path / "run")
  assert str(data) in str(error.value)


@pytest.mark.slow
def test_export_loads_with_the_trained_parameters(full_run):
  exported, config = weights.load(full_run / "export")
  trained, _ = ckpt_lib.load_export(full_run)  # the latest training checkpoint

  assert config.n_layer == 2 and config.n_embd == 32 and config.vocab_size == 256
  assert_params_close(flat_params(exported), flat_params(trained), atol=0)
  tokens = jnp.asarray([[1, 2, 3, 100, 200]])
  np.testing.assert_array_equal(np.asarray(exported(tokens, impl="scan")[0]),
                                np.asarray(trained(tokens, impl="scan")[0]))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["workdir", "export"])
def test_load_gives_the_requested_dtype_for_a_workdir_and_an_export(full_run, where):
  path = full_run if where == "workdir" else full_run / "export"
  float32, _ = weights.load(path)

  loaded, config = weights.load(path, dtype="bfloat16")

  assert config.param_dtype == "bfloat16"
  got, want = flat_params(loaded), flat_params(float32)
  assert got.keys() == want.keys()
  for name in want:
    assert got[name].dtype == jnp.bfloat16, name
    np.testing.assert_array_equal(got[name], want[name].astype(jnp.bfloat16), err_msg=name)


@pytest.mark.slow
def test_score_cli_reads_the_export_on_another_device_count(full_run, tmp_path):
  out = tmp_path / "logits.npy"
  result = run_module([sys.executable, "-m", "experiments.score",
                       f"--checkpoint={full_run / 'export'}", "--tokens=1,2,3",
                       f"--output={out}", "--impl=scan"],
                      subprocess_env(devices=1))
  assert result.returncode == 0, result.stderr[-3000:]

  logits = np.load(out)
  model, _ = weights.load(full_run / "export")
  assert logits.shape == (3, 256)
  expected = np.asarray(model(jnp.asarray([[1, 2, 3]]), impl="scan")[0][0])
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_export_converts_to_an_official_pth(full_run, tmp_path):
  model, _ = weights.load(full_run / "export")
  path = tmp_path / "model.pth"
  formats.save_pth(model, path)

  back, config = weights.load(path)
  assert config.n_embd == 32
  assert_params_close(flat_params(back), flat_params(model), atol=0)


@pytest.mark.slow
def test_convert_cli_reads_the_export(full_run, tmp_path):
  out = tmp_path / "model.pth"
  result = run_module([sys.executable, "-m", "experiments.convert",
                       f"--input={full_run / 'export'}", f"--output={out}"],
                      subprocess_env(devices=1))
  assert result.returncode == 0, result.stderr[-3000:]

  converted, _ = weights.load(out)
  exported, _ = weights.load(full_run / "export")
  assert_params_close(flat_params(converted), flat_params(exported), atol=0)

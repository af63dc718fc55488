"""A real two-process jax.distributed training run on localhost equals a one-process run."""

from __future__ import annotations

import subprocess

import portpicker
import pytest

from training_util import (REPO, losses, subprocess_env, tiny_config, train_command,
                           write_config_file)

STEPS = 4
TIMEOUT_S = 240


def _wait_all(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
  """Waits for every process (bounded); kills all of them if any hangs."""
  try:
    return [(p.wait(timeout=TIMEOUT_S), p.communicate()[1]) for p in processes]
  except subprocess.TimeoutExpired:
    pytest.fail(f"A training process did not finish within {TIMEOUT_S} s.")
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_len", [0, 5], ids=["one_call", "chunks_of_5"])
def test_two_processes_train_like_one_process_with_the_same_devices(corpus, compile_cache,
                                                                    tmp_path, chunk_len):
  # Global batch 8 over 4 devices either way; checkpoints are written by both processes. With
  # chunk_len=5 each 16-token window runs in chunks of 5, 5, 5 and 1 that carry the state.
  config = tiny_config(corpus, steps=STEPS, checkpoint_every=2, export=True)
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  config.train.chunk_len = chunk_len
  config_file = write_config_file(tmp_path / "config.py", config)
  port = portpicker.pick_unused_port()
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"

  processes = [
      _start(train_command(config_file, multi, f"--coordinator_address=127.0.0.1:{port}",
                           "--num_processes=2", f"--process_id={i}"),
             subprocess_env(compile_cache, devices=2))
      for i in range(2)]
  processes.append(_start(train_command(config_file, single),
                          subprocess_env(compile_cache, devices=4)))
  results = _wait_all(processes)

  for name, (code, stderr) in zip(["process 0", "process 1", "single process"], results):
    assert code == 0, f"{name} failed:\n{stderr[-3000:]}"
  assert "process 1 of 2, 2 local / 4 global devices" in results[1][1]
  two, one = losses(multi), losses(single)
  assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    assert two[step] == pytest.approx(one[step], abs=1e-5), step
  assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == ["2", "4"]
  assert (multi / "export" / "rwkv_jax.json").is_file()

"""A lost host: in a real two-process training run one process is killed (SIGKILL); the other
stops within the heartbeat timeout with one line saying which, and both restarted resume from
the newest complete checkpoint as if nothing had happened."""

from __future__ import annotations

import signal
import time

import pytest

from test_preemption import assert_continues_the_full_run, two_processes
from training_util import N, subprocess_env, tiny_config, write_config_file

HEARTBEAT_S = 10
HEARTBEAT = f"--heartbeat_timeout={HEARTBEAT_S}"
# A survivor that hangs, or waits jax's default heartbeat timeout (100 s), takes longer than this.
STOPS_WITHIN_S = 60


def _wait_for(condition, what: str, timeout_s: float = 120) -> None:
  deadline = time.monotonic() + timeout_s
  while not condition():
    assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
    time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["a_worker", "the_coordinator"])
def test_a_killed_process_stops_the_other_in_one_line_and_both_restarted_resume(
    full_run, corpus, compile_cache, tmp_path, victim):
  config = tiny_config(corpus)
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  config_file = write_config_file(tmp_path / "config.py", config)
  workdir = tmp_path / "run"
  env = subprocess_env(compile_cache, devices=2)
  runs = two_processes(config_file, workdir, env, tmp_path, "first", HEARTBEAT,
                       hold_at_step=N + 1)
  runs[0].wait_until_held()
  _wait_for(lambda: (workdir / "checkpoints" / str(N)).is_dir(), f"checkpoint {N}")
  survivor = runs[1 - victim]

  runs[victim].signal(signal.SIGKILL)
  start = time.monotonic()
  runs[0].let_go()
  status, _ = survivor.finish()
  elapsed = time.monotonic() - start
  runs[victim].finish()

  stderr = survivor.stderr
  assert status not in (0, -signal.SIGKILL), stderr[-3000:]
  assert elapsed < STOPS_WITHIN_S, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, stderr[-3000:]
  # From a collective that failed (the training loop), or from jax.distributed's own verdict.
  said = [f"process {1 - victim} of 2 lost contact with another process of this run",
          f"process {1 - victim} of 2 stops: " + (
              f"process 1 of this run sent no heartbeat for {HEARTBEAT_S} s" if victim == 1
              else "the coordinator, process 0, is gone")]
  assert any(errors[0].startswith(f"error: {text}") for text in said), errors[0]
  assert errors[0].endswith("Restart every process with the same command to resume from the "
                            "newest complete checkpoint.")
  assert "Check failure stack trace" not in stderr and "Fatal Python error" not in stderr

  restarted = two_processes(config_file, workdir, env, tmp_path, "again", HEARTBEAT)
  for i, run in enumerate(restarted):
    code, _ = run.finish()
    assert code == 0, f"process {i}:\n{run.stderr[-3000:]}"
  assert f"Resumed from step {N}" in restarted[0].stderr
  assert_continues_the_full_run(workdir, full_run, after=N, atol=1e-5)  # another mesh


def test_the_heartbeat_timeout_comes_from_the_flag_then_the_environment_then_jax(monkeypatch):
  from rwkv_jax import sharding  # pylint: disable=g-import-not-at-top

  monkeypatch.delenv(sharding.HEARTBEAT_TIMEOUT_ENV, raising=False)
  assert sharding.heartbeat_timeout_s() == sharding.DEFAULT_HEARTBEAT_TIMEOUT_S == 100
  monkeypatch.setenv(sharding.HEARTBEAT_TIMEOUT_ENV, "7")
  assert sharding.heartbeat_timeout_s() == 7
  assert sharding.heartbeat_timeout_s(12) == 12
  monkeypatch.setenv(sharding.HEARTBEAT_TIMEOUT_ENV, "soon")
  with pytest.raises(ValueError, match="RWKV_JAX_HEARTBEAT_TIMEOUT='soon' must be a whole number"):
    sharding.heartbeat_timeout_s()

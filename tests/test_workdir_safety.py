"""One run per workdir: a second trainer is refused at once; a killed holder blocks nothing and
leaves no unfinished save behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from rwkv_jax.train import loop as train_loop
from rwkv_jax.train import workdir as workdir_lib
from training_util import (REPO, TOTAL, compile_cache, copy_run, corpus, full_run,  # noqa: F401
                           run_module, subprocess_env, tiny_config, train_command,
                           write_config_file)

# Takes the workdir's lock as a trainer does, says so, and holds it until killed.
_HOLD = ("import pathlib, sys, time; from rwkv_jax.train import workdir as workdir_lib\n"
         "with workdir_lib.workdir_lock(pathlib.Path(sys.argv[1])):\n"
         "  print('held', flush=True); time.sleep(600)\n")


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_killed_holder_blocks_nothing(corpus, compile_cache,
                                                                        tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  config = tiny_config(corpus, steps=1, checkpoint_every=1)
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env=subprocess_env())
  try:
    assert holder.stdout.readline() == "held\n"
    second = run_module(train_command(write_config_file(tmp_path / "config.py", config), workdir),
                        subprocess_env(compile_cache))
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"in use by pid {holder.pid} on host {socket.gethostname()}" in second.stderr
    assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()

  final = train_loop.train_and_evaluate(config, workdir)  # the dead holder's lock is gone with it
  assert final["step"] == 1
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]


def test_the_lock_refuses_a_second_holder_by_name_until_the_first_lets_go(tmp_path):
  # flock belongs to an open file, so a second open in this process contends like another process.
  with workdir_lib.workdir_lock(tmp_path):
    with pytest.raises(workdir_lib.WorkdirBusyError,
                       match=f"in use by pid {os.getpid()} on host {socket.gethostname()}"):
      with workdir_lib.workdir_lock(tmp_path):
        pass
  with workdir_lib.workdir_lock(tmp_path):
    pass


def test_unfinished_saves_are_removed_and_complete_checkpoints_kept(tmp_path):
  checkpoints = tmp_path / "checkpoints"
  (checkpoints / "3" / "params").mkdir(parents=True)
  unfinished = checkpoints / "4.orbax-checkpoint-tmp-1764316800000000"
  (unfinished / "params").mkdir(parents=True)
  (unfinished / "params" / "half_written").write_bytes(b"\0" * 64)
  (checkpoints / "5.orbax-checkpoint-tmp").write_bytes(b"")  # a file, not a directory

  workdir_lib.remove_unfinished_saves(tmp_path)

  assert sorted(p.name for p in checkpoints.iterdir()) == ["3"]


@pytest.mark.slow
def test_a_killed_save_leaves_no_temporary_directory_behind(full_run, corpus, tmp_path):
  # What a run killed in the middle of saving step TOTAL + 1 leaves: Orbax's unfinished directory.
  workdir = copy_run(full_run, tmp_path / "run")
  unfinished = workdir / "checkpoints" / f"{TOTAL + 1}.orbax-checkpoint-tmp-1764316800000000"
  (unfinished / "params").mkdir(parents=True)
  (unfinished / "params" / "half_written").write_bytes(b"\0" * 64)

  final = train_loop.train_and_evaluate(tiny_config(corpus), workdir)  # resumes at TOTAL: no steps
  assert final["step"] == TOTAL
  assert not unfinished.exists()
  assert str(TOTAL) in [p.name for p in (workdir / "checkpoints").iterdir()]

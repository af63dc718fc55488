"""SIGTERM and SIGINT, as a cluster sends them to preempt a job: training saves the step in flight
and exits 0, and the same command resumes as if it had never stopped; a second signal exits at
once and leaves no checkpoint that looks complete; a conversion or a saved state in progress
leaves nothing under its final name.

Each run is a real `python -m experiments.train` (or convert, generate) sent a real signal. It
is held at a chosen point (a logged step, a save's final rename, a write) until the signal has
been sent, so that the signal lands there every time.
"""

from __future__ import annotations

import pathlib
import re
import signal
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from rwkv_jax.io import state_file, weights
from training_util import (REPO, TOTAL, N, flat_params, latest_params, losses, run_module,
                           subprocess_env, tiny_config, write_config_file)

TMP_MARKER = "orbax-checkpoint-tmp"
TIMEOUT_S = 240

# Runs the module named by argv[1] with its remaining arguments, held where the environment says:
#   HOLD_AT_STEP=k       after writing step k's metrics,
#   HOLD_AT_RENAME=k     at Orbax's final rename of step k's checkpoint,
#   HOLD_IN_WRITE=PATH   with PATH's atomic write done under its temporary name, not renamed.
# There it prints "held" and waits for the file $RELEASE (never, for HOLD_AT_RENAME).
_HELD = """
import os, pathlib, runpy, sys, time

def hold(release=os.environ["RELEASE"]):
  print("held", flush=True)
  while not pathlib.Path(release).exists():
    time.sleep(0.01)

if "HOLD_AT_STEP" in os.environ:
  from rwkv_jax.train import metrics
  _write = metrics.MetricWriter.write

  def write(self, step, record):
    _write(self, step, record)
    if step == int(os.environ["HOLD_AT_STEP"]) and "train/loss" in record:
      hold()

  metrics.MetricWriter.write = write

if "HOLD_AT_RENAME" in os.environ:
  from orbax.checkpoint._src.path import async_path
  _rename = async_path.rename

  async def rename(src, dst):
    if dst.name == os.environ["HOLD_AT_RENAME"] and "orbax-checkpoint-tmp" in src.name:
      hold(release="/nonexistent")  # until the process is ended
    return await _rename(src, dst)

  async_path.rename = rename

if "HOLD_IN_WRITE" in os.environ:
  import contextlib
  from rwkv_jax import files
  _atomic_path = files.atomic_path

  @contextlib.contextmanager
  def atomic_path(path):
    with _atomic_path(path) as tmp:
      yield tmp
      if str(path) == os.environ["HOLD_IN_WRITE"]:
        hold()

  files.atomic_path = atomic_path

module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


class Held:
  """A command started under _HELD; `signal` sends a real signal once it is held there."""

  def __init__(self, module: str, args: list[str], env: dict[str, str], tmp_path: pathlib.Path,
               name: str = "", **hold: int | pathlib.Path):
    name = name or module
    self.release = tmp_path / f"release-{name}"
    self.release.unlink(missing_ok=True)
    self.stderr_path = tmp_path / f"stderr-{name}.txt"
    env = dict(env, RELEASE=str(self.release), **{k.upper(): str(v) for k, v in hold.items()})
    with open(self.stderr_path, "w") as stderr:  # a file: a full pipe would stall the run
      self.process = subprocess.Popen([sys.executable, "-c", _HELD, module, *args], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)

  def wait_until_held(self) -> None:
    for line in self.process.stdout:  # other lines are the program's (gloo's, multi-process)
      if line == "held\n":
        return
    pytest.fail(f"Ended before it was held; stderr:\n{self.stderr[-3000:]}")

  def signal(self, signum: int) -> None:
    self.process.send_signal(signum)

  def let_go(self) -> None:
    self.release.touch()

  def finish(self) -> tuple[int, str]:
    """(exit status, the rest of stdout), waiting a bounded time; kills it if it hangs."""
    try:
      out, _ = self.process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.communicate()
      pytest.fail(f"Not finished {TIMEOUT_S} s after the signal; stderr:\n{self.stderr[-3000:]}")
    return self.process.returncode, out

  @property
  def stderr(self) -> str:
    return self.stderr_path.read_text()


def two_processes(config_file: pathlib.Path, workdir: pathlib.Path, env: dict[str, str],
                  tmp_path: pathlib.Path, tag: str, *flags: str, **hold_first) -> list[Held]:
  """Processes 0 and 1 of one `experiments.train` run on localhost; `hold_first` holds process 0."""
  port = portpicker.pick_unused_port()
  return [Held("experiments.train",
               [f"--config={config_file}", f"--workdir={workdir}",
                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                f"--process_id={i}", *flags],
               env, tmp_path, name=f"{tag}{i}", **(hold_first if i == 0 else {}))
          for i in range(2)]


def _complete_steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def assert_continues_the_full_run(workdir: pathlib.Path, full_run: pathlib.Path, after: int,
                                  atol: float = 1e-6) -> None:
  """Losses after step `after` and the final parameters are those of the uninterrupted run."""
  got, want = losses(workdir), losses(full_run)
  assert sorted(got) == list(range(1, TOTAL + 1))
  for step in range(after + 1, TOTAL + 1):
    assert got[step] == pytest.approx(want[step], abs=atol), step
  want_params = latest_params(full_run)
  for name, value in latest_params(workdir).items():
    np.testing.assert_allclose(value, want_params[name], rtol=0, atol=atol, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_the_step_in_flight_and_the_same_command_resumes_as_one_run(
    full_run, corpus, compile_cache, tmp_path, signum):
  config_file = write_config_file(tmp_path / "config.py", tiny_config(corpus))
  workdir = tmp_path / "run"
  args = [f"--config={config_file}", f"--workdir={workdir}"]
  env = subprocess_env(compile_cache)
  run = Held("experiments.train", args, env, tmp_path, hold_at_step=1)

  run.wait_until_held()  # step 2 is running
  run.signal(signum)
  run.let_go()
  status, out = run.finish()

  assert status == 0, run.stderr[-3000:]
  name = signal.Signals(signum).name
  assert out == f"Stopped by {name} at step 2 of {TOTAL}, with a checkpoint; run the same " \
                f"command to resume.\n"
  assert _complete_steps(workdir) == [2]
  assert sorted(losses(workdir)) == [1, 2]  # the metrics of the step it stopped at
  assert not (workdir / "export").exists()

  resumed = run_module([sys.executable, "-m", "experiments.train", *args], env)

  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from step 2" in resumed.stderr
  assert_continues_the_full_run(workdir, full_run, after=2)


@pytest.mark.slow
def test_a_second_signal_during_the_save_exits_at_once_and_the_previous_checkpoint_is_used(
    full_run, corpus, compile_cache, tmp_path):
  config_file = write_config_file(tmp_path / "config.py", tiny_config(corpus))
  workdir = tmp_path / "run"
  args = [f"--config={config_file}", f"--workdir={workdir}"]
  env = subprocess_env(compile_cache)
  run = Held("experiments.train", args, env, tmp_path, hold_at_step=N + 1,
             hold_at_rename=N + 2)
  run.wait_until_held()
  run.signal(signal.SIGTERM)  # step N + 2 is running: the run stops after it, saving it
  run.let_go()
  run.wait_until_held()  # the save of step N + 2, written, before its final rename

  run.signal(signal.SIGTERM)
  status, _ = run.finish()

  assert status == -signal.SIGTERM  # at once: the signal's default action
  leftovers = [p.name for p in (workdir / "checkpoints").iterdir() if TMP_MARKER in p.name]
  assert [name.split(".")[0] for name in leftovers] == [str(N + 2)]
  assert _complete_steps(workdir) == [N]

  resumed = run_module([sys.executable, "-m", "experiments.train", *args], env)

  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from step {N}" in resumed.stderr
  assert not any(TMP_MARKER in p.name for p in (workdir / "checkpoints").iterdir())
  assert_continues_the_full_run(workdir, full_run, after=N)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_both_resume_as_one_run(
    full_run, corpus, compile_cache, tmp_path):
  config = tiny_config(corpus)
  config.mesh.update(data=-1, fsdp=1, tensor=1)  # 2 x 2 devices, the global batch of full_run
  config_file = write_config_file(tmp_path / "config.py", config)
  workdir = tmp_path / "run"
  env = subprocess_env(compile_cache, devices=2)
  runs = two_processes(config_file, workdir, env, tmp_path, "first", hold_at_step=1)
  runs[0].wait_until_held()  # process 1 runs ahead until a collective waits for process 0

  runs[1].signal(signal.SIGTERM)
  runs[0].let_go()
  results = [run.finish() for run in runs]

  for i, (status, _) in enumerate(results):
    assert status == 0, f"process {i}:\n{runs[i].stderr[-3000:]}"
  said = [re.fullmatch(r"Stopped by SIGTERM at step (\d+) of 6, with a checkpoint; run the same "
                       r"command to resume.", out.splitlines()[-1])  # after gloo's lines
          for _, out in results]
  assert all(said), results
  stop = int(said[0].group(1))
  assert int(said[1].group(1)) == stop < TOTAL  # the step they agreed on
  assert max(_complete_steps(workdir)) == stop

  again = two_processes(config_file, workdir, env, tmp_path, "again")
  for i, run in enumerate(again):
    status, _ = run.finish()
    assert status == 0, f"process {i}:\n{run.stderr[-3000:]}"
  assert f"Resumed from step {stop}" in again[0].stderr
  assert_continues_the_full_run(workdir, full_run, after=stop, atol=1e-5)  # another mesh


@pytest.fixture
def export(full_run) -> pathlib.Path:
  return full_run / "export"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["convert", "generate"])
def test_a_signal_while_an_output_is_written_leaves_nothing_under_its_name(export, tmp_path,
                                                                          command):
  if command == "convert":
    out = tmp_path / "model.pth"
    args = [f"--input={export}", f"--output={out}"]
  else:
    out = tmp_path / "prompt.state"
    args = [f"--checkpoint={export}", "--tokenizer=bytes", "--max_tokens=0",
            "--prompt_tokens=1,2,3", f"--save_state={out}"]
  env = subprocess_env(devices=1)
  run = Held(f"experiments.{command}", args, env, tmp_path, hold_in_write=out)
  run.wait_until_held()  # the output is written in full under its temporary name

  run.signal(signal.SIGTERM)
  status, out_text = run.finish()

  assert status == 128 + signal.SIGTERM, run.stderr[-3000:]
  errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
  assert errors == ["error: stopped by SIGTERM; outputs not yet complete were not written."]
  assert "Traceback" not in run.stderr and out_text == ""
  assert sorted(p.name for p in tmp_path.iterdir()
                if not p.name.startswith(("stderr-", "release-"))) == []

  assert run_module([sys.executable, "-m", f"experiments.{command}", *args], env).returncode == 0
  if command == "convert":
    got, want = flat_params(weights.load(out)[0]), flat_params(weights.load(export)[0])
    for name, value in want.items():
      np.testing.assert_array_equal(got[name], value, err_msg=name)
  else:
    assert state_file.load(out).tokens_consumed == (3,)

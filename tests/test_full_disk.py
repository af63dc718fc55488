"""A disk that fills up: every writer fails in one line naming its path and ENOSPC, leaves what it
wrote before whole, and the same command resumes or completes once space is freed.

The disk is a real 8 MiB tmpfs, filled with a file to leave a chosen amount free.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from rwkv_jax import files
from rwkv_jax.data import binidx, encode
from rwkv_jax.io import state_file, weights
from rwkv_jax.train import metrics
from training_util import (TOTAL, N, copy_run, flat_params, latest_params, losses, one_line_error,
                           run_module, subprocess_env, tiny_config, train_command,
                           write_config_file)

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


class Disk:
  """A mounted tmpfs and the file that fills it."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self._filler = root / ".filler"

  def free_bytes(self) -> int:
    stat = os.statvfs(self.root)
    return stat.f_bavail * stat.f_frsize

  def fill(self, leave: int = 0) -> None:
    """Fills the disk so that about `leave` bytes (whole pages) stay free."""
    size = max(self.free_bytes() - leave, 0) + (self._filler.stat().st_size
                                                if self._filler.exists() else 0)
    with open(self._filler, "wb") as f:
      f.truncate(0)
      f.write(b"\1" * size)
    assert self.free_bytes() <= leave

  def free(self) -> None:
    self._filler.unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path):
  root = tmp_path / "disk"
  root.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(root)],
                           capture_output=True, text=True, check=False)
  if mounted.returncode:
    pytest.skip(f"a full disk needs a small tmpfs, and mounting one is not permitted here "
                f"(mount: {mounted.stderr.strip()}); run as root")
  try:
    yield Disk(root)
  finally:
    if subprocess.run(["umount", str(root)], check=False).returncode:
      subprocess.run(["umount", "-l", str(root)], check=False)  # a process still holds a file


def _error_line(result: subprocess.CompletedProcess) -> str:
  """The one `error: ...` line of a run that failed (status 1).

  Not one_line_error: after a failed save, tensorstore may still print tracebacks of its
  abandoned writes ("Event loop is closed") from their own threads before the error line, which
  the program cannot hold back; the error line is still a line of its own (experiments/_cli.py).
  """
  assert result.returncode == 1, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


def _step_dirs(workdir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def _dir_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _assert_same_params(got: pathlib.Path, want: pathlib.Path) -> None:
  got_params, want_params = (flat_params(weights.load(path)[0]) for path in (got, want))
  assert got_params.keys() == want_params.keys()
  for name, value in want_params.items():
    np.testing.assert_array_equal(got_params[name], value, err_msg=name)


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_stops_training_and_the_same_command_resumes(
    half_run, full_run, corpus, compile_cache, disk, tmp_path):
  workdir = copy_run(half_run, disk.root / "run")  # checkpoint N
  config_file = write_config_file(tmp_path / "config.py", tiny_config(corpus, checkpoint_every=1))
  command = train_command(config_file, workdir)
  env = subprocess_env(compile_cache)
  disk.fill(leave=_dir_bytes(workdir / "checkpoints" / str(N)) // 2)  # half a checkpoint

  failed = run_module(command, env)

  error = _error_line(failed)
  assert f"could not write {workdir / 'checkpoints' / str(N + 1)}: {NO_SPACE} (ENOSPC)" in error
  assert f"the newest complete checkpoint is step {N}" in error
  # Stopped at the latest by the next save, not run on to the end with nothing to resume from.
  assert max(losses(workdir)) <= N + 2
  assert str(N) in _step_dirs(workdir) and str(N + 1) not in _step_dirs(workdir)

  disk.free()
  resumed = run_module(command, env)

  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from step {N}" in resumed.stderr
  got, want = losses(workdir), losses(full_run)
  for step in range(N + 1, TOTAL + 1):
    assert got[step] == pytest.approx(want[step], abs=1e-6), step
  for name, value in latest_params(full_run).items():
    np.testing.assert_allclose(latest_params(workdir)[name], value, rtol=0, atol=1e-6,
                               err_msg=name)


@pytest.mark.slow
def test_an_export_that_does_not_fit_fails_in_one_line_and_the_same_command_writes_it(
    full_run, corpus, compile_cache, disk, tmp_path):
  workdir = disk.root / "run"
  shutil.copytree(full_run, workdir, ignore=shutil.ignore_patterns("export"))
  command = train_command(write_config_file(tmp_path / "config.py",
                                            tiny_config(corpus, export=True)), workdir)
  env = subprocess_env(compile_cache)
  disk.fill(leave=_dir_bytes(full_run / "export") // 4)

  error = _error_line(run_module(command, env))

  assert f"could not write {workdir / 'export'}: {NO_SPACE} (ENOSPC)" in error
  assert not (workdir / "export" / "rwkv_jax.json").exists()  # an incomplete export is not one
  assert _step_dirs(workdir) == [str(N), str(TOTAL)]
  disk.free()
  assert run_module(command, env).returncode == 0
  _assert_same_params(workdir / "export", full_run / "export")


def test_metrics_on_a_full_disk_raise_naming_the_file_and_keep_the_records_before(disk):
  workdir = disk.root / "run"
  workdir.mkdir()
  writer = metrics.MetricWriter(workdir, start_step=0)
  writer.write(1, {"train/loss": 5.0})
  disk.fill()

  with pytest.raises(files.NoSpaceError) as error:
    for step in range(2, 10_000):  # until the pages already held are full too
      writer.write(step, {"train/loss": 5.0 - step * 1e-4, "train/lr": 1e-3})
  with contextlib.suppress(files.NoSpaceError):  # what it still holds cannot be written either
    writer.close()

  assert error.value.errno == errno.ENOSPC
  assert str(error.value).startswith(f"could not write {workdir}")
  assert NO_SPACE in str(error.value) and "\n" not in str(error.value)
  disk.free()
  # A resumed run drops a record cut short by the full disk; every record before it is whole.
  metrics.MetricWriter(workdir, start_step=10_000).close()
  history = metrics.read_history(workdir)
  assert [r["step"] for r in history] == list(range(1, len(history) + 1))


def test_a_full_disk_while_encoding_text_leaves_the_old_tokens_and_encodes_once_freed(disk,
                                                                                      tmp_path):
  text = tmp_path / "text.txt"
  text.write_text("hello world\n\nsecond paragraph\n")
  prefix = disk.root / "data" / "text"
  encode.encode_once(text, "bytes", prefix)
  before = {p.name: p.read_bytes() for p in prefix.parent.iterdir()}
  text.write_text("much more text. " * 50_000)  # 1.6 MB of uint16 tokens: more than is left
  disk.fill(leave=256 << 10)

  with pytest.raises(files.NoSpaceError) as error:
    encode.encode_once(text, "bytes", prefix)

  assert str(error.value).startswith(f"could not write {prefix}.bin: {NO_SPACE} (ENOSPC)")
  for name in ("text.bin", "text.idx"):  # the old pair is whole; the record of it is gone
    assert (prefix.parent / name).read_bytes() == before[name]
  assert not any(p.name.endswith(".tmp") for p in prefix.parent.iterdir())
  disk.free()
  encode.encode_once(text, "bytes", prefix)
  assert len(binidx.BinidxSource(prefix).tokens) == 800_000 + 1  # and the end of document


@pytest.mark.slow
def test_a_figure_on_a_full_disk_raises_naming_it_and_keeps_the_old_one(full_run, disk):
  from experiments import plots

  workdir = copy_run(full_run, disk.root / "run")
  old = plots.plot_loss(workdir).read_bytes()
  disk.fill()

  with pytest.raises(files.NoSpaceError, match=f"could not write {workdir / 'loss.png'}: "):
    plots.plot_loss(workdir, title="another title")

  assert (workdir / "loss.png").read_bytes() == old
  assert [p.name for p in workdir.iterdir() if p.name.endswith(".tmp")] == []


@pytest.fixture
def export(full_run) -> pathlib.Path:
  return full_run / "export"


@pytest.mark.slow
def test_convert_on_a_full_disk_is_one_line_and_writes_nothing_until_space_is_freed(export, disk):
  out = disk.root / "model.pth"
  command = [sys.executable, "-m", "experiments.convert", f"--input={export}", f"--output={out}"]
  disk.fill(leave=64 << 10)  # the .pth is 170 kB

  error = one_line_error(run_module(command, subprocess_env(devices=1)), status=1)

  assert f"{out}: {NO_SPACE}" in error
  assert [p.name for p in disk.root.iterdir()] == [".filler"]  # no output, no temporary file
  disk.free()
  assert run_module(command, subprocess_env(devices=1)).returncode == 0
  _assert_same_params(out, export)


@pytest.mark.slow
def test_a_state_file_on_a_full_disk_is_one_line_and_the_old_one_stays(export, disk):
  path = disk.root / "prompt.state"
  command = [sys.executable, "-m", "experiments.generate", f"--checkpoint={export}",
             "--tokenizer=bytes", "--max_tokens=0", "--prompt_tokens=1,2,3",
             f"--save_state={path}"]
  assert run_module(command, subprocess_env(devices=1)).returncode == 0
  old = path.read_bytes()
  disk.fill()

  error = one_line_error(run_module(command[:-2] + ["--prompt_tokens=1,2,3,4", command[-1]],
                                    subprocess_env(devices=1)), status=1)

  assert f"{path}: {NO_SPACE}" in error
  assert path.read_bytes() == old
  assert sorted(p.name for p in disk.root.iterdir()) == [".filler", "prompt.state"]
  disk.free()
  assert run_module(command[:-2] + ["--prompt_tokens=1,2,3,4", command[-1]],
                    subprocess_env(devices=1)).returncode == 0
  assert state_file.load(path).tokens_consumed == (4,)

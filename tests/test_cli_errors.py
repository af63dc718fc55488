"""experiments.train, make_binidx and the runners end a user's mistake in one line, no traceback.

Each case is a real subprocess that stops before any training: status 2 for a mistake in the
flags or the files they name (status 1, a failed run, is pinned in tests/test_workdir_safety.py).
Every program that writes a file refuses a bad output path by one rule, in the same words; and a
ValueError that is not the user's mistake (a bug) keeps its traceback.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import threading

import pytest
from absl import app

from experiments import _cli
from training_util import (REPO, one_line_error, run_module, subprocess_env, tiny_config,
                           train_command, write_config_file)


@pytest.mark.slow
@pytest.mark.parametrize("case, expected", [
    ("missing config file", "--config=MISSING: there is no file"),
    ("config file that fails", "--config=BROKEN failed to load: ZeroDivisionError"),
    ("unknown override", "--config.train.stpes: the config has no field 'stpes'"),
    ("unknown key in the config file", "Unknown config key(s) config.train.stpes"),
    ("workdir is a file", "--workdir=AFILE is a file, not a directory"),
    ("workdir under a file", "--workdir=AFILE/run cannot be created (Not a directory"),
    ("zero log_every", "--config.train.log_every=0 must be >= 1"),
])
def test_train_usage_errors_are_one_line_and_status_2(corpus, tmp_path, case, expected):
  config = tiny_config(corpus, steps=1)
  a_file = tmp_path / "afile"
  a_file.write_text("not a directory")
  workdir, flags = tmp_path / "run", []
  if case == "unknown key in the config file":
    config.train.stpes = 1
  config_file = write_config_file(tmp_path / "config.py", config)
  if case == "missing config file":
    config_file = tmp_path / "missing.py"
  elif case == "config file that fails":
    config_file = tmp_path / "broken.py"
    config_file.write_text("def get_config():\n  return 1 / 0\n")
  elif case == "unknown override":
    flags = ["--config.train.stpes=3"]
  elif case == "workdir is a file":
    workdir = a_file
  elif case == "workdir under a file":
    workdir = a_file / "run"
  elif case.startswith("zero "):
    flags = [f"--config.train.{case.removeprefix('zero ')}=0"]

  result = run_module(train_command(config_file, workdir, *flags), subprocess_env())
  line = one_line_error(result, 2)
  expected = (expected.replace("MISSING", str(config_file)).replace("BROKEN", str(config_file))
              .replace("AFILE", str(a_file)))
  assert expected in line
  assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.slow
def test_debug_shows_the_traceback(corpus, tmp_path):
  config_file = write_config_file(tmp_path / "config.py", tiny_config(corpus))
  result = run_module(train_command(config_file, tmp_path / "run", "--config.train.stpes=3",
                                    "--debug"), subprocess_env())
  assert result.returncode != 0 and "Traceback" in result.stderr


def _make_binidx(*flags: str):
  return run_module([sys.executable, "-m", "experiments.make_binidx", *flags], subprocess_env())


@pytest.mark.parametrize("case, expected", [
    ("missing input", "--input=TMP/missing.txt is missing"),
    ("input is a directory", "--input=TMP is a directory"),
    ("not UTF-8", "--input=TMP/latin1.txt is not UTF-8 text"),
    ("empty input", "TMP/empty.txt holds no text"),
    ("unknown tokenizer", "--tokenizer=nope: unknown tokenizer 'nope'"),
    ("output under a file", "--output_prefix=TMP/text.txt/out cannot be written: TMP/text.txt is "
                            "a file, not a directory"),
    ("output is a directory", "--output_prefix=TMP is a directory"),
    ("no output flag", "--output_prefix must have a value"),
    ("extra argument", "Unexpected arguments: ['extra']"),
])
def test_make_binidx_errors_are_one_line_and_status_2(tmp_path, case, expected):
  text = tmp_path / "text.txt"
  text.write_text("some text\n")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
  (tmp_path / "empty.txt").write_text("\n\n")
  flags = {"input": str(text), "output_prefix": str(tmp_path / "out" / "corpus"),
           "tokenizer": "bytes"}
  extra = []
  if case == "missing input":
    flags["input"] = str(tmp_path / "missing.txt")
  elif case == "input is a directory":
    flags["input"] = str(tmp_path)
  elif case == "not UTF-8":
    flags["input"] = str(tmp_path / "latin1.txt")
  elif case == "empty input":
    flags["input"] = str(tmp_path / "empty.txt")
  elif case == "unknown tokenizer":
    flags["tokenizer"] = "nope"
  elif case == "output under a file":
    flags["output_prefix"] = str(text / "out")
  elif case == "output is a directory":
    flags["output_prefix"] = str(tmp_path)
  elif case == "no output flag":
    del flags["output_prefix"]
  elif case == "extra argument":
    extra = ["extra"]

  result = _make_binidx(*(f"--{k}={v}" for k, v in flags.items()), *extra)
  assert expected.replace("TMP", str(tmp_path)) in one_line_error(result, 2)
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("module, flags, expected", [
    ("bench_wkv", ["--impls=scan,nope"], "--impls=scan,nope: ['nope'] not among"),
    ("bench_wkv", ["--shapes=8x0x4"], "--shapes entry '8x0x4' is not BxTxC"),
    ("bench_train", ["--batch_size=0"], "--batch_size=0"),
    ("figure7", ["--tokens=0"], "--tokens"),
    ("demo", ["--workdir=AFILE"], "AFILE is a file, not a directory"),
    # The claim runners: their own flags and the shared --workdir, --out and --tag.
    ("char_level", ["--size=nope", "--tag=t"], "--size=nope: value should be one of"),
    ("scaling", ["--size=nope", "--workdir=AFILE"], "--size=nope: value should be one of"),
    ("long_context", ["--size=nope", "--tag=t"], "--size=nope: value should be one of"),
])
def test_runner_errors_are_one_line_and_status_2(tmp_path, module, flags, expected):
  a_file = tmp_path / "afile"
  a_file.write_text("not a directory")
  flags = [f.replace("AFILE", str(a_file)) for f in flags]
  result = run_module([sys.executable, "-m", f"experiments.{module}", *flags,
                       f"--out={tmp_path / 'out'}" if module != "demo" else "--steps=1"],
                      subprocess_env())
  assert expected.replace("AFILE", str(a_file)) in one_line_error(result, 2)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, kwargs, expected", [
    ("1,2, 3", {}, [1, 2, 3]),
    (["4", " 5"], {}, [4, 5]),
    ("", {"allow_empty": True}, []),
    ("1,,2,", {}, [1, 2]),
    ("-3,7", {}, [-3, 7]),
])
def test_integers_parses_comma_separated_ids(value, kwargs, expected):
  assert _cli.integers("ids", value, **kwargs) == expected


@pytest.mark.parametrize("value, kwargs, expected", [
    ("1,x", {}, "--ids='1,x' must be comma-separated integers, e.g. --ids=1,2,3."),
    ("1.5", {}, "--ids='1.5' must be comma-separated integers"),
    ("", {}, "--ids is empty; give at least one integer."),
    (["2", "0"], {"minimum": 1}, "--ids=2,0: every value must be >= 1."),
])
def test_integers_names_the_flag_in_its_error(value, kwargs, expected):
  with pytest.raises(app.UsageError) as e:
    _cli.integers("ids", value, **kwargs)
  assert str(e.value).startswith(expected)


@pytest.mark.slow
@pytest.mark.parametrize("module, flags, expected", [
    ("bench_decode", ["--batches=1,x"], "--batches='1,x' must be comma-separated integers"),
    ("bench_decode", ["--memory_lengths=0"], "--memory_lengths=0: every value must be >= 1"),
])
def test_list_flags_of_the_benchmarks_are_checked_in_one_line(module, flags, expected):
  result = run_module([sys.executable, "-m", f"experiments.{module}", *flags], subprocess_env())
  assert expected in one_line_error(result, 2)


# ----------------------------------------------------------------------------------------------
# One rule for output paths, one message in every program.

# (program, its flags before the output flag, the output flag, whether it writes a directory)
_WRITERS = [
    ("score", ["--checkpoint=MISSING.pth", "--tokens=1,2"], "output", False),
    ("score", ["--checkpoint=MISSING.pth", "--text=hi"], "position_loss", False),
    ("generate", ["--checkpoint=MISSING.pth", "--prompt=Hi"], "output", False),
    ("generate", ["--checkpoint=MISSING.pth", "--prompt=Hi"], "save_state", False),
    ("convert", ["--input=INPUT", "--format=pth"], "output", False),
    ("convert", ["--input=INPUT", "--format=hf"], "output", True),
    ("make_binidx", ["--input=INPUT", "--tokenizer=bytes"], "output_prefix", False),
    ("bench_wkv", ["--impls=scan", "--shapes=1x4x2"], "out", True),
    ("bench_train", [], "out", False),
    ("bench_decode", [], "out", True),
    ("bench_memory", [], "out", False),
    ("figure7", [], "out", True),
    ("accuracy", [], "out", False),
    ("char_level", ["--size=tiny"], "out", True),
    ("scaling", ["--size=tiny"], "out", True),
    ("long_context", ["--size=tiny"], "out", True),
]


def _writer_args(tmp_path, flags, name, value):
  text = tmp_path / "input.txt"
  text.write_text("some text\n")
  flags = [f.replace("MISSING", str(tmp_path / "missing")).replace("INPUT", str(text))
           for f in flags]
  return [sys.executable, "-m", f"experiments.{name}", *flags, value]


@pytest.mark.slow
@pytest.mark.parametrize("name, flags, flag, directory", _WRITERS,
                         ids=[f"{w[0]}-{w[2]}-{'dir' if w[3] else 'file'}" for w in _WRITERS])
def test_an_output_under_a_file_is_refused_in_the_same_words_by_every_program(
    tmp_path, name, flags, flag, directory):
  a_file = tmp_path / "afile"
  a_file.write_text("not a directory")
  bad = a_file / "sub" / ("out" if directory else "out.json")
  result = run_module(_writer_args(tmp_path, flags, name, f"--{flag}={bad}"), subprocess_env())
  assert one_line_error(result, 2) == (
      f"error: --{flag}={bad} cannot be written: {a_file} is a file, not a directory; choose "
      f"another --{flag}.")
  assert a_file.read_text() == "not a directory"


@pytest.mark.slow
@pytest.mark.parametrize("name, flags, flag", [
    (name, flags, flag) for name, flags, flag, directory in _WRITERS
    if name in ("score", "generate", "convert", "make_binidx") and not directory])
def test_a_directory_where_a_file_is_written_is_refused_in_the_same_words(tmp_path, name, flags,
                                                                         flag):
  result = run_module(_writer_args(tmp_path, flags, name, f"--{flag}={tmp_path}"),
                      subprocess_env())
  assert one_line_error(result, 2) == (
      f"error: --{flag}={tmp_path} is a directory; name a file inside it.")


@pytest.mark.parametrize("directory", [False, True])
def test_output_path_creates_nothing_and_refuses_what_cannot_be_written(tmp_path, directory):
  missing = tmp_path / "new" / "deeper" / "out"
  assert _cli.output_path("out", str(missing), directory=directory) == missing
  assert _cli.output_path("out", None) is None
  assert not (tmp_path / "new").exists()  # created when the output is written, not before
  with pytest.raises(_cli.UsageError, match=r"^--out is empty; name a "):
    _cli.output_path("out", "", directory=directory)
  (tmp_path / "f").write_text("")
  if directory:
    with pytest.raises(_cli.UsageError, match=r"is a file; name a directory\.$"):
      _cli.output_path("out", str(tmp_path / "f"), directory=True)
  else:
    with pytest.raises(_cli.UsageError, match=r"is a directory; name a file inside it\.$"):
      _cli.output_path("out", f"{tmp_path / 'new'}/")


# ----------------------------------------------------------------------------------------------
# A bug is not a usage error.


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
  return run_module([sys.executable, "-c", textwrap.dedent(code), *args], subprocess_env())


def test_a_value_error_that_main_does_not_raise_as_usage_error_keeps_its_traceback():
  result = _python("""
      from experiments import _cli

      def main(argv):
        raise ValueError("a bug, not the user's mistake")

      _cli.run(main)
  """)
  assert result.returncode == 1
  assert "Traceback" in result.stderr and "ValueError: a bug" in result.stderr
  assert not [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_a_usage_error_raised_by_main_is_one_line_and_status_2():
  result = _python("""
      from experiments import _cli

      def main(argv):
        with _cli.user_input(ValueError, flag="--x=1"):
          raise ValueError("must be 2")

      _cli.run(main)
  """)
  assert one_line_error(result, 2) == "error: --x=1: must be 2"


@pytest.mark.slow
def test_a_bug_inside_training_shows_its_traceback(corpus, tmp_path):
  # The real entry point on a valid command, with the library's training raising a ValueError:
  # every check of the user's input passes, so the error is a bug and must not look like theirs.
  config_file = write_config_file(tmp_path / "config.py", tiny_config(corpus, steps=1))
  result = _python("""
      import runpy
      from rwkv_jax.train import loop

      def broken(*args, **kwargs):
        raise ValueError("a bug inside training")

      loop.train_and_evaluate = broken
      runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)
  """, f"--config={config_file}", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" in result.stderr and "ValueError: a bug inside training" in result.stderr
  assert not [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_the_error_line_is_a_line_of_its_own_and_other_threads_go_quiet_after_it():
  out = io.StringIO()
  stderr = _cli._Stderr(out)  # pylint: disable=protected-access

  def other_thread(text):
    t = threading.Thread(target=stderr.write, args=(text,))
    t.start()
    t.join()

  other_thread("Traceback ...\n    raise RuntimeError('Event loop is closed')")  # no newline yet
  stderr.say("error: could not write X")
  other_thread("\nTraceback (most recent call last): ...\n")  # dropped
  stderr.write("the main thread still writes\n")
  assert out.getvalue().splitlines() == [
      "Traceback ...", "    raise RuntimeError('Event loop is closed')",
      "error: could not write X", "the main thread still writes"]


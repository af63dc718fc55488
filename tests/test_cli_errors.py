"""experiments.train, make_binidx and the runners end a user's mistake in one line, no traceback.

Each case is a real subprocess that stops before any training: status 2 for a mistake in the
flags or the files they name (status 1, a failed run, is pinned in tests/test_workdir_safety.py).
"""

from __future__ import annotations

import sys

import pytest
from absl import app

from experiments import _cli
from training_util import (REPO, corpus, one_line_error, run_module,  # noqa: F401
                           subprocess_env, tiny_config, train_command, write_config_file)


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
    ("output under a file", "--output_prefix=TMP/text.txt/out: cannot create the directory"),
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


@pytest.mark.parametrize("module, flags, expected", [
    ("bench_decode", ["--batches=1,x"], "--batches='1,x' must be comma-separated integers"),
    ("bench_decode", ["--memory_lengths=0"], "--memory_lengths=0: every value must be >= 1"),
])
def test_list_flags_of_the_benchmarks_are_checked_in_one_line(module, flags, expected):
  result = run_module([sys.executable, "-m", f"experiments.{module}", *flags], subprocess_env())
  assert expected in one_line_error(result, 2)

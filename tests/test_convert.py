"""experiments.convert through the native Orbax export: .pth -> Orbax -> .pth is exact."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import training_util
from rwkv_jax.config import RWKVConfig
from rwkv_jax.io import checkpoint, formats, weights
from rwkv_jax.model import RWKV

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(__file__))


def convert(*args):
  return subprocess.run([sys.executable, "-m", "experiments.convert", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_pth_to_orbax_and_back_is_bit_exact(tmp_path):
  model = RWKV(RWKVConfig(n_layer=2, n_embd=16, vocab_size=50), rngs=nnx.Rngs(0))
  leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  keys = jax.random.split(jax.random.key(3), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      treedef, [x + jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
  formats.save_pth(model, tmp_path / "a.pth", dtype="bfloat16")

  result = convert(f"--input={tmp_path / 'a.pth'}", f"--output={tmp_path / 'orbax'}",
                   "--format=orbax")
  assert result.returncode == 0, result.stderr
  loaded, config = checkpoint.load_export(tmp_path / "orbax")
  assert config.param_dtype == "bfloat16"

  result = convert(f"--input={tmp_path / 'orbax'}", f"--output={tmp_path / 'b.pth'}")
  assert result.returncode == 0, result.stderr
  a = torch.load(tmp_path / "a.pth", weights_only=True)
  b = torch.load(tmp_path / "b.pth", weights_only=True)
  assert a.keys() == b.keys()
  for name in a:
    assert a[name].dtype == b[name].dtype == torch.bfloat16, name
    assert torch.equal(a[name], b[name]), name


def test_dtype_flag_applies_to_an_orbax_output(tmp_path):
  model = RWKV(RWKVConfig(n_layer=1, n_embd=16, vocab_size=50), rngs=nnx.Rngs(0))
  formats.save_pth(model, tmp_path / "a.pth")

  result = convert(f"--input={tmp_path / 'a.pth'}", f"--output={tmp_path / 'orbax'}",
                   "--format=orbax", "--dtype=float16")
  assert result.returncode == 0, result.stderr

  loaded, config = checkpoint.load_export(tmp_path / "orbax")
  assert config.param_dtype == "float16"
  assert loaded.head.kernel.get_value().dtype == np.float16
  np.testing.assert_array_equal(np.asarray(loaded.head.kernel.get_value()),
                                np.asarray(model.head.kernel.get_value()).astype(np.float16))


def test_an_existing_output_is_kept_unless_overwrite_is_given(tmp_path):
  model = RWKV(RWKVConfig(n_layer=1, n_embd=16, vocab_size=50), rngs=nnx.Rngs(0))
  formats.save_pth(model, tmp_path / "a.pth")
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "notes.txt").write_text("mine")
  (tmp_path / "b.pth").write_bytes(b"keep me")

  for out in ("hf", "b.pth"):
    result = convert(f"--input={tmp_path / 'a.pth'}", f"--output={tmp_path / out}")
    assert result.returncode != 0 and "--overwrite" in result.stderr, result.stderr
  assert (tmp_path / "b.pth").read_bytes() == b"keep me"
  assert not (tmp_path / "hf" / "config.json").exists()

  result = convert(f"--input={tmp_path / 'a.pth'}", f"--output={tmp_path / 'b.pth'}",
                   "--overwrite")
  assert result.returncode == 0, result.stderr
  assert weights.load(tmp_path / "b.pth")[1].n_layer == 1


def test_a_training_workdir_is_never_an_output(tmp_path):
  model = RWKV(RWKVConfig(n_layer=1, n_embd=16, vocab_size=50), rngs=nnx.Rngs(0))
  formats.save_pth(model, tmp_path / "a.pth")
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  result = convert(f"--input={tmp_path / 'a.pth'}", f"--output={tmp_path / 'run'}",
                   "--format=orbax", "--overwrite")
  assert result.returncode != 0 and "training work directory" in result.stderr, result.stderr
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]


def small_pth(tmp_path):
  model = RWKV(RWKVConfig(n_layer=1, n_embd=32, vocab_size=50), rngs=nnx.Rngs(0))
  formats.save_pth(model, tmp_path / "a.pth")
  return tmp_path / "a.pth"


def test_dtype_int8_writes_an_export_that_loads_as_the_same_int8_model(tmp_path):
  src = small_pth(tmp_path)
  result = convert(f"--input={src}", f"--output={tmp_path / 'int8'}", "--dtype=int8")
  assert result.returncode == 0, result.stderr
  assert "(orbax, int8)" in result.stdout
  exported, config = weights.load(tmp_path / "int8", dtype=None)
  direct, direct_config = weights.load(src, dtype="int8")
  assert config == direct_config and config.quant == "int8"
  for a, b in zip(jax.tree.leaves(nnx.state(exported, nnx.Param)),
                  jax.tree.leaves(nnx.state(direct, nnx.Param))):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def assert_one_line_error(result, status, *needles):
  line = training_util.one_line_error(result, status)
  for needle in needles:
    assert needle in line, (needle, line)


def test_every_mistake_is_one_line_naming_the_flag_and_nothing_is_written(tmp_path):
  src = small_pth(tmp_path)
  (tmp_path / "notes.txt").write_text("not a checkpoint")
  int8 = tmp_path / "int8"
  assert convert(f"--input={src}", f"--output={int8}", "--dtype=int8").returncode == 0
  before = sorted(p.name for p in tmp_path.iterdir())
  cases = [
      (["--output=x.pth"], "--input"),  # a required flag left out
      ([f"--input={tmp_path / 'nope.pth'}", "--output=x.pth"], "--input=", "does not exist"),
      ([f"--input={tmp_path / 'notes.txt'}", f"--output={tmp_path / 'o.pth'}"],
       "--input=", "is not an RWKV-4 checkpoint"),
      ([f"--input={src}", f"--output={tmp_path / 'o'}", "--format=gguf"], "--format"),
      ([f"--input={src}", f"--output={tmp_path / 'o.pth'}", "--dtype=fp8"], "--dtype",
       "float32|bfloat16|float16|int8"),
      ([f"--input={src}", f"--output={tmp_path / 'notes.txt' / 'o.pth'}"],
       "--output=", "is a file, not a directory"),
      ([f"--input={src}", f"--output={tmp_path / 'o.pth'}", "--dtype=int8"],
       "--dtype=int8", "--format=orbax"),
      ([f"--input={src}", f"--output={tmp_path / 'hf'}", "--format=hf", "--dtype=int8"],
       "--dtype=int8"),
      ([f"--input={int8}", f"--output={tmp_path / 'o.pth'}"], "--input=", "int8 export"),
      ([f"--input={src}", f"--output={int8}", "--format=orbax"], "--output=", "--overwrite"),
  ]
  for args, *needles in cases:
    assert_one_line_error(convert(*args), 2, *needles)
  assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_loading_an_int8_export_as_float_names_the_way_out(tmp_path):
  src = small_pth(tmp_path)
  assert convert(f"--input={src}", f"--output={tmp_path / 'int8'}", "--dtype=int8").returncode == 0
  result = convert(f"--input={tmp_path / 'int8'}", f"--output={tmp_path / 'f'}",
                   "--format=orbax", "--dtype=float32")
  assert_one_line_error(result, 2, "--input=", "dtype='int8'")
  assert not (tmp_path / "f").exists()

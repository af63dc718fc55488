"""experiments.convert through the native Orbax export: .pth -> Orbax -> .pth is exact."""

import os
import subprocess
import sys

import jax
import numpy as np
import torch
from flax import nnx

from rwkv_jax import checkpoint, weights
from rwkv_jax.config import RWKVConfig
from rwkv_jax.model import RWKV

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
  weights.save_pth(model, tmp_path / "a.pth", dtype="bfloat16")

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
  weights.save_pth(model, tmp_path / "a.pth")

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
  weights.save_pth(model, tmp_path / "a.pth")
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
  weights.save_pth(model, tmp_path / "a.pth")
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  result = convert(f"--input={tmp_path / 'a.pth'}", f"--output={tmp_path / 'run'}",
                   "--format=orbax", "--overwrite")
  assert result.returncode != 0 and "training work directory" in result.stderr, result.stderr
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]

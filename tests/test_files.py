"""Files written atomically get the permissions of any other new file (the umask), not 0600."""

import os
import stat

import numpy as np
import pytest
from flax import nnx

from rwkv_jax import files
from rwkv_jax.config import RWKVConfig
from rwkv_jax.io import formats
from rwkv_jax.model import RWKV


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
  old = os.umask(request.param)
  yield request.param
  os.umask(old)


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_follow_the_umask(tmp_path, umask):
  with files.atomic_write(tmp_path / "a.json", "w") as f:
    f.write("{}")
  with files.atomic_path(tmp_path / "b.npy") as tmp:
    np.save(open(tmp, "wb"), np.zeros(2))
  for name in ("a.json", "b.npy"):
    assert _mode(tmp_path / name) == 0o666 & ~umask
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.npy"]  # no temporaries


@pytest.mark.slow
def test_converted_checkpoints_are_readable_by_others_under_the_usual_umask(tmp_path, umask):
  model = RWKV(RWKVConfig(n_layer=1, n_embd=8, vocab_size=16), rngs=nnx.Rngs(0))
  formats.save_pth(model, tmp_path / "m.pth")
  formats.save_hf(model, tmp_path / "hf")
  written = [tmp_path / "m.pth", *(p for p in (tmp_path / "hf").iterdir() if p.is_file())]
  assert len(written) >= 3
  for path in written:
    assert _mode(path) == 0o666 & ~umask, path

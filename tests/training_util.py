"""Shared pieces of the tests: a real text file, a tiny config, runs and their results, a tiny
model with every parameter non-zero, damaged checkpoints, and the one-line error of a program.

Every run here is a real `train_loop.train_and_evaluate` (in this process or as `experiments.train`
in a subprocess) over a real byte file, writing real Orbax checkpoints.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

import fake_devices
from rwkv_jax import sharding
from rwkv_jax.config import RWKVConfig
from rwkv_jax.io import checkpoint as ckpt_lib
from rwkv_jax.io import formats
from rwkv_jax.model import RWKV
from rwkv_jax.train import config as train_config
from rwkv_jax.train import loop as train_loop

REPO = pathlib.Path(__file__).resolve().parents[1]
# Steps of the short runs: N before the interruption, TOTAL at the end.
N, TOTAL = 3, 6

_WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at "
          "which but have an they you were her she there been one all we their has would when if "
          "so no what up out who them some more can river city north king music early second "
          "water between known during after people under years large history called").split()


def write_corpus(path: pathlib.Path, num_bytes: int = 200_000) -> pathlib.Path:
  """Writes deterministic English-like text (sentences of common words) of about num_bytes."""
  rng = np.random.default_rng(1234)
  sentences, size = [], 0
  while size < num_bytes:
    words = rng.choice(_WORDS, rng.integers(4, 14))
    sentence = " ".join(words).capitalize() + rng.choice([".", ".", ",", "?"]) + " "
    sentences.append(sentence)
    size += len(sentence)
  path.write_text("".join(sentences)[:num_bytes])
  return path


def tiny_config(data_path: pathlib.Path, **train_overrides) -> ml_collections.ConfigDict:
  """A 2-layer, 32-wide byte-level model on `data_path`; constant LR after a 2-step warmup.

  The decay end is tied to train.steps, so lr_final == lr_init keeps the schedule independent of
  the total step count: a run stopped at N and continued to TOTAL sees the same rates as one run.
  """
  c = train_config.default_config()
  c.model.update(n_layer=2, n_embd=32, vocab_size=256, ctx_len=16, dtype="float32")
  c.data.update(source="file", path=str(data_path), val_fraction=0.05)
  c.optim.update(lr_init=3e-3, lr_final=3e-3, warmup_steps=2)
  c.train.update(steps=TOTAL, batch_size=8, impl="scan", log_every=1, eval_every=0,
                 eval_batches=2, checkpoint_every=N, async_checkpoints=True, export=False,
                 progress_bar=False)
  c.train.update(**train_overrides)
  c.mesh.update(data=8, fsdp=1, tensor=1)
  return c


def write_config_file(path: pathlib.Path, config: ml_collections.ConfigDict) -> pathlib.Path:
  """A config file for `experiments.train --config=PATH` that returns exactly `config`."""
  path.write_text(
      "import json\nimport ml_collections\n\n\ndef get_config():\n"
      f"  return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n")
  return path


def losses(workdir: pathlib.Path) -> dict[int, float]:
  """step -> training loss from metrics.jsonl (the last record of a step wins after a resume)."""
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def latest_params(workdir: pathlib.Path) -> dict[str, np.ndarray]:
  """The parameters of the latest complete checkpoint in workdir (or of an export)."""
  model, _ = ckpt_lib.load_export(workdir)
  return flat_params(model)


def flat_params(model) -> dict[str, np.ndarray]:
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {sharding.path_name(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]}


def random_model(cfg: RWKVConfig, seed: int = 0, scale: float = 0.3, **kwargs) -> RWKV:
  """A model with every parameter non-zero (the official init zeroes several matrices): its
  init from `seed` plus `scale` x standard normal noise; kwargs go to RWKV (e.g. remat)."""
  model = RWKV(cfg, rngs=nnx.Rngs(seed), **kwargs)
  leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                for x, k in zip(leaves, keys)]))
  return model


def write_pth(model: RWKV, tmp_path_factory, name: str = "tiny.pth") -> pathlib.Path:
  """`model` as an official .pth file in a new temporary directory (for module fixtures)."""
  path = tmp_path_factory.mktemp("pth") / name
  formats.save_pth(model, path)
  return path


def _truncate_largest_param_file(step_dir: pathlib.Path) -> None:
  files = sorted((p for p in (step_dir / "params").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
  files[-1].write_bytes(files[-1].read_bytes()[:100])


# Ways to damage an Orbax checkpoint step directory (as a crash or a full disk might), by name.
CHECKPOINT_DAMAGE = {
    "truncated_params": _truncate_largest_param_file,
    "missing_manifest": lambda step_dir: (step_dir / "params" / "manifest.ocdbt").unlink(),
    "missing_meta": lambda step_dir: shutil.rmtree(step_dir / "meta"),
    "missing_data": lambda step_dir: shutil.rmtree(step_dir / "data"),
}


def damage_checkpoint(step_dir: pathlib.Path, how: str) -> None:
  """Damages the checkpoint in `step_dir` in the way named `how` (a key of CHECKPOINT_DAMAGE)."""
  CHECKPOINT_DAMAGE[how](step_dir)


def one_line_error(result: subprocess.CompletedProcess, status: int = 2) -> str:
  """The one `error: ...` line of a program that exited with `status` and no traceback."""
  assert result.returncode == status, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


def subprocess_env(cache_dir: pathlib.Path | None = None, devices: int = 8) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=fake_devices.xla_flags(devices))
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env


def train_command(config_file: pathlib.Path, workdir: pathlib.Path, *flags: str) -> list[str]:
  return [sys.executable, "-m", "experiments.train", f"--config={config_file}",
          f"--workdir={workdir}", *flags]


def run_module(args: list[str], env: dict[str, str], timeout: float = 180
               ) -> subprocess.CompletedProcess:
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
  """A persistent XLA cache for every test process of a run (the directory tests/conftest.py
  makes): the tests compile the same small programs (the tiny models' steps) many times."""
  directory = pathlib.Path(os.environ.get("RWKV_JAX_TEST_PROGRAMS")
                           or tmp_path_factory.mktemp("xla_cache"))
  saved = {name: getattr(jax.config, name) for name in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  compilation_cache.reset_cache()
  yield directory
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> pathlib.Path:
  return write_corpus(tmp_path_factory.mktemp("data") / "corpus.txt")


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, corpus, compile_cache) -> pathlib.Path:
  """TOTAL steps uninterrupted on mesh (8, 1, 1), with an export at the end."""
  workdir = tmp_path_factory.mktemp("full_run")
  train_loop.train_and_evaluate(tiny_config(corpus, export=True), workdir)
  return workdir


@pytest.fixture(scope="session")
def half_run(tmp_path_factory, corpus, compile_cache) -> pathlib.Path:
  """The same run stopped after N steps (steps=N); tests copy it before continuing it."""
  workdir = tmp_path_factory.mktemp("half_run")
  train_loop.train_and_evaluate(tiny_config(corpus, steps=N), workdir)
  return workdir


def copy_run(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  shutil.copytree(src, dst)
  return dst

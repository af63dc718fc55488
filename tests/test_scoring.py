"""Scoring: chunked logits equal one call; the score CLI on .pth and HF checkpoints; its errors."""

import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from rwkv_jax import chunks, scoring, weights
from rwkv_jax.config import RWKVConfig
from rwkv_jax.model import RWKV

CFG = RWKVConfig(n_layer=2, n_embd=32, vocab_size=256)


@pytest.fixture(scope="module")
def model():
  m = RWKV(CFG, rngs=nnx.Rngs(0))
  params = nnx.state(m, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(m, jax.tree.unflatten(
      treedef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
  return m


@pytest.fixture(scope="module")
def pth(model, tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
  weights.save_pth(model, path)
  return path


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.score", *args], capture_output=True,
                        text=True, env=env, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_chunked_logits_equal_one_call(model, chunk):
  tokens = np.random.default_rng(0).integers(0, 256, size=23)
  full, _ = model(tokens[None])
  np.testing.assert_allclose(scoring.logits_for(model, tokens, chunk=chunk), full[0], atol=2e-5)


def test_logits_of_every_length_share_one_compiled_chunk(model):
  chunks._run_chunk.clear_cache()
  rng = np.random.default_rng(1)
  for t in (3, 8, 11, 13):
    tokens = rng.integers(0, 256, size=t)
    full, _ = model(tokens[None])
    np.testing.assert_allclose(scoring.logits_for(model, tokens, chunk=8), full[0], atol=2e-5)
  assert chunks._run_chunk._cache_size() == 1


@pytest.mark.parametrize("t", [12, 13, 15, 5])
def test_padding_of_the_last_chunk_does_not_reach_the_state(model, t):
  tokens_bt = np.random.default_rng(t).integers(0, 256, size=(2, t))
  want_logits, want_state = model(tokens_bt)
  logits, state = chunks.run_chunks(model, tokens_bt, chunk=6)
  np.testing.assert_allclose(logits, want_logits, atol=2e-5)
  for got, want in zip(state, want_state):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_bad_chunk_is_reported():
  with pytest.raises(ValueError, match="chunk=0"):
    chunks.run_chunks(None, np.zeros((1, 3), np.int32), chunk=0)


def test_text_score_is_mean_cross_entropy(model):
  tokens = np.frombuffer(b"hello world, hello rwkv", np.uint8).astype(np.int64)
  score = scoring.score_tokens(model, tokens, num_bytes=len(tokens) - 1, chunk=8)
  logits = np.asarray(model(tokens[None])[0][0], np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                           keepdims=True)) \
      - logits.max(-1, keepdims=True)
  expected = -np.mean([logp[i, tokens[i + 1]] for i in range(len(tokens) - 1)])
  assert math.isclose(score.mean_loss, expected, rel_tol=1e-5)
  assert math.isclose(score.bits_per_byte, expected / math.log(2), rel_tol=1e-5)


def test_cli_writes_logits_for_pth_and_hf(model, pth, tmp_path):
  hf_dir = tmp_path / "hf"
  weights.save_hf(model, hf_dir)
  expected = np.asarray(model(np.array([[1, 2, 3, 200]]))[0][0])
  for ckpt in (pth, hf_dir):
    out = tmp_path / f"logits_{ckpt.name}.npy"
    result = run_cli(f"--checkpoint={ckpt}", "--tokens=1,2,3,200", f"--output={out}")
    assert result.returncode == 0, result.stderr
    logits = np.load(out)
    assert logits.shape == (4, 256) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, atol=2e-5)


def test_cli_dtype_flag_loads_bfloat16_weights(model, pth, tmp_path):
  out = tmp_path / "logits_bf16.npy"
  result = run_cli(f"--checkpoint={pth}", "--tokens=1,2,3,200", f"--output={out}",
                   "--dtype=bfloat16")
  assert result.returncode == 0, result.stderr
  assert "bfloat16" in result.stderr  # the loaded config is logged
  expected = np.asarray(model(np.array([[1, 2, 3, 200]]))[0][0])
  logits = np.load(out)
  assert logits.dtype == np.float32 and not np.array_equal(logits, expected)
  np.testing.assert_allclose(logits, expected, atol=0.5)
  assert list(tmp_path.glob("*.tmp")) == []


def test_cli_scores_text_with_bits_per_byte(pth):
  result = run_cli(f"--checkpoint={pth}", "--text=The quick brown fox jumps over the lazy dog.")
  assert result.returncode == 0, result.stderr
  assert "bits per byte:" in result.stdout and "perplexity:" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--tokens=1,2,999"], r"token ids must be in \[0, 256\)"),
    (["--text=hello", "--tokenizer=/no/such/file.json"], "/no/such/file.json"),
])
def test_cli_errors_are_clear(pth, args, message):
  result = run_cli(f"--checkpoint={pth}", *args)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  assert re.search(message, result.stderr), result.stderr


def test_cli_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
  bogus = tmp_path / "notes.txt"
  bogus.write_text("not a checkpoint")
  result = run_cli(f"--checkpoint={bogus}", "--tokens=1,2")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "notes.txt" in result.stderr


def test_perplexity_of_a_diverged_model_is_infinite_not_an_error():
  from rwkv_jax import scoring as scoring_lib  # pylint: disable=g-import-not-at-top
  score = scoring_lib.TextScore(np.asarray([1e4, 2e4], np.float32), num_bytes=2)
  assert score.perplexity == float("inf")
  assert scoring_lib.TextScore(np.asarray([1.0], np.float32), 1).perplexity == pytest.approx(np.e)

"""Scoring: chunked logits equal one call; the score CLI on .pth and HF checkpoints; its errors."""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from rwkv_jax.config import RWKVConfig
from rwkv_jax.infer import chunks, scoring
from rwkv_jax.io import formats
from rwkv_jax.model import RWKV
from training_util import one_line_error, random_model, write_pth

CFG = RWKVConfig(n_layer=2, n_embd=32, vocab_size=256)


@pytest.fixture(scope="module")
def model():
  return random_model(CFG, seed=0, scale=0.2)


@pytest.fixture(scope="module")
def pth(model, tmp_path_factory):
  return write_pth(model, tmp_path_factory)


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.score", *args], capture_output=True,
                        text=True, env=env, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_chunked_logits_equal_one_call(model, chunk):
  tokens = np.random.default_rng(0).integers(0, 256, size=23)
  full, _ = model(tokens[None])
  np.testing.assert_allclose(scoring.logits_for(model, tokens, chunk=chunk), full[0], atol=2e-5)


@pytest.mark.slow
def test_logits_of_every_length_share_one_compiled_chunk(model):
  chunks._run_chunk.clear_cache()
  rng = np.random.default_rng(1)
  for t in (3, 8, 11, 13):
    tokens = rng.integers(0, 256, size=t)
    full, _ = model(tokens[None])
    np.testing.assert_allclose(scoring.logits_for(model, tokens, chunk=8), full[0], atol=2e-5)
  assert chunks._run_chunk._cache_size() == 1


@pytest.mark.slow
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


@pytest.mark.slow
def test_cli_writes_logits_for_pth_and_hf(model, pth, tmp_path):
  hf_dir = tmp_path / "hf"
  formats.save_hf(model, hf_dir)
  expected = np.asarray(model(np.array([[1, 2, 3, 200]]))[0][0])
  for ckpt in (pth, hf_dir):
    out = tmp_path / f"logits_{ckpt.name}.npy"
    result = run_cli(f"--checkpoint={ckpt}", "--tokens=1,2,3,200", f"--output={out}")
    assert result.returncode == 0, result.stderr
    logits = np.load(out)
    assert logits.shape == (4, 256) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, atol=2e-5)


@pytest.mark.slow
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


@pytest.mark.slow
def test_cli_scores_text_with_bits_per_byte(pth):
  result = run_cli(f"--checkpoint={pth}", "--text=The quick brown fox jumps over the lazy dog.")
  assert result.returncode == 0, result.stderr
  assert "bits per byte:" in result.stdout and "perplexity:" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--tokens=1,2,999"], r"token ids must be in \[0, 256\)"),
    (["--text=hello", "--tokenizer=/no/such/file.json"], "/no/such/file.json"),
])
def test_cli_errors_are_clear(pth, args, message):
  result = run_cli(f"--checkpoint={pth}", *args)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  assert re.search(message, result.stderr), result.stderr


@pytest.mark.slow
def test_cli_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
  bogus = tmp_path / "notes.txt"
  bogus.write_text("not a checkpoint")
  result = run_cli(f"--checkpoint={bogus}", "--tokens=1,2")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "notes.txt" in result.stderr


def test_perplexity_of_a_diverged_model_is_infinite_not_an_error():
  from rwkv_jax.infer import scoring as scoring_lib  # pylint: disable=g-import-not-at-top
  score = scoring_lib.TextScore(np.asarray([1e4, 2e4], np.float32), num_bytes=2)
  assert score.perplexity == float("inf")
  assert scoring_lib.TextScore(np.asarray([1.0], np.float32), 1).perplexity == pytest.approx(np.e)


# ----------------------------------------------------------------------------------------------
# Losses computed on the device, batched documents, loss by position.

def _losses_alone(model, doc):
  """The document in one model call, its cross-entropy in float64 numpy."""
  logits, _ = model(np.asarray(doc[None, :-1]))
  logits = np.asarray(logits[0], np.float64)
  top = logits.max(axis=-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
  return -logp[np.arange(len(doc) - 1), doc[1:]]


@pytest.mark.slow
def test_batched_documents_of_different_lengths_equal_each_alone(model):
  rng = np.random.default_rng(3)
  docs = [rng.integers(0, 256, n) for n in (2, 5, 17, 33, 9)]
  got = scoring.batch_token_losses(model, docs, chunk=8)
  for doc, losses in zip(docs, got):
    assert losses.shape == (len(doc) - 1,)
    np.testing.assert_allclose(losses, _losses_alone(model, doc), rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_loss_by_position_averages_over_the_documents_that_reach_it(model):
  rng = np.random.default_rng(4)
  docs = [rng.integers(0, 256, n) for n in (12, 4, 1, 9)]  # the 1-token one is skipped
  result = scoring.loss_by_position(model, docs, batch_size=2, chunk=8)
  alone = [_losses_alone(model, d) for d in docs if len(d) >= 2]
  assert result.count.tolist() == [3, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1]
  for p in range(len(result.count)):
    expected = np.mean([losses[p] for losses in alone if len(losses) > p])
    assert result.mean_loss[p] == pytest.approx(expected, rel=1e-5)
  capped = scoring.loss_by_position(model, docs, max_position=5, chunk=8)
  assert capped.count.tolist() == [3, 3, 3, 2, 2]
  np.testing.assert_allclose(capped.loss_sum, result.loss_sum[:5], rtol=1e-6)
  assert [row[:2] for row in result.bucketed()] == [(1, 1), (2, 3), (4, 7), (8, 11)]


@pytest.mark.slow
def test_cli_writes_the_loss_by_position_of_separated_documents(model, pth, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  text = tmp_path / "docs.txt"
  docs = [b"first document here", b"second, longer document goes on", b"third"]
  text.write_bytes(b"\n\n".join(docs))
  out = tmp_path / "by_position.json"
  result = run_cli(f"--checkpoint={pth}", f"--text_file={text}", "--document_separator=\\n\\n",
                   f"--position_loss={out}", "--chunk=8")
  assert result.returncode == 0, result.stderr
  record = json.loads(out.read_text())
  expected = scoring.loss_by_position(
      model, [np.frombuffer(d, np.uint8).astype(np.int64) for d in docs], chunk=8)
  assert record["num_documents"] == 3 and record["documents"] == expected.count.tolist()
  np.testing.assert_allclose(record["mean_loss"], expected.mean_loss, rtol=1e-5)


@pytest.mark.slow
def test_cli_scores_a_binidx_dataset_by_position(model, pth, tmp_path):
  import json  # pylint: disable=g-import-not-at-top

  from rwkv_jax.data import binidx  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  docs = [rng.integers(0, 256, n).astype(np.uint16) for n in (20, 7)]
  binidx.write_binidx(tmp_path / "val", docs, dtype=np.uint16)
  out = tmp_path / "pos.json"
  result = run_cli(f"--checkpoint={pth}", f"--binidx={tmp_path / 'val'}",
                   f"--position_loss={out}", "--chunk=8")
  assert result.returncode == 0, result.stderr
  expected = scoring.loss_by_position(model, [d.astype(np.int64) for d in docs], chunk=8)
  np.testing.assert_allclose(json.loads(out.read_text())["mean_loss"], expected.mean_loss,
                             rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Text that is not UTF-8, and other mistakes: one line, status 2, nothing written.

@pytest.fixture(scope="module")
def neox_pth(tmp_path_factory):
  cfg = RWKVConfig(n_layer=1, n_embd=8, vocab_size=50277)
  path = tmp_path_factory.mktemp("neox") / "neox.pth"
  formats.save_pth(RWKV(cfg, rngs=nnx.Rngs(0)), path)
  return path


@pytest.mark.slow
def test_text_that_is_not_utf8_is_refused_unless_replacement_is_asked(neox_pth, tmp_path):
  bad = tmp_path / "latin1.txt"
  bad.write_bytes("café au lait, crème brûlée".encode("latin-1"))
  line = one_line_error(run_cli(f"--checkpoint={neox_pth}", f"--text_file={bad}"))
  assert f"--text_file={bad} is not UTF-8" in line and "offset 3" in line
  assert "--encoding_errors=replace" in line
  result = run_cli(f"--checkpoint={neox_pth}", f"--text_file={bad}", "--encoding_errors=replace")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "4 undecodable byte sequence(s) were replaced" in result.stderr


@pytest.mark.slow
def test_the_byte_tokenizer_scores_raw_bytes_exactly(model, pth, tmp_path):
  raw = "naïve façade".encode("latin-1") + b"\x00\xff\xfe"
  path = tmp_path / "binary.dat"
  path.write_bytes(raw)
  result = run_cli(f"--checkpoint={pth}", f"--text_file={path}", "--chunk=8")
  assert result.returncode == 0, result.stderr[-2000:]
  tokens = np.frombuffer(raw, np.uint8).astype(np.int64)
  expected = float(np.mean(_losses_alone(model, tokens)))
  loss = float(re.search(r"loss: ([0-9.]+) nats/token", result.stdout).group(1))
  assert loss == pytest.approx(expected, abs=1e-4)
  assert f"bytes: {len(raw) - 1}" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("case", ["output under a file", "truncated pth", "damaged export",
                                  "bad dtype", "position loss with tokens", "zero chunk"])
def test_cli_mistakes_are_one_line(model, pth, tmp_path, case):
  ckpt, args = pth, ["--tokens=1,2,3"]
  if case == "output under a file":
    (tmp_path / "afile").write_text("")
    args.append(f"--output={tmp_path / 'afile' / 'logits.npy'}")
    expected = "is a file, not a directory"
  elif case == "truncated pth":
    ckpt = tmp_path / "cut.pth"
    ckpt.write_bytes(pth.read_bytes()[:1000])
    expected = "cut.pth"
  elif case == "damaged export":
    from rwkv_jax.io import checkpoint  # pylint: disable=g-import-not-at-top
    ckpt = checkpoint.export(model, tmp_path / "export")
    for f in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.stat().st_size > 1000):
      f.write_bytes(f.read_bytes()[:100])
    expected = "export"
  elif case == "bad dtype":
    args.append("--dtype=float8")
    expected = "--dtype=float8 is not one of"
  elif case == "position loss with tokens":
    args.append(f"--position_loss={tmp_path / 'p.json'}")
    expected = "--position_loss needs documents"
  else:
    args.append("--chunk=0")
    expected = "--chunk=0 must be >= 1"
  line = one_line_error(run_cli(f"--checkpoint={ckpt}", *args))
  assert expected in line, line
  assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.npy"))

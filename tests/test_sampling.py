"""Sampling and generation: logits match the full forward pass, samplers, penalties, stops, CLI."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import training_util
from rwkv_jax.config import RWKVConfig
from rwkv_jax.data.tokenizer import ByteTokenizer
from rwkv_jax.infer import chunks, sampling
from rwkv_jax.io import formats

CFG = RWKVConfig(n_layer=2, n_embd=32, vocab_size=256)
REPO = pathlib.Path(__file__).resolve().parents[1]


def random_model(cfg=CFG, seed=0):
  return training_util.random_model(cfg, seed)


@pytest.fixture(scope="module")
def model():
  return random_model()


def prompts(b, t, seed=0):
  return np.asarray(jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size))


B, N = 2, 12  # batch and new tokens shared by most tests, so that compilations are reused
_PAD_TO = 32


@jax.jit
def _forward(graphdef, params, tokens_bt, state):
  return nnx.merge(graphdef, params)(tokens_bt, state)


def full_forward(model, tokens_bt, state=None):
  """model(tokens_bt, state), jitted once per batch: the causal model ignores the zero padding."""
  tokens_bt = np.asarray(tokens_bt)
  t = tokens_bt.shape[1]
  assert t <= _PAD_TO
  padded = np.zeros((tokens_bt.shape[0], _PAD_TO), np.int32)
  padded[:, :t] = tokens_bt
  logits, _ = _forward(*nnx.split(model), jnp.asarray(padded), state)
  return np.asarray(logits[:, :t])


def forward_state(model, tokens_bt):
  """The state after tokens_bt (no padding here: the state would see it)."""
  return _forward(*nnx.split(model), jnp.asarray(tokens_bt, jnp.int32), None)[1]


# ----------------------------------------------------------------------------------------------
# Generation against the full forward pass.

def greedy(model, prompt, stop_tokens=(), **kw):
  cfg = sampling.SamplingConfig(temperature=0.0, stop_tokens=stop_tokens)
  return sampling.generate(model, prompt, N, jax.random.key(0), return_logits=True,
                           sampling=cfg, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("temperature, streaming", [(0.0, False), (1.0, True)])
def test_logits_used_while_generating_equal_the_full_forward_pass(model, temperature, streaming):
  prompt = prompts(B, 7)
  result = sampling.generate(model, prompt, N, jax.random.key(3),
                             sampling=sampling.SamplingConfig(temperature=temperature),
                             return_logits=True,
                             callback=(lambda *_: None) if streaming else None)
  assert result.tokens.shape == (B, N) and list(result.lengths) == [N] * B
  full = full_forward(model, np.concatenate([prompt, result.tokens], axis=1))
  # The logits that chose new token i are those at position (prompt length - 1 + i).
  np.testing.assert_allclose(result.logits, full[:, 6:6 + N], atol=2e-5, rtol=0)


def test_greedy_generation_equals_repeated_argmax_of_the_full_forward_pass(model):
  seq = prompts(B, 5, seed=1)
  result = greedy(model, seq)
  for _ in range(N):
    logits = full_forward(model, seq)
    seq = np.concatenate([seq, np.argmax(logits[:, -1], axis=-1)[:, None]], axis=1)
  np.testing.assert_array_equal(result.tokens, seq[:, 5:])


@pytest.mark.slow
def test_final_state_is_the_state_after_prompt_and_every_new_token(model):
  prompt = prompts(B, 6, seed=2)
  result = greedy(model, prompt)
  full_state = forward_state(model, np.concatenate([prompt, result.tokens], axis=1))
  probe = np.asarray([[5, 17], [9, 200]])
  np.testing.assert_allclose(full_forward(model, probe, result.state),
                             full_forward(model, probe, full_state), atol=2e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 4])
def test_prefill_chunk_size_does_not_change_the_results(model, chunk):
  prompt = prompts(B, 10, seed=4)
  ref = greedy(model, prompt, prefill_chunk=1024)
  got = greedy(model, prompt, prefill_chunk=chunk)
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  np.testing.assert_allclose(got.logits, ref.logits, atol=2e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("t", [13, 4, 3])
def test_prefill_of_an_odd_length_prompt_equals_one_call(model, t):
  prompt = prompts(B, t, seed=6)
  logits_bv, state = sampling.prefill(model, prompt, chunk=4)
  want_logits, want_state = _forward(*nnx.split(model), jnp.asarray(prompt, jnp.int32), None)
  np.testing.assert_allclose(logits_bv, want_logits[:, -1], atol=2e-5, rtol=0)
  for got, want in zip(state, want_state):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_prefill_compiles_one_program_per_chunk_length(model):
  chunks._run_chunk.clear_cache()
  for t in (3, 5, 6, 7, 9, 15, 21):
    sampling.prefill(model, prompts(B, t), chunk=8)
  assert chunks._run_chunk._cache_size() == 1
  sampling.prefill(model, prompts(B, 5), chunk=4)
  assert chunks._run_chunk._cache_size() == 2


@pytest.mark.slow
def test_streaming_and_compiled_loop_give_the_same_tokens(model):
  prompt = prompts(B, 4, seed=5)
  seen = []
  kw = dict(sampling=sampling.SamplingConfig(temperature=1.3, top_k=20, alpha_frequency=0.3,
                                            stop_tokens=(7, 11)))
  ref = sampling.generate(model, prompt, N, jax.random.key(9), **kw)
  got = sampling.generate(model, prompt, N, jax.random.key(9), **kw,
                          callback=lambda tok, emitted: seen.append((tok.copy(), emitted.copy())))
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  np.testing.assert_array_equal(got.lengths, ref.lengths)
  streamed = np.stack([np.where(e, t, sampling.PAD_ID) for t, e in seen], axis=1)
  np.testing.assert_array_equal(streamed, ref.tokens[:, :streamed.shape[1]])


def test_the_greedy_program_decodes_as_the_sampler_does_at_temperature_0(model):
  """generate at temperature 0 runs decode_block(sample=False), which has no sampler; it gives
  the tokens, logits and state of the sampling program's greedy rows, penalties, vocab_limit and
  stop tokens included (top_p and top_k leave greedy rows alone)."""
  prompt = prompts(B, 4, seed=8)
  cfg = sampling.SamplingConfig(temperature=0.0, top_p=0.3, top_k=5, alpha_presence=0.4,
                                alpha_frequency=0.2, stop_tokens=(7,), vocab_limit=200)
  logits_bv, state = sampling.prefill(model, prompt)
  v = CFG.vocab_size
  carry = sampling.DecodeCarry(logits_bv, state, jnp.zeros((B, v)), jnp.zeros((B,), bool))
  rows = sampling.RowSampling.of([cfg] * B, v)
  graphdef, params = nnx.split(model)
  run = lambda sample: sampling.decode_block(graphdef, params, carry, jax.random.key(1), rows,
                                             jnp.int32(0), jnp.int32(N), True, sample)
  greedy_carry, greedy_tokens, greedy_logits = run(False)
  carry_s, tokens_s, logits_s = run(True)
  np.testing.assert_array_equal(greedy_tokens, tokens_s)
  np.testing.assert_array_equal(greedy_logits, logits_s)
  jax.tree.map(np.testing.assert_array_equal, greedy_carry, carry_s)
  assert np.all(np.asarray(greedy_tokens) < 200)
  got = sampling.generate(model, prompt, N, jax.random.key(1), sampling=cfg)
  np.testing.assert_array_equal(got.tokens, np.asarray(greedy_tokens)[:, :N])


@pytest.mark.slow
def test_ragged_prompts_generate_as_if_alone(model):
  short, long = prompts(1, 3, seed=6)[0], prompts(1, 8, seed=7)[0]
  batched = greedy(model, [short.tolist(), long.tolist()])
  # The short prompt as if in a batch of equal lengths; the long one against the full forward.
  alone = greedy(model, np.stack([long[-3:], short]))
  np.testing.assert_array_equal(batched.tokens[0], alone.tokens[1])
  np.testing.assert_allclose(batched.logits[0], alone.logits[1], atol=2e-5, rtol=0)
  full = full_forward(model, np.concatenate([long, batched.tokens[1]])[None])
  np.testing.assert_allclose(batched.logits[1], full[0, 7:7 + N], atol=2e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("lengths", [(13, 1, 6, 8), (3, 8, 8, 0)])
def test_batched_prefill_of_ragged_prompts_equals_each_prompt_alone(model, lengths):
  rows = [prompts(1, max(n, 1), seed=20 + i)[0][:n] for i, n in enumerate(lengths)]
  tokens_bt, lengths_b = sampling.pad_rows(rows)
  start = forward_state(model, prompts(len(rows), 3, seed=30))  # continue a non-empty state
  logits_bv, state = sampling.prefill(model, tokens_bt, start, chunk=4, lengths=lengths_b)
  all_logits, _ = chunks.run_chunks(model, tokens_bt, start, chunk=4, lengths=lengths_b)
  for i, row in enumerate(rows):
    alone = jax.tree.map(lambda x, i=i: x[:, i:i + 1], start)
    if len(row) == 0:  # nothing to run: the state is kept
      want_state, want_logits, want_all = alone, np.zeros_like(logits_bv[i]), None
    else:
      want_all, want_state = _forward(*nnx.split(model), jnp.asarray(row[None], jnp.int32), alone)
      want_logits = want_all[0, -1]
    np.testing.assert_allclose(logits_bv[i], want_logits, atol=2e-5, rtol=0)
    if want_all is not None:
      np.testing.assert_allclose(all_logits[i, :len(row)], want_all[0], atol=2e-5, rtol=0)
    for got, want in zip(state, want_state):
      np.testing.assert_allclose(got[:, i], want[:, 0], atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_stop_token_ends_only_its_sequence_and_freezes_its_state(model):
  prompt = prompts(B, 5, seed=8)
  free = greedy(model, prompt)
  stop = int(free.tokens[0, 3])
  first = [int(np.argmax(row == stop)) if stop in row else None for row in free.tokens]
  got = greedy(model, prompt, stop_tokens=[stop])
  for i, f in enumerate(first):
    n = N if f is None else f + 1
    assert got.lengths[i] == n
    np.testing.assert_array_equal(got.tokens[i, :n], free.tokens[i, :n])
    assert np.all(got.tokens[i, n:] == sampling.PAD_ID)
    assert got.sequences()[i] == free.tokens[i, :n].tolist()
  # Row 0's state is the one right after its stop token.
  expected = forward_state(model, np.concatenate([prompt[:1], free.tokens[:1, :first[0] + 1]],
                                                 axis=1))
  for got_field, expected_field in zip(got.state, expected):
    np.testing.assert_allclose(got_field[:, 0], expected_field[:, 0], atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_zero_new_tokens_returns_the_state_after_the_prompt(model):
  prompt = prompts(B, 6, seed=10)
  result = sampling.generate(model, prompt, 0, jax.random.key(0))
  assert result.tokens.shape == (B, 0) and result.sequences() == [[], []]
  probe = np.asarray([[3], [4]])
  np.testing.assert_allclose(full_forward(model, probe, result.state),
                             full_forward(model, probe, forward_state(model, prompt)),
                             atol=2e-5, rtol=0)


@pytest.mark.slow
def test_presence_penalty_prevents_repeats(model):
  prompt = prompts(B, 4, seed=9)
  free = sampling.generate(model, prompt, 40, jax.random.key(0),
                           sampling=sampling.SamplingConfig(temperature=0.0))
  assert any(len(set(row.tolist())) < 40 for row in free.tokens)  # greedy does repeat
  penalized = sampling.generate(
      model, prompt, 40, jax.random.key(0),
      sampling=sampling.SamplingConfig(temperature=0.0, alpha_presence=1e4))
  for row in penalized.tokens:
    assert len(set(row.tolist())) == 40


def test_vocab_limit_keeps_samples_below_it(model):
  result = sampling.generate(model, prompts(B, 3), 30, jax.random.key(0),
                             sampling=sampling.SamplingConfig(temperature=2.0, vocab_limit=10))
  assert result.tokens.max() < 10


def test_bad_arguments_are_reported(model):
  with pytest.raises(ValueError, match="empty"):
    sampling.generate(model, [], 5, jax.random.key(0))
  with pytest.raises(ValueError, match="top_p"):
    sampling.generate(model, [1, 2], 5, jax.random.key(0),
                      sampling=sampling.SamplingConfig(top_p=0.0))
  with pytest.raises(ValueError, match="temperature"):
    sampling.generate(model, [1, 2], 5, jax.random.key(0),
                      sampling=sampling.SamplingConfig(temperature=-1.0))
  with pytest.raises(TypeError, match="SamplingConfig"):
    sampling.generate(model, [1, 2], 5, jax.random.key(0), sampling={"temperature": 0.0})
  with pytest.raises(ValueError, match="outside the vocabulary"):
    sampling.generate(model, [1, 300], 5, jax.random.key(0))


# ----------------------------------------------------------------------------------------------
# Sampling from fixed logits.

def random_logits(b=16, v=50, seed=0):
  return 3.0 * jax.random.normal(jax.random.key(seed), (b, v))


@pytest.mark.slow
def test_tiny_top_p_and_top_k_1_are_greedy():
  logits = random_logits()
  greedy = np.argmax(logits, axis=-1)
  for seed in range(5):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(sampling.sample_logits(logits, key, top_p=1e-6), greedy)
    np.testing.assert_array_equal(sampling.sample_logits(logits, key, top_k=1), greedy)
    np.testing.assert_array_equal(sampling.sample_logits(logits, key, temperature=0.0), greedy)


def test_rows_sample_by_their_own_settings_and_greedy_rows_take_the_argmax():
  """One program, settings per row: a greedy row takes its argmax whatever its top_p and top_k,
  and a sampled row draws what it draws in a batch where every row has its settings."""
  logits = random_logits()
  b = logits.shape[0]
  keys = jax.random.split(jax.random.key(3), b)
  temperature = np.where(np.arange(b) % 2 == 0, 0.0, 0.9).astype(np.float32)
  top_p = np.linspace(0.2, 1.0, b).astype(np.float32)
  top_k = (np.arange(b) % 3 * 4).astype(np.int32)
  mixed = np.asarray(sampling._sample_rows(logits, keys, temperature, top_p, top_k))
  greedy_rows = temperature == 0
  np.testing.assert_array_equal(mixed[greedy_rows], np.argmax(logits, -1)[greedy_rows])
  for i in np.flatnonzero(~greedy_rows):
    alone = sampling._sample_rows(logits, keys, np.full(b, temperature[i]), np.full(b, top_p[i]),
                                  np.full(b, top_k[i]))
    assert mixed[i] == alone[i]


def test_sampling_with_a_fixed_key_is_deterministic():
  logits = random_logits()
  a = sampling.sample_logits(logits, jax.random.key(4), temperature=0.8, top_p=0.9)
  b = sampling.sample_logits(logits, jax.random.key(4), temperature=0.8, top_p=0.9)
  c = sampling.sample_logits(logits, jax.random.key(5), temperature=0.8, top_p=0.9)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def chi_square(samples, probs):
  counts = np.bincount(np.asarray(samples), minlength=len(probs))
  expected = len(samples) * np.asarray(probs)
  return float(np.sum((counts - expected) ** 2 / expected))


def test_temperature_samples_follow_softmax_of_logits_over_t():
  logits = jnp.asarray([1.0, 0.5, 0.0, -0.5, -1.5])
  t, n = 0.7, 20000
  samples = sampling.sample_logits(jnp.broadcast_to(logits, (n, 5)), jax.random.key(0),
                                   temperature=t)
  # 4 degrees of freedom: P(chi2 > 30) < 1e-5 under the right distribution.
  assert chi_square(samples, jax.nn.softmax(logits / t)) < 30
  # The same statistic rejects the untempered distribution.
  assert chi_square(samples, jax.nn.softmax(logits)) > 300


def test_top_p_samples_only_the_nucleus_then_applies_temperature():
  probs = np.asarray([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.asarray(probs))
  n = 20000
  # Mass 0.5 < 0.7 <= 0.8: the nucleus is the two most probable tokens.
  kept = sampling.filter_logits(logits[None], top_p=0.7)[0]
  np.testing.assert_array_equal(np.isfinite(kept), [True, True, False, False])
  samples = sampling.sample_logits(jnp.broadcast_to(logits, (n, 4)), jax.random.key(1),
                                   temperature=2.0, top_p=0.7)
  assert set(np.unique(samples).tolist()) == {0, 1}
  tempered = probs[:2] ** 0.5 / np.sum(probs[:2] ** 0.5)
  assert chi_square(samples, np.concatenate([tempered, [1e-9, 1e-9]])) < 30


def test_top_k_keeps_the_k_most_probable():
  logits = random_logits(b=4, v=30, seed=3)
  kept = sampling.filter_logits(logits, top_k=5)
  top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
  for row, idx in zip(np.asarray(kept), top5):
    assert set(np.flatnonzero(np.isfinite(row)).tolist()) == set(idx.tolist())


def test_penalties_subtract_presence_and_frequency():
  logits = jnp.zeros((1, 4))
  counts = jnp.asarray([[0.0, 1.0, 3.0, 0.5]])
  out = sampling.apply_penalties(logits, counts, alpha_presence=0.5, alpha_frequency=0.2)
  np.testing.assert_allclose(out, [[0.0, -0.7, -1.1, -0.6]], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# The command line.

def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.generate", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_generate_cli_prints_the_greedy_continuation(model, tmp_path):
  path = tmp_path / "tiny.pth"
  formats.save_pth(model, path)
  proc = run_cli(f"--checkpoint={path}", "--prompt=Hello", "--tokenizer=bytes",
                 "--max_tokens=25", "--temperature=0")
  assert proc.returncode == 0, proc.stderr
  tok = ByteTokenizer()
  expected = sampling.generate(model, tok.encode("Hello"), 25, jax.random.key(0),
                               sampling=sampling.SamplingConfig(temperature=0.0))
  assert proc.stdout == tok.decode(expected.tokens[0]) + "\n"


@pytest.mark.slow
def test_generate_cli_reports_bad_inputs(tmp_path):
  small = random_model(CFG.replace(vocab_size=100))
  path = tmp_path / "small.pth"
  formats.save_pth(small, path)
  proc = run_cli(f"--checkpoint={tmp_path / 'missing.pth'}", "--prompt=Hi", "--tokenizer=bytes")
  assert proc.returncode != 0 and "missing.pth does not exist" in proc.stderr
  proc = run_cli(f"--checkpoint={path}", "--prompt=", "--tokenizer=bytes")
  assert proc.returncode != 0 and "--prompt is empty" in proc.stderr
  proc = run_cli(f"--checkpoint={path}", "--prompt=Hi", "--tokenizer=bytes")
  assert proc.returncode != 0 and "has 256 tokens but the model only 100" in proc.stderr

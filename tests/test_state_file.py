"""The prompt cache: a saved state continues exactly as the whole text in one go; bad files refused."""

import json
import zipfile

import jax
import numpy as np
import pytest
from test_sampling import CFG, random_model

from rwkv_jax.infer import sampling
from rwkv_jax.io import state_file

N = 8  # new tokens, shared so that the decode loop compiles once


@pytest.fixture(scope="module")
def model():
  return random_model(seed=3)


def ids(t, seed):
  return np.random.default_rng(seed).integers(0, CFG.vocab_size, size=t).tolist()


def saved_after(model, prompt, tmp_path, new_tokens=0, key=0):
  result = sampling.generate(model, [prompt], new_tokens, jax.random.key(key),
                             sampling=sampling.SamplingConfig(temperature=0.0))
  path = state_file.save(tmp_path / "prompt.state", state_file.SavedState.of(
      CFG, result.state, result.next_logits, len(prompt) + int(result.lengths[0])))
  return result, state_file.load(path, config=CFG)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_loaded_prompt_state_continues_as_the_whole_prompt_in_one_go(model, tmp_path,
                                                                     temperature):
  first, second = ids(11, 1), ids(6, 2)
  _, saved = saved_after(model, first, tmp_path)
  assert saved.tokens_consumed == (11,)
  cfg = sampling.SamplingConfig(temperature=temperature, top_p=0.9)
  whole = sampling.generate(model, [first + second], N, jax.random.key(5), sampling=cfg)
  cont = sampling.generate(model, [second], N, jax.random.key(5), sampling=cfg,
                           state=saved.state, next_logits=saved.next_logits)
  np.testing.assert_array_equal(cont.tokens, whole.tokens)


def test_loaded_state_without_a_prompt_continues_the_generation(model, tmp_path):
  prompt = ids(5, 3)
  first, saved = saved_after(model, prompt, tmp_path, new_tokens=N)
  assert saved.tokens_consumed == (5 + N,)
  more = sampling.generate(model, [[]], N, jax.random.key(0),
                           sampling=sampling.SamplingConfig(temperature=0.0),
                           state=saved.state, next_logits=saved.next_logits)
  whole = sampling.generate(model, [prompt + first.tokens[0].tolist()], N, jax.random.key(0),
                            sampling=sampling.SamplingConfig(temperature=0.0))
  np.testing.assert_array_equal(more.tokens, whole.tokens)


def test_forked_state_equals_prefilling_every_row(model, tmp_path):
  prompt = ids(7, 4)
  _, saved = saved_after(model, prompt, tmp_path)
  forked = state_file.fork(saved.state, 3)
  _, want = sampling.prefill(model, np.asarray([prompt] * 3))
  for got_field, want_field in zip(forked, want):
    assert got_field.shape == want_field.shape
    np.testing.assert_allclose(got_field, want_field, atol=2e-5, rtol=1e-5)
  picked = state_file.select(forked, [2])
  np.testing.assert_array_equal(picked.num, saved.state.num)


def test_file_is_a_documented_npz(model, tmp_path):
  _, saved = saved_after(model, ids(4, 5), tmp_path)
  path = tmp_path / "prompt.state"
  with np.load(path) as npz:
    np.testing.assert_array_equal(npz["max_exp"], saved.state.max_exp)
    assert npz["next_logits"].shape == (1, CFG.vocab_size)
  with zipfile.ZipFile(path) as z:
    header = json.loads(z.read("header.json"))
  assert header == {"format": "rwkv_jax.state", "version": 1, "batch": 1, "n_layer": 2,
                    "n_embd": 32, "dim_att": 32, "vocab_size": 256, "tokens_consumed": [4],
                    "param_dtype": "float32"}


def test_damaged_truncated_or_foreign_files_are_refused_naming_the_file(model, tmp_path):
  _, saved = saved_after(model, ids(4, 6), tmp_path)
  good = (tmp_path / "prompt.state").read_bytes()
  cases = {"truncated": good[:len(good) // 2], "cut at the end": good[:-10],
           "empty": b"", "not a zip": b"hello world" * 10}
  flipped = bytearray(good)
  flipped[len(good) // 2] ^= 0xFF  # inside an array: the member's CRC-32 fails
  cases["one byte changed"] = bytes(flipped)
  for name, data in cases.items():
    path = tmp_path / f"{name.replace(' ', '_')}.state"
    path.write_bytes(data)
    with pytest.raises(state_file.StateFileError, match=str(path)):
      state_file.load(path)
  with pytest.raises(state_file.StateFileError, match="does not exist"):
    state_file.load(tmp_path / "missing.state")
  for other in (CFG.replace(n_layer=3), CFG.replace(n_embd=48), CFG.replace(vocab_size=300)):
    with pytest.raises(state_file.StateFileError, match="this model has"):
      state_file.load(tmp_path / "prompt.state", config=other)


def test_a_failed_save_leaves_the_old_file(model, tmp_path):
  _, saved = saved_after(model, ids(4, 7), tmp_path)
  path = tmp_path / "prompt.state"
  before = path.read_bytes()
  wrong = state_file.SavedState(saved.state, np.zeros((1, 7), np.float32), (4,), CFG.n_layer,
                                CFG.n_embd, CFG.dim_att, CFG.vocab_size)
  with pytest.raises(ValueError, match="next_logits"):
    state_file.save(path, wrong)
  assert path.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["prompt.state"]

"""rwkv_jax against the reference implementations on the same random official weights.

The weights are written here with plain torch code under the official names and shapes (not with
rwkv_jax's init or exporter), so a mistake in the mapping table cannot cancel itself out.
References: the rwkv PyPI package (ChatRWKV's inference code) and HF transformers'
RwkvForCausalLM with rescale_every=0. Run with `pytest -s` to see the measured errors.
"""

import os

os.environ.setdefault("RWKV_JIT_ON", "0")  # read by rwkv.model at import time
os.environ.setdefault("RWKV_CUDA_ON", "0")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from rwkv.model import RWKV as RefRWKV  # pylint: disable=g-import-not-at-top
import transformers
from flax import nnx

from rwkv_jax import model as model_lib
from rwkv_jax import weights

# Both references assume dim_att == n_embd (their WKV state is sized by n_embd), so A = C here;
# test_weights covers dim_att != n_embd.
L, C, A, F, V = 3, 64, 64, 160, 211
T = 29
TOL = 1e-4


def official_state_dict(seed: int) -> dict[str, torch.Tensor]:
  """Random RWKV-4 weights with the official names and shapes, all tensors non-zero."""
  g = torch.Generator().manual_seed(seed)
  randn = lambda *s, std=1.0: torch.randn(*s, generator=g) * std
  uniform = lambda *s, lo, hi: torch.rand(*s, generator=g) * (hi - lo) + lo
  sd = {"emb.weight": randn(V, C, std=0.5),
        "blocks.0.ln0.weight": uniform(C, lo=0.5, hi=1.5), "blocks.0.ln0.bias": randn(C, std=0.1)}
  for i in range(L):
    p = f"blocks.{i}."
    sd.update({
        p + "ln1.weight": uniform(C, lo=0.5, hi=1.5), p + "ln1.bias": randn(C, std=0.1),
        p + "ln2.weight": uniform(C, lo=0.5, hi=1.5), p + "ln2.bias": randn(C, std=0.1),
        p + "att.time_decay": uniform(A, lo=-6, hi=2),
        p + "att.time_first": uniform(A, lo=-1, hi=1.5),
        p + "att.time_mix_k": uniform(1, 1, C, lo=0, hi=1),
        p + "att.time_mix_v": uniform(1, 1, C, lo=0, hi=1),
        p + "att.time_mix_r": uniform(1, 1, C, lo=0, hi=1),
        p + "att.key.weight": randn(A, C, std=C ** -0.5),
        p + "att.value.weight": randn(A, C, std=C ** -0.5),
        p + "att.receptance.weight": randn(A, C, std=C ** -0.5),
        p + "att.output.weight": randn(C, A, std=A ** -0.5),
        p + "ffn.time_mix_k": uniform(1, 1, C, lo=0, hi=1),
        p + "ffn.time_mix_r": uniform(1, 1, C, lo=0, hi=1),
        p + "ffn.key.weight": randn(F, C, std=C ** -0.5),
        p + "ffn.receptance.weight": randn(C, C, std=C ** -0.5),
        p + "ffn.value.weight": randn(C, F, std=F ** -0.5),
    })
  sd.update({"ln_out.weight": uniform(C, lo=0.5, hi=1.5), "ln_out.bias": randn(C, std=0.1),
             "head.weight": randn(V, C, std=C ** -0.5)})
  return sd


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("parity") / "rwkv4_random.pth"
  sd = official_state_dict(seed=0)
  torch.save(sd, path)
  return path, sd


class Jitted:
  """The loaded model's __call__ and step under jax.jit (eager dispatch is slow per token)."""

  def __init__(self, model):
    self.config = model.config
    graphdef, params = nnx.split(model)
    self._params = params
    self._call = jax.jit(lambda p, t, s: nnx.merge(graphdef, p)(t, s))
    self._step = jax.jit(lambda p, t, s: nnx.merge(graphdef, p).step(t, s))

  def _state(self, state, batch):
    return model_lib.empty_state(self.config, batch) if state is None else state

  def __call__(self, tokens_bt, state=None):
    return self._call(self._params, tokens_bt, self._state(state, tokens_bt.shape[0]))

  def step(self, token_b, state=None):
    return self._step(self._params, token_b, self._state(state, token_b.shape[0]))


@pytest.fixture(scope="module")
def loaded(checkpoint):
  model, config = weights.load_pth(checkpoint[0])
  assert (config.n_layer, config.n_embd, config.dim_att, config.dim_ffn, config.vocab_size) == (
      L, C, A, F, V)
  return model


@pytest.fixture(scope="module")
def ours(loaded):
  return Jitted(loaded)


@pytest.fixture(scope="module")
def ref(checkpoint):
  return RefRWKV(model=str(checkpoint[0]), strategy="cpu fp32")


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(1).integers(0, V, size=T).tolist()


def max_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def ref_clone(state):
  return [s.clone() for s in state]


def check_state_invariants(ours_state, ref_state, label):
  """Compares an RWKVState with the rwkv package's 5-per-layer list.

  att_x_prev and ffn_x_prev are plain vectors: compared directly. (num, den, max_exp) are a
  scaled representation (true sums = num * e^max_exp); rwkv_jax's parallel scan and the package's
  sequential loop may round max_exp differently, so we compare the invariants: both sums
  rescaled to a common exponent m, relative to their size, and the ratio num / den that the next
  token's output reads.
  """
  theirs = weights.state_from_rwkv_package(ref_state)
  errs = {}
  for name in ("att_x_prev", "ffn_x_prev"):
    errs[name] = max_err(getattr(ours_state, name), getattr(theirs, name))
  m = np.maximum(np.asarray(ours_state.max_exp, np.float64), np.asarray(theirs.max_exp, np.float64))
  for name in ("num", "den"):
    a = np.asarray(getattr(ours_state, name), np.float64) * np.exp(ours_state.max_exp - m)
    b = np.asarray(getattr(theirs, name), np.float64) * np.exp(theirs.max_exp - m)
    errs[name] = float(np.max(np.abs(a - b) / (np.abs(b) + 1e-6)))
  errs["num/den"] = max_err(ours_state.num / ours_state.den, theirs.num / theirs.den)
  errs["max_exp"] = max_err(ours_state.max_exp, theirs.max_exp)
  print(f"\n[{label}] state errors: " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items()))
  for k, v in errs.items():
    assert v < TOL, f"{label}: state field {k} differs by {v}"


def test_sequence_mode_matches_rwkv_package(ours, ref, tokens):
  expected, ref_state = ref.forward(tokens, None, full_output=True)
  logits, state = ours(jnp.asarray([tokens]))
  err = max_err(logits[0], expected)
  print(f"\n[sequence] max |logits - rwkv package| = {err:.2e}")
  assert logits.shape == (1, T, V)
  assert err < TOL
  check_state_invariants(state, ref_state, "sequence")


def test_rnn_mode_matches_rwkv_package(ours, ref, tokens):
  ref_state, expected = None, []
  state = None
  got = []
  for tok in tokens:
    out, ref_state = ref.forward([tok], ref_state)
    expected.append(out.numpy())
    logits, state = ours.step(jnp.asarray([tok]), state)
    got.append(np.asarray(logits[0]))
  err = max_err(np.stack(got), np.stack(expected))
  print(f"\n[rnn] max |logits - rwkv package| = {err:.2e}")
  assert err < TOL
  # Both are the same sequential recurrence, so here the scaled state agrees directly too.
  theirs = weights.state_from_rwkv_package(ref_state)
  for name in state._fields:
    assert max_err(getattr(state, name), getattr(theirs, name)) < TOL, name
  check_state_invariants(state, ref_state, "rnn")


def test_chunked_mode_matches_rwkv_package(ours, ref, tokens):
  cuts = [0, 14, 15, T]  # a single-token chunk in the middle; few shapes, few compilations
  ref_state, state, expected, got = None, None, [], []
  for lo, hi in zip(cuts[:-1], cuts[1:]):
    out, ref_state = ref.forward(tokens[lo:hi], ref_state, full_output=True)
    expected.append(out.numpy().reshape(hi - lo, V))
    logits, state = ours(jnp.asarray([tokens[lo:hi]]), state)
    got.append(np.asarray(logits[0]))
  err = max_err(np.concatenate(got), np.concatenate(expected))
  print(f"\n[chunked] max |logits - rwkv package| = {err:.2e}")
  assert err < TOL
  check_state_invariants(state, ref_state, "chunked")


def test_state_from_rwkv_package_continues_generation_identically(ours, ref, tokens):
  prompt, rest = tokens[:14], tokens[14:28]
  _, ref_state = ref.forward(prompt, None)
  state = weights.state_from_rwkv_package(ref_clone(ref_state))
  expected, _ = ref.forward(rest, ref_clone(ref_state), full_output=True)
  logits, _ = ours(jnp.asarray([rest]), state)
  err = max_err(logits[0], expected)
  print(f"\n[state from package] max |logits - rwkv package| = {err:.2e}")
  assert err < TOL
  # And the other way: our prefill state drives the package.
  _, our_state = ours(jnp.asarray([prompt]))
  out, _ = ref.forward(rest, weights.state_to_rwkv_package(our_state), full_output=True)
  err = max_err(out, expected)
  print(f"[state to package] max |logits - rwkv package| = {err:.2e}")
  assert err < TOL


def test_state_round_trip_through_package_layout_is_exact(ours, tokens):
  _, state = ours(jnp.asarray([tokens]))
  back = weights.state_from_rwkv_package(weights.state_to_rwkv_package(state))
  for a, b in zip(state, back):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------
# HF transformers.

def to_hf_name(name: str) -> str:
  """Official -> HF name by the renaming rules in FACTS.md, written independently of weights.py."""
  if name == "head.weight":
    return name
  for old, new in ((".att.", ".attention."), (".ffn.", ".feed_forward."),
                   ("blocks.0.ln0.", "blocks.0.pre_ln.")):
    name = name.replace(old, new)
  if name.startswith("emb."):
    name = "embeddings." + name[len("emb."):]
  for short, long in (("_k", "_key"), ("_v", "_value"), ("_r", "_receptance")):
    if name.endswith("time_mix" + short):
      name = name[:-len(short)] + long
  return "rwkv." + name


@pytest.fixture(scope="module")
def hf_model(checkpoint):
  cfg = transformers.RwkvConfig(
      vocab_size=V, hidden_size=C, num_hidden_layers=L, attention_hidden_size=A,
      intermediate_size=F, context_length=64, rescale_every=0)
  model = transformers.RwkvForCausalLM(cfg).eval()
  hf_sd = {to_hf_name(k): v for k, v in checkpoint[1].items()}
  model.load_state_dict(hf_sd, strict=True)  # raises on any name or shape mismatch
  return model


def test_hf_directory_loads_and_matches_transformers_logits(hf_model, loaded, ours, tokens,
                                                            tmp_path):
  hf_model.save_pretrained(tmp_path / "hf")
  model, config = weights.load_hf(tmp_path / "hf")
  assert config.ctx_len == 64
  # The HF directory gives bit for bit the parameters of the .pth file ...
  from_hf = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(loaded, nnx.Param)):
    np.testing.assert_array_equal(np.asarray(from_hf[path].get_value()),
                                  np.asarray(var.get_value()), err_msg=str(path))
  # ... and those give transformers' logits.
  with torch.no_grad():
    expected = hf_model(torch.tensor([tokens])).logits[0].numpy()
  logits, _ = ours(jnp.asarray([tokens]))
  err = max_err(logits[0], expected)
  print(f"\n[hf sequence] max |logits - transformers| = {err:.2e}")
  assert err < TOL


def test_hf_chunked_with_state_matches_transformers(hf_model, ours, tokens):
  cuts = [0, 14, 15, T]
  hf_state, state, expected, got = None, None, [], []
  with torch.no_grad():
    for lo, hi in zip(cuts[:-1], cuts[1:]):
      out = hf_model(torch.tensor([tokens[lo:hi]]), state=hf_state, use_cache=True)
      hf_state = out.state
      expected.append(out.logits[0].numpy())
      logits, state = ours(jnp.asarray([tokens[lo:hi]]), state)
      got.append(np.asarray(logits[0]))
  err = max_err(np.concatenate(got), np.concatenate(expected))
  print(f"\n[hf chunked] max |logits - transformers| = {err:.2e}")
  assert err < TOL
  theirs = weights.state_from_hf(hf_state)
  for name in ("att_x_prev", "ffn_x_prev"):
    assert max_err(getattr(state, name), getattr(theirs, name)) < TOL, name
  assert max_err(state.num / state.den, theirs.num / theirs.den) < TOL
  # Our state converted to HF's layout continues HF's generation.
  nxt = [tokens[0]]
  with torch.no_grad():
    want = hf_model(torch.tensor([nxt]), state=[s.clone() for s in hf_state]).logits
    have = hf_model(torch.tensor([nxt]), state=weights.state_to_hf(state)).logits
  assert max_err(have, want) < TOL


def test_export_to_hf_loads_in_transformers_with_same_logits(loaded, ours, tokens, tmp_path):
  weights.save_hf(loaded, tmp_path / "exported")
  hf = transformers.RwkvForCausalLM.from_pretrained(tmp_path / "exported").eval()
  assert hf.config.rescale_every == 0
  with torch.no_grad():
    expected = hf(torch.tensor([tokens])).logits[0].numpy()
  logits, _ = ours(jnp.asarray([tokens]))
  err = max_err(logits[0], expected)
  print(f"\n[export hf] max |logits - transformers| = {err:.2e}")
  assert err < TOL

"""Measured agreement of rwkv_jax with the reference implementations and with float64.

`tests/test_parity.py` asserts on these numbers and `experiments/accuracy.py` records them; neither
parses the other's output.

Parity: random RWKV-4 weights are written with plain torch code under the official names and
shapes (not with rwkv_jax's init or exporter), so a mistake in the mapping table cannot cancel
itself out. References: the rwkv PyPI package (ChatRWKV's inference code) and HF transformers'
RwkvForCausalLM with rescale_every=0. torch, rwkv and transformers are test dependencies, imported
where they are used.

WKV accuracy: the float32 implementations against eq. 16 evaluated in float64
(`rwkv_jax.reference`) on a long sequence with extreme decays and keys.

Precisions: bfloat16, float16 and int8 logits against float32 on a deep model whose float32
residual stream goes beyond float16's range, beside the rwkv package's own int8 (`cpu fp32i8`)
on the same weights (`precision_vs_float32`; tests/test_precision.py asserts on them).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax import model as model_lib
from rwkv_jax import reference
from rwkv_jax import wkv as wkv_lib
from rwkv_jax.io import formats, state_convert, weights

# Both references assume dim_att == n_embd (their WKV state is sized by n_embd), so A = C here;
# test_weights covers dim_att != n_embd.
L, C, A, F, V = 3, 64, 64, 160, 211
T = 29
CUTS = (0, 14, 15, T)  # a single-token chunk in the middle; few shapes, few compilations


def max_err(a, b) -> float:
  """max |a - b| in float64, for arrays of one shape (no broadcasting hides a wrong shape)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"Compared arrays differ in shape: {a.shape} and {b.shape}.")
  return float(np.max(np.abs(a - b)))


# ----------------------------------------------------------------------------------------------
# WKV against float64.


def wkv_vs_float64(t: int = 4096, b: int = 2, c: int = 8, seed: int = 0) -> dict[str, float]:
  """max |y - y_float64| of the sequential and associative scans from an empty state.

  time_decay in [-9, 4] and k in [-60, 60]: the range where float32 rounding of the running
  maximum exponent shows.
  """
  rng = np.random.default_rng(seed)
  w = np.exp(rng.uniform(-9, 4, size=c)).astype(np.float32)
  u = rng.normal(size=c).astype(np.float32)
  k = rng.uniform(-60, 60, size=(b, t, c)).astype(np.float32)
  v = rng.normal(size=(b, t, c)).astype(np.float32)
  y_ref, _ = reference.wkv_float64(w, u, k, v)
  out = {}
  for name in ("scan", "associative"):
    y, _ = jax.jit(lambda *a, n=name: wkv_lib.wkv(*a, impl=n))(w, u, k, v)
    out[name] = max_err(y, y_ref)
  return out


# ----------------------------------------------------------------------------------------------
# The models under comparison.


def official_state_dict(seed: int) -> dict[str, Any]:
  """Random RWKV-4 weights (torch tensors) with the official names and shapes, none zero."""
  import torch  # pylint: disable=g-import-not-at-top

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


def write_checkpoint(directory: str | os.PathLike[str], seed: int = 0
                     ) -> tuple[pathlib.Path, dict[str, Any]]:
  """Saves `official_state_dict(seed)` as an official .pth; returns its path and the tensors."""
  import torch  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(directory) / "rwkv4_random.pth"
  sd = official_state_dict(seed)
  torch.save(sd, path)
  return path, sd


def random_tokens(seed: int = 1) -> list[int]:
  return np.random.default_rng(seed).integers(0, V, size=T).tolist()


class Jitted:
  """The loaded model's __call__ and step under jax.jit (eager dispatch is slow per token)."""

  def __init__(self, model: model_lib.RWKV):
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


def rwkv_package_model(path: str | os.PathLike[str]):
  """The rwkv package's RWKV on CPU in float32, without its JIT or CUDA kernel."""
  os.environ.setdefault("RWKV_JIT_ON", "0")  # read by rwkv.model at import time
  os.environ.setdefault("RWKV_CUDA_ON", "0")
  from rwkv.model import RWKV  # pylint: disable=g-import-not-at-top

  return RWKV(model=str(path), strategy="cpu fp32")


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


def hf_model(state_dict: dict[str, Any]):
  """transformers' RwkvForCausalLM (rescale_every=0) holding the official tensors, renamed."""
  import transformers  # pylint: disable=g-import-not-at-top

  cfg = transformers.RwkvConfig(
      vocab_size=V, hidden_size=C, num_hidden_layers=L, attention_hidden_size=A,
      intermediate_size=F, context_length=64, rescale_every=0)
  model = transformers.RwkvForCausalLM(cfg).eval()
  hf_sd = {to_hf_name(k): v for k, v in state_dict.items()}
  model.load_state_dict(hf_sd, strict=True)  # raises on any name or shape mismatch
  return model


# ----------------------------------------------------------------------------------------------
# Against the rwkv package. `ours` is a Jitted model, `package` the package's RWKV.


def state_errors(ours_state: model_lib.RWKVState, package_state) -> dict[str, float]:
  """Errors of an RWKVState against the rwkv package's 5-per-layer list.

  att_x_prev and ffn_x_prev are plain vectors: compared directly. (num, den, max_exp) are a
  scaled representation (true sums = num * e^max_exp); rwkv_jax's parallel scan and the package's
  sequential loop may round max_exp differently, so we compare the invariants: both sums
  rescaled to a common exponent m, relative to their size, and the ratio num / den that the next
  token's output reads.
  """
  theirs = state_convert.state_from_rwkv_package(package_state)
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
  return errs


def sequence_mode(ours: Jitted, package, tokens: list[int]) -> dict[str, Any]:
  """The whole sequence in one parallel call: logits and final state."""
  expected, package_state = package.forward(tokens, None, full_output=True)
  logits, state = ours(jnp.asarray([tokens]))
  return {"logits": max_err(logits[0], expected), "state": state_errors(state, package_state)}


def rnn_mode(ours: Jitted, package, tokens: list[int]) -> dict[str, Any]:
  """Token by token through `step`. "raw_state" compares the scaled fields directly: both are the
  same sequential recurrence, so they agree without rescaling too."""
  package_state, state, expected, got = None, None, [], []
  for tok in tokens:
    out, package_state = package.forward([tok], package_state)
    expected.append(out.numpy())
    logits, state = ours.step(jnp.asarray([tok]), state)
    got.append(np.asarray(logits[0]))
  theirs = state_convert.state_from_rwkv_package(package_state)
  return {"logits": max_err(np.stack(got), np.stack(expected)),
          "state": state_errors(state, package_state),
          "raw_state": {name: max_err(getattr(state, name), getattr(theirs, name))
                        for name in state._fields}}


def chunked_mode(ours: Jitted, package, tokens: list[int], cuts=CUTS) -> dict[str, Any]:
  """Chunks of the sequence, each continuing from the previous chunk's state."""
  package_state, state, expected, got = None, None, [], []
  for lo, hi in zip(cuts[:-1], cuts[1:]):
    out, package_state = package.forward(tokens[lo:hi], package_state, full_output=True)
    expected.append(out.numpy().reshape(hi - lo, V))
    logits, state = ours(jnp.asarray([tokens[lo:hi]]), state)
    got.append(np.asarray(logits[0]))
  return {"logits": max_err(np.concatenate(got), np.concatenate(expected)),
          "state": state_errors(state, package_state)}


def state_exchange(ours: Jitted, package, tokens: list[int], split: int = 14
                   ) -> dict[str, Any]:
  """Logit errors when one side continues from the other's prompt state, both ways."""
  prompt, rest = tokens[:split], tokens[split:2 * split]
  clone = lambda state: [s.clone() for s in state]
  _, package_state = package.forward(prompt, None)
  expected, _ = package.forward(rest, clone(package_state), full_output=True)
  logits, _ = ours(jnp.asarray([rest]), state_convert.state_from_rwkv_package(clone(package_state)))
  _, our_state = ours(jnp.asarray([prompt]))
  out, _ = package.forward(rest, state_convert.state_to_rwkv_package(our_state), full_output=True)
  return {"state_from_package": {"logits": max_err(logits[0], expected)},
          "state_to_package": {"logits": max_err(out, expected)}}


# ----------------------------------------------------------------------------------------------
# Against transformers.


def hf_sequence(ours: Jitted, hf, tokens: list[int]) -> dict[str, Any]:
  """Logit error of the whole sequence against transformers."""
  import torch  # pylint: disable=g-import-not-at-top

  with torch.no_grad():
    expected = hf(torch.tensor([tokens])).logits[0].numpy()
  logits, _ = ours(jnp.asarray([tokens]))
  return {"logits": max_err(logits[0], expected)}


def hf_chunked(ours: Jitted, hf, tokens: list[int], cuts=CUTS) -> dict[str, Any]:
  """Chunks continued from the state against transformers with use_cache; then one token of
  transformers continued from its own state and from ours converted to its layout."""
  import torch  # pylint: disable=g-import-not-at-top

  hf_state, state, expected, got = None, None, [], []
  with torch.no_grad():
    for lo, hi in zip(cuts[:-1], cuts[1:]):
      out = hf(torch.tensor([tokens[lo:hi]]), state=hf_state, use_cache=True)
      hf_state = out.state
      expected.append(out.logits[0].numpy())
      logits, state = ours(jnp.asarray([tokens[lo:hi]]), state)
      got.append(np.asarray(logits[0]))
    nxt = torch.tensor([tokens[:1]])
    want = hf(nxt, state=[s.clone() for s in hf_state]).logits
    have = hf(nxt, state=state_convert.state_to_hf(state)).logits
  theirs = state_convert.state_from_hf(hf_state)
  return {"logits": max_err(np.concatenate(got), np.concatenate(expected)),
          "state": {"att_x_prev": max_err(state.att_x_prev, theirs.att_x_prev),
                    "ffn_x_prev": max_err(state.ffn_x_prev, theirs.ffn_x_prev),
                    "num/den": max_err(state.num / state.den, theirs.num / theirs.den)},
          "continued_from_our_state": max_err(have, want)}


def hf_export(model: model_lib.RWKV, ours: Jitted, tokens: list[int],
              directory: str | os.PathLike[str]) -> dict[str, Any]:
  """Logit error of transformers loading `formats.save_hf(model, directory)` against ours."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  formats.save_hf(model, directory)
  hf = transformers.RwkvForCausalLM.from_pretrained(directory).eval()
  with torch.no_grad():
    expected = hf(torch.tensor([tokens])).logits[0].numpy()
  logits, _ = ours(jnp.asarray([tokens]))
  return {"logits": max_err(logits[0], expected)}


# ----------------------------------------------------------------------------------------------


def measure(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """Every parity measurement on one random checkpoint written under `directory`."""
  path, sd = write_checkpoint(directory)
  model, _ = weights.load_pth(path)
  ours, package, tokens = Jitted(model), rwkv_package_model(path), random_tokens()
  hf = hf_model(sd)
  return {
      "rwkv_package": {"sequence": sequence_mode(ours, package, tokens),
                       "rnn": rnn_mode(ours, package, tokens),
                       "chunked": chunked_mode(ours, package, tokens),
                       **state_exchange(ours, package, tokens)},
      "transformers": {"sequence": hf_sequence(ours, hf, tokens),
                       "chunked": hf_chunked(ours, hf, tokens),
                       "export": hf_export(model, ours, tokens, pathlib.Path(directory) / "hf")},
  }


# ----------------------------------------------------------------------------------------------
# Precisions.

# Deep (four rescale groups of 6 blocks) and narrow; the FFN width is 16 groups of int8 scales
# per column.
DEEP_LAYERS, DEEP_WIDTH, DEEP_FFN, DEEP_VOCAB = 24, 64, 256, 97
DEEP_TOKENS_SHAPE = (4, 48)  # (batch, time) of the compared logits
# att.output and ffn.value DEEP_BIG * 2^(layer // 6) times their usual scale: each block adds more
# to the residual stream than the last group did (as trained models do), and the float32 stream
# passes float16's largest value (65504) well before the last block.
DEEP_BIG = 3000.0


def deep_state_dict(seed: int = 0) -> dict[str, Any]:
  """The deep model's weights (torch tensors) under the official names."""
  import torch  # pylint: disable=g-import-not-at-top

  l, c, f, v = DEEP_LAYERS, DEEP_WIDTH, DEEP_FFN, DEEP_VOCAB
  g = torch.Generator().manual_seed(seed)
  randn = lambda *s, std: torch.randn(*s, generator=g) * std
  uniform = lambda *s, lo, hi: torch.rand(*s, generator=g) * (hi - lo) + lo
  sd = {"emb.weight": randn(v, c, std=0.5), "blocks.0.ln0.weight": uniform(c, lo=0.5, hi=1.5),
        "blocks.0.ln0.bias": randn(c, std=0.1)}
  for i in range(l):
    p, big = f"blocks.{i}.", DEEP_BIG * 2 ** (i // 6)
    sd.update({
        p + "ln1.weight": uniform(c, lo=0.5, hi=1.5), p + "ln1.bias": randn(c, std=0.1),
        p + "ln2.weight": uniform(c, lo=0.5, hi=1.5), p + "ln2.bias": randn(c, std=0.1),
        p + "att.time_decay": uniform(c, lo=-6, hi=2),
        p + "att.time_first": uniform(c, lo=-1, hi=1.5),
        p + "att.time_mix_k": uniform(1, 1, c, lo=0, hi=1),
        p + "att.time_mix_v": uniform(1, 1, c, lo=0, hi=1),
        p + "att.time_mix_r": uniform(1, 1, c, lo=0, hi=1),
        p + "att.key.weight": randn(c, c, std=c ** -0.5),
        p + "att.value.weight": randn(c, c, std=c ** -0.5),
        p + "att.receptance.weight": randn(c, c, std=c ** -0.5),
        p + "att.output.weight": randn(c, c, std=big * c ** -0.5),
        p + "ffn.time_mix_k": uniform(1, 1, c, lo=0, hi=1),
        p + "ffn.time_mix_r": uniform(1, 1, c, lo=0, hi=1),
        p + "ffn.key.weight": randn(f, c, std=c ** -0.5),
        p + "ffn.receptance.weight": randn(c, c, std=c ** -0.5),
        p + "ffn.value.weight": randn(c, f, std=big * f ** -0.5)})
  sd.update({"ln_out.weight": uniform(c, lo=0.5, hi=1.5), "ln_out.bias": randn(c, std=0.1),
             "head.weight": randn(v, c, std=c ** -0.5)})
  return sd


def deep_tokens() -> np.ndarray:
  """The int [batch, time] tokens the precisions are compared on."""
  return np.random.default_rng(1).integers(0, DEEP_VOCAB, size=DEEP_TOKENS_SHAPE)


def logits_of(model: model_lib.RWKV) -> np.ndarray:
  """float32 [batch, time, vocab] logits of `model` on deep_tokens()."""
  return np.asarray(jax.jit(lambda m, t: m(t)[0])(model, jnp.asarray(deep_tokens())))


def rwkv_package_logits(path: str | os.PathLike[str], strategy: str) -> np.ndarray:
  """The rwkv package's logits on deep_tokens() with `strategy` (e.g. "cpu fp32i8")."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top

  os.environ.setdefault("RWKV_JIT_ON", "0")  # read by rwkv.model at import time
  os.environ.setdefault("RWKV_CUDA_ON", "0")
  from rwkv.model import RWKV  # pylint: disable=g-import-not-at-top
  with contextlib.redirect_stdout(io.StringIO()):  # it prints a table of every tensor
    package = RWKV(model=str(path), strategy=strategy)
  return np.stack([package.forward(row.tolist(), None, full_output=True)[0].numpy()
                   for row in deep_tokens()])


def precision_vs_float32(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """Max |logit difference| from float32 and top-1 agreement with it, for each precision of
  weights.load and the rwkv package's int8, on the deep model written under `directory`."""
  import torch  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(directory) / "deep.pth"
  torch.save(deep_state_dict(), path)
  ref = logits_of(weights.load(path, dtype="float32")[0])

  def against_float32(logits):
    return {"max_abs_logit_diff": float(np.abs(logits - ref).max()),
            "top1_agreement": float(np.mean(logits.argmax(-1) == ref.argmax(-1)))}

  record = {dtype: against_float32(logits_of(weights.load(path, dtype=dtype)[0]))
            for dtype in ("bfloat16", "float16", "int8")}
  record["rwkv_package_cpu_fp32i8"] = against_float32(rwkv_package_logits(path, "cpu fp32i8"))
  return {"model": {"n_layer": DEEP_LAYERS, "n_embd": DEEP_WIDTH, "dim_ffn": DEEP_FFN,
                    "vocab": DEEP_VOCAB, "tokens": list(DEEP_TOKENS_SHAPE)}, **record}

r"""Records the accuracy figures quoted in the README, with device, versions, date and command.

  python -m experiments.accuracy [--out=experiments/results/accuracy_cpu.json]

1. WKV in float32 against eq. 16 in float64 at T=4096, time_decay in [-9, 4], |k| up to 60:
   max |y - y_ref| for the sequential and the associative scan (`wkv_vs_float64`).
2. Parity with the reference implementations on random official-format weights: max errors of
   logits and states against the rwkv package and transformers (`measure`).
3. Precisions on a deep model whose float32 residual goes beyond float16's range: bfloat16,
   float16 and int8 logits against float32, and the rwkv package's int8 (`cpu fp32i8`) on the
   same weights (`precision_vs_float32`).

The measurements are functions of this module, and tests/test_parity.py and tests/test_precision.py
assert on the same functions; the models and weights are in experiments/reference_models.py.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import _cli
from experiments import reference_models as ref
from rwkv_jax import model as model_lib
from rwkv_jax import reference
from rwkv_jax import wkv as wkv_lib
from rwkv_jax.io import formats, state_convert, weights

_REPO = pathlib.Path(__file__).resolve().parents[1]
CUTS = (0, 14, 15, ref.T)  # a single-token chunk in the middle; few shapes, few compilations


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
# Against the rwkv package. `ours` is a reference_models.Jitted, `package` the package's RWKV.


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


def sequence_mode(ours: ref.Jitted, package, tokens: list[int]) -> dict[str, Any]:
  """The whole sequence in one parallel call: logits and final state."""
  expected, package_state = package.forward(tokens, None, full_output=True)
  logits, state = ours(jnp.asarray([tokens]))
  return {"logits": max_err(logits[0], expected), "state": state_errors(state, package_state)}


def rnn_mode(ours: ref.Jitted, package, tokens: list[int]) -> dict[str, Any]:
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


def chunked_mode(ours: ref.Jitted, package, tokens: list[int], cuts=CUTS) -> dict[str, Any]:
  """Chunks of the sequence, each continuing from the previous chunk's state."""
  package_state, state, expected, got = None, None, [], []
  for lo, hi in zip(cuts[:-1], cuts[1:]):
    out, package_state = package.forward(tokens[lo:hi], package_state, full_output=True)
    expected.append(out.numpy().reshape(hi - lo, ref.V))
    logits, state = ours(jnp.asarray([tokens[lo:hi]]), state)
    got.append(np.asarray(logits[0]))
  return {"logits": max_err(np.concatenate(got), np.concatenate(expected)),
          "state": state_errors(state, package_state)}


def state_exchange(ours: ref.Jitted, package, tokens: list[int], split: int = 14
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


def hf_sequence(ours: ref.Jitted, hf, tokens: list[int]) -> dict[str, Any]:
  """Logit error of the whole sequence against transformers."""
  import torch  # pylint: disable=g-import-not-at-top

  with torch.no_grad():
    expected = hf(torch.tensor([tokens])).logits[0].numpy()
  logits, _ = ours(jnp.asarray([tokens]))
  return {"logits": max_err(logits[0], expected)}


def hf_chunked(ours: ref.Jitted, hf, tokens: list[int], cuts=CUTS) -> dict[str, Any]:
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


def hf_export(model: model_lib.RWKV, ours: ref.Jitted, tokens: list[int],
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
  path, sd = ref.write_checkpoint(directory)
  model, _ = weights.load_pth(path)
  ours, package, tokens = ref.Jitted(model), ref.rwkv_package(path), ref.random_tokens()
  hf = ref.hf_model(sd)
  return {
      "rwkv_package": {"sequence": sequence_mode(ours, package, tokens),
                       "rnn": rnn_mode(ours, package, tokens),
                       "chunked": chunked_mode(ours, package, tokens),
                       **state_exchange(ours, package, tokens)},
      "transformers": {"sequence": hf_sequence(ours, hf, tokens),
                       "chunked": hf_chunked(ours, hf, tokens),
                       "export": hf_export(model, ours, tokens, pathlib.Path(directory) / "hf")},
  }


def precision_vs_float32(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """Max |logit difference| from float32 and top-1 agreement with it, for each precision of
  weights.load and the rwkv package's int8, on the deep model written under `directory`."""
  import torch  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(directory) / "deep.pth"
  torch.save(ref.deep_state_dict(), path)
  float32 = ref.logits_of(weights.load(path, dtype="float32")[0])

  def against_float32(logits):
    return {"max_abs_logit_diff": float(np.abs(logits - float32).max()),
            "top1_agreement": float(np.mean(logits.argmax(-1) == float32.argmax(-1)))}

  record = {dtype: against_float32(ref.logits_of(weights.load(path, dtype=dtype)[0]))
            for dtype in ("bfloat16", "float16", "int8")}
  record["rwkv_package_cpu_fp32i8"] = against_float32(ref.rwkv_package_logits(path, "cpu fp32i8"))
  return {"model": {"n_layer": ref.DEEP_LAYERS, "n_embd": ref.DEEP_WIDTH,
                    "dim_ffn": ref.DEEP_FFN, "vocab": ref.DEEP_VOCAB,
                    "tokens": list(ref.DEEP_TOKENS_SHAPE)}, **record}


def main(argv):
  del argv
  from experiments import benchlib

  out = _cli.output_path("out", _REPO / flags.FLAGS.out)
  with tempfile.TemporaryDirectory() as tmp:
    record = {"benchmark": "accuracy", "environment": benchlib.environment(sys.argv),
              "wkv_vs_float64_T4096_k60_max_abs_error": wkv_vs_float64(),
              "parity": measure(tmp),
              "precision_vs_float32": precision_vs_float32(tmp)}
  print(benchlib.write_json(out, record))


if __name__ == "__main__":
  # Only as a program: the tests import the measurements beside other entry points' flags.
  flags.DEFINE_string("out", "experiments/results/accuracy_cpu.json", "Output JSON.")
  _cli.run(main)

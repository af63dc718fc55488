"""rwkv_jax against the reference implementations on the same random official weights.

The measurements are in `experiments/accuracy.py`, which records the same numbers in
experiments/results/accuracy_cpu.json; how the weights and reference models are made is in
`experiments/reference_models.py`.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from experiments import accuracy
from experiments import reference_models
from experiments.reference_models import A, C, F, L, V
from rwkv_jax.io import state_convert, weights

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return reference_models.write_checkpoint(tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
  model, config = weights.load_pth(checkpoint[0])
  assert (config.n_layer, config.n_embd, config.dim_att, config.dim_ffn, config.vocab_size) == (
      L, C, A, F, V)
  return model


@pytest.fixture(scope="module")
def ours(loaded):
  return reference_models.Jitted(loaded)


@pytest.fixture(scope="module")
def ref(checkpoint):
  return reference_models.rwkv_package(checkpoint[0])


@pytest.fixture(scope="module")
def tokens():
  return reference_models.random_tokens()


def assert_state_within_tol(errs, label):
  for k, v in errs.items():
    assert v < TOL, f"{label}: state field {k} differs by {v}"


def test_sequence_mode_matches_rwkv_package(ours, ref, tokens):
  # Raises unless our logits are [T, V] as theirs.
  errs = accuracy.sequence_mode(ours, ref, tokens)
  assert errs["logits"] < TOL
  assert_state_within_tol(errs["state"], "sequence")


@pytest.mark.slow
def test_rnn_mode_matches_rwkv_package(ours, ref, tokens):
  errs = accuracy.rnn_mode(ours, ref, tokens)
  assert errs["logits"] < TOL
  # Both are the same sequential recurrence, so here the scaled state agrees directly too.
  for name, err in errs["raw_state"].items():
    assert err < TOL, name
  assert_state_within_tol(errs["state"], "rnn")


@pytest.mark.slow
def test_chunked_mode_matches_rwkv_package(ours, ref, tokens):
  errs = accuracy.chunked_mode(ours, ref, tokens)
  assert errs["logits"] < TOL
  assert_state_within_tol(errs["state"], "chunked")


@pytest.mark.slow
def test_state_from_rwkv_package_continues_generation_identically(ours, ref, tokens):
  errs = accuracy.state_exchange(ours, ref, tokens)
  assert errs["state_from_package"]["logits"] < TOL
  # And the other way: our prefill state drives the package.
  assert errs["state_to_package"]["logits"] < TOL


def test_state_round_trip_through_package_layout_is_exact(ours, tokens):
  _, state = ours(jnp.asarray([tokens]))
  back = state_convert.state_from_rwkv_package(state_convert.state_to_rwkv_package(state))
  for a, b in zip(state, back):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------
# HF transformers.


@pytest.fixture(scope="module")
def hf_model(checkpoint):
  return reference_models.hf_model(checkpoint[1])


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
  assert accuracy.hf_sequence(ours, hf_model, tokens)["logits"] < TOL


def test_hf_chunked_with_state_matches_transformers(hf_model, ours, tokens):
  errs = accuracy.hf_chunked(ours, hf_model, tokens)
  assert errs["logits"] < TOL
  for name, err in errs["state"].items():
    assert err < TOL, name
  # Our state converted to HF's layout continues HF's generation.
  assert errs["continued_from_our_state"] < TOL


def test_export_to_hf_loads_in_transformers_with_same_logits(loaded, ours, tokens, tmp_path):
  assert accuracy.hf_export(loaded, ours, tokens, tmp_path / "exported")["logits"] < TOL
  assert transformers.RwkvConfig.from_pretrained(tmp_path / "exported").rescale_every == 0

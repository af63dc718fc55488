"""Config: presets against the paper's parameter formula, and validation."""

import jax
import pytest
from flax import nnx

from rwkv_jax.config import PILE_VOCAB_SIZE, Preset, RWKVConfig, paper_param_count
from rwkv_jax.model import RWKV

# Table 2 of the paper: parameter counts of the released models, in millions (rounded there).
PAPER_SIZES_M = {Preset.RWKV4_169M: 169, Preset.RWKV4_430M: 430, Preset.RWKV4_1B5: 1515,
                 Preset.RWKV4_3B: 2985, Preset.RWKV4_7B: 7393, Preset.RWKV4_14B: 14150}


@pytest.mark.parametrize("preset", list(Preset))
def test_preset_param_count_matches_paper_formula(preset):
  cfg = preset.config()
  assert cfg.vocab_size == PILE_VOCAB_SIZE == 50277
  assert cfg.num_params() == paper_param_count(cfg.n_layer, cfg.n_embd)
  assert abs(cfg.num_params() / 1e6 - PAPER_SIZES_M[preset]) / PAPER_SIZES_M[preset] < 0.01


@pytest.mark.parametrize("cfg", [
    RWKVConfig(n_layer=2, n_embd=24, vocab_size=37),
    RWKVConfig(n_layer=3, n_embd=16, vocab_size=11, dim_att=8, dim_ffn=40),
])
def test_num_params_counts_the_real_model(cfg):
  model = nnx.eval_shape(lambda: RWKV(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert sum(x.size for x in leaves) == cfg.num_params()


def test_defaults_and_round_trip():
  cfg = RWKVConfig(n_layer=2, n_embd=64)
  assert (cfg.dim_att, cfg.dim_ffn) == (64, 256)
  assert RWKVConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_layer=0, n_embd=8), "n_layer must be a positive integer"),
    (dict(n_layer=2, n_embd=8, dtype="float64"), "dtype='float64' is not one of"),
    (dict(n_layer=2, n_embd=8.5), "n_embd must be a positive integer"),
])
def test_invalid_configs_are_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    RWKVConfig(**kwargs)


def test_unknown_fields_are_rejected():
  with pytest.raises(ValueError, match="Unknown RWKVConfig fields"):
    RWKVConfig.from_dict({"n_layer": 2, "n_embd": 8, "n_head": 4})

"""Config: presets against the paper's parameter formula, validation, the training config."""

import pathlib

import jax
import ml_collections
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from rwkv_jax.config import PILE_VOCAB_SIZE, Preset, RWKVConfig, paper_param_count
from rwkv_jax.model import abstract_model
from rwkv_jax.train import config as train_config

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
  model = abstract_model(cfg)
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


# ---------------------------------------------------------------------------------------------
# The training config (rwkv_jax/train/config.py)

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"


def _parse_config_flags(*args: str) -> ml_collections.ConfigDict:
  """Parses `--config=FILE --config.x=y ...` as experiments/train.py's flags do."""
  argv = ["prog", *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize("name", ["char_tiny", "enwik8", "pile"])
def test_every_experiment_config_passes_the_training_config_check(name):
  train_config.check(_parse_config_flags(f"--config={CONFIGS / name}.py"))


def test_command_line_overrides_reach_the_config_and_unknown_keys_are_refused():
  config = _parse_config_flags(f"--config={CONFIGS / 'char_tiny.py'}", "--config.train.steps=7",
                               "--config.optim.betas=(0.9, 0.95)", "--config.data.path=/data/x")
  assert (config.train.steps, tuple(config.optim.betas), config.data.path) == (
      7, (0.9, 0.95), "/data/x")
  with pytest.raises(AttributeError, match='Did you mean "steps"'):  # not a new key
    _parse_config_flags(f"--config={CONFIGS / 'char_tiny.py'}", "--config.train.stepz=7")


def test_a_config_with_an_unknown_key_names_it():
  config = train_config.default_config()
  config.train.learning_rate = 1e-3
  with pytest.raises(ValueError, match=r"Unknown config key\(s\) config\.train\.learning_rate"):
    train_config.check(config)


def test_a_config_missing_a_key_names_it_and_where_defaults_live():
  config = train_config.default_config().to_dict()
  del config["data"]["worker_count"]
  with pytest.raises(ValueError, match=r"lacks config\.data\.worker_count.*default_config\(\)"):
    train_config.check(ml_collections.ConfigDict(config))


@pytest.mark.parametrize("key", ["checkpoint_every", "log_every", "keep_checkpoints"])
def test_a_zero_step_interval_or_checkpoint_count_is_refused_naming_the_flag(key):
  config = train_config.default_config()
  config.train[key] = 0
  with pytest.raises(ValueError, match=rf"--config\.train\.{key}=0 must be >= 1"):
    train_config.check(config)

"""The claim runners (experiments/char_level.py, scaling.py) on tiny settings: the records they
write, their default file names, the power-law fit, and the matched sizes of the
character-level comparison."""

import json
import logging

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import _runs, char_level, scaling
from experiments.baselines import transformer as tf
from rwkv_jax import sharding
from rwkv_jax.train import step as step_lib


def _count(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("size", ["cpu", "paper"])
def test_char_level_models_have_matching_parameter_counts(size):
  config = char_level.SIZES[size]()
  rwkv = nnx.eval_shape(lambda: step_lib.build_model(config, nnx.Rngs(0)))
  transformer = nnx.eval_shape(lambda: tf.build_model(config, nnx.Rngs(0)))
  n_rwkv, n_tf = _count(rwkv), _count(transformer)
  assert n_rwkv == step_lib.model_config(config).num_params()
  assert n_tf == tf.TransformerConfig.from_training(config).num_params()
  assert abs(n_tf / n_rwkv - 1) < 0.01, (n_tf, n_rwkv)


def test_transformer_rules_place_every_parameter_on_a_sharded_mesh():
  config = char_level.SIZES["tiny"]()
  params = nnx.state(nnx.eval_shape(lambda: tf.build_model(config, nnx.Rngs(0))), nnx.Param)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  shardings = sharding.param_shardings(mesh, params, tf.PARAM_RULES)
  specs = {sharding.path_name(p): s.spec for p, s in
           jax.tree_util.tree_flatten_with_path(shardings)[0]}
  assert specs["blocks/0/attn/qkv/kernel"] == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert specs["blocks/0/ln1/scale"] == jax.sharding.PartitionSpec()


@pytest.mark.slow
def test_char_level_records_bits_per_char_of_both_models_and_skips_finished_runs(tmp_path,
                                                                                 caplog):
  caplog.set_level(logging.INFO)
  record = char_level.run("tiny", tmp_path / "runs")
  path = char_level.save(record, tmp_path / "out", "tiny")
  saved = json.loads(path.read_text())
  assert (tmp_path / "out" / "char_tiny.png").is_file()
  assert saved["environment"]["command"] and saved["steps"] == 4
  assert set(saved["val_bits_per_char"]) == {"rwkv", "transformer"}
  for name, run in saved["runs"].items():
    assert run["steps"] == 4 and run["tokens"] == 4 * 8 * 32
    assert run["val_bits_per_token"] == saved["val_bits_per_char"][name] > 0
    assert run["num_params"] > 0 and run["wall_s"] > 0 and run["train_tokens_per_s"] > 0
    # The trainer's start-up line counts the parameters of the model it trains.
    assert f"{run['num_params']:,} parameters" in caplog.text, name
  assert abs(saved["param_ratio_transformer_to_rwkv"] - 1) < 0.01
  again = char_level.run("tiny", tmp_path / "runs")  # finished: read back, not trained again
  assert again["runs"]["rwkv"]["wall_s"] == record["runs"]["rwkv"]["wall_s"]


@pytest.mark.slow
def test_scaling_records_every_size_and_a_fit(tmp_path):
  record = scaling.run("tiny", tmp_path / "runs")
  path = scaling.save(record, tmp_path / "out", "tiny")
  saved = json.loads(path.read_text())
  assert (tmp_path / "out" / "scaling_tiny.png").is_file()
  points = saved["points"]
  assert [p["name"] for p in points] == ["L1_D8", "L1_D16", "L1_D24"]
  compute = [p["train_flops"] for p in points]
  assert compute == sorted(compute) and all(p["val_loss"] > 0 for p in points)
  assert 0 <= saved["fit"]["r2"] <= 1 and saved["paper_r2"] == 0.994
  assert np.isfinite(saved["fit"]["slope"])


def test_default_tag_is_the_size_then_the_device_unless_the_size_names_it():
  # conftest runs the tests on CPU devices.
  assert _runs.default_tag("cpu") == "cpu"
  assert _runs.default_tag("tiny") == "tiny_cpu"
  assert _runs.default_tag("cpu", "_lr0.001") == "cpu_lr0.001"
  assert _runs.default_tag("paper", "_lr0.001") == "paper_cpu_lr0.001"


def test_power_law_fit_recovers_a_known_exponent():
  rng = np.random.default_rng(0)
  compute = np.geomspace(1e12, 1e18, 8)
  loss = 40.0 * compute ** -0.05 * np.exp(rng.normal(0, 1e-3, 8))
  fit = scaling.fit_power_law(compute, loss)
  assert fit["slope"] == pytest.approx(-0.05, abs=2e-3)
  assert 10 ** fit["intercept"] == pytest.approx(40.0, rel=0.05)
  assert fit["r2"] > 0.99


def test_power_law_fit_r2_is_low_for_points_off_any_line():
  fit = scaling.fit_power_law([1e3, 1e4, 1e5, 1e6], [2.0, 1.0, 2.0, 1.0])
  assert fit["r2"] < 0.5


def test_power_law_fit_needs_two_computes():
  with pytest.raises(ValueError, match="two or more computes"):
    scaling.fit_power_law([1e9, 1e9], [2.0, 1.9])

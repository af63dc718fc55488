"""Checkpoint formats: exact round trips, config inference and the errors for bad inputs."""

import json
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from rwkv_jax import model as model_lib
from rwkv_jax.config import RWKVConfig
from rwkv_jax.io import checkpoint, formats, tensor_names, weights

L, C, A, F, V = 2, 32, 24, 96, 64  # dim_att != n_embd: catches A/C mix-ups in the table


def official_state_dict(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
  """Random tensors under the official names and shapes (distinct values everywhere)."""
  g = torch.Generator().manual_seed(seed)
  shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
  for i in range(L):
    p = f"blocks.{i}."
    shapes.update({
        p + "ln1.weight": (C,), p + "ln1.bias": (C,), p + "ln2.weight": (C,), p + "ln2.bias": (C,),
        p + "att.time_decay": (A,), p + "att.time_first": (A,), p + "att.time_mix_k": (1, 1, C),
        p + "att.time_mix_v": (1, 1, C), p + "att.time_mix_r": (1, 1, C),
        p + "att.key.weight": (A, C), p + "att.value.weight": (A, C),
        p + "att.receptance.weight": (A, C), p + "att.output.weight": (C, A),
        p + "ffn.time_mix_k": (1, 1, C), p + "ffn.time_mix_r": (1, 1, C),
        p + "ffn.key.weight": (F, C), p + "ffn.receptance.weight": (C, C),
        p + "ffn.value.weight": (C, F)})
  shapes.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
  return {k: torch.randn(*s, generator=g).to(dtype) for k, s in shapes.items()}


def assert_same_tensors(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    assert a[k].shape == b[k].shape, k
    assert torch.equal(a[k], b[k]), k


@pytest.fixture
def pth(tmp_path):
  path = tmp_path / "model.pth"
  sd = official_state_dict()
  torch.save(sd, path)
  return path, sd


def test_pth_round_trip_is_bit_exact_fp32(pth, tmp_path):
  path, sd = pth
  model, config = weights.load_pth(path)
  assert config.param_dtype == "float32"
  formats.save_pth(model, tmp_path / "out.pth")
  assert_same_tensors(torch.load(tmp_path / "out.pth", weights_only=True), sd)


def test_bf16_file_upcasts_exactly_and_exports_back_bit_exact(tmp_path):
  sd = official_state_dict(dtype=torch.bfloat16)
  torch.save(sd, tmp_path / "bf16.pth")
  model, _ = weights.load_pth(tmp_path / "bf16.pth")  # float32 parameters
  emb = np.asarray(model.emb.embedding.get_value())
  assert emb.dtype == np.float32
  np.testing.assert_array_equal(emb, sd["emb.weight"].float().numpy())
  formats.save_pth(model, tmp_path / "back.pth", dtype="bfloat16")
  assert_same_tensors(torch.load(tmp_path / "back.pth", weights_only=True), sd)


def test_legacy_non_zip_pth_loads(tmp_path):
  sd = official_state_dict()
  torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
  model, _ = weights.load_pth(tmp_path / "legacy.pth")  # cannot be memory-mapped: read whole
  formats.save_pth(model, tmp_path / "back.pth")
  assert_same_tensors(torch.load(tmp_path / "back.pth", weights_only=True), sd)


def test_dtype_none_keeps_the_checkpoint_dtype(tmp_path):
  sd = official_state_dict(dtype=torch.float16)
  torch.save(sd, tmp_path / "fp16.pth")
  model, config = weights.load_pth(tmp_path / "fp16.pth", dtype=None)
  assert config.param_dtype == "float16"
  assert model.head.kernel.get_value().dtype == jnp.float16
  formats.save_pth(model, tmp_path / "back.pth")
  assert_same_tensors(torch.load(tmp_path / "back.pth", weights_only=True), sd)


def test_pth_to_hf_to_pth_is_bit_exact(pth, tmp_path):
  path, sd = pth
  model, _ = weights.load_pth(path)
  formats.save_hf(model, tmp_path / "hf")
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert hf_config["rescale_every"] == 0
  assert (hf_config["attention_hidden_size"], hf_config["intermediate_size"]) == (A, F)
  model2, config2 = weights.load_hf(tmp_path / "hf")
  assert (config2.n_layer, config2.dim_att, config2.dim_ffn) == (L, A, F)
  formats.save_pth(model2, tmp_path / "back.pth")
  assert_same_tensors(torch.load(tmp_path / "back.pth", weights_only=True), sd)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_directory_saved_again_is_byte_identical(pth, tmp_path, dtype):
  model, _ = weights.load_pth(pth[0], dtype=dtype)
  formats.save_hf(model, tmp_path / "a")
  weights.convert_checkpoint(tmp_path / "a", tmp_path / "b", "hf")  # file -> file, no model
  formats.save_hf(weights.load_hf(tmp_path / "b", dtype=None)[0], tmp_path / "c")
  for name in ("model.safetensors", "config.json"):
    a = (tmp_path / "a" / name).read_bytes()
    assert a == (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name


def test_hf_pytorch_model_bin_loads_like_safetensors(pth, tmp_path):
  path, sd = pth
  model, _ = weights.load_pth(path)
  formats.save_hf(model, tmp_path / "hf")
  hf_names = {e.official: e.hf for e in tensor_names.mapping(L)}
  (tmp_path / "hf" / "model.safetensors").unlink()
  torch.save({hf_names[k]: v for k, v in sd.items()}, tmp_path / "hf" / "pytorch_model.bin")
  model2, _ = weights.load(tmp_path / "hf")
  formats.save_pth(model2, tmp_path / "back.pth")
  assert_same_tensors(torch.load(tmp_path / "back.pth", weights_only=True), sd)


def test_sharded_safetensors_directory_loads(pth, tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path, sd = pth
  hf_names = {e.official: e.hf for e in tensor_names.mapping(L)}
  d = tmp_path / "sharded"
  d.mkdir()
  (d / "config.json").write_text(json.dumps(
      {"model_type": "rwkv", "hidden_size": C, "num_hidden_layers": L, "vocab_size": V,
       "attention_hidden_size": A, "intermediate_size": F}))
  shards = {"a.safetensors": {}, "b.safetensors": {}}
  for i, (k, v) in enumerate(sd.items()):
    shards["ab"[i % 2] + ".safetensors"][hf_names[k]] = v.numpy()
  for name, tensors in shards.items():
    save_file(tensors, d / name)
  index = {"weight_map": {k: name for name, ts in shards.items() for k in ts}}
  (d / "model.safetensors.index.json").write_text(json.dumps(index))
  model, _ = weights.load(d)
  formats.save_pth(model, tmp_path / "back.pth")
  assert_same_tensors(torch.load(tmp_path / "back.pth", weights_only=True), sd)


def test_table_covers_every_model_parameter_once():
  config = RWKVConfig(n_layer=L, n_embd=C, vocab_size=V, dim_att=A, dim_ffn=F)
  abstract = model_lib.abstract_model(config)
  paths = [p for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
  entries = tensor_names.mapping(L)
  assert sorted(map(str, paths)) == sorted(str(e.path) for e in entries)
  assert sorted(e.official for e in entries) == sorted(official_state_dict())
  for e in entries:  # the name rules used before the layer count is known agree with the table
    assert tensor_names.hf_to_official_name(e.hf) == e.official


def test_infer_config_reads_every_dimension():
  shapes = {k: tuple(v.shape) for k, v in official_state_dict().items()}
  config = tensor_names.infer_config(shapes)
  assert (config.n_layer, config.n_embd, config.vocab_size, config.dim_att, config.dim_ffn) == (
      L, C, V, A, F)
  hf_shapes = {e.hf: shapes[e.official] for e in tensor_names.mapping(L)}
  assert tensor_names.infer_config(hf_shapes) == config


def test_infer_config_names_missing_essential_tensor():
  shapes = {k: tuple(v.shape) for k, v in official_state_dict().items()}
  del shapes["blocks.0.ffn.key.weight"]
  with pytest.raises(tensor_names.CheckpointError, match=r"blocks\.0\.ffn\.key\.weight.*missing"):
    tensor_names.infer_config(shapes)


def test_missing_tensors_are_listed(tmp_path):
  sd = official_state_dict()
  del sd["blocks.1.att.time_first"], sd["ln_out.bias"]
  torch.save(sd, tmp_path / "m.pth")
  with pytest.raises(tensor_names.CheckpointError,
                     match=r"missing tensors \['blocks\.1\.att\.time_first', 'ln_out\.bias'\]"):
    weights.load_pth(tmp_path / "m.pth")


def test_unexpected_tensors_are_listed(tmp_path):
  sd = official_state_dict()
  sd["blocks.0.att.gate.weight"] = torch.zeros(C, C)  # an RWKV-5 tensor
  torch.save(sd, tmp_path / "m.pth")
  with pytest.raises(tensor_names.CheckpointError,
                     match=r"unexpected tensors \['blocks\.0\.att\.gate\.weight'\]"):
    weights.load_pth(tmp_path / "m.pth")


def test_misshaped_tensor_names_expected_and_got(tmp_path):
  sd = official_state_dict()
  sd["blocks.1.ffn.value.weight"] = torch.zeros(F, C)  # transposed
  torch.save(sd, tmp_path / "m.pth")
  with pytest.raises(tensor_names.CheckpointError,
                     match=r"blocks\.1\.ffn\.value\.weight .* shape \(96, 32\), expected \(32, 96\)"):
    weights.load_pth(tmp_path / "m.pth")


def test_config_mismatch_names_the_tensor(pth):
  wrong = RWKVConfig(n_layer=L, n_embd=C, vocab_size=V, dim_att=C, dim_ffn=F)
  with pytest.raises(tensor_names.CheckpointError,
                     match=r"blocks\.0\.att\.time_decay .* shape \(24,\), expected \(32,\)"):
    weights.load_pth(pth[0], config=wrong)


def test_config_with_more_layers_lists_the_missing_block(pth):
  wrong = RWKVConfig(n_layer=L + 1, n_embd=C, vocab_size=V, dim_att=A, dim_ffn=F)
  with pytest.raises(tensor_names.CheckpointError, match=r"n_layer=3: missing tensors \['blocks\.2\."):
    weights.load_pth(pth[0], config=wrong)


def test_hf_config_mismatch_names_the_hf_tensor(pth, tmp_path):
  model, _ = weights.load_pth(pth[0])
  formats.save_hf(model, tmp_path / "hf")
  cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  cfg["intermediate_size"] = 4 * C
  (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(tensor_names.CheckpointError,
                     match=r"rwkv\.blocks\.0\.feed_forward\.key\.weight .* expected \(128, 32\)"):
    weights.load_hf(tmp_path / "hf")


@pytest.mark.parametrize("content", [b"\x00\x13garbage\xff" * 50, b"just some text\n"])
def test_file_that_is_not_a_checkpoint(tmp_path, content):
  path = tmp_path / "bad.pth"
  path.write_bytes(content)
  with pytest.raises(tensor_names.CheckpointError, match=r"bad\.pth is not an RWKV-4 checkpoint"):
    weights.load(path)


def test_torch_file_that_is_not_a_state_dict(tmp_path):
  torch.save([1, 2, 3], tmp_path / "list.pth")
  with pytest.raises(tensor_names.CheckpointError, match="not a state dict of tensors"):
    weights.load_pth(tmp_path / "list.pth")


def test_directory_without_config_json(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(tensor_names.CheckpointError,
                     match=r"not an RWKV-4 checkpoint .*official \.pth file or a HuggingFace"):
    weights.load(tmp_path / "empty")


def test_hf_directory_with_corrupt_safetensors(tmp_path):
  d = tmp_path / "hf"
  d.mkdir()
  (d / "config.json").write_text(json.dumps(
      {"model_type": "rwkv", "hidden_size": C, "num_hidden_layers": L, "vocab_size": V}))
  (d / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(tensor_names.CheckpointError, match="not a readable safetensors file"):
    weights.load(d)


def test_hf_directory_of_another_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(tensor_names.CheckpointError, match="model_type='llama'; expected 'rwkv'"):
    weights.load(tmp_path)


def test_save_replaces_atomically_and_leaves_no_temp_files(pth, tmp_path):
  model, _ = weights.load_pth(pth[0])
  out = tmp_path / "out"
  out.mkdir()
  (out / "m.pth").write_bytes(b"old")
  formats.save_pth(model, out / "m.pth")
  formats.save_hf(model, out / "hf")
  formats.save_hf(model, out / "hf")  # overwriting an existing directory works
  assert sorted(p.name for p in out.iterdir()) == ["hf", "m.pth"]
  assert sorted(p.name for p in (out / "hf").iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("fmt", ["pth", "hf", "orbax"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_load_gives_the_requested_dtype_for_every_format(pth, tmp_path, fmt, dtype):
  model, _ = weights.load_pth(pth[0])  # float32
  path = {"pth": pth[0], "hf": tmp_path / "hf", "orbax": tmp_path / "orbax"}[fmt]
  if fmt == "hf":
    formats.save_hf(model, path)
  elif fmt == "orbax":
    checkpoint.export(model, path)

  loaded, config = weights.load(path, dtype=dtype)

  assert config.param_dtype == dtype
  want = {p: np.asarray(v.get_value()).astype(jnp.dtype(dtype))
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
  assert got.keys() == want.keys()
  for p, v in got.items():
    assert v.get_value().dtype == jnp.dtype(dtype), p
    np.testing.assert_array_equal(np.asarray(v.get_value()), want[p], err_msg=str(p))


def test_load_keeps_an_exports_dtype_with_dtype_none(pth, tmp_path):
  model, _ = weights.load_pth(pth[0], dtype="bfloat16")
  checkpoint.export(model, tmp_path / "orbax")
  loaded, config = weights.load(tmp_path / "orbax", dtype=None)
  assert config.param_dtype == "bfloat16"
  assert loaded.head.kernel.get_value().dtype == jnp.bfloat16


def test_bf16_parameters_survive_hf_round_trip(pth, tmp_path):
  model, _ = weights.load_pth(pth[0], dtype="bfloat16")
  formats.save_hf(model, tmp_path / "hf")
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  model2, config2 = weights.load_hf(tmp_path / "hf", dtype=None)
  assert config2.param_dtype == "bfloat16"
  a = np.asarray(model.blocks[1].ffn.value.kernel.get_value())
  b = np.asarray(model2.blocks[1].ffn.value.kernel.get_value())
  assert a.dtype == b.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


def run_convert(*args):
  return subprocess.run([sys.executable, "-m", "experiments.convert", *args],
                        capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_convert_cli_pth_to_hf_to_bf16_pth(pth, tmp_path):
  path, sd = pth
  r = run_convert(f"--input={path}", f"--output={tmp_path / 'hf'}")
  assert r.returncode == 0, r.stderr
  assert (tmp_path / "hf" / "config.json").is_file()
  r = run_convert(f"--input={tmp_path / 'hf'}", f"--output={tmp_path / 'b.pth'}",
                  "--dtype=bfloat16")
  assert r.returncode == 0, r.stderr
  back = torch.load(tmp_path / "b.pth", weights_only=True)
  assert_same_tensors(back, {k: v.to(torch.bfloat16) for k, v in sd.items()})


@pytest.mark.slow
def test_convert_cli_rejects_bad_input_with_a_message(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  r = run_convert(f"--input={tmp_path / 'notes.txt'}", f"--output={tmp_path / 'o.pth'}")
  assert r.returncode != 0
  assert "is not an RWKV-4 checkpoint" in r.stderr
  assert "Traceback" not in r.stderr

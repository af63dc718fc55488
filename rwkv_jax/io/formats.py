"""The official .pth and HuggingFace RwkvForCausalLM files: read tensor by tensor, and written.

Readers return `Tensors`: a checkpoint's tensors by official name with their shapes and dtypes,
each read (memory-mapped where the format allows) only when asked for, so a large checkpoint never
needs two full host copies. Turning them into a model is `weights.load`'s job. Writers take
name -> array in the official layout and hand it to torch.save or the safetensors package, each
file replacing its destination atomically.

torch is imported lazily: only .pth and pytorch_model.bin files need it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import warnings
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np
from flax import nnx

from rwkv_jax import files
from rwkv_jax import model as model_lib
from rwkv_jax.config import RWKVConfig
from rwkv_jax.io import tensor_names
from rwkv_jax.io.tensor_names import CheckpointError, Entry

PathLike = str | os.PathLike

NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
FLOAT_NAMES = (*NP_DTYPES, "float64")  # dtypes a checkpoint tensor may have
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_BIN = "pytorch_model.bin"


def check_dtype_flag(dtype: str | None) -> None:
  if dtype is not None and dtype not in NP_DTYPES:
    raise ValueError(f"dtype={dtype!r} is not one of {sorted(NP_DTYPES)} (or None to keep "
                     f"the checkpoint's dtype).")


# ----------------------------------------------------------------------------------------------
# torch.

def import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Reading or writing .pth / pytorch_model.bin files needs torch: "
                      "pip install torch (the CPU build is enough).") from e
  return torch


def torch_to_numpy(t) -> np.ndarray:
  """A numpy view of a CPU tensor; bfloat16 reinterpreted bit for bit (numpy has no bf16)."""
  torch = import_torch()
  t = t.detach().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def numpy_to_torch(x: np.ndarray):
  """A torch view of `x` (no copy). Arrays read from jax are read-only; the tensors made here are
  only ever read (by torch.save), so torch's warning about that does not apply."""
  torch = import_torch()
  x = np.ascontiguousarray(x)
  if x.dtype == ml_dtypes.bfloat16:
    x, bf16 = x.view(np.int16), True
  else:
    bf16 = False
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    t = torch.from_numpy(x)
  return t.view(torch.bfloat16) if bf16 else t


# ----------------------------------------------------------------------------------------------
# Reading.

def _torch_load(path: pathlib.Path) -> dict[str, Any]:
  torch = import_torch()
  try:
    try:
      sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise
      # Files written with the legacy (pre-zip) serializer cannot be memory-mapped.
      sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a file that is not a checkpoint
    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if "Weights only load failed" in reason:
      # torch's advice (weights_only=False) would run arbitrary code; an official .pth is a
      # plain dict of tensors and never needs it.
      reason = "not a pickle of plain tensors"
    raise CheckpointError(
        f"{path} is not an RWKV-4 checkpoint: torch.load could not read it as a PyTorch "
        f"file ({reason[:200]}). Expected an official .pth file.") from None
  if isinstance(sd, dict) and "_strategy" in sd:
    raise CheckpointError(
        f"{path} was converted by the rwkv package for strategy {sd['_strategy']!r} (weights "
        f"transposed, rescaled or quantized); load the original official .pth instead.")
  if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]  # Lightning-style wrapper
  if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
    raise CheckpointError(
        f"{path} is a PyTorch file but not a state dict of tensors (got {type(sd).__name__}). "
        f"Expected an official RWKV-4 .pth file.")
  return sd


@dataclasses.dataclass
class Tensors:
  """A checkpoint's tensors by official name, read lazily; `get` releases what it returns."""

  source: str
  shapes: dict[str, tuple[int, ...]]
  dtypes: dict[str, str]
  get: Callable[[str], np.ndarray]
  names: dict[str, str]  # official name -> name as spelled in the source
  config: RWKVConfig | None = None  # from the source's own config, if it has one


def _torch_tensors(source: str, sd: dict[str, Any], config: RWKVConfig | None = None,
                   rename: Callable[[str], str] = lambda n: n) -> Tensors:
  names = {rename(k): k for k in sd}
  if len(names) != len(sd):
    raise CheckpointError(f"{source} holds the same tensor under two names.")
  # Moved out of the caller's dict, so that popping below really releases each tensor.
  sd = {rename(k): sd.pop(k) for k in list(sd)}
  shapes = {k: tuple(v.shape) for k, v in sd.items()}
  dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in sd.items()}

  def get(name):
    return torch_to_numpy(sd.pop(name))  # drop our reference as soon as it is converted

  return Tensors(source, shapes, dtypes, get, names, config)


def pth_tensors(path: pathlib.Path) -> Tensors:
  """The tensors of an official .pth file."""
  return _torch_tensors(str(path), _torch_load(path))


def _read_hf_config(directory: pathlib.Path) -> dict[str, Any]:
  try:
    with open(directory / "config.json") as f:
      hf = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{directory}/config.json cannot be read as JSON: {e}") from None
  if not isinstance(hf, dict) or hf.get("model_type", "rwkv") != "rwkv":
    got = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
    raise CheckpointError(f"{directory}/config.json has model_type={got!r}; expected 'rwkv' "
                          f"(HuggingFace RwkvForCausalLM).")
  return hf


def _config_from_hf(hf: dict[str, Any], directory: pathlib.Path) -> RWKVConfig:
  try:
    n_embd = int(hf["hidden_size"])
    return RWKVConfig(n_layer=int(hf["num_hidden_layers"]), n_embd=n_embd,
                      vocab_size=int(hf["vocab_size"]),
                      dim_att=int(hf.get("attention_hidden_size") or n_embd),
                      dim_ffn=int(hf.get("intermediate_size") or 4 * n_embd),
                      ctx_len=int(hf.get("context_length") or 1024))
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{directory}/config.json is not a valid RwkvConfig: {e!r} (needs "
                          f"hidden_size, num_hidden_layers, vocab_size).") from None


def hf_tensors(directory: pathlib.Path) -> Tensors:
  """The tensors of an HF RwkvForCausalLM directory, with the shape its config.json gives."""
  if not (directory / "config.json").is_file():
    raise CheckpointError(f"{directory} is not a HuggingFace RWKV directory: no config.json.")
  config = _config_from_hf(_read_hf_config(directory), directory)
  if (directory / HF_WEIGHTS).is_file() or (directory / HF_INDEX).is_file():
    return _safetensors_tensors(directory, config)
  if (directory / HF_BIN).is_file():
    return _torch_tensors(str(directory), _torch_load(directory / HF_BIN), config,
                          rename=tensor_names.hf_to_official_name)
  raise CheckpointError(f"{directory} has config.json but no {HF_WEIGHTS}, {HF_INDEX} or "
                        f"{HF_BIN}.")


def _safetensors_tensors(directory: pathlib.Path, config: RWKVConfig) -> Tensors:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if (directory / HF_INDEX).is_file():
    with open(directory / HF_INDEX) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
  else:
    shards = [HF_WEIGHTS]
  where, shapes, dtypes, names = {}, {}, {}, {}
  for file in shards:
    try:
      h = safe_open(str(directory / file), framework="numpy")
    except Exception as e:  # safetensors raises its own error types for a corrupt header
      raise CheckpointError(f"{directory / file} is not a readable safetensors file: "
                            f"{type(e).__name__}: {e}") from None
    for key in h.keys():
      name = tensor_names.hf_to_official_name(key)
      sl = h.get_slice(key)
      where[name], names[name] = (h, key), key
      shapes[name] = tuple(sl.get_shape())
      dtypes[name] = _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())

  def get(name):
    h, key = where.pop(name)
    return h.get_tensor(key)

  return Tensors(str(directory), shapes, dtypes, get, names, config)


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


# ----------------------------------------------------------------------------------------------
# Writing.

def _official_arrays(model: model_lib.RWKV, dtype: str | None
                     ) -> Iterable[tuple[Entry, np.ndarray]]:
  check_dtype_flag(dtype)
  if model.config.quant:
    raise ValueError(f"This model holds {model.config.quant} weights, which .pth and HF files "
                     f"cannot; write an Orbax export (checkpoint.export), or load the original "
                     f"checkpoint in a float dtype.")
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for e in tensor_names.mapping(model.config.n_layer):
    x = np.asarray(flat[e.path].get_value())
    if dtype is not None:
      x = x.astype(NP_DTYPES[dtype])
    yield e, tensor_names.to_official(x, e.layout)


def write_pth(path: PathLike, state_dict: dict[str, np.ndarray]) -> None:
  """torch.save of official name -> array, replacing `path` atomically."""
  torch = import_torch()
  sd = {k: numpy_to_torch(x) for k, x in state_dict.items()}
  with files.atomic_path(path) as tmp:
    torch.save(sd, tmp)


def save_pth(model: model_lib.RWKV, path: PathLike, dtype: str | None = None) -> None:
  """Writes the model as an official RWKV-4 .pth file (loadable by the rwkv package).

  Args:
    model: the model to export.
    path: destination file; replaced atomically.
    dtype: tensor dtype in the file, or None for the parameters' own dtype.
  """
  write_pth(path, {e.official: x for e, x in _official_arrays(model, dtype)})


def hf_config_dict(config: RWKVConfig, dtype: str) -> dict[str, Any]:
  """The config.json of a HuggingFace RwkvForCausalLM with this shape (rescale_every=0)."""
  return {
      "architectures": ["RwkvForCausalLM"],
      "model_type": "rwkv",
      "vocab_size": config.vocab_size,
      "hidden_size": config.n_embd,
      "num_hidden_layers": config.n_layer,
      "attention_hidden_size": config.dim_att,
      "intermediate_size": config.dim_ffn,
      "context_length": config.ctx_len,
      "layer_norm_epsilon": 1e-5,
      "bos_token_id": 0,
      "eos_token_id": 0,
      # HF's default of 6 halves weights at inference time in eval mode; exact weights need 0.
      "rescale_every": 0,
      "tie_word_embeddings": False,
      "use_cache": True,
      "torch_dtype": dtype,
  }


def save_hf(model: model_lib.RWKV, directory: PathLike, dtype: str | None = None) -> None:
  """Writes the model as a HuggingFace RwkvForCausalLM directory (config.json, model.safetensors).

  Args:
    model: the model to export.
    directory: created if needed; each file is replaced atomically, config.json last.
    dtype: tensor dtype in the file, or None for the parameters' own dtype.
  """
  write_hf(directory, model.config, dtype or model.config.param_dtype,
           {e.hf: x for e, x in _official_arrays(model, dtype)})


def write_hf(directory: PathLike, config: RWKVConfig, dtype: str,
             tensors: dict[str, np.ndarray]) -> None:
  """Writes an HF directory: model.safetensors from HF name -> array, then config.json.

  The safetensors package writes straight from the arrays' buffers, so the only extra host memory
  is what the caller made to transpose or cast; arrays that are views of a memory-mapped input
  stay views.

  Args:
    directory: created if needed; each file is replaced atomically, config.json last (so a
      directory with a config.json is complete).
    config: the model shape, for config.json.
    dtype: the tensors' dtype, for config.json's torch_dtype.
    tensors: HF name -> array in the official layout.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  if directory.exists() and not directory.is_dir():
    raise ValueError(f"{directory} exists and is not a directory; HF checkpoints are folders.")
  tensors = {k: np.ascontiguousarray(x) for k, x in tensors.items()}
  with files.atomic_path(directory / HF_WEIGHTS) as tmp:
    # transformers refuses a safetensors file without a format it knows; "pt" is its own.
    save_file(tensors, tmp, metadata={"format": "pt"})
  with files.atomic_write(directory / "config.json", "w") as f:
    f.write(json.dumps(hf_config_dict(config, dtype), indent=2) + "\n")

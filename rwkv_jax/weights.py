"""RWKV-4 weights in and out: official BlinkDL .pth files and HuggingFace `RwkvForCausalLM`.

One table, `_GLOBAL` + `_PER_LAYER`, names every parameter three ways (official, HF, NNX path)
with its layout; `_to_model` / `_to_official` are the only places where tensors are transposed
or reshaped, and they serve every format in both directions. HF tensors have exactly the official
shapes, so HF differs from .pth by names only.

Loading streams tensor by tensor into a model built abstractly (`nnx.eval_shape`), so a large
checkpoint never needs two full host copies. time_decay and time_first are stored raw by the
official trainer, the rwkv package and HF alike (all use w = -exp(time_decay)); the model keeps
them raw too, so no value is ever transformed, only renamed, transposed or cast.

torch is imported lazily: only .pth and pytorch_model.bin files need it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import tempfile
import warnings
from typing import Any, Callable, Iterable

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from rwkv_jax import model as model_lib
from rwkv_jax.config import RWKVConfig

PathLike = str | os.PathLike

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_FLOAT_NAMES = (*_NP_DTYPES, "float64")  # dtypes a checkpoint tensor may have
_HF_WEIGHTS = "model.safetensors"
_HF_INDEX = "model.safetensors.index.json"
_HF_BIN = "pytorch_model.bin"


class CheckpointError(ValueError):
  """A checkpoint that cannot be read as RWKV-4 weights; the message says which file and why."""


# ----------------------------------------------------------------------------------------------
# The mapping table.

_PLAIN = "plain"  # same array everywhere
_LINEAR = "linear"  # official/HF [out, in]  <->  nnx kernel [in, out]
_MIX = "mix"  # official/HF [1, 1, c]  <->  nnx [c]


@dataclasses.dataclass(frozen=True)
class Entry:
  """One parameter: its official name, its HF name, its NNX state path and its layout."""

  official: str
  hf: str
  path: tuple[str | int, ...]
  layout: str


# (official, HF, NNX path, layout). Per-layer names are relative to blocks.{i}.
_GLOBAL = (
    ("emb.weight", "rwkv.embeddings.weight", ("emb", "embedding"), _PLAIN),
    ("blocks.0.ln0.weight", "rwkv.blocks.0.pre_ln.weight", ("ln0", "scale"), _PLAIN),
    ("blocks.0.ln0.bias", "rwkv.blocks.0.pre_ln.bias", ("ln0", "bias"), _PLAIN),
    ("ln_out.weight", "rwkv.ln_out.weight", ("ln_out", "scale"), _PLAIN),
    ("ln_out.bias", "rwkv.ln_out.bias", ("ln_out", "bias"), _PLAIN),
    ("head.weight", "head.weight", ("head", "kernel"), _LINEAR),
)
_PER_LAYER = (
    ("ln1.weight", "ln1.weight", ("ln1", "scale"), _PLAIN),
    ("ln1.bias", "ln1.bias", ("ln1", "bias"), _PLAIN),
    ("ln2.weight", "ln2.weight", ("ln2", "scale"), _PLAIN),
    ("ln2.bias", "ln2.bias", ("ln2", "bias"), _PLAIN),
    ("att.time_decay", "attention.time_decay", ("att", "time_decay"), _PLAIN),
    ("att.time_first", "attention.time_first", ("att", "time_first"), _PLAIN),
    ("att.time_mix_k", "attention.time_mix_key", ("att", "time_mix_k"), _MIX),
    ("att.time_mix_v", "attention.time_mix_value", ("att", "time_mix_v"), _MIX),
    ("att.time_mix_r", "attention.time_mix_receptance", ("att", "time_mix_r"), _MIX),
    ("att.key.weight", "attention.key.weight", ("att", "key", "kernel"), _LINEAR),
    ("att.value.weight", "attention.value.weight", ("att", "value", "kernel"), _LINEAR),
    ("att.receptance.weight", "attention.receptance.weight", ("att", "receptance", "kernel"),
     _LINEAR),
    ("att.output.weight", "attention.output.weight", ("att", "output", "kernel"), _LINEAR),
    ("ffn.time_mix_k", "feed_forward.time_mix_key", ("ffn", "time_mix_k"), _MIX),
    ("ffn.time_mix_r", "feed_forward.time_mix_receptance", ("ffn", "time_mix_r"), _MIX),
    ("ffn.key.weight", "feed_forward.key.weight", ("ffn", "key", "kernel"), _LINEAR),
    ("ffn.receptance.weight", "feed_forward.receptance.weight", ("ffn", "receptance", "kernel"),
     _LINEAR),
    ("ffn.value.weight", "feed_forward.value.weight", ("ffn", "value", "kernel"), _LINEAR),
)


def mapping(n_layer: int) -> list[Entry]:
  """Every parameter of an n_layer model, in official checkpoint order.

  Args:
    n_layer: number of blocks.

  Returns:
    One Entry per tensor (official name, HF name, NNX path, layout).
  """
  entries = [Entry(*_GLOBAL[0]), Entry(*_GLOBAL[1]), Entry(*_GLOBAL[2])]
  for i in range(n_layer):
    entries += [Entry(f"blocks.{i}.{o}", f"rwkv.blocks.{i}.{h}", ("blocks", i, *p), lay)
                for o, h, p, lay in _PER_LAYER]
  return entries + [Entry(*g) for g in _GLOBAL[3:]]


def _to_model(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == _LINEAR:
    return x.T
  if layout == _MIX:
    return x.reshape(-1)
  return x


def _to_official(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == _LINEAR:
    return np.ascontiguousarray(x.T)
  if layout == _MIX:
    return x.reshape(1, 1, -1)
  return x


def _official_shape(model_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  if layout == _LINEAR:
    return tuple(reversed(model_shape))
  if layout == _MIX:
    return (1, 1, *model_shape)
  return tuple(model_shape)


def _shape_ok(got: tuple[int, ...], model_shape: tuple[int, ...], layout: str) -> bool:
  # time_mix is [1, 1, c] in every official file; [c] (squeezed by some converters) is accepted.
  if layout == _MIX and got == tuple(model_shape):
    return True
  return got == _official_shape(model_shape, layout)


_HF_TO_OFFICIAL_RE = [
    (re.compile(r"^rwkv\.embeddings\."), "emb."),
    (re.compile(r"^rwkv\.blocks\.0\.pre_ln\."), "blocks.0.ln0."),
    (re.compile(r"\.attention\."), ".att."),
    (re.compile(r"\.feed_forward\."), ".ffn."),
    (re.compile(r"\.time_mix_key$"), ".time_mix_k"),
    (re.compile(r"\.time_mix_value$"), ".time_mix_v"),
    (re.compile(r"\.time_mix_receptance$"), ".time_mix_r"),
    (re.compile(r"^rwkv\."), ""),
]


def hf_to_official_name(name: str) -> str:
  """Renames one HF RwkvForCausalLM tensor to its official name (unknown names pass through)."""
  # The table is the source of truth; these rules only exist to name tensors before the layer
  # count is known. test_weights checks that they agree with the table.
  for pattern, repl in _HF_TO_OFFICIAL_RE:
    name = pattern.sub(repl, name)
  return name


# ----------------------------------------------------------------------------------------------
# Config from tensor shapes.

def infer_config(shapes: dict[str, tuple[int, ...]], **overrides) -> RWKVConfig:
  """The model shape implied by a checkpoint's tensor shapes.

  Args:
    shapes: tensor name -> shape, official names (HF names are accepted and renamed).
    **overrides: other RWKVConfig fields (ctx_len, dtype, param_dtype).

  Returns:
    RWKVConfig with n_layer, n_embd, vocab_size, dim_att and dim_ffn taken from the tensors.

  Raises:
    CheckpointError: if a tensor needed to tell the shape is missing or has the wrong rank.
  """
  shapes = {hf_to_official_name(k): tuple(v) for k, v in shapes.items()}
  essential = ("emb.weight", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight")
  missing = [n for n in essential if n not in shapes]
  if missing:
    raise CheckpointError(
        f"Cannot tell the model shape: tensors {missing} are missing (found "
        f"{len(shapes)} tensors, e.g. {sorted(shapes)[:5]}). Is this an RWKV-4 checkpoint?")
  for name in essential:
    if len(shapes[name]) != 2:
      raise CheckpointError(f"Tensor {name} must be 2-D; got shape {shapes[name]}.")
  layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
  vocab, n_embd = shapes["emb.weight"]
  return RWKVConfig(n_layer=max(layers) + 1, n_embd=n_embd, vocab_size=vocab,
                    dim_att=shapes["blocks.0.att.key.weight"][0],
                    dim_ffn=shapes["blocks.0.ffn.key.weight"][0], **overrides)


# ----------------------------------------------------------------------------------------------
# Loading: one streaming path for every source format.

def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Reading or writing .pth / pytorch_model.bin files needs torch: "
                      "pip install torch (the CPU build is enough).") from e
  return torch


def _torch_to_numpy(t) -> np.ndarray:
  """A numpy view of a CPU tensor; bfloat16 reinterpreted bit for bit (numpy has no bf16)."""
  torch = _import_torch()
  t = t.detach().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _numpy_to_torch(x: np.ndarray):
  """A torch view of `x` (no copy). Arrays read from jax are read-only; the tensors made here are
  only ever read (by torch.save), so torch's warning about that does not apply."""
  torch = _import_torch()
  x = np.ascontiguousarray(x)
  if x.dtype == ml_dtypes.bfloat16:
    x, bf16 = x.view(np.int16), True
  else:
    bf16 = False
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    t = torch.from_numpy(x)
  return t.view(torch.bfloat16) if bf16 else t


def _dtype_name(dtype: Any) -> str:
  for name, np_dtype in _NP_DTYPES.items():
    if np.dtype(dtype) == np.dtype(np_dtype):
      return name
  raise CheckpointError(f"Unsupported parameter dtype {dtype}; use one of {sorted(_NP_DTYPES)}.")


def _check_dtype_flag(dtype: str | None) -> None:
  if dtype is not None and dtype not in _NP_DTYPES:
    raise ValueError(f"dtype={dtype!r} is not one of {sorted(_NP_DTYPES)} (or None to keep "
                     f"the checkpoint's dtype).")


def _validate(source: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, Any],
              config: RWKVConfig | None, dtype: str | None, names: dict[str, str] | None = None):
  """Checks a checkpoint's names, shapes and dtypes against the model they must fill.

  Args:
    source: the file or directory, for error messages.
    shapes: official name -> shape of every tensor in the source.
    dtypes: official name -> dtype name ("float32", "bfloat16", ...) of every tensor.
    config: expected shape (checked against the tensors) or None to infer it.
    dtype: parameter dtype, or None for the dtype of emb.weight.
    names: official name -> the name as spelled in the source, for error messages.

  Returns:
    (config, entries, graphdef, model_vars): the config with param_dtype set, the mapping
    entries, and the abstract model split into its graphdef and flat variables.
  """
  _check_dtype_flag(dtype)
  names = names or {}
  spell = lambda n: names.get(n, n)
  if dtype is None:
    dtype = dtypes.get("emb.weight", "float32")
    dtype = dtype if dtype in _NP_DTYPES else "float32"
  if config is None:
    config = infer_config(shapes, param_dtype=dtype)
  else:
    config = config.replace(param_dtype=dtype)
  entries = mapping(config.n_layer)
  expected = {e.official for e in entries}
  missing = [spell(e.official) for e in entries if e.official not in shapes]
  unexpected = sorted(spell(n) for n in shapes if n not in expected)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing tensors {missing}")
    if unexpected:
      parts.append(f"unexpected tensors {unexpected}")
    raise CheckpointError(
        f"{source} does not match an RWKV-4 model with n_layer={config.n_layer}: "
        f"{'; '.join(parts)}. Only RWKV-4 checkpoints are supported (not RWKV-5/6, and not "
        f"files already converted by the rwkv package's strategy).")

  abstract = nnx.eval_shape(lambda: model_lib.RWKV(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  model_vars = dict(nnx.to_flat_state(abstract_state))
  for e in entries:
    model_shape = tuple(model_vars[e.path].get_value().shape)
    if not _shape_ok(shapes[e.official], model_shape, e.layout):
      raise CheckpointError(
          f"Tensor {spell(e.official)} in {source} has shape {shapes[e.official]}, expected "
          f"{_official_shape(model_shape, e.layout)} for n_layer={config.n_layer}, "
          f"n_embd={config.n_embd}, vocab_size={config.vocab_size}, dim_att={config.dim_att}, "
          f"dim_ffn={config.dim_ffn}.")
    if dtypes[e.official] not in _FLOAT_NAMES:
      raise CheckpointError(f"Tensor {spell(e.official)} in {source} has dtype "
                            f"{dtypes[e.official]}; RWKV-4 weights are floating point.")
  return config, entries, graphdef, model_vars


def _build(source: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, Any],
           get: Callable[[str], np.ndarray], config: RWKVConfig | None, dtype: str | None,
           names: dict[str, str] | None = None) -> tuple[model_lib.RWKV, RWKVConfig]:
  """Validates names and shapes (`_validate`), then fills an abstract model one tensor at a time.

  `get` maps an official name to a numpy array; it is called once per tensor, which it may then
  release.
  """
  config, entries, graphdef, model_vars = _validate(source, shapes, dtypes, config, dtype, names)
  target = _NP_DTYPES[config.param_dtype]
  filled = []
  for e in entries:
    variable = model_vars[e.path]
    # astype from bf16/fp16 to fp32 is exact; the device copy is made before `get`'s buffer
    # (possibly a memory-mapped file page) is released.
    x = _to_model(get(e.official), e.layout).astype(target)
    filled.append((e.path, variable.replace(jnp.asarray(x))))
    del x
  return nnx.merge(graphdef, nnx.from_flat_state(filled)), config


def _torch_load(path: pathlib.Path) -> dict[str, Any]:
  torch = _import_torch()
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
class _Tensors:
  """A checkpoint's tensors by official name, read lazily; `get` releases what it returns."""

  source: str
  shapes: dict[str, tuple[int, ...]]
  dtypes: dict[str, str]
  get: Callable[[str], np.ndarray]
  names: dict[str, str]  # official name -> name as spelled in the source
  config: RWKVConfig | None = None  # from the source's own config, if it has one


def _torch_tensors(source: str, sd: dict[str, Any], config: RWKVConfig | None = None,
                   rename: Callable[[str], str] = lambda n: n) -> _Tensors:
  names = {rename(k): k for k in sd}
  if len(names) != len(sd):
    raise CheckpointError(f"{source} holds the same tensor under two names.")
  # Moved out of the caller's dict, so that popping below really releases each tensor.
  sd = {rename(k): sd.pop(k) for k in list(sd)}
  shapes = {k: tuple(v.shape) for k, v in sd.items()}
  dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in sd.items()}

  def get(name):
    return _torch_to_numpy(sd.pop(name))  # drop our reference as soon as it is converted

  return _Tensors(source, shapes, dtypes, get, names, config)


def _from_tensors(t: _Tensors, config: RWKVConfig | None, dtype: str | None
                  ) -> tuple[model_lib.RWKV, RWKVConfig]:
  return _build(t.source, t.shapes, t.dtypes, t.get, config or t.config, dtype, t.names)


def load_pth(path: PathLike, config: RWKVConfig | None = None, dtype: str | None = "float32"
             ) -> tuple[model_lib.RWKV, RWKVConfig]:
  """Loads an official BlinkDL RWKV-4 .pth file.

  Args:
    path: the .pth file (torch.save of the state dict, any float dtype).
    config: the expected shape; None infers it from the tensors. Its param_dtype is replaced by
      `dtype`.
    dtype: parameter dtype ("float32", "bfloat16", "float16"), or None for the file's own dtype
      (that of emb.weight). bf16/fp16 files upcast to float32 exactly.

  Returns:
    (model, config).

  Raises:
    CheckpointError: the file is not a checkpoint, or tensors are missing, unexpected,
      mis-shaped, or do not match `config`.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist or is not a file; expected an official "
                            f"RWKV-4 .pth file.")
  return _from_tensors(_torch_tensors(str(path), _torch_load(path)), config, dtype)


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


def load_hf(directory: PathLike, dtype: str | None = "float32"
            ) -> tuple[model_lib.RWKV, RWKVConfig]:
  """Loads a HuggingFace RwkvForCausalLM directory.

  Args:
    directory: holds config.json and model.safetensors (or a sharded
      model.safetensors.index.json, or pytorch_model.bin).
    dtype: parameter dtype, or None for the checkpoint's own (that of the embedding).

  Returns:
    (model, config); config.json's shape is checked against every tensor.

  Raises:
    CheckpointError: as load_pth, naming the HF tensor.
  """
  return _from_tensors(_hf_tensors(pathlib.Path(directory)), None, dtype)


def _hf_tensors(directory: pathlib.Path) -> _Tensors:
  if not (directory / "config.json").is_file():
    raise CheckpointError(f"{directory} is not a HuggingFace RWKV directory: no config.json.")
  config = _config_from_hf(_read_hf_config(directory), directory)
  if (directory / _HF_WEIGHTS).is_file() or (directory / _HF_INDEX).is_file():
    return _safetensors_tensors(directory, config)
  if (directory / _HF_BIN).is_file():
    return _torch_tensors(str(directory), _torch_load(directory / _HF_BIN), config,
                          rename=hf_to_official_name)
  raise CheckpointError(f"{directory} has config.json but no {_HF_WEIGHTS}, {_HF_INDEX} or "
                        f"{_HF_BIN}.")


def _safetensors_tensors(directory: pathlib.Path, config: RWKVConfig) -> _Tensors:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if (directory / _HF_INDEX).is_file():
    with open(directory / _HF_INDEX) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = [_HF_WEIGHTS]
  where, shapes, dtypes, names = {}, {}, {}, {}
  for file in files:
    try:
      h = safe_open(str(directory / file), framework="numpy")
    except Exception as e:  # safetensors raises its own error types for a corrupt header
      raise CheckpointError(f"{directory / file} is not a readable safetensors file: "
                            f"{type(e).__name__}: {e}") from None
    for key in h.keys():
      name = hf_to_official_name(key)
      sl = h.get_slice(key)
      where[name], names[name] = (h, key), key
      shapes[name] = tuple(sl.get_shape())
      dtypes[name] = _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())

  def get(name):
    h, key = where.pop(name)
    return h.get_tensor(key)

  return _Tensors(str(directory), shapes, dtypes, get, names, config)


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


# ----------------------------------------------------------------------------------------------
# Saving.

def _official_arrays(model: model_lib.RWKV, dtype: str | None
                     ) -> Iterable[tuple[Entry, np.ndarray]]:
  _check_dtype_flag(dtype)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for e in mapping(model.config.n_layer):
    x = np.asarray(flat[e.path].get_value())
    if dtype is not None:
      x = x.astype(_NP_DTYPES[dtype])
    yield e, _to_official(x, e.layout)


def _atomic_write(path: pathlib.Path, write: Callable[[str], None]) -> None:
  """Writes via a temporary file in the same directory and renames it into place."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_pth(model: model_lib.RWKV, path: PathLike, dtype: str | None = None) -> None:
  """Writes the model as an official RWKV-4 .pth file (loadable by the rwkv package).

  Args:
    model: the model to export.
    path: destination file; replaced atomically.
    dtype: tensor dtype in the file, or None for the parameters' own dtype.
  """
  torch = _import_torch()
  sd = {e.official: _numpy_to_torch(x) for e, x in _official_arrays(model, dtype)}
  _atomic_write(pathlib.Path(path), lambda tmp: torch.save(sd, tmp))


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

  Tensors are written one at a time, so the only extra memory is one tensor.

  Args:
    model: the model to export.
    directory: created if needed; each file is replaced atomically, config.json last.
    dtype: tensor dtype in the file, or None for the parameters' own dtype.
  """
  _check_dtype_flag(dtype)
  directory = _hf_directory(directory)
  file_dtype = dtype or model.config.param_dtype
  entries = mapping(model.config.n_layer)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  shapes = [_official_shape(tuple(flat[e.path].get_value().shape), e.layout) for e in entries]
  _write_safetensors(directory / _HF_WEIGHTS, [e.hf for e in entries], shapes, file_dtype,
                     lambda i: _to_official(np.asarray(flat[entries[i].path].get_value()),
                                            entries[i].layout))
  _write_hf_config(directory, model.config, file_dtype)


def _hf_directory(directory: PathLike) -> pathlib.Path:
  directory = pathlib.Path(directory)
  if directory.exists() and not directory.is_dir():
    raise ValueError(f"{directory} exists and is not a directory; HF checkpoints are folders.")
  return directory


def _write_hf_config(directory: pathlib.Path, config: RWKVConfig, dtype: str) -> None:
  text = json.dumps(hf_config_dict(config, dtype), indent=2) + "\n"
  _atomic_write(directory / "config.json", lambda tmp: pathlib.Path(tmp).write_text(text))


_ST_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _write_safetensors(path: pathlib.Path, names: list[str], shapes: list[tuple[int, ...]],
                       dtype: str, get: Callable[[int], np.ndarray]) -> None:
  """Streams tensors into a .safetensors file: the header from the shapes, then one at a time.

  The format is an 8-byte little-endian header length, a JSON header of name -> dtype, shape and
  byte range, then the raw little-endian data in that order.
  """
  np_dtype = np.dtype(_NP_DTYPES[dtype])
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape in zip(names, shapes):
    size = int(np.prod(shape)) * np_dtype.itemsize
    header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned

  def write(tmp):
    with open(tmp, "wb") as f:
      f.write(len(header_bytes).to_bytes(8, "little"))
      f.write(header_bytes)
      for i, shape in enumerate(shapes):
        x = np.ascontiguousarray(get(i), dtype=np_dtype)
        if x.shape != tuple(shape):
          raise AssertionError(f"{names[i]}: shape {x.shape} != header {shape}")
        f.write(memoryview(x.reshape(-1).view(np.uint8)))
        del x

  _atomic_write(path, write)


def convert_checkpoint(src: PathLike, dst: PathLike, fmt: str, dtype: str | None = None
                       ) -> RWKVConfig:
  """Converts an official .pth file or HF directory into the other format, tensor by tensor.

  No model is built: each tensor is read (memory-mapped where the format allows), renamed, cast
  and written before the next is read. Writing a .pth needs the whole state dict in memory once
  (torch.save takes a dict); writing HF streams.

  Args:
    src: official .pth file or HF directory.
    dst: destination .pth file ("pth") or directory ("hf").
    fmt: "pth" or "hf".
    dtype: tensor dtype of the output, or None for that of the input's embedding.

  Returns:
    The model config of the checkpoint.
  """
  src = pathlib.Path(src)
  if src.is_dir():
    t = _hf_tensors(src)
  elif src.is_file():
    t = _torch_tensors(str(src), _torch_load(src))
  else:
    raise CheckpointError(f"{src} does not exist.")
  config, entries, _, model_vars = _validate(t.source, t.shapes, t.dtypes, t.config, dtype,
                                             t.names)
  shapes = [_official_shape(tuple(model_vars[e.path].get_value().shape), e.layout)
            for e in entries]

  def official(i):  # squeezed [c] time_mix vectors are accepted on input, [1, 1, c] written
    return t.get(entries[i].official).reshape(shapes[i])

  if fmt == "hf":
    directory = _hf_directory(dst)
    _write_safetensors(directory / _HF_WEIGHTS, [e.hf for e in entries], shapes,
                       config.param_dtype, official)
    _write_hf_config(directory, config, config.param_dtype)
  elif fmt == "pth":
    torch = _import_torch()
    target = _NP_DTYPES[config.param_dtype]
    sd = {e.official: _numpy_to_torch(official(i).astype(target)) for i, e in enumerate(entries)}
    _atomic_write(pathlib.Path(dst), lambda tmp: torch.save(sd, tmp))
  else:
    raise ValueError(f"fmt={fmt!r}; use 'pth' or 'hf'.")
  return config


# ----------------------------------------------------------------------------------------------
# Format detection.

Loader = Callable[[pathlib.Path], tuple[model_lib.RWKV, RWKVConfig]]
_EXTRA_FORMATS: list[tuple[str, Callable[[pathlib.Path], bool], Loader]] = []


def register_format(name: str, detect: Callable[[pathlib.Path], bool], loader: Loader) -> None:
  """Teaches `load` a new format (e.g. the native Orbax checkpoints in checkpoint.py).

  Args:
    name: short format name, for messages.
    detect: path -> True if this format can read it; tried before the built-in formats.
    loader: path -> (model, config).
  """
  _EXTRA_FORMATS.append((name, detect, loader))


def load(path: PathLike, dtype: str | None = "float32") -> tuple[model_lib.RWKV, RWKVConfig]:
  """Loads any supported checkpoint: an rwkv_jax export or training work directory (Orbax), an
  official .pth file, an HF directory, or a format added with `register_format`.

  Args:
    path: file or directory.
    dtype: parameter dtype for .pth / HF (None keeps the checkpoint's own).

  Returns:
    (model, config).
  """
  # The native format registers itself on import; checkpoint.py imports this module, so the
  # import happens here rather than at the top.
  from rwkv_jax import checkpoint  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  path = pathlib.Path(path)
  for _, detect, loader in _EXTRA_FORMATS:
    if detect(path):
      return loader(path)
  if path.is_dir() and (path / "config.json").is_file():
    return load_hf(path, dtype=dtype)
  if path.is_file():
    return load_pth(path, dtype=dtype)
  what = "does not exist" if not path.exists() else "is a directory without config.json"
  raise CheckpointError(
      f"{path} is not an RWKV-4 checkpoint ({what}): expected an official .pth file or a "
      f"HuggingFace directory with config.json.")


# ----------------------------------------------------------------------------------------------
# Recurrent state <-> the reference implementations.

def state_to_rwkv_package(state: model_lib.RWKVState) -> list[Any]:
  """Converts a batch-1 RWKVState to the rwkv package's list (5 float32 tensors per layer).

  Args:
    state: RWKVState with fields [l, 1, c].

  Returns:
    [att_xx, aa, bb, pp, ffn_xx] * n_layer as torch tensors; the same scaled representation
    (aa = num, bb = den, pp = max_exp), so no value changes.
  """
  torch = _import_torch()
  if state.num.ndim != 3 or state.num.shape[1] != 1:
    raise ValueError(f"state_to_rwkv_package takes a batch-1 state ([l, 1, c] fields); got "
                     f"num of shape {tuple(state.num.shape)}. Slice one sequence first.")
  fields = [np.asarray(f, np.float32)[:, 0] for f in state]
  return [torch.from_numpy(np.array(f[i])) for i in range(fields[0].shape[0]) for f in fields]


def state_from_rwkv_package(tensors: list[Any]) -> model_lib.RWKVState:
  """Converts the rwkv package's RWKV-4 state list to a batch-1 RWKVState ([l, 1, c] fields)."""
  if len(tensors) % 5 or not tensors:
    raise ValueError(f"An RWKV-4 rwkv-package state has 5 tensors per layer; got {len(tensors)}.")
  arrays = [_torch_to_numpy(t.float().cpu()) for t in tensors]
  fields = [np.stack(arrays[j::5])[:, None, :] for j in range(5)]
  return model_lib.RWKVState(*(jnp.asarray(f, jnp.float32) for f in fields))


# HF RwkvModel keeps 5 tensors [b, c, l]: (ffn shift, att shift, num, den, max_exp).
_HF_STATE_ORDER = (4, 0, 1, 2, 3)  # HF slot -> RWKVState field


def state_to_hf(state: model_lib.RWKVState) -> list[Any]:
  """Converts an RWKVState ([l, b, c] fields) to HF RwkvModel's `state` list."""
  torch = _import_torch()
  return [torch.from_numpy(np.ascontiguousarray(np.asarray(state[f], np.float32)
                                                .transpose(1, 2, 0)))
          for f in _HF_STATE_ORDER]


def state_from_hf(tensors: list[Any]) -> model_lib.RWKVState:
  """Converts HF RwkvModel's `state` list (5 tensors [b, c, l]) to an RWKVState."""
  if len(tensors) != 5:
    raise ValueError(f"HF RWKV state is a list of 5 tensors; got {len(tensors)}.")
  fields = [None] * 5
  for slot, f in enumerate(_HF_STATE_ORDER):
    fields[f] = jnp.asarray(_torch_to_numpy(tensors[slot].float().cpu()).transpose(2, 0, 1))
  return model_lib.RWKVState(*fields)

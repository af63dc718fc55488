"""RWKV-4 weights in: one `load` for every format, and `convert_checkpoint` between files.

`load` reads an official BlinkDL .pth file, a HuggingFace `RwkvForCausalLM` directory, an rwkv_jax
Orbax export or a training work directory (its latest checkpoint). Every reader fills an abstract
model (`model.abstract_model`) of the requested precision (`DTYPES`, defined by
`RWKVConfig.with_precision`), so a precision means the same for all formats; int8 is quantised
tensor by tensor as it is read (`rwkv_jax/quant.py`), and an int8 export is read back as it
is. time_decay and time_first are stored raw by the official trainer, the rwkv package and HF
alike (all use w = -exp(time_decay)); the model keeps them raw too, so no value is ever
transformed, only renamed, transposed or cast.

The rest of rwkv_jax/io/:
  tensor_names.py   the name table (official / HF / NNX path), layouts, config inference
  formats.py        reading and writing .pth and HF files
  state_convert.py  the recurrent state <-> the rwkv package and HF
  checkpoint.py     Orbax training checkpoints and exports
"""

from __future__ import annotations

import math
import mmap
import os
import pathlib
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from rwkv_jax import model as model_lib
from rwkv_jax import quant
from rwkv_jax.config import PRECISIONS, RWKVConfig
from rwkv_jax.io import formats, tensor_names
from rwkv_jax.io.tensor_names import CheckpointError

PathLike = str | os.PathLike

# The precisions `load(path, dtype=...)` accepts; every --dtype flag offers exactly these.
DTYPES = PRECISIONS


def check_dtype(dtype: str | None) -> None:
  """Raises ValueError (one line, naming the accepted names) unless dtype is in DTYPES or None."""
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)} (or None to keep the "
                     f"checkpoint's own).")


# ----------------------------------------------------------------------------------------------
# Tensors (by official name) -> model.

def _validate(source: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, Any],
              config: RWKVConfig | None, dtype: str | None, names: dict[str, str] | None = None):
  """Checks a checkpoint's names, shapes and dtypes against the model they must fill.

  Args:
    source: the file or directory, for error messages.
    shapes: official name -> shape of every tensor in the source.
    dtypes: official name -> dtype name ("float32", "bfloat16", ...) of every tensor.
    config: expected shape (checked against the tensors) or None to infer it.
    dtype: precision (one of DTYPES), or None for the dtype of emb.weight.
    names: official name -> the name as spelled in the source, for error messages.

  Returns:
    (config, entries, graphdef, model_vars): the config in the precision asked for, the
    mapping entries, and the abstract model split into its graphdef and flat variables.
  """
  check_dtype(dtype)
  names = names or {}
  spell = lambda n: names.get(n, n)
  if dtype is None:
    dtype = dtypes.get("emb.weight", "float32")
    dtype = dtype if dtype in formats.NP_DTYPES else "float32"
  if config is None:
    config = tensor_names.infer_config(shapes)
  config = config.with_precision(dtype)
  entries = tensor_names.mapping(config.n_layer)
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

  graphdef, abstract_state = model_lib.abstract_split(config)  # shared: read only
  model_vars = dict(nnx.to_flat_state(abstract_state))
  for e in entries:
    model_shape = tuple(_kernel_var(model_vars, e.path).get_value().shape)
    if not tensor_names.shape_ok(shapes[e.official], model_shape, e.layout):
      raise CheckpointError(
          f"Tensor {spell(e.official)} in {source} has shape {shapes[e.official]}, expected "
          f"{tensor_names.official_shape(model_shape, e.layout)} for n_layer={config.n_layer}, "
          f"n_embd={config.n_embd}, vocab_size={config.vocab_size}, dim_att={config.dim_att}, "
          f"dim_ffn={config.dim_ffn}.")
    if dtypes[e.official] not in formats.FLOAT_NAMES:
      raise CheckpointError(f"Tensor {spell(e.official)} in {source} has dtype "
                            f"{dtypes[e.official]}; RWKV-4 weights are floating point.")
  return config, entries, graphdef, model_vars


def _kernel_var(model_vars: dict, path: tuple):
  """The variable at `path`, or for a quantised matrix its int8 kernel (same shape)."""
  return model_vars[path if path in model_vars else quant.leaf_path(path, quant.QKERNEL)]


def _build(source: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, Any],
           get: Callable[[str], np.ndarray], config: RWKVConfig | None, dtype: str | None,
           names: dict[str, str] | None = None, fresh: bool = False,
           on_config: Callable[[RWKVConfig], None] | None = None
           ) -> tuple[model_lib.RWKV, RWKVConfig]:
  """Validates names and shapes (`_validate`), then fills an abstract model one tensor at a time.

  `get` maps an official name to a numpy array; it is called once per tensor, which it may then
  release. With `fresh`, its arrays are the caller's to keep (see `formats.Tensors.fresh`).
  `on_config` is called with the config once it is checked, before any tensor is read.

  Peak host memory is the model plus one tensor: each tensor is cast and transposed in one pass
  into a buffer that jax then uses in place (`_to_device`), and its source is dropped before the
  next is read. The buffers are carved from one `_HostArena`.
  """
  config, entries, graphdef, model_vars = _validate(source, shapes, dtypes, config, dtype, names)
  if on_config is not None:
    on_config(config)
  dense = [model_vars[e.path].get_value() for e in entries if e.path in model_vars]
  arena = _HostArena(sum(_padded(math.prod(v.shape) * np.dtype(v.dtype).itemsize)
                         for v in dense))
  filled = []
  for e in entries:
    x = tensor_names.to_model(get(e.official), e.layout)
    if e.path in model_vars:
      variable = model_vars[e.path]
      # A cast from bf16/fp16 to fp32 is exact.
      filled.append((e.path, variable.replace(
          _to_device(x, variable.get_value().dtype, fresh, arena))))
    else:  # an int8 matrix: quantised from the file's own values
      for leaf, value in zip((quant.QKERNEL, quant.QSCALE), quant.quantize(x)):
        path = quant.leaf_path(e.path, leaf)
        filled.append((path, model_vars[path].replace(_to_device(value, value.dtype, True))))
    del x
  return nnx.merge(graphdef, nnx.from_flat_state(filled)), config


# Source rows per block of a transposing copy.
_TRANSPOSE_BLOCK = 64


def _padded(nbytes: int) -> int:
  return -(-nbytes // formats.ALIGN) * formats.ALIGN


class _HostArena:
  """Aligned host buffers for a model's arrays, carved from one anonymous memory map.

  The kernel fills in the map's pages when it is made (MAP_POPULATE), at once and several times
  faster than the page faults of first writing to new memory one page at a time (in a virtual
  machine each such fault may also be one of the host's: on 2 vCPUs, 0.3 s instead of 2.4 s for
  the 0.68 GB of a 169M model). The arena lives as long as any array of it does. A request past
  its size, or a system without anonymous maps, gets a buffer of its own.
  """

  def __init__(self, nbytes: int):
    self._used = 0
    try:
      self._map = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                            | getattr(mmap, "MAP_POPULATE", 0))
    except (AttributeError, OSError, ValueError):
      self._map = None

  def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized C-contiguous array, aligned as jax needs to use it in place."""
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if self._map is None or not nbytes or self._used + nbytes > len(self._map):
      return formats.aligned_empty(shape, dtype)
    out = np.frombuffer(self._map, dtype, count, self._used).reshape(shape)
    self._used += _padded(nbytes)
    return out


def _to_device(x: np.ndarray, dtype, fresh: bool, arena: _HostArena | None = None) -> jax.Array:
  """x as a jax array of `dtype`, made with at most one copy.

  jax.device_put uses an aligned, C-contiguous host array in place on CPU (no copy; unlike
  jnp.asarray, it compiles nothing either), so an array that is already right and the caller's
  to give (`fresh`) is handed over as it is; any other is cast and laid out in one pass into a
  new aligned buffer (from `arena` if given). Never a view of someone else's memory (a
  memory-mapped file): jax would keep using it.
  """
  dtype = np.dtype(dtype)
  if not (fresh and x.dtype == dtype and x.flags.c_contiguous
          and x.ctypes.data % formats.ALIGN == 0):
    out = arena.empty(x.shape, dtype) if arena else formats.aligned_empty(x.shape, dtype)
    if x.ndim == 2 and not x.flags.c_contiguous:  # a transposed [out, in] matrix
      # A block of source rows at a time: one pass of the whole transpose strides through all of
      # memory for every row written, several times slower on a large matrix (the head).
      for j in range(0, x.shape[1], _TRANSPOSE_BLOCK):
        np.copyto(out[:, j:j + _TRANSPOSE_BLOCK], x[:, j:j + _TRANSPOSE_BLOCK], casting="unsafe")
    else:
      np.copyto(out, x, casting="unsafe")
    x = out
  return jax.device_put(x)


def _from_tensors(t: formats.Tensors, config: RWKVConfig | None, dtype: str | None,
                  on_config: Callable[[RWKVConfig], None] | None = None
                  ) -> tuple[model_lib.RWKV, RWKVConfig]:
  return _build(t.source, t.shapes, t.dtypes, t.get, config or t.config, dtype, t.names,
                t.fresh, on_config)


def load_pth(path: PathLike, config: RWKVConfig | None = None, dtype: str | None = "float32",
             on_config: Callable[[RWKVConfig], None] | None = None
             ) -> tuple[model_lib.RWKV, RWKVConfig]:
  """Loads an official BlinkDL RWKV-4 .pth file.

  Args:
    path: the .pth file (torch.save of the state dict, any float dtype).
    config: the expected shape; None infers it from the tensors. Its param_dtype is replaced by
      `dtype`.
    dtype: precision (one of DTYPES: "float32", "bfloat16", "float16", "int8"), or None for
      the file's own dtype (that of emb.weight). bf16/fp16 files upcast to float32 exactly.
    on_config: called with the config (as `load` returns it) once the file's header is checked,
      before its tensors are read: work that needs only the shapes can start there.

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
  return _from_tensors(formats.pth_tensors(path), config, dtype, on_config)


def load_hf(directory: PathLike, dtype: str | None = "float32",
            on_config: Callable[[RWKVConfig], None] | None = None
            ) -> tuple[model_lib.RWKV, RWKVConfig]:
  """Loads a HuggingFace RwkvForCausalLM directory.

  Args:
    directory: holds config.json and model.safetensors (or a sharded
      model.safetensors.index.json, or pytorch_model.bin).
    dtype: precision (one of DTYPES), or None for the checkpoint's own (that of the embedding).
    on_config: as for `load_pth`.

  Returns:
    (model, config); config.json's shape is checked against every tensor.

  Raises:
    CheckpointError: as load_pth, naming the HF tensor.
  """
  return _from_tensors(formats.hf_tensors(pathlib.Path(directory)), None, dtype, on_config)


def load(path: PathLike, dtype: str | None = "float32", adapters: PathLike | None = None, *,
         on_config: Callable[[RWKVConfig], None] | None = None
         ) -> tuple[model_lib.RWKV, RWKVConfig]:
  """Loads any supported checkpoint: an rwkv_jax export or training work directory (Orbax), an
  official .pth file, or an HF directory.

  Args:
    path: file or directory.
    dtype: the precision the model runs in, one of DTYPES ("float32", "bfloat16", "float16",
      "int8"; see `RWKVConfig.with_precision`), for every format; None keeps the checkpoint's
      own (for .pth / HF that of the embedding; an int8 export stays int8).
    adapters: a fine-tuning run's adapters directory (rwkv_jax/train/adapters.py) to put on
      the model, unmerged: LoRA beside the matrices, and with a learned state an
      `adapters.FineTuned` model that starts from it. They must have been trained on this very
      base (its digest is checked).
    on_config: called with the config once it is known and checked, before the weights are
      read (for .pth and HF; for an Orbax directory, once they are): work that needs only the
      shapes, such as compiling the programs that will run the model, can overlap the reading.

  Returns:
    (model, config), config.precision the precision it runs in.

  Raises:
    ValueError: dtype is not one of DTYPES.
    CheckpointError: the path is not a checkpoint or does not fit an RWKV-4 model; adapters of
      another base.
  """
  if adapters is not None:
    from rwkv_jax.train import adapters as adapters_lib  # pylint: disable=g-import-not-at-top
    model, config = load(path, dtype, on_config=on_config)
    return adapters_lib.load(model, adapters, adapters_lib.base_digest(path)), config
  check_dtype(dtype)
  path = pathlib.Path(path)
  if path.is_dir():
    checkpoint = _checkpoint()
    if checkpoint.is_rwkv_jax_dir(path):
      model, config = checkpoint.load_export(path, dtype=dtype)
      if on_config is not None:
        on_config(config)
      return model, config
  if path.is_dir() and (path / "config.json").is_file():
    return load_hf(path, dtype=dtype, on_config=on_config)
  if path.is_file():
    return load_pth(path, dtype=dtype, on_config=on_config)
  what = "does not exist" if not path.exists() else "is a directory without config.json"
  raise CheckpointError(
      f"{path} is not an RWKV-4 checkpoint ({what}): expected an official .pth file or a "
      f"HuggingFace directory with config.json (or an rwkv_jax export or work directory).")


def _checkpoint():
  """rwkv_jax.io.checkpoint, imported when an Orbax directory is involved: Orbax takes about a
  second to import, which reading a .pth or HF file does not need."""
  from rwkv_jax.io import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint


# ----------------------------------------------------------------------------------------------
# File -> file.

def convert_checkpoint(src: PathLike, dst: PathLike, fmt: str, dtype: str | None = None
                       ) -> RWKVConfig:
  """Converts any checkpoint `load` reads into an official .pth file, an HF directory or an export.

  .pth <-> HF is a renaming, done without a model: tensors are read memory-mapped where the format
  allows, renamed and cast; a tensor that needs no cast stays a view of the input, so a same-dtype
  conversion makes no second host copy. Orbax in or out goes through a model (`load`, then
  `formats.save_pth`, `formats.save_hf` or `checkpoint.export`).

  Args:
    src: official .pth file, HF directory, rwkv_jax export or training work directory.
    dst: destination .pth file ("pth") or directory ("hf", "orbax").
    fmt: "pth", "hf" or "orbax".
    dtype: precision of the output (one of DTYPES; "int8" only for "orbax", which makes an int8
      export), or None for the input's own (that of the embedding for .pth and HF).

  Returns:
    The model config of the checkpoint, param_dtype the output's dtype.

  Raises:
    ValueError: an unknown fmt or dtype, or int8 asked of .pth or HF.
    CheckpointError: `src` is not a checkpoint or does not fit an RWKV-4 model.
  """
  checkpoint = _checkpoint()
  writers = {"pth": formats.save_pth, "hf": formats.save_hf, "orbax": checkpoint.export}
  if fmt not in writers:
    raise ValueError(f"fmt={fmt!r}; use one of {sorted(writers)}.")
  check_dtype(dtype)
  if dtype == "int8" and fmt != "orbax":
    raise ValueError(f"dtype='int8' cannot be written as {fmt}: .pth and HF files hold "
                     f"floating-point tensors; write an Orbax export (fmt='orbax') instead.")
  src = pathlib.Path(src)
  if fmt == "orbax" or checkpoint.is_rwkv_jax_dir(src):
    model, config = load(src, dtype=dtype)  # parameters already in the output dtype
    writers[fmt](model, dst)
    return config
  if src.is_dir():
    t = formats.hf_tensors(src)
  elif src.is_file():
    t = formats.pth_tensors(src)
  else:
    raise CheckpointError(f"{src} does not exist.")
  config, entries, _, model_vars = _validate(t.source, t.shapes, t.dtypes, t.config, dtype,
                                             t.names)
  shapes = [tensor_names.official_shape(tuple(model_vars[e.path].get_value().shape), e.layout)
            for e in entries]
  target = formats.NP_DTYPES[config.param_dtype]

  def official(i):
    # Squeezed [c] time_mix vectors are accepted on input, [1, 1, c] written. Without a cast,
    # the array stays a view of the (memory-mapped) input.
    return t.get(entries[i].official).reshape(shapes[i]).astype(target, copy=False)

  if fmt == "hf":
    formats.write_hf(dst, config, config.param_dtype,
                     {e.hf: official(i) for i, e in enumerate(entries)})
  else:
    formats.write_pth(dst, {e.official: official(i) for i, e in enumerate(entries)})
  return config

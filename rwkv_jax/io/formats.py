"""The official .pth and HuggingFace RwkvForCausalLM files: read tensor by tensor, and written.

Readers return `Tensors`: a checkpoint's tensors by official name with their shapes and dtypes,
each read only when asked for, so a large checkpoint never needs two full host copies. Turning
them into a model is `weights.load`'s job. Writers take name -> array in the official layout and
hand it to torch.save or the safetensors package, each file replacing its destination atomically.

A .pth or pytorch_model.bin file written by torch.save (a ZIP archive: ARCHIVE/data.pkl pickles
the state dict, each tensor's bytes are a stored member ARCHIVE/data/KEY) is read without torch:
an unpickler that knows only the names a state dict of tensors uses (`_StateDictUnpickler`)
finds each tensor's member, offset, shape and dtype. The file is memory-mapped and each tensor
is a view of its bytes, which `weights.load` copies (cast and transposed) once into the model's
buffer; once copied, the tensor's pages are dropped from the process (they stay in the page
cache), so the map never holds more than one tensor resident beside the model. No torch import
(about 0.25 GB and seconds). Anything else (the legacy pre-ZIP format, other pickled objects,
big-endian data) goes to torch.load.

Checkpoints come from strangers, so every reader refuses a malformed file with one
`CheckpointError` line naming it: the unpickler above calls nothing it does not define, and
torch.load runs with weights_only=True (a pickled callable is refused, never called), a
safetensors header is checked against the file's size before the safetensors package maps it,
and an index file must name shards that are in its directory.

torch is imported lazily: only writing .pth files and reading what the unpickler above does not
know needs it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import mmap
import os
import pathlib
import pickle
import struct
import sys
import warnings
import zipfile
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
HF_BIN_INDEX = "pytorch_model.bin.index.json"


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
  """The state dict of a torch.save file: `TensorRef`s where the file is a plain state dict in
  the ZIP format (`read_state_dict_zip`), else torch tensors from torch.load."""
  sd = read_state_dict_zip(path)
  if sd is None:
    sd = _torch_load_with_torch(path)
  if isinstance(sd, dict) and "_strategy" in sd:
    raise CheckpointError(
        f"{path} was converted by the rwkv package for strategy {sd['_strategy']!r} (weights "
        f"transposed, rescaled or quantized); load the original official .pth instead.")
  if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]  # Lightning-style wrapper
  if not isinstance(sd, dict) or not all(_is_tensor(v) for v in sd.values()):
    raise CheckpointError(
        f"{path} is a PyTorch file but not a state dict of tensors (got {type(sd).__name__}). "
        f"Expected an official RWKV-4 .pth file.")
  return sd


def _is_tensor(x: Any) -> bool:
  torch = sys.modules.get("torch")  # a torch tensor means torch is imported
  return isinstance(x, TensorRef) or (torch is not None and isinstance(x, torch.Tensor))


def _torch_load_with_torch(path: pathlib.Path) -> Any:
  torch = import_torch()
  try:
    try:
      return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise
      # Files written with the legacy (pre-zip) serializer cannot be memory-mapped.
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a file that is not a checkpoint
    raise CheckpointError(
        f"{path} is not an RWKV-4 checkpoint: torch.load could not read it as a PyTorch "
        f"file ({_torch_failure(path, e)}). Expected an official .pth file.") from None


# torch's storage classes, as data.pkl names them, and the dtype of their elements.
_STORAGE_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16,
                   "BFloat16Storage": ml_dtypes.bfloat16, "DoubleStorage": np.float64,
                   "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                   "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
# A state dict's data.pkl names each tensor in a few dozen bytes; far above any real one.
_MAX_PICKLE_BYTES = 1 << 26
# jax uses a host buffer in place (no copy) when it is aligned to this many bytes.
ALIGN = 64


class _NotPlain(Exception):
  """The file holds more than a state dict of plain tensors: torch.load must read it."""


@dataclasses.dataclass(frozen=True)
class TensorRef:
  """A tensor of a torch.save ZIP file, not yet read: where its bytes are and what they hold."""

  path: pathlib.Path
  offset: int  # of its first byte in the file
  shape: tuple[int, ...]
  dtype: np.dtype

  def read(self) -> np.ndarray:
    """The tensor, read from the file into a new buffer that nothing else references."""
    out = aligned_empty(self.shape, self.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(self.path, "rb", buffering=0) as f:
      f.seek(self.offset)
      done = 0
      while done < len(view):
        n = f.readinto(view[done:])
        if not n:
          raise CheckpointError(f"{self.path} ends inside a tensor's data; the file is cut "
                                f"short.")
        done += n
    return out


class MappedFile:
  """A file mapped read-only, whose tensors (`TensorRef`s) are read as views of the map.

  `release` drops a tensor's pages from the process once it has been copied out: they stay in
  the page cache, and a view still reads them (faulted in again), but the process's resident
  memory no longer counts them.
  """

  def __init__(self, path: pathlib.Path):
    self.path = path
    with open(path, "rb") as f:
      self.size = os.fstat(f.fileno()).st_size
      self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None

  def view(self, ref: TensorRef) -> np.ndarray:
    """The tensor's bytes as a read-only array, without a copy."""
    count = math.prod(ref.shape)
    if ref.offset < 0 or ref.offset + count * ref.dtype.itemsize > self.size:
      # Never a view past the end of the file: reading it would kill the process (SIGBUS).
      raise CheckpointError(f"{self.path} ends inside a tensor's data; the file is cut short.")
    if not count:
      return np.empty(ref.shape, ref.dtype)
    return np.frombuffer(self._map, ref.dtype, count, ref.offset).reshape(ref.shape)

  def release(self, ref: TensorRef) -> None:
    """Drops the pages of `ref` from the process's resident memory."""
    nbytes = math.prod(ref.shape) * ref.dtype.itemsize
    if self._map is None or not nbytes or not hasattr(mmap, "MADV_DONTNEED"):
      return
    start = ref.offset - ref.offset % mmap.PAGESIZE
    try:
      self._map.madvise(mmap.MADV_DONTNEED, start, min(ref.offset + nbytes, self.size) - start)
    except (OSError, ValueError):  # only memory is at stake
      pass


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
  """An uninitialized C-contiguous array whose data is aligned as jax needs to use it in place."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + ALIGN, np.uint8)
  start = -raw.ctypes.data % ALIGN
  return raw[start:start + nbytes].view(dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class _Storage:
  name: str  # ARCHIVE/data/KEY
  dtype: np.dtype
  numel: int


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> tuple[_Storage, int, tuple]:
  """torch._utils._rebuild_tensor(_v2) for a C-contiguous tensor: (storage, offset, shape)."""
  del unused  # requires_grad, backward hooks, metadata: nothing a state dict's values need
  ints = lambda xs: isinstance(xs, tuple) and all(type(x) is int and x >= 0 for x in xs)
  if not (isinstance(storage, _Storage) and type(storage_offset) is int and ints(size)
          and ints(stride) and len(size) == len(stride)):
    raise _NotPlain("not a tensor of a storage")
  contiguous = [math.prod(size[i + 1:]) for i in range(len(size))]
  if any(n > 1 and s != c for n, s, c in zip(size, stride, contiguous)):
    raise _NotPlain("a strided view")
  if storage_offset < 0 or storage_offset + math.prod(size) > storage.numel:
    raise _NotPlain("a tensor outside its storage")
  return storage, storage_offset, tuple(size)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  del requires_grad, backward_hooks, unused
  return data


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles data.pkl knowing only dicts and tensors: any other global is refused, so nothing
  it does not define here is ever called."""

  _GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict,
              ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
              ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
              ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
              **{("torch", name): name for name in _STORAGE_DTYPES}}

  def __init__(self, file, archive: str):
    super().__init__(file)
    self._archive = archive
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    try:
      return self._GLOBALS[(module, name)]
    except KeyError:
      raise _NotPlain(f"{module}.{name}") from None

  def persistent_load(self, pid):
    # ("storage", storage class, key, device, number of elements)
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], str) and pid[1] in _STORAGE_DTYPES
            and isinstance(pid[2], str) and type(pid[4]) is int and pid[4] >= 0):
      raise _NotPlain("an unknown persistent id")
    name = f"{self._archive}/data/{pid[2]}"
    return self.storages.setdefault(
        name, _Storage(name, np.dtype(_STORAGE_DTYPES[pid[1]]), pid[4]))


def read_state_dict_zip(path: pathlib.Path) -> dict[str, Any] | None:
  """The state dict of a torch.save ZIP file, each tensor a `TensorRef`; None for a file this
  reader does not handle (torch.load then reads it, or says what is wrong with it).

  A value that is not a tensor (a Lightning wrapper's step count, a converted file's strategy
  string) is returned as it is, so the caller can tell such files apart.
  """
  try:
    with zipfile.ZipFile(path) as z:
      members = {info.filename: info for info in z.infolist()}
      pickles = [n for n in members if n.count("/") == 1 and n.endswith("/data.pkl")]
      if len(pickles) != 1 or members[pickles[0]].file_size > _MAX_PICKLE_BYTES:
        return None
      archive = pickles[0].split("/")[0]
      if f"{archive}/byteorder" in members and z.read(f"{archive}/byteorder") != b"little":
        return None
      with z.open(pickles[0]) as f:
        unpickler = _StateDictUnpickler(f, archive)
        sd = unpickler.load()
      offsets = {}
      for storage in unpickler.storages.values():
        info = members.get(storage.name)
        if (info is None or info.compress_type != zipfile.ZIP_STORED
            or info.file_size < storage.numel * storage.dtype.itemsize):
          return None
        offsets[storage.name] = _data_offset(path, info)
  except Exception:  # pylint: disable=broad-except  (a damaged or unusual file, or _NotPlain)
    return None  # torch.load reads what is unusual, or says what is wrong

  def value(x):
    if isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], _Storage):
      storage, first, shape = x
      return TensorRef(pathlib.Path(path), offsets[storage.name] + first * storage.dtype.itemsize,
                       shape, storage.dtype)
    if isinstance(x, dict):
      return {k: value(v) for k, v in x.items()}
    return x

  return value(sd) if isinstance(sd, dict) else None


def _data_offset(path: pathlib.Path, info: zipfile.ZipInfo) -> int:
  """Where a stored member's bytes start: after its local header, whose name and extra field
  (torch pads it to align the data) may differ in length from the central directory's."""
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    header = f.read(30)
  if len(header) != 30 or header[:4] != b"PK\x03\x04":
    raise zipfile.BadZipFile("no local file header")
  name_length, extra_length = struct.unpack("<HH", header[26:30])
  return info.header_offset + 30 + name_length + extra_length


def _torch_failure(path: pathlib.Path, e: Exception) -> str:
  """What torch.load's error `e` means for `path`, in a few words on one line."""
  text = str(e).strip()
  if "Weights only load failed" in text:
    # torch's advice (weights_only=False) would run arbitrary code; an official .pth is a
    # plain dict of tensors and never needs it.
    return "it pickles objects other than tensors, such as code to run, which are never loaded"
  # A .pth is a ZIP archive whose directory is at its end: a file cut short loses it.
  try:
    with open(path, "rb") as f:
      cut_short = f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(f)
  except OSError:
    cut_short = False
  if cut_short:
    return "a ZIP archive without its central directory: the file is cut short"
  first_line = text.splitlines()[0] if text else ""
  return f"{type(e).__name__}: {first_line}"[:200]


@dataclasses.dataclass
class Tensors:
  """A checkpoint's tensors by official name, read lazily; `get` releases what it returns."""

  source: str
  shapes: dict[str, tuple[int, ...]]
  dtypes: dict[str, str]
  get: Callable[[str], np.ndarray]
  names: dict[str, str]  # official name -> name as spelled in the source
  config: RWKVConfig | None = None  # from the source's own config, if it has one
  # `get` returns arrays that nothing else references (not views of a memory map or of another
  # library's tensors), so the caller may keep them, and jax may use them in place. Otherwise
  # they may be views of a memory map, whose pages the next call of `get` drops from resident
  # memory (a view still reads, faulting them in again): copy what is kept.
  fresh: bool = False


def _torch_tensors(source: str, sd: dict[str, Any], config: RWKVConfig | None = None,
                   rename: Callable[[str], str] = lambda n: n) -> Tensors:
  """Tensors of a state dict from `_torch_load` (values `TensorRef`s or torch tensors)."""
  names = {rename(k): k for k in sd}
  if len(names) != len(sd):
    raise CheckpointError(f"{source} holds the same tensor under two names.")
  # Moved out of the caller's dict, so that popping below really releases each tensor.
  sd = {rename(k): sd.pop(k) for k in list(sd)}
  shapes = {k: tuple(v.shape) for k, v in sd.items()}
  dtypes = {k: _dtype_name(v) for k, v in sd.items()}
  maps = {path: MappedFile(path)
          for path in {x.path for x in sd.values() if isinstance(x, TensorRef)}}
  last = []  # the TensorRef returned last, whose pages go when the next is asked for

  def get(name):
    if last:
      ref = last.pop()
      maps[ref.path].release(ref)
    x = sd.pop(name)  # drop our reference as soon as it is converted
    if isinstance(x, TensorRef):
      last.append(x)
      return maps[x.path].view(x)
    return torch_to_numpy(x)

  return Tensors(source, shapes, dtypes, get, names, config)


def _dtype_name(x) -> str:
  if isinstance(x, TensorRef):
    return x.dtype.name
  return str(x.dtype).removeprefix("torch.")


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
  """The tensors of an HF RwkvForCausalLM directory, with the shape its config.json gives.

  The tensors are those of model.safetensors or pytorch_model.bin, or of the shards that
  model.safetensors.index.json or pytorch_model.bin.index.json lists.
  """
  if not (directory / "config.json").is_file():
    raise CheckpointError(f"{directory} is not a HuggingFace RWKV directory: no config.json.")
  config = _config_from_hf(_read_hf_config(directory), directory)
  if (directory / HF_INDEX).is_file():
    return _safetensors_tensors(directory, config, _read_index(directory / HF_INDEX))
  if (directory / HF_WEIGHTS).is_file():
    return _safetensors_tensors(directory, config, None)
  if (directory / HF_BIN_INDEX).is_file():
    weight_map = _read_index(directory / HF_BIN_INDEX)
    sd = {}
    for shard, keys in _shards(weight_map).items():
      part = _torch_load(directory / shard)
      _check_shard(directory / HF_BIN_INDEX, shard, keys, part, sd)
      sd.update(part)
    return _torch_tensors(str(directory), sd, config, rename=tensor_names.hf_to_official_name)
  if (directory / HF_BIN).is_file():
    return _torch_tensors(str(directory), _torch_load(directory / HF_BIN), config,
                          rename=tensor_names.hf_to_official_name)
  raise CheckpointError(f"{directory} has config.json but no {HF_WEIGHTS}, {HF_INDEX}, "
                        f"{HF_BIN} or {HF_BIN_INDEX}.")


# An index file lists tensor names and shard file names; 64 MiB is far above any real one.
_MAX_INDEX_BYTES = 1 << 26


def _read_index(index: pathlib.Path) -> dict[str, str]:
  """The weight_map (tensor name -> shard file) of an HF index, its shards present beside it."""
  if index.stat().st_size > _MAX_INDEX_BYTES:
    raise CheckpointError(f"{index} has {index.stat().st_size} bytes, more than an index of "
                          f"shard names ever needs; it is not a HuggingFace index file.")
  try:
    weight_map = json.loads(index.read_bytes())["weight_map"]
  except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f"{index} is not a HuggingFace index file: it must be JSON with a "
                          f"'weight_map' of tensor name -> shard file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}).") from None
  if not isinstance(weight_map, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
    raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names.")
  for shard in sorted(set(weight_map.values())):
    if pathlib.PurePath(shard).name != shard or shard in (".", ".."):
      raise CheckpointError(f"{index} names the shard {shard!r}, which is not a file name in its "
                            f"directory; shards must lie beside the index.")
    if not (index.parent / shard).is_file():
      raise CheckpointError(f"{index} names the shard {shard}, which is missing from "
                            f"{index.parent}; download every shard the index lists.")
  return weight_map


def _shards(weight_map: dict[str, str]) -> dict[str, set[str]]:
  """shard file -> the tensor names the index places in it, shards in name order."""
  shards: dict[str, set[str]] = {}
  for key, shard in sorted(weight_map.items(), key=lambda kv: kv[1]):
    shards.setdefault(shard, set()).add(key)
  return shards


def _check_shard(index: pathlib.Path, shard: str, keys: set[str], held: Iterable[str],
                 seen: Iterable[str]) -> None:
  """Raises unless `shard` holds every tensor the index places in it, none held before."""
  held = set(held)
  if not keys <= held:
    raise CheckpointError(f"{index} places {sorted(keys - held)[:3]} in {shard}, which does not "
                          f"hold them; the shard belongs to another checkpoint or is damaged.")
  twice = sorted(held & set(seen))
  if twice:
    raise CheckpointError(f"{index.parent}: {twice[:3]} are held by {shard} and by another "
                          f"shard too; the directory mixes two checkpoints.")


def _safetensors_tensors(directory: pathlib.Path, config: RWKVConfig,
                         weight_map: dict[str, str] | None) -> Tensors:
  """The tensors of model.safetensors, or of the shards `weight_map` (from the index) names."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  shards = _shards(weight_map) if weight_map is not None else {HF_WEIGHTS: set()}
  where, shapes, dtypes, names = {}, {}, {}, {}
  for file, keys in shards.items():
    path = directory / file
    check_safetensors_header(path)
    try:
      h = safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own error types for a corrupt header
      raise CheckpointError(f"{path} is not a readable safetensors file: "
                            f"{type(e).__name__}: {e}") from None
    if weight_map is not None:
      _check_shard(directory / HF_INDEX, file, keys, h.keys(), names.values())
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
# Bytes per element of the safetensors dtypes; others are bounds-checked but not size-checked.
_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                         "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
                         "F8_E4M3": 1, "F8_E5M2": 1}
# The safetensors package's own limit on the JSON header.
_MAX_SAFETENSORS_HEADER = 100_000_000


def check_safetensors_header(path: pathlib.Path) -> None:
  """Checks a safetensors file's header against the file before anything maps it.

  The format is an 8-byte little-endian header length N, N bytes of JSON giving each tensor's
  dtype, shape and [begin, end) byte range in the data that follows, then the data. Nothing is
  allocated from what the header claims: its length is compared with the file's size before it
  is read, and every range must lie inside the data, match its shape and overlap no other.

  Raises:
    CheckpointError: naming the file and the first thing that does not fit.
  """
  bad = f"{path} is not a readable safetensors file"
  size = path.stat().st_size
  with open(path, "rb") as f:
    if size < 8:
      raise CheckpointError(f"{bad}: it has {size} bytes, fewer than the 8 of the header length.")
    n = int.from_bytes(f.read(8), "little")
    if n > size - 8 or n > _MAX_SAFETENSORS_HEADER:
      raise CheckpointError(f"{bad}: its header length field says {n} bytes, but the file has "
                            f"{size - 8} after it; the file is cut short or is not safetensors.")
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{bad}: its header is not JSON ({e}).") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{bad}: its header is a JSON {type(header).__name__}, not an object.")
  data_size = size - 8 - n
  ranges = []
  for key, entry in header.items():
    if key == "__metadata__":
      continue
    name = repr(key[:100])  # the header is the stranger's: keep the message one short line
    try:
      dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
      ok = (isinstance(dtype, str) and isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and type(begin) is int and type(end) is int and 0 <= begin <= end)
    except (TypeError, KeyError, ValueError):
      ok = False
    if not ok:
      raise CheckpointError(f"{bad}: the header's entry for {name} is not {{'dtype': str, "
                            f"'shape': [int >= 0, ...], 'data_offsets': [begin, end]}}.")
    if end > data_size:
      raise CheckpointError(f"{bad}: tensor {name} takes bytes [{begin}, {end}) of the data, "
                            f"which has only {data_size}; the file is cut short or damaged.")
    if dtype in _SAFETENSORS_ITEMSIZE:
      want = _SAFETENSORS_ITEMSIZE[dtype] * int(np.prod(shape, dtype=object))
      if end - begin != want:
        raise CheckpointError(f"{bad}: tensor {name} of dtype {dtype} and shape "
                              f"{str(shape)[:80]} needs {want} bytes, but its data_offsets give "
                              f"{end - begin}.")
    if end > begin:
      ranges.append((begin, end, name))
  ranges.sort()
  for (_, end_a, a), (begin_b, _, b) in zip(ranges, ranges[1:]):
    if begin_b < end_a:
      raise CheckpointError(f"{bad}: tensors {a} and {b} overlap (bytes [{begin_b}, "
                            f"{end_a}) belong to both).")


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

"""The prompt cache: the recurrent state after some tokens, in a file, to continue from later.

  state_file.save(path, saved)                  # atomically
  saved = state_file.load(path, config=config)  # StateFileError if damaged or from another shape
  state = state_file.fork(saved.state, 4)        # one sequence's state for a batch of 4

An RWKV-4 model's whole memory of the text so far is its recurrent state (five float32 vectors per
layer, `model.RWKVState`), so processing a long prompt once and saving the state is a prompt
cache: loading it and going on gives the tokens that processing the whole text in one go gives.

File format (version 1): a ZIP archive (stored, not compressed; each member has a CRC-32, so
damage is detected), readable by `numpy.load` as an .npz:
  header.json       {"format": "rwkv_jax.state", "version": 1, "n_layer", "n_embd", "dim_att",
                     "vocab_size", "batch", "tokens_consumed": [per sequence], "param_dtype"}
  att_x_prev.npy    float32 [n_layer, batch, n_embd]   (the rwkv package's att_xx)
  num.npy           float32 [n_layer, batch, dim_att]  (aa)
  den.npy           float32 [n_layer, batch, dim_att]  (bb)
  max_exp.npy       float32 [n_layer, batch, dim_att]  (pp)
  ffn_x_prev.npy    float32 [n_layer, batch, n_embd]   (ffn_xx)
  next_logits.npy   float32 [batch, vocab_size]: the model's scores for the token after the
                    last one consumed, so a loaded state can be sampled from without a new prompt
`state_convert.state_to_rwkv_package` turns one sequence of the state into the rwkv package's list.

Shapes: l = n_layer, b = batch, c = n_embd, a = dim_att, v = vocab.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax import files
from rwkv_jax import model as model_lib
from rwkv_jax.config import RWKVConfig
from rwkv_jax.io.tensor_names import CheckpointError

FORMAT, VERSION = "rwkv_jax.state", 1
_HEADER = "header.json"
_SHAPE_KEYS = ("n_layer", "n_embd", "dim_att", "vocab_size")
# header.json holds a few numbers and one count per sequence; 16 MiB is far above a real one.
_MAX_HEADER_BYTES = 1 << 24


class StateFileError(CheckpointError):
  """A state file that cannot be read, is damaged, or does not fit the model; names the file.

  A CheckpointError (so a ValueError) like every other reader's refusal of a file.
  """


@dataclasses.dataclass(frozen=True)
class SavedState:
  """A recurrent state with what it belongs to.

  Attributes:
    state: float32 RWKVState with fields [l, b, c] (or [l, b, a]).
    next_logits: float32 [b, v]: scores for the next token of each sequence.
    tokens_consumed: per sequence, how many tokens the state has seen.
    n_layer, n_embd, dim_att, vocab_size: the shape of the model that made it.
    param_dtype: that model's parameter dtype (informational; the state is float32 always).
  """

  state: model_lib.RWKVState
  next_logits: jax.Array | np.ndarray
  tokens_consumed: tuple[int, ...]
  n_layer: int
  n_embd: int
  dim_att: int
  vocab_size: int
  param_dtype: str = "float32"

  @classmethod
  def of(cls, config: RWKVConfig, state: model_lib.RWKVState, next_logits,
         tokens_consumed) -> "SavedState":
    """The state of a model with `config`; tokens_consumed is one count or one per sequence."""
    b = state.num.shape[1]
    counts = np.broadcast_to(np.asarray(tokens_consumed, np.int64), (b,))
    return cls(state, next_logits, tuple(int(n) for n in counts), config.n_layer, config.n_embd,
               config.dim_att, config.vocab_size, config.param_dtype)

  @property
  def batch(self) -> int:
    return int(self.state.num.shape[1])

  def shape_text(self) -> str:
    return ", ".join(f"{k}={getattr(self, k)}" for k in _SHAPE_KEYS)


def _expected_shapes(h: dict) -> dict[str, tuple[int, ...]]:
  l, b, c, a, v = h["n_layer"], h["batch"], h["n_embd"], h["dim_att"], h["vocab_size"]
  return {"att_x_prev": (l, b, c), "num": (l, b, a), "den": (l, b, a), "max_exp": (l, b, a),
          "ffn_x_prev": (l, b, c), "next_logits": (b, v)}


def save(path: str | os.PathLike, saved: SavedState) -> pathlib.Path:
  """Writes `saved` to `path` atomically (a killed writer leaves the old file or none).

  Returns:
    The path.
  """
  path = pathlib.Path(path)
  header = {"format": FORMAT, "version": VERSION, "batch": saved.batch,
            **{k: int(getattr(saved, k)) for k in _SHAPE_KEYS},
            "tokens_consumed": list(saved.tokens_consumed), "param_dtype": saved.param_dtype}
  arrays = dict(zip(model_lib.RWKVState._fields, saved.state))
  arrays["next_logits"] = saved.next_logits
  want = _expected_shapes(header)
  for name, x in arrays.items():
    if tuple(x.shape) != want[name]:
      raise ValueError(f"{name} has shape {tuple(x.shape)}; a state of {saved.shape_text()}, "
                       f"batch {saved.batch} has {want[name]}.")
  with files.atomic_path(path) as tmp:
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
      z.writestr(_HEADER, json.dumps(header, indent=1))
      for name, x in arrays.items():
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.asarray(x, np.float32), allow_pickle=False)
        z.writestr(f"{name}.npy", buf.getvalue())
  return path


def load(path: str | os.PathLike, config: RWKVConfig | None = None) -> SavedState:
  """Reads a state file, checking it completely before anything is returned.

  Args:
    path: a file written by `save`.
    config: the model it will continue; its n_layer, n_embd, dim_att and vocab_size must match.

  Returns:
    The SavedState, its arrays on the default device.

  Raises:
    StateFileError: the file is missing, truncated, damaged, not a state file, or made by a
      model of another shape. The message names the file.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise StateFileError(f"{path} does not exist or is not a file; pass a state file written "
                         f"with --save_state (rwkv_jax.io.state_file.save).")
  try:
    with zipfile.ZipFile(path) as z:
      header = _read_header(z, path)
      want = _expected_shapes(header)
      # Nothing the header claims is allocated before it is checked against the file's size.
      claimed = sum(4 * int(np.prod(shape, dtype=object)) for shape in want.values())
      if claimed > path.stat().st_size:
        raise StateFileError(
            f"{path}: its header describes {claimed} bytes of arrays ("
            f"{', '.join(f'{k}={header[k]}' for k in (*_SHAPE_KEYS, 'batch'))}) but the file "
            f"has {path.stat().st_size}; the header is wrong or the file is not a state file.")
      arrays = {name: _read_member_array(z, path, name, shape) for name, shape in want.items()}
  except StateFileError:
    raise
  except (zipfile.BadZipFile, KeyError, ValueError, TypeError, EOFError, OSError) as e:
    # Truncation, a failed CRC, a missing member, a malformed .npy.
    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    raise StateFileError(f"{path} is damaged, cut short or not a state file ({reason}); "
                         f"write it again with --save_state.") from None
  if not all(np.isfinite(x).all() for x in arrays.values()):
    raise StateFileError(f"{path} holds non-finite numbers; write it again with --save_state.")
  saved = SavedState(
      model_lib.RWKVState(*(jnp.asarray(arrays[f]) for f in model_lib.RWKVState._fields)),
      jnp.asarray(arrays["next_logits"]), tuple(int(n) for n in header["tokens_consumed"]),
      *(int(header[k]) for k in _SHAPE_KEYS), str(header.get("param_dtype", "float32")))
  if config is not None:
    check_fits(saved, config, path)
  return saved


def _read_header(z: zipfile.ZipFile, path: pathlib.Path) -> dict:
  """header.json, every field `load` uses checked for its type and range."""
  info = z.getinfo(_HEADER)
  if info.file_size > _MAX_HEADER_BYTES:
    raise StateFileError(f"{path}: its {_HEADER} claims {info.file_size} bytes, more than a state "
                         f"header ever holds; the file is not a state file.")
  try:
    header = json.loads(z.read(_HEADER))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise StateFileError(f"{path}: its {_HEADER} is not JSON ({e}); write it again with "
                         f"--save_state.") from None
  if not isinstance(header, dict) or header.get("format") != FORMAT:
    raise StateFileError(f"{path} is not an rwkv_jax state file (its header names no "
                         f"format {FORMAT!r}).")
  if header.get("version") != VERSION:
    raise StateFileError(f"{path} has state file version {header.get('version')!r}; this "
                         f"rwkv_jax reads version {VERSION}.")
  for key in (*_SHAPE_KEYS, "batch"):
    value = header.get(key)
    if type(value) is not int or value < 1:
      raise StateFileError(f"{path}: its header's {key} is {value!r}, not a whole number >= 1; "
                           f"the file is damaged. Write it again with --save_state.")
  counts = header.get("tokens_consumed")
  if (not isinstance(counts, list) or len(counts) != header["batch"]
      or not all(type(n) is int and n >= 0 for n in counts)):
    raise StateFileError(f"{path}: its header's tokens_consumed {str(counts)[:80]} does not give a "
                         f"count >= 0 for each of its {header['batch']} sequences.")
  return header


def _read_member_array(z: zipfile.ZipFile, path: pathlib.Path, name: str,
                       shape: tuple[int, ...]) -> np.ndarray:
  """The float32 array `name`.npy, its .npy header checked against `shape` before reading data."""
  member = f"{name}.npy"
  want = 4 * int(np.prod(shape))
  # A .npy header is at most 64 KiB (format 2.0); numpy's writer uses 128 bytes here.
  if z.getinfo(member).file_size > want + (1 << 16):
    raise StateFileError(f"{path}: {member} claims {z.getinfo(member).file_size} bytes, more "
                         f"than float32 {shape} needs; the file is damaged.")
  data = z.read(member)
  f = io.BytesIO(data)
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    got, fortran, dtype = np.lib.format.read_array_header_1_0(f)
  elif version == (2, 0):
    got, fortran, dtype = np.lib.format.read_array_header_2_0(f)
  else:
    raise StateFileError(f"{path}: {member} is .npy format {version}; expected 1.0 or 2.0.")
  if dtype != np.dtype("<f4") or fortran or tuple(got) != shape:
    raise StateFileError(f"{path}: {name} is {dtype} {tuple(got)}"
                         f"{' (Fortran order)' if fortran else ''}, expected float32 {shape} by "
                         f"its header.")
  if len(data) - f.tell() != want:
    raise StateFileError(f"{path}: {member} holds {len(data) - f.tell()} bytes of data, but "
                         f"float32 {shape} is {want}; the file is damaged.")
  return np.frombuffer(data, np.float32, offset=f.tell()).reshape(shape)


def check_fits(saved: SavedState, config: RWKVConfig, source: str | os.PathLike = "state"
               ) -> None:
  """Raises StateFileError unless `saved` was made by a model of `config`'s shape."""
  model_shape = ", ".join(f"{k}={getattr(config, k)}" for k in _SHAPE_KEYS)
  if saved.shape_text() != model_shape:
    raise StateFileError(f"{source} holds the state of a model with {saved.shape_text()}, but "
                         f"this model has {model_shape}; use a state saved with this model.")


def fork(state: model_lib.RWKVState, batch: int) -> model_lib.RWKVState:
  """One sequence's state repeated for `batch` sequences ([l, 1, ...] -> [l, batch, ...])."""
  if state.num.shape[1] != 1:
    raise ValueError(f"fork takes the state of one sequence; this one has "
                     f"{state.num.shape[1]}. Select one first (select(state, [i])).")
  return jax.tree.map(lambda x: jnp.repeat(x, batch, axis=1), state)


def select(state: model_lib.RWKVState, rows) -> model_lib.RWKVState:
  """The sequences `rows` (indices) of a batched state, in that order."""
  rows = jnp.asarray(rows, jnp.int32)
  return jax.tree.map(lambda x: jnp.take(x, rows, axis=1), state)

"""Fine-tuning a loaded RWKV-4: LoRA beside frozen matrices, a learned initial state, and files.

A fine-tuned model is the base plus adapters; the base never changes (DESIGN.md, "Adapters").

  model = adapters.apply(base, mode="lora+state", r=8, lora_alpha=16)   # graph surgery
  trainable, frozen = adapters.trainable_filter(mode), adapters.frozen_filter(mode)
  merged = adapters.merge_and_unload(model)          # an RWKV with W + A @ B * alpha / r
  adapters.save(model, DIR, base_digest=..., settings=...); adapters.load(base, DIR, digest)

LoRA (`LoRA`): a frozen `nnx.Linear` or `quant.Int8Dense` y = base(x) plus
x @ A @ B * (lora_alpha / r), A [in, r] drawn as peft does (uniform +-1/sqrt(in)), B [r, out]
zero, so an untrained adapter is the base exactly (op by op; one compiled program of the whole
adapted model may round some values differently from the base's, by XLA's fusion choices, within
float32 rounding). The factors are float32 whatever the base's
dtype (bfloat16, int8). `apply` replaces `model.blocks[i].att.key` and the like in place; the
targets are peft-style names: "att.key", "ffn.value", ..., "head", or a bare suffix ("key"
names att.key and ffn.key). lora_dropout drops inputs of the low-rank path while training; its
mask is drawn from a key hashed from the input itself, so no random state is carried and a
resumed run draws the same masks.

State tuning (`InitialState`): the model starts every sequence from a learned state in the
layout of `model.RWKVState` instead of the empty one. The token-shift vectors (att_x_prev,
ffn_x_prev) are free. The WKV part is learned in its unscaled form: a numerator N (free) and a
denominator D = |d| >= 0, so every value is a valid state (a non-negative weight on past values;
the readout's denominator stays > 0), written with the fixed exponent STATE_MAX_EXP:
(num, den, max_exp) = (N e^-STATE_MAX_EXP, D e^-STATE_MAX_EXP, STATE_MAX_EXP). Why not the
empty state's max_exp = -1e38: every gradient into num and den is multiplied by e^max_exp there,
so a state that starts empty could never learn its WKV part. With N = D = 0 the state is empty in
value, and while the keys stay above STATE_MAX_EXP (u + k >= -40 and k + w >= -40, true of any
sane model) every step of the WKV does the same float operations as from `empty_state`: learning
rate 0 reproduces the base bit for bit. The learned state is written as an ordinary state file
(`rwkv_jax.io.state_file`, tokens_consumed 0 and next_logits zero: give a prompt after it).

`FineTuned` wraps the base and the learned state (`model(tokens)` starts from it); LoRA lives
inside the base's own modules, so `model.base.blocks[i].att.key.base` is the frozen matrix.
Freezing is a filter (`trainable_filter`): the train step differentiates the trainable
parameters only, and the optimizer state covers them only (rwkv_jax/train/step.py, `frozen`).

Files (`save` / `load`): DIR/adapter_config.json (mode, r, lora_alpha, lora_dropout,
target_modules, the base's model config and digest) and DIR/adapter_model.npz (the trained
arrays by path); loading onto a base of another digest is refused in one line.

Shapes: l = n_layer, c = n_embd, a = dim_att, i = in, o = out, r = rank.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pathlib
import zipfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax import files
from rwkv_jax import model as model_lib
from rwkv_jax import quant
from rwkv_jax import sharding
from rwkv_jax.config import RWKVConfig
from rwkv_jax.io import state_file
from rwkv_jax.io.tensor_names import CheckpointError

Array = jax.Array

MODES = ("full", "lora", "state", "lora+state")
# Every matrix LoRA can sit beside, by its peft-style name (module path below a block, or "head").
TARGETS = ("att.key", "att.value", "att.receptance", "att.output", "ffn.key", "ffn.value",
           "ffn.receptance", "head")
DEFAULT_TARGETS = TARGETS[:-1]  # the time-mix and channel-mix matrices
STATE_MAX_EXP = -40.0  # the learned WKV state's fixed exponent (see the module docstring)
CONFIG_FILE, ARRAYS_FILE = "adapter_config.json", "adapter_model.npz"
FORMAT, VERSION = "rwkv_jax.adapters", 1


class BaseMismatchError(CheckpointError):
  """Adapters (or a fine-tuning run) of another base than the one given."""


class LoRAParam(nnx.Param):
  """A LoRA factor (trained; the matrix beside it is frozen)."""


class StateParam(nnx.Param):
  """A part of the learned initial state (trained)."""


def uses_lora(mode: str) -> bool:
  return mode in ("lora", "lora+state")


def uses_state(mode: str) -> bool:
  return mode in ("state", "lora+state")


def check_settings(mode: str, r: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                   target_modules: Sequence[str] = DEFAULT_TARGETS) -> tuple[str, ...]:
  """Raises ValueError (one line naming the setting) for a mode, rank, alpha, dropout or target
  that does not exist; returns the targets resolved to TARGETS names."""
  if mode not in MODES:
    raise ValueError(f"finetune.mode={mode!r} is not one of {', '.join(MODES)}.")
  if not uses_lora(mode):
    return ()
  if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1:
    raise ValueError(f"finetune.r={r!r} must be a whole number >= 1 (the LoRA rank).")
  if not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0:
    raise ValueError(f"finetune.lora_alpha={lora_alpha!r} must be a number > 0.")
  if not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
    raise ValueError(f"finetune.lora_dropout={lora_dropout!r} must be in [0, 1).")
  if isinstance(target_modules, str):
    target_modules = [t for t in target_modules.split(",") if t.strip()]
  resolved = []
  for name in target_modules:
    name = name.strip()
    hits = [t for t in TARGETS if t == name or t.endswith(f".{name}")]
    if not hits:
      raise ValueError(f"finetune.target_modules names {name!r}, which is no matrix of RWKV-4; "
                       f"use names of {', '.join(TARGETS)} (or a suffix such as 'key').")
    resolved += [t for t in hits if t not in resolved]
  if not resolved:
    raise ValueError("finetune.target_modules is empty; name at least one matrix, e.g. att.key.")
  return tuple(t for t in TARGETS if t in resolved)


def _in_out(dense) -> tuple[int, int]:
  if isinstance(dense, quant.Int8Dense):
    return tuple(dense.qkernel.get_value().shape)
  return tuple(dense.kernel.get_value().shape)


def _input_key(x: Array) -> Array:
  """A PRNG key that is a hash of x's bits: dropout masks with no random state to carry."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  weights = jnp.arange(1, x.size + 1, dtype=jnp.uint32).reshape(x.shape)
  return jax.random.key(jnp.sum(bits * weights, dtype=jnp.uint32))


class LoRA(nnx.Module):
  """base(x) + dropout(x) @ A @ B * (lora_alpha / r), beside a frozen bias-free matrix."""

  def __init__(self, base: nnx.Module, *, r: int, lora_alpha: float, lora_dropout: float = 0.0,
               rngs: nnx.Rngs):
    d_in, d_out = _in_out(base)
    self.base = base
    bound = 1.0 / math.sqrt(d_in)  # peft's kaiming_uniform_(a=sqrt(5)) on [r, in]
    self.lora_a = LoRAParam(jax.random.uniform(rngs.params(), (d_in, r), jnp.float32, -bound,
                                               bound))
    self.lora_b = LoRAParam(jnp.zeros((r, d_out), jnp.float32))
    self.scale = lora_alpha / r
    self.lora_dropout = lora_dropout
    self.deterministic = False  # model.eval() sets it: no dropout at inference

  def delta(self) -> Array:
    """A @ B * scale, float32 [i, o]: what merging adds to the kernel."""
    return (self.lora_a[...] @ self.lora_b[...]) * self.scale

  def __call__(self, x: Array) -> Array:
    y = self.base(x)
    h = x.astype(jnp.float32)
    if self.lora_dropout and not self.deterministic:
      keep = jax.random.bernoulli(_input_key(h), 1.0 - self.lora_dropout, h.shape)
      h = jnp.where(keep, h / (1.0 - self.lora_dropout), 0.0)
    return y + ((h @ self.lora_a[...]) @ self.lora_b[...] * self.scale).astype(y.dtype)


class InitialState(nnx.Module):
  """The learned initial state of every layer (see the module docstring for its form)."""

  def __init__(self, config: RWKVConfig):
    l, c, a = config.n_layer, config.n_embd, config.dim_att
    zeros = lambda *s: StateParam(jnp.zeros(s, jnp.float32))
    self.att_x_prev = zeros(l, 1, c)
    self.num = zeros(l, 1, a)  # N, the unscaled numerator
    self.den = zeros(l, 1, a)  # d; the unscaled denominator is |d|
    self.ffn_x_prev = zeros(l, 1, c)

  def __call__(self, batch: int = 1) -> model_lib.RWKVState:
    """The state for `batch` sequences, float32 [l, batch, ...]."""
    scale = jnp.float32(math.exp(-STATE_MAX_EXP))
    num = self.num[...] * scale
    state = model_lib.RWKVState(self.att_x_prev[...], num, jnp.abs(self.den[...]) * scale,
                                jnp.full(num.shape, STATE_MAX_EXP, jnp.float32),
                                self.ffn_x_prev[...])
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (x.shape[0], batch, *x.shape[2:])), state)


class FineTuned(nnx.Module):
  """The base (with any LoRA inside it) starting from a learned initial state.

  The calling convention of `model.RWKV`: `model(tokens, state=None)` and `model.step`, a None
  state meaning the learned one.
  """

  def __init__(self, base: model_lib.RWKV, initial: InitialState):
    self.base = base
    self.initial = initial
    self.config = base.config

  def initial_state(self, batch: int) -> model_lib.RWKVState:
    return self.initial(batch)

  def __call__(self, tokens_bt: Array, state: model_lib.RWKVState | None = None,
               **kwargs) -> tuple[Array, model_lib.RWKVState]:
    if state is None:
      state = self.initial(tokens_bt.shape[0])
    return self.base(tokens_bt, state, **kwargs)

  def step(self, token_b: Array, state: model_lib.RWKVState | None = None
           ) -> tuple[Array, model_lib.RWKVState]:
    logits, state = self(token_b[:, None], state, impl="scan")
    return logits[:, 0], state


def base_of(model: nnx.Module) -> model_lib.RWKV:
  return model.base if isinstance(model, FineTuned) else model


def _target_owner(model: model_lib.RWKV, target: str):
  """(module holding the matrix, attribute name) for each place `target` names."""
  if target == "head":
    return [(model, "head")]
  part, name = target.split(".")
  return [(getattr(block, part), name) for block in model.blocks]


def apply(base: model_lib.RWKV, mode: str, *, r: int = 8, lora_alpha: float = 16.0,
          lora_dropout: float = 0.0, target_modules: Sequence[str] = DEFAULT_TARGETS,
          seed: int = 0) -> nnx.Module:
  """Adds `mode`'s adapters to a loaded base: LoRA in place of its target matrices, and a
  `FineTuned` wrapper with the initial state. "full" returns the base itself.

  Raises:
    ValueError: a mode, rank, alpha, dropout or target that does not exist (one line).
  """
  targets = check_settings(mode, r, lora_alpha, lora_dropout, target_modules)
  rngs = nnx.Rngs(seed)
  for target in targets:
    for owner, name in _target_owner(base, target):
      dense = getattr(owner, name)
      if isinstance(dense, LoRA):
        raise ValueError(f"{target} already has a LoRA adapter; merge it first.")
      setattr(owner, name, LoRA(dense, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                rngs=rngs))
  if uses_state(mode):
    return FineTuned(base, InitialState(base.config))
  return base


def trainable_filter(mode: str):
  """The nnx filter of what `mode` trains."""
  check_settings(mode)
  return {"full": nnx.Param, "lora": LoRAParam, "state": StateParam,
          "lora+state": nnx.Any(LoRAParam, StateParam)}[mode]


def frozen_filter(mode: str):
  """The nnx filter of the parameters `mode` keeps fixed (nothing for "full")."""
  return nnx.All(nnx.Param, nnx.Not(trainable_filter(mode)))


def split(model: nnx.Module, mode: str):
  """(graphdef, trainable, frozen) states of a model with `mode`'s adapters."""
  return nnx.split(model, trainable_filter(mode), ...)


def rules(base_rules: sharding.Rules = sharding.PARAM_RULES) -> sharding.Rules:
  """Partition rules for an adapted model: a wrapped matrix is placed as the matrix it wraps,
  the LoRA factors and the learned state are replicated (they are small)."""
  wrapped = tuple((pattern.replace("/kernel$", "/base/kernel$")
                   .replace("/qkernel$", "/base/qkernel$").replace("/qscale$", "/base/qscale$"),
                   spec) for pattern, spec in base_rules if pattern.endswith(
                       ("/kernel$", "/qkernel$", "/qscale$")))
  small = ((r"(^|/)lora_(a|b)$", sharding.P()),
           (r"(^|/)initial/(att_x_prev|num|den|ffn_x_prev)$", sharding.P()))
  return (*wrapped, *small, *base_rules)


# ----------------------------------------------------------------------------------------------
# Merging.

def merge_and_unload(model: nnx.Module) -> model_lib.RWKV:
  """The base with every LoRA folded into its kernel (W + A @ B * scale, rounded once to the
  kernel's dtype) and unwrapped; a learned state is dropped (it is a state file: `learned_state`).

  The adapters of `model` are consumed: `model` itself is changed.

  Raises:
    ValueError: a LoRA beside an int8 matrix (load the base in a float dtype to merge).
  """
  base = base_of(model)
  for target in TARGETS:
    for owner, name in _target_owner(base, target):
      lora = getattr(owner, name)
      if not isinstance(lora, LoRA):
        continue
      if isinstance(lora.base, quant.Int8Dense):
        raise ValueError("LoRA beside an int8 matrix cannot be folded into it; load the base in "
                         "a float dtype (e.g. weights.load(base, dtype='float32', adapters=DIR)) "
                         "to merge.")
      kernel = lora.base.kernel
      kernel.set_value((kernel.get_value().astype(jnp.float32) + lora.delta()).astype(
          kernel.get_value().dtype))
      setattr(owner, name, lora.base)
  return base


def learned_state(model: FineTuned) -> state_file.SavedState:
  """The learned initial state as a state file's contents (one sequence, no token consumed)."""
  state = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), model.initial_state(1))
  return state_file.SavedState.of(model.config, state,
                                  jnp.zeros((1, model.config.vocab_size), jnp.float32), 0)


# ----------------------------------------------------------------------------------------------
# Files.

def base_digest(path: str | os.PathLike) -> str:
  """SHA-256 of the base's weights as stored: of the file, or for a directory (HF, an export, a
  work directory) of every file's relative path and SHA-256, in order."""
  path = pathlib.Path(path)
  if path.is_file():
    return files.sha256(path)
  digest = hashlib.sha256()
  for p in sorted(q for q in path.rglob("*") if q.is_file()):
    digest.update(f"{p.relative_to(path).as_posix()}\0{files.sha256(p)}\n".encode())
  return digest.hexdigest()


def trained_arrays(model: nnx.Module, mode: str) -> dict[str, np.ndarray]:
  """The arrays `mode` trains, by path ("blocks/0/att/key/lora_a", "initial/num", ...)."""
  _, trainable, _ = split(model, mode)
  return {sharding.path_name(path): np.asarray(var.get_value())
          for path, var in nnx.to_flat_state(trainable)}


def save(model: nnx.Module, directory: str | os.PathLike, *, settings: dict[str, Any],
         base_config: RWKVConfig, base_digest: str, base_path: str = "") -> pathlib.Path:
  """Writes the trained arrays and adapter_config.json into `directory` (each file atomically,
  the config last, so a directory with a config is complete).

  Args:
    model: the adapted model.
    directory: created if needed.
    settings: mode, r, lora_alpha, lora_dropout, target_modules.
    base_config: the base's model config (recorded; checked at load).
    base_digest: `base_digest(base file)`.
    base_path: where the base was read from (informational; the merge reads it back).
  """
  directory = pathlib.Path(directory)
  (directory / CONFIG_FILE).unlink(missing_ok=True)
  arrays = trained_arrays(model, settings["mode"])
  with files.atomic_path(directory / ARRAYS_FILE) as tmp:
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
      for name, x in arrays.items():
        buf = io.BytesIO()
        np.lib.format.write_array(buf, x, allow_pickle=False)
        z.writestr(f"{name}.npy", buf.getvalue())
  meta = {"format": FORMAT, "version": VERSION, **settings,
          "target_modules": list(settings.get("target_modules", ())),
          "base_model": base_config.to_dict(), "base_digest": base_digest,
          "base_path": str(base_path)}
  with files.atomic_write(directory / CONFIG_FILE, "w") as f:
    f.write(json.dumps(meta, indent=2))
  return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
  """adapter_config.json of an adapters directory; CheckpointError if there is none."""
  path = pathlib.Path(directory) / CONFIG_FILE
  try:
    meta = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{directory} holds no readable {CONFIG_FILE} ({type(e).__name__}); "
                          f"pass the adapters directory a fine-tuning run wrote.") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise CheckpointError(f"{path} is not an rwkv_jax adapters config.")
  return meta


def load(base: model_lib.RWKV, directory: str | os.PathLike, digest: str | None) -> nnx.Module:
  """The base with the adapters of `directory` on it (unmerged, in eval mode).

  Args:
    base: the loaded base (changed in place by the LoRA surgery).
    directory: written by `save`.
    digest: `base_digest` of the file the base was read from; None skips that check.

  Raises:
    CheckpointError: adapters of another base (config or digest), or a damaged directory.
  """
  meta = read_config(directory)
  saved = RWKVConfig.from_dict(meta["base_model"])
  if (saved.n_layer, saved.n_embd, saved.dim_att, saved.dim_ffn, saved.vocab_size) != (
      base.config.n_layer, base.config.n_embd, base.config.dim_att, base.config.dim_ffn,
      base.config.vocab_size):
    raise BaseMismatchError(
        f"{directory} holds adapters of another model (n_layer={saved.n_layer}, n_embd="
        f"{saved.n_embd}, vocab_size={saved.vocab_size}); load them onto the base they were "
        f"trained on ({meta.get('base_path') or '?'}).")
  if digest is not None and digest != meta["base_digest"]:
    raise BaseMismatchError(
        f"{directory} holds adapters of another base (its weights' digest is "
        f"{meta['base_digest'][:12]}..., this base's {digest[:12]}...); load them onto the base "
        f"they were trained on ({meta.get('base_path') or '?'}).")
  model = apply(base, meta["mode"], r=meta.get("r", 8), lora_alpha=meta.get("lora_alpha", 16.0),
                lora_dropout=meta.get("lora_dropout", 0.0),
                target_modules=meta.get("target_modules") or DEFAULT_TARGETS)
  try:
    with zipfile.ZipFile(pathlib.Path(directory) / ARRAYS_FILE) as z:
      arrays = {n[:-len(".npy")]: np.lib.format.read_array(io.BytesIO(z.read(n)),
                                                           allow_pickle=False)
                for n in z.namelist()}
  except (OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
    raise CheckpointError(f"{pathlib.Path(directory) / ARRAYS_FILE} is damaged or missing "
                          f"({type(e).__name__}: {e}).") from None
  _, trainable, _ = split(model, meta["mode"])
  flat = nnx.to_flat_state(trainable)
  want = {sharding.path_name(path): var for path, var in flat}
  if set(want) != set(arrays) or any(arrays[n].shape != v.get_value().shape
                                     for n, v in want.items()):
    raise CheckpointError(f"{directory}: {ARRAYS_FILE} does not hold the arrays its "
                          f"{CONFIG_FILE} describes; it is damaged or was edited.")
  nnx.update(model, nnx.from_flat_state(
      [(path, var.replace(jnp.asarray(arrays[sharding.path_name(path)], var.get_value().dtype)))
       for path, var in flat]))
  model.eval()
  return model

"""One table names every RWKV-4 parameter three ways: official .pth, HuggingFace and NNX path.

`mapping(n_layer)` lists them with their layout; `to_model` / `to_official` are the only places
where tensors are transposed or reshaped, and they serve every format in both directions. HF
tensors have exactly the official shapes, so HF differs from .pth by names only. `infer_config`
reads the model shape from tensor shapes.

`CheckpointError` is the one error of every checkpoint reader (.pth, HF, Orbax): a checkpoint
that cannot be read, or does not fit the requested model.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from rwkv_jax.config import RWKVConfig


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or used as asked; the message says which file and why."""


# ----------------------------------------------------------------------------------------------
# The mapping table.

PLAIN = "plain"  # same array everywhere
LINEAR = "linear"  # official/HF [out, in]  <->  nnx kernel [in, out]
MIX = "mix"  # official/HF [1, 1, c]  <->  nnx [c]


@dataclasses.dataclass(frozen=True)
class Entry:
  """One parameter: its official name, its HF name, its NNX state path and its layout."""

  official: str
  hf: str
  path: tuple[str | int, ...]
  layout: str


# (official, HF, NNX path, layout). Per-layer names are relative to blocks.{i}.
_GLOBAL = (
    ("emb.weight", "rwkv.embeddings.weight", ("emb", "embedding"), PLAIN),
    ("blocks.0.ln0.weight", "rwkv.blocks.0.pre_ln.weight", ("ln0", "scale"), PLAIN),
    ("blocks.0.ln0.bias", "rwkv.blocks.0.pre_ln.bias", ("ln0", "bias"), PLAIN),
    ("ln_out.weight", "rwkv.ln_out.weight", ("ln_out", "scale"), PLAIN),
    ("ln_out.bias", "rwkv.ln_out.bias", ("ln_out", "bias"), PLAIN),
    ("head.weight", "head.weight", ("head", "kernel"), LINEAR),
)
_PER_LAYER = (
    ("ln1.weight", "ln1.weight", ("ln1", "scale"), PLAIN),
    ("ln1.bias", "ln1.bias", ("ln1", "bias"), PLAIN),
    ("ln2.weight", "ln2.weight", ("ln2", "scale"), PLAIN),
    ("ln2.bias", "ln2.bias", ("ln2", "bias"), PLAIN),
    ("att.time_decay", "attention.time_decay", ("att", "time_decay"), PLAIN),
    ("att.time_first", "attention.time_first", ("att", "time_first"), PLAIN),
    ("att.time_mix_k", "attention.time_mix_key", ("att", "time_mix_k"), MIX),
    ("att.time_mix_v", "attention.time_mix_value", ("att", "time_mix_v"), MIX),
    ("att.time_mix_r", "attention.time_mix_receptance", ("att", "time_mix_r"), MIX),
    ("att.key.weight", "attention.key.weight", ("att", "key", "kernel"), LINEAR),
    ("att.value.weight", "attention.value.weight", ("att", "value", "kernel"), LINEAR),
    ("att.receptance.weight", "attention.receptance.weight", ("att", "receptance", "kernel"),
     LINEAR),
    ("att.output.weight", "attention.output.weight", ("att", "output", "kernel"), LINEAR),
    ("ffn.time_mix_k", "feed_forward.time_mix_key", ("ffn", "time_mix_k"), MIX),
    ("ffn.time_mix_r", "feed_forward.time_mix_receptance", ("ffn", "time_mix_r"), MIX),
    ("ffn.key.weight", "feed_forward.key.weight", ("ffn", "key", "kernel"), LINEAR),
    ("ffn.receptance.weight", "feed_forward.receptance.weight", ("ffn", "receptance", "kernel"),
     LINEAR),
    ("ffn.value.weight", "feed_forward.value.weight", ("ffn", "value", "kernel"), LINEAR),
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


def to_model(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == LINEAR:
    return x.T
  if layout == MIX:
    return x.reshape(-1)
  return x


def to_official(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == LINEAR:
    return np.ascontiguousarray(x.T)
  if layout == MIX:
    return x.reshape(1, 1, -1)
  return x


def official_shape(model_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  if layout == LINEAR:
    return tuple(reversed(model_shape))
  if layout == MIX:
    return (1, 1, *model_shape)
  return tuple(model_shape)


def shape_ok(got: tuple[int, ...], model_shape: tuple[int, ...], layout: str) -> bool:
  # time_mix is [1, 1, c] in every official file; [c] (squeezed by some converters) is accepted.
  if layout == MIX and got == tuple(model_shape):
    return True
  return got == official_shape(model_shape, layout)


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

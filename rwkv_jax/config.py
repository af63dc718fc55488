"""Model configuration: a frozen dataclass, the precisions a model runs in, and the paper's model
sizes (Table 2).

`RWKVConfig.with_precision(name)` is the one place that says what each precision name of
`PRECISIONS` means (`weights.load(path, dtype=name)` and every `--dtype` flag use it):
  float32, bfloat16   matrix products, activations and parameters in that type.
  float16             the same in float16, with the official rescale (`rescale_every=6`): the
                      residual is halved after every 6th block and the inputs of att.output and
                      ffn.value are divided by 2^(layer // 6) to match, so deep models stay in
                      float16's range. The final LayerNorm removes the scale: the logits are the
                      unscaled model's.
  int8                the block matrices as int8 with float scales (rwkv_jax/quant.py), dequantised
                      inside each matrix product; activations, the head and the other
                      parameters in float32 on CPU and bfloat16 on accelerators.
The WKV state and its accumulation are float32 in every precision.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax.numpy as jnp

PILE_VOCAB_SIZE = 50277  # GPT-NeoX 20B tokenizer, used by every RWKV-4 Pile model.

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PRECISIONS = ("float32", "bfloat16", "float16", "int8")
QUANTS = ("", "int8")
FLOAT16_RESCALE_EVERY = 6  # the rwkv package's RWKV_RESCALE_LAYER default for fp16


@dataclasses.dataclass(frozen=True)
class RWKVConfig:
  """Shape and precision of an RWKV-4 model.

  Attributes:
    n_layer: number of blocks (L).
    n_embd: width of the residual stream (D, called C in the WKV code).
    vocab_size: number of token ids (V).
    dim_att: width of the time-mixing projections; defaults to n_embd.
    dim_ffn: width of the channel-mixing hidden layer; defaults to 4 * n_embd.
    ctx_len: training context length. The model itself has no length limit.
    dtype: compute dtype of matrix products and activations ("float32" or "bfloat16").
      The WKV state and accumulation are float32 whatever this says.
    param_dtype: storage dtype of the parameters (master weights).
    quant: "" or "int8": the block matrices stored as int8 with float scales.
    rescale_every: 0, or halve the residual after every rescale_every-th block (float16).
  """

  n_layer: int
  n_embd: int
  vocab_size: int = PILE_VOCAB_SIZE
  dim_att: int = 0
  dim_ffn: int = 0
  ctx_len: int = 1024
  dtype: str = "float32"
  param_dtype: str = "float32"
  quant: str = ""
  rescale_every: int = 0

  def __post_init__(self):
    if not self.dim_att:
      object.__setattr__(self, "dim_att", self.n_embd)
    if not self.dim_ffn:
      object.__setattr__(self, "dim_ffn", 4 * self.n_embd)
    for name in ("n_layer", "n_embd", "vocab_size", "dim_att", "dim_ffn", "ctx_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"RWKVConfig.{name} must be a positive integer, got {value!r}.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(
            f"RWKVConfig.{name}={getattr(self, name)!r} is not one of {sorted(_DTYPES)}.")
    if self.quant not in QUANTS:
      raise ValueError(f"RWKVConfig.quant={self.quant!r} is not one of {QUANTS}.")
    if not isinstance(self.rescale_every, int) or self.rescale_every < 0:
      raise ValueError(f"RWKVConfig.rescale_every must be an integer >= 0 (0: never), got "
                       f"{self.rescale_every!r}.")

  def with_precision(self, name: str, platform: str | None = None) -> "RWKVConfig":
    """This shape in the precision `name` (one of PRECISIONS; see the module docstring).

    Args:
      name: "float32", "bfloat16", "float16" or "int8".
      platform: jax backend name deciding int8's activation dtype; default: jax's backend.
    """
    if name not in PRECISIONS:
      raise ValueError(f"dtype={name!r} is not one of {', '.join(PRECISIONS)}.")
    if name == "int8":
      if platform is None:
        import jax  # pylint: disable=g-import-not-at-top
        platform = jax.default_backend()
      act = "float32" if platform == "cpu" else "bfloat16"
      return self.replace(dtype=act, param_dtype=act, quant="int8", rescale_every=0)
    rescale = FLOAT16_RESCALE_EVERY if name == "float16" else 0
    return self.replace(dtype=name, param_dtype=name, quant="", rescale_every=rescale)

  @property
  def precision(self) -> str:
    """The PRECISIONS name of this config ("int8" for any quantised one); for a training
    config with float32 master weights and bfloat16 compute, that of the parameters."""
    return self.quant or self.param_dtype

  @property
  def compute_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  @property
  def storage_dtype(self) -> Any:
    return _DTYPES[self.param_dtype]

  def replace(self, **changes) -> "RWKVConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "RWKVConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f"Unknown RWKVConfig fields {sorted(unknown)}; known: {sorted(fields)}.")
    return cls(**d)

  def num_params(self) -> int:
    """Exact parameter count of this configuration (embedding and head counted separately)."""
    c, a, f, v, l = self.n_embd, self.dim_att, self.dim_ffn, self.vocab_size, self.n_layer
    per_layer = (
        3 * a * c + c * a  # att key/value/receptance, output
        + 2 * a + 3 * c  # time_decay, time_first, time_mix_{k,v,r}
        + f * c + c * f + c * c  # ffn key, value, receptance
        + 2 * c  # ffn time_mix_{k,r}
        + 4 * c  # ln1, ln2
    )
    return 2 * v * c + l * per_layer + 4 * c  # emb + head, blocks, ln0 + ln_out

  def flops_per_token(self) -> int:
    """Matrix-product FLOPs of one training token (forward + backward = 3x forward, 2 per MAC)."""
    c, a, f, v = self.n_embd, self.dim_att, self.dim_ffn, self.vocab_size
    macs = self.n_layer * (4 * a * c + 2 * f * c + c * c) + v * c
    return 6 * macs


class Preset(enum.Enum):
  """The RWKV-4 Pile model sizes of the paper (Table 2)."""

  RWKV4_169M = (12, 768)
  RWKV4_430M = (24, 1024)
  RWKV4_1B5 = (24, 2048)
  RWKV4_3B = (32, 2560)
  RWKV4_7B = (32, 4096)
  RWKV4_14B = (40, 5120)

  def config(self, **overrides) -> RWKVConfig:
    n_layer, n_embd = self.value
    return RWKVConfig(n_layer=n_layer, n_embd=n_embd, **overrides)


def paper_param_count(n_layer: int, n_embd: int, vocab_size: int = PILE_VOCAB_SIZE) -> int:
  """The paper's closed form (Section 4.1): 2VD + 13D^2 L + D(11L + 4)."""
  d, l, v = n_embd, n_layer, vocab_size
  return 2 * v * d + 13 * d * d * l + d * (11 * l + 4)

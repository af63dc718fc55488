"""A small GPT-style Transformer: the baseline the paper's claims are measured against.

Pre-LN decoder blocks (causal multi-head attention with rotary positions, a GELU MLP), tied to
nothing RWKV-specific, so that a comparison differs only in the model. It has RWKV's calling
convention, so the same trainer, losses and benchmarks run it:

  logits, cache = model(tokens [b, t], cache=None)   # parallel over t (training, prefill)
  logits, cache = model.step(token [b], cache)       # one token with a KV cache (generation)

The KV cache holds every past key and value (per layer [b, h, capacity, d], the layout the
attention reads without a transpose); `grow` copies it into a larger one. Generation therefore costs O(position) per token in time and memory, where RWKV's is
constant: the contrast of the paper's Figure 7.

Shapes: b = batch, t = time, s = cached positions, c = n_embd, h = n_head, d = head size,
f = dim_ffn, v = vocab, l = n_layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import PartitionSpec as P

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Model shape. dim_ffn=0 means 4.5 * n_embd: 12.9 c^2 per layer, RWKV-4's 13 c^2."""

  n_layer: int
  n_embd: int
  n_head: int
  vocab_size: int
  dim_ffn: int = 0
  ctx_len: int = 1024
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
      raise ValueError(f"n_embd={self.n_embd} must split into n_head={self.n_head} heads of an "
                       f"even size (rotary positions rotate pairs of channels).")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"TransformerConfig.{name}={getattr(self, name)!r} is not one of "
                         f"{sorted(_DTYPES)}.")
    if self.dim_ffn == 0:
      object.__setattr__(self, "dim_ffn", int(4.5 * self.n_embd))

  @property
  def head_size(self) -> int:
    return self.n_embd // self.n_head

  @classmethod
  def from_training(cls, config: ml_collections.ConfigDict,
                    head_size: int = 64) -> TransformerConfig:
    """The baseline for a training config's `model` section: RWKV's width, depth and vocabulary.

    Heads of `head_size` channels (GPT-2's 64), one head if the model is narrower than that.
    """
    m = config.model
    return cls(n_layer=m.n_layer, n_embd=m.n_embd, n_head=max(1, m.n_embd // head_size),
               vocab_size=m.vocab_size, ctx_len=m.ctx_len, dtype=m.dtype,
               param_dtype=m.param_dtype)

  def num_params(self) -> int:
    """Parameters: embedding, blocks (attention 4 c^2, MLP 2 c f, biases, norms), head."""
    c, f, v = self.n_embd, self.dim_ffn, self.vocab_size
    per_layer = 4 * c * c + 2 * c * f + (4 * c + f + c) + 4 * c
    return v * c + self.n_layer * per_layer + 2 * c + c * v


# Partition rules in the form of rwkv_jax/sharding.py's (regex on the '/'-joined key path, spec;
# first match wins), Megatron-style as RWKV's: projections into the block split their output
# over "tensor", projections out of it their input. The fused qkv kernel's 3c outputs are split
# as one axis, which need not fall on head boundaries; the compiler reshards where it does not.
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"(^|/)attn/qkv/kernel$", P("fsdp", "tensor")),  # [c, 3c]
    (r"(^|/)attn/qkv/bias$", P("tensor")),  # [3c]
    (r"(^|/)attn/out/kernel$", P("tensor", "fsdp")),  # [c, c]
    (r"(^|/)mlp/up/kernel$", P("fsdp", "tensor")),  # [c, f]
    (r"(^|/)mlp/up/bias$", P("tensor")),  # [f]
    (r"(^|/)mlp/down/kernel$", P("tensor", "fsdp")),  # [f, c]
    (r"(^|/)emb/embedding$", P("tensor", "fsdp")),  # [v, c]
    (r"(^|/)head/kernel$", P("fsdp", "tensor")),  # [c, v]
    # Small vectors, replicated on purpose.
    (r"(^|/)(attn/out|mlp/down)/bias$", P()),  # [c]
    (r"(^|/)ln(1|2|_out)/(scale|bias)$", P()),  # [c]
)


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> Transformer:
  """`train.train_and_evaluate`'s make_model hook: the baseline of the config's RWKV."""
  return Transformer(TransformerConfig.from_training(config), rngs=rngs,
                     remat=config.model.remat)


class KVCache(NamedTuple):
  """Past keys and values, one [b, h, s, d] array per layer, and the filled length (int32).

  One array per layer (not one [l, ...] array) so that a decode loop updates each in place.
  """

  k: tuple[Array, ...]
  v: tuple[Array, ...]
  length: Array

  @property
  def capacity(self) -> int:
    return self.k[0].shape[2]


def empty_cache(config: TransformerConfig, batch: int, capacity: int) -> KVCache:
  shape = (batch, config.n_head, capacity, config.head_size)
  dtype = _DTYPES[config.dtype]
  zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer))
  return KVCache(zeros(), zeros(), jnp.zeros((), jnp.int32))


def grow(cache: KVCache, capacity: int) -> KVCache:
  """The same cache with room for `capacity` positions (a copy, as a growing cache costs)."""
  extra = capacity - cache.capacity
  if extra < 0:
    raise ValueError(f"grow: {capacity=} is smaller than the cache's {cache.capacity}.")
  pad = lambda xs: tuple(jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0))) for x in xs)
  return KVCache(pad(cache.k), pad(cache.v), cache.length)


def _rotary(x_bthd: Array, positions_t: Array) -> Array:
  """Rotary position embedding (Su et al. 2021) over pairs of channels (first half, second half)."""
  d = x_bthd.shape[-1]
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angle_td = positions_t.astype(jnp.float32)[:, None] * inv_freq[None, :]
  cos, sin = jnp.cos(angle_td)[None, :, None, :], jnp.sin(angle_td)[None, :, None, :]
  x1, x2 = jnp.split(x_bthd.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.astype(x_bthd.dtype)


class Attention(nnx.Module):
  """Causal multi-head self-attention; reads and extends the layer's slice of the KV cache."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    c, dt, pdt = cfg.n_embd, _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    self.n_head, self.head_size = cfg.n_head, cfg.head_size
    self.qkv = nnx.Linear(c, 3 * c, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.out = nnx.Linear(c, c, dtype=dt, param_dtype=pdt, rngs=rngs,
                          kernel_init=nnx.initializers.normal(0.02 / (2 * cfg.n_layer) ** 0.5))

  def __call__(self, x_btc: Array, cache: KVCache, layer: int) -> tuple[Array, KVCache]:
    b, t, c = x_btc.shape
    start = cache.length
    q, k, v = jnp.split(self.qkv(x_btc).reshape(b, t, 3 * self.n_head, self.head_size), 3, axis=2)
    positions_t = start + jnp.arange(t)
    q, k = _rotary(q, positions_t), _rotary(k, positions_t)
    k_bhtd, v_bhtd = (x.transpose(0, 2, 1, 3) for x in (k, v))
    k_cache = jax.lax.dynamic_update_slice_in_dim(
        cache.k[layer], k_bhtd.astype(cache.k[layer].dtype), start, axis=2)
    v_cache = jax.lax.dynamic_update_slice_in_dim(
        cache.v[layer], v_bhtd.astype(cache.v[layer].dtype), start, axis=2)
    # Query at position p attends to cached positions <= p (the rest of the buffer is empty).
    visible_ts = jnp.arange(k_cache.shape[2])[None, :] <= positions_t[:, None]
    logits_bhts = jnp.einsum("bthd,bhsd->bhts", q, k_cache).astype(jnp.float32)
    logits_bhts = logits_bhts / jnp.sqrt(jnp.float32(self.head_size))
    logits_bhts = jnp.where(visible_ts[None, None], logits_bhts, -jnp.inf)
    probs = jax.nn.softmax(logits_bhts, axis=-1).astype(v_cache.dtype)
    y = jnp.einsum("bhts,bhsd->bthd", probs, v_cache).reshape(b, t, c)
    replace = lambda xs, x: xs[:layer] + (x,) + xs[layer + 1:]
    cache = KVCache(replace(cache.k, k_cache), replace(cache.v, v_cache), cache.length)
    return self.out(y.astype(x_btc.dtype)), cache


class MLP(nnx.Module):
  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    c, f, dt, pdt = cfg.n_embd, cfg.dim_ffn, _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    self.up = nnx.Linear(c, f, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.down = nnx.Linear(f, c, dtype=dt, param_dtype=pdt, rngs=rngs,
                           kernel_init=nnx.initializers.normal(0.02 / (2 * cfg.n_layer) ** 0.5))

  def __call__(self, x_btc: Array) -> Array:
    return self.down(jax.nn.gelu(self.up(x_btc)))


class Block(nnx.Module):
  """Pre-LN: x += attn(ln1(x)); x += mlp(ln2(x))."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    dt, pdt = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    self.ln1 = nnx.LayerNorm(cfg.n_embd, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.ln2 = nnx.LayerNorm(cfg.n_embd, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_btc: Array, cache: KVCache, layer: int) -> tuple[Array, KVCache]:
    h, cache = self.attn(self.ln1(x_btc), cache, layer)
    x_btc = x_btc + h
    return x_btc + self.mlp(self.ln2(x_btc)), cache


class Transformer(nnx.Module):
  """The GPT baseline with RWKV's calling convention (see the module docstring)."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, remat: bool = False):
    cfg = config
    dt, pdt = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    self.config = config
    self.remat = remat
    self.emb = nnx.Embed(cfg.vocab_size, cfg.n_embd, dtype=dt, param_dtype=pdt,
                         embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
    self.ln_out = nnx.LayerNorm(cfg.n_embd, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.head = nnx.Linear(cfg.n_embd, cfg.vocab_size, use_bias=False, dtype=dt,
                           param_dtype=pdt, rngs=rngs)

  def __call__(self, tokens_bt: Array, cache: KVCache | None = None, *, impl: Any = None,
               last_only: bool = False) -> tuple[Array, KVCache]:
    """Logits [b, t, v] (float32) and the cache extended by these tokens.

    Without a cache, one just large enough for `tokens_bt` is made (training, scoring). `impl`
    is accepted and ignored, for the trainer's RWKV calling convention.
    """
    del impl
    b, t = tokens_bt.shape
    if cache is None:
      cache = empty_cache(self.config, b, t)
    elif not isinstance(cache.length, jax.core.Tracer):
      if int(cache.length) + t > cache.capacity:
        raise ValueError(f"KV cache holds {cache.capacity} positions; {int(cache.length)} are "
                         f"used and {t} more were given. Make room with transformer.grow().")
    x = self.emb(tokens_bt)
    for i, block in enumerate(self.blocks):
      if self.remat:
        x, cache = nnx.remat(lambda blk, x, c, i=i: blk(x, c, i))(block, x, cache)
      else:
        x, cache = block(x, cache, i)
    if last_only:
      x = x[:, -1:]
    logits = self.head(self.ln_out(x)).astype(jnp.float32)
    return logits, cache._replace(length=cache.length + t)

  def step(self, token_b: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """One token per sequence with the KV cache: logits [b, v] and the extended cache."""
    logits, cache = self(token_b[:, None], cache)
    return logits[:, 0], cache

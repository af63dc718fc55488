"""RWKV-4 as Flax NNX modules (paper Section 3; eqs. 11-18).

One set of parameters runs two ways with the same code:
  logits, state = model(tokens [b, t], state)   # parallel over t: training, prefill
  logits, state = model.step(token [b], state)   # one token: generation
Both take and return the recurrent state, so any split of a sequence gives the same logits.

Parameter names follow the official checkpoints (`blocks.N.att.time_decay`, ...) so that the
mapping in `tensor_names.py` is a renaming plus the [out, in] -> [in, out] transpose of nnx.Linear.

Shapes: b = batch, t = time, c = n_embd, a = dim_att, f = dim_ffn, v = vocab, l = n_layer.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax import quant
from rwkv_jax import wkv as wkv_lib
from rwkv_jax.config import RWKVConfig

Array = jax.Array

INIT_SCHEMES = ("official", "paper")


class RWKVState(NamedTuple):
  """The recurrent state, float32. Per layer [b, c] (or [b, a]); for the model, [l, b, ...].

  The same five vectors per layer as the rwkv package (att_xx, aa, bb, pp, ffn_xx).
  """

  att_x_prev: Array  # last ln1 output seen by time mixing (token shift)
  num: Array  # WKV numerator / e^max_exp
  den: Array  # WKV denominator / e^max_exp
  max_exp: Array  # running max exponent
  ffn_x_prev: Array  # last ln2 output seen by channel mixing

  @property
  def wkv(self) -> wkv_lib.WKVState:
    return wkv_lib.WKVState(self.num, self.den, self.max_exp)


def empty_state(config: RWKVConfig, batch: int) -> RWKVState:
  """The state before any token: zeros, and max_exp "minus infinity"."""
  l, c, a = config.n_layer, config.n_embd, config.dim_att
  zeros = lambda *s: jnp.zeros(s, jnp.float32)
  return RWKVState(zeros(l, batch, c), zeros(l, batch, a), zeros(l, batch, a),
                   jnp.full((l, batch, a), wkv_lib.EMPTY_MAX_EXP, jnp.float32),
                   zeros(l, batch, c))


def _token_shift(x_btc: Array, x_prev_bc: Array) -> Array:
  """x shifted one step back in time, with the previous chunk's last token in front."""
  return jnp.concatenate([x_prev_bc[:, None, :].astype(x_btc.dtype), x_btc[:, :-1]], axis=1)


def _last(x_btc: Array, lengths_b: Array | None) -> Array:
  """x at each row's last real position (t - 1, or lengths[b] - 1), as float32 [b, c]."""
  if lengths_b is None:
    return x_btc[:, -1].astype(jnp.float32)
  idx = (lengths_b.astype(jnp.int32) - 1)[:, None, None]
  return jnp.take_along_axis(x_btc, idx, axis=1)[:, 0].astype(jnp.float32)


def _mix(x, xx, mu):
  return x * mu + xx * (1 - mu)


def _channel_ramp(c: int) -> np.ndarray:
  return np.arange(c, dtype=np.float64) / c  # i / C, as in the official trainer and App. E


def _dense(d_in, d_out, cfg: RWKVConfig, *, scale: float, rngs: nnx.Rngs
           ) -> nnx.Linear | quant.Int8Dense:
  """A bias-free linear layer, kernel [in, out] (the official weight is [out, in]); int8 when
  the config says so (every matrix but the embedding, as the rwkv package's int8; see
  quant.py)."""
  if scale == 0:
    init = nnx.initializers.zeros_init()
  else:
    # Official: torch orthogonal_ on [out, in] with gain sqrt(out / in) when out > in.
    gain = math.sqrt(d_out / d_in) if d_out > d_in else 1.0
    orthogonal = nnx.initializers.orthogonal(scale=gain * scale)
    # In float32 whatever the storage: the QR behind it has no float16 kernel on CPU.
    init = lambda key, shape, dtype: orthogonal(key, shape, jnp.float32).astype(dtype)
  if cfg.quant == "int8":
    return quant.Int8Dense(d_in, d_out, kernel_init=init, dtype=cfg.compute_dtype, rngs=rngs)
  return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init, dtype=cfg.compute_dtype,
                    param_dtype=cfg.storage_dtype, rngs=rngs)


def _rescale(cfg: RWKVConfig, layer_id: int) -> float:
  """1 / 2^(layer // rescale_every): the official float16 rescale of att.output and ffn.value.

  Applied to their inputs rather than to the stored weights: a power of two commutes exactly with
  the product, and the parameters stay the checkpoint's, so saving needs nothing undone.
  """
  return 0.5 ** (layer_id // cfg.rescale_every) if cfg.rescale_every else 1.0


def _scaled(x, factor: float):
  return x if factor == 1.0 else x * jnp.asarray(factor, x.dtype)


def _layer_norm(c: int, cfg: RWKVConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # torch's eps and two-pass variance, for bit-level parity with the reference implementations.
  return nnx.LayerNorm(c, epsilon=1e-5, use_fast_variance=False, dtype=cfg.compute_dtype,
                       param_dtype=cfg.storage_dtype, rngs=rngs)


class TimeMix(nnx.Module):
  """Time mixing (eqs. 11-17): receptance-gated WKV over token-shifted projections."""

  def __init__(self, cfg: RWKVConfig, layer_id: int, *, init: str, rngs: nnx.Rngs):
    c, a, l = cfg.n_embd, cfg.dim_att, cfg.n_layer
    ratio_0_to_1 = layer_id / max(l - 1, 1)
    ratio_1_to_0 = 1.0 - layer_id / l
    ramp = _channel_ramp(c)
    h = np.arange(a, dtype=np.float64) / max(a - 1, 1)
    param = lambda x: nnx.Param(jnp.asarray(x, cfg.storage_dtype))
    self.time_decay = param(-5 + 8 * h ** (0.7 + 1.3 * ratio_0_to_1))
    self.time_first = param(math.log(0.3) + 0.5 * ((np.arange(a) + 1) % 3 - 1))
    self.time_mix_k = param(ramp ** ratio_1_to_0)
    self.time_mix_v = param(ramp ** ratio_1_to_0 + 0.3 * ratio_0_to_1)
    if init == "official":
      self.time_mix_r = param(ramp ** (0.5 * ratio_1_to_0))
    else:  # Appendix E writes mu_r = 0.5 (i/C)^(1 - l/L).
      self.time_mix_r = param(0.5 * ramp ** ratio_1_to_0)
    self.key = _dense(c, a, cfg, scale=0, rngs=rngs)
    self.value = _dense(c, a, cfg, scale=1, rngs=rngs)
    self.receptance = _dense(c, a, cfg, scale=0, rngs=rngs)
    self.output = _dense(a, c, cfg, scale=0, rngs=rngs)
    self.rescale = _rescale(cfg, layer_id)

  def __call__(self, x_btc, x_prev_bc, state: wkv_lib.WKVState, impl: str, lengths_b=None):
    xx = _token_shift(x_btc, x_prev_bc)
    k = self.key(_mix(x_btc, xx, self.time_mix_k[...].astype(x_btc.dtype)))
    v = self.value(_mix(x_btc, xx, self.time_mix_v[...].astype(x_btc.dtype)))
    r = self.receptance(_mix(x_btc, xx, self.time_mix_r[...].astype(x_btc.dtype)))
    w = jnp.exp(self.time_decay[...].astype(jnp.float32))
    y, state_out = wkv_lib.wkv(w, self.time_first[...].astype(jnp.float32), k, v, state,
                               impl=impl)
    if lengths_b is not None:
      # y is causal, so only the state must stop at each row's end.
      state_out = wkv_lib.wkv_state_after(w, k, v, state, lengths_b)
    out = self.output(_scaled(jax.nn.sigmoid(r) * y.astype(r.dtype), self.rescale))
    return out, _last(x_btc, lengths_b), state_out


class ChannelMix(nnx.Module):
  """Channel mixing (eq. 18): a receptance-gated squared-ReLU MLP over token-shifted inputs."""

  def __init__(self, cfg: RWKVConfig, layer_id: int, *, init: str, rngs: nnx.Rngs):
    del init  # identical in both schemes
    c, f = cfg.n_embd, cfg.dim_ffn
    ratio_1_to_0 = 1.0 - layer_id / cfg.n_layer
    ramp = _channel_ramp(c)
    self.time_mix_k = nnx.Param(jnp.asarray(ramp ** ratio_1_to_0, cfg.storage_dtype))
    self.time_mix_r = nnx.Param(jnp.asarray(ramp ** ratio_1_to_0, cfg.storage_dtype))
    self.key = _dense(c, f, cfg, scale=1, rngs=rngs)
    self.receptance = _dense(c, c, cfg, scale=0, rngs=rngs)
    self.value = _dense(f, c, cfg, scale=0, rngs=rngs)
    self.rescale = _rescale(cfg, layer_id)

  def __call__(self, x_btc, x_prev_bc, lengths_b=None):
    xx = _token_shift(x_btc, x_prev_bc)
    k = self.key(_mix(x_btc, xx, self.time_mix_k[...].astype(x_btc.dtype)))
    r = self.receptance(_mix(x_btc, xx, self.time_mix_r[...].astype(x_btc.dtype)))
    out = jax.nn.sigmoid(r) * self.value(_scaled(jnp.square(jax.nn.relu(k)), self.rescale))
    return out, _last(x_btc, lengths_b)


class Block(nnx.Module):
  """Pre-LN residual block: x += att(ln1(x)); x += ffn(ln2(x))."""

  def __init__(self, cfg: RWKVConfig, layer_id: int, *, init: str, rngs: nnx.Rngs):
    self.ln1 = _layer_norm(cfg.n_embd, cfg, rngs)
    self.ln2 = _layer_norm(cfg.n_embd, cfg, rngs)
    self.att = TimeMix(cfg, layer_id, init=init, rngs=rngs)
    self.ffn = ChannelMix(cfg, layer_id, init=init, rngs=rngs)

  def __call__(self, x_btc, state: RWKVState, impl: str, lengths_b=None):
    h, att_x, wkv_state = self.att(self.ln1(x_btc), state.att_x_prev, state.wkv, impl, lengths_b)
    x_btc = x_btc + h
    h, ffn_x = self.ffn(self.ln2(x_btc), state.ffn_x_prev, lengths_b)
    return x_btc + h, RWKVState(att_x, *wkv_state, ffn_x)


class RWKV(nnx.Module):
  """The RWKV-4 language model.

  Args:
    config: model shape and dtypes.
    rngs: random streams for initialization.
    init: "official" (BlinkDL's v4neo trainer) or "paper" (Appendix E as written). They differ
      in the embedding scale (U(+-emb_scale) with the trainer's lr_init vs U(+-1e-4)) and in the
      receptance token-shift mix mu_r ((i/C)^(0.5 (1 - l/L)) vs 0.5 (i/C)^(1 - l/L)).
    emb_scale: half-width of the uniform embedding init for init="official"; the trainer uses its
      initial learning rate.
    remat: rematerialize each block in the backward pass (saves activation memory).
  """

  def __init__(self, config: RWKVConfig, *, rngs: nnx.Rngs, init: str = "official",
               emb_scale: float = 6e-4, remat: bool = False):
    if init not in INIT_SCHEMES:
      raise ValueError(f"init={init!r} is not one of {INIT_SCHEMES}.")
    cfg = config
    self.config = config
    self.remat = remat
    scale = emb_scale if init == "official" else 1e-4
    self.emb = nnx.Embed(cfg.vocab_size, cfg.n_embd, dtype=cfg.compute_dtype,
                         param_dtype=cfg.storage_dtype,
                         embedding_init=nnx.initializers.uniform(2 * scale), rngs=rngs)
    # nnx's uniform init samples [0, 2*scale); centre it like torch's uniform_(-scale, scale).
    self.emb.embedding[...] = self.emb.embedding[...] - jnp.asarray(scale, cfg.storage_dtype)
    self.ln0 = _layer_norm(cfg.n_embd, cfg, rngs)
    self.blocks = nnx.List([Block(cfg, i, init=init, rngs=rngs) for i in range(cfg.n_layer)])
    self.ln_out = _layer_norm(cfg.n_embd, cfg, rngs)
    self.head = _dense(cfg.n_embd, cfg.vocab_size, cfg, scale=0.5, rngs=rngs)

  def __call__(self, tokens_bt: Array, state: RWKVState | None = None, *, impl: str = "auto",
               last_only: bool = False, lengths: Array | None = None,
               loop_layers: bool = False) -> tuple[Array, RWKVState]:
    """Logits [b, t, v] (float32) for every position, and the state after the last token.

    With last_only=True the head runs on the last position only (logits [b, 1, v]): prefill
    needs nothing else, and the head is the largest matrix product at long prompts.

    lengths (int [b], 1 <= lengths[b] <= t, may be traced) runs a batch of prompts padded to a
    common t: row b's state is the state after its first lengths[b] tokens (padding never reaches
    it), its logits at positions < lengths[b] are as usual (later ones are meaningless), and
    last_only gives the logits at position lengths[b] - 1.

    loop_layers=True runs the blocks as one loop in the compiled program instead of one copy of
    the block per layer (see `_looped_blocks`): the same results, a program that compiles about
    3x faster, and a copy of each block's weights per call. For inference: differentiating the
    loop carries every layer's gradients through every step. Blocks that differ in structure
    (float16's per-layer rescale) run unrolled whatever it says.
    """
    check_tokens(tokens_bt, self.config.vocab_size)
    check_lengths(lengths, tokens_bt.shape)
    b = tokens_bt.shape[0]
    if state is None:
      state = empty_state(self.config, b)
    x = self.ln0(self.emb(tokens_bt))
    looped = self._looped_blocks(x, state, impl, lengths) if loop_layers else None
    if looped is not None:
      x, new_state = looped
    else:
      x, new_state = self._unrolled_blocks(x, state, impl, lengths)
    if last_only:
      x = x[:, -1:] if lengths is None else _last(x, lengths)[:, None].astype(x.dtype)
    logits = self.head(self.ln_out(x)).astype(jnp.float32)
    return logits, new_state

  def _unrolled_blocks(self, x, state: RWKVState, impl: str, lengths) -> tuple[Array, RWKVState]:
    new_states = []
    for i, block in enumerate(self.blocks):
      layer_state = RWKVState(*(s[i] for s in state))
      if self.remat:
        x, layer_state = nnx.remat(lambda blk, x, s, n: blk(x, s, impl, n))(
            block, x, layer_state, lengths)
      else:
        x, layer_state = block(x, layer_state, impl, lengths)
      if self.config.rescale_every and (i + 1) % self.config.rescale_every == 0:
        x = x / 2  # float16: keeps the residual in range; see _rescale
      new_states.append(layer_state)
    return x, RWKVState(*(jnp.stack(s) for s in zip(*new_states)))

  def _looped_blocks(self, x, state: RWKVState, impl: str, lengths
                     ) -> tuple[Array, RWKVState] | None:
    """The blocks as `lax.scan` over layers, or None when they differ in structure.

    The parameters stay one array per layer (checkpoints, sharding rules and adapters see the
    usual tree): step i of the loop takes layer i's with `lax.switch`, which copies them (a
    dynamic slice of weights stacked in advance would copy them too on CPU, where a matrix
    product needs its operand whole, and would keep a second copy of the model). XLA then
    compiles one block instead of n_layer: 0.7 s instead of 2.0 s for the 128-token prefill
    chunk of a 169M model on 2 CPU cores, which then runs in 104 ms instead of 83-98 ms.
    """
    graphdefs, params = zip(*(nnx.split(block) for block in self.blocks))
    if any(g != graphdefs[0] for g in graphdefs) or self.config.rescale_every:
      return None
    branches = [lambda p=p: p for p in params]

    def layer(x, i_and_state):
      i, layer_state = i_and_state
      block = nnx.merge(graphdefs[0], jax.lax.switch(i, branches))
      return block(x, RWKVState(*layer_state), impl, lengths)

    return jax.lax.scan(layer, x, (jnp.arange(len(params)), state))

  def step(self, token_b: Array, state: RWKVState | None = None) -> tuple[Array, RWKVState]:
    """One token per sequence: logits [b, v] and the next state (the RNN form)."""
    logits, state = self(token_b[:, None], state, impl="scan")
    return logits[:, 0], state


class _ShapeOnlyKeys:
  """Stands in for nnx.Rngs where only shapes are wanted: every initializer gets the same key and
  no draw is counted. Counting them on a traced nnx.Rngs costs more than the rest of the trace
  (each count update asks the tracer for a sharding it has not got, and the error that answers
  walks the whole trace): 1 s of a 169M model's 1.2 s on 2 cores."""

  def params(self) -> Array:
    return jax.random.key(0)


def abstract_model(config: RWKVConfig) -> RWKV:
  """The model's structure with shape-only parameters (jax.ShapeDtypeStruct); nothing allocated.

  The target that checkpoint readers fill; parameters have `config.param_dtype`.
  """
  try:
    return nnx.eval_shape(lambda: RWKV(config, rngs=_ShapeOnlyKeys()))
  except (AttributeError, TypeError):  # a Flax whose modules ask more of their rngs
    return nnx.eval_shape(lambda: RWKV(config, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=8)
def abstract_split(config: RWKVConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """`nnx.split(abstract_model(config))`, made once per config and shared: read it, never change
  it. A runner's weight loader and the programs it compiles meanwhile on another thread both need
  it (0.1-0.3 s each at 169M)."""
  return nnx.split(abstract_model(config))


def check_lengths(lengths, tokens_shape) -> None:
  """Raises ValueError unless lengths is None or int [b] within [1, t] (values checked when
  concrete)."""
  if lengths is None:
    return
  b, t = tokens_shape
  shape = getattr(lengths, "shape", None)
  if shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be an integer array of shape ({b},), one per row of tokens; "
                     f"got shape {shape}, dtype {getattr(lengths, 'dtype', None)}.")
  if isinstance(lengths, jax.core.Tracer):
    return
  lengths = np.asarray(lengths)
  if lengths.min() < 1 or lengths.max() > t:
    raise ValueError(f"lengths must be in [1, {t}] (the tokens' time axis); got "
                     f"{lengths.tolist()[:8]}.")


def check_tokens(tokens, vocab_size: int) -> None:
  """Raises ValueError for a malformed token array; checks values when they are concrete."""
  shape = getattr(tokens, "shape", None)
  if shape is None or len(shape) != 2:
    raise ValueError(f"tokens must be a [batch, time] integer array; got shape {shape}.")
  if shape[0] == 0 or shape[1] == 0:
    raise ValueError(f"tokens is empty (shape {tuple(shape)}); give at least one token.")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integers; got dtype {tokens.dtype}.")
  if isinstance(tokens, jax.core.Tracer):
    return
  tokens = np.asarray(tokens)
  lo, hi = tokens.min(), tokens.max()
  if lo < 0 or hi >= vocab_size:
    bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
    raise ValueError(f"token ids must be in [0, {vocab_size}); found {bad[:5].tolist()} "
                     f"outside the vocabulary of this model.")

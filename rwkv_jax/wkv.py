"""The WKV operator of RWKV-4 (paper eq. 16, numerically stable form of Appendix D).

For one channel, with per-step decay w > 0 and bonus u:

    wkv_t = (sum_{i<t} e^{-(t-1-i)w + k_i} v_i + e^{u + k_t} v_t)
          / (sum_{i<t} e^{-(t-1-i)w + k_i}     + e^{u + k_t})

The running sums are kept as a state (num, den, max_exp): the true numerator is
num * e^{max_exp} and the true denominator den * e^{max_exp}, so nothing overflows for any
k or any length. Every implementation takes and returns this state, which lets a sequence be
cut anywhere (chunked prefill, truncated BPTT, token-by-token generation) with identical
results.

All implementations here share one piece of arithmetic, `merge`, which adds two scaled sums in
log space. The sequential scan applies it once per token; the associative scan uses it in
`combine`, the monoid combine of segments; kernels in `kernels/` (the package
`rwkv_jax_kernels`) use the same two public functions and the dispatcher below, nothing else.

Shapes: b = batch, t = time, c = channels.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from rwkv_jax import sharding

Array = jax.Array

# "Nothing seen yet" for max_exp. Finite, unlike -inf, so that exp(max_exp - max_exp) stays 1
# and gradients stay finite; the rwkv package uses -1e30, the official CUDA kernel -1e38.
EMPTY_MAX_EXP = -1e38


class WKVState(NamedTuple):
  """Running WKV sums for one layer; all float32 [b, c]."""

  num: Array
  den: Array
  max_exp: Array

  @classmethod
  def empty(cls, batch: int, channels: int) -> "WKVState":
    zeros = jnp.zeros((batch, channels), jnp.float32)
    return cls(zeros, zeros, jnp.full((batch, channels), EMPTY_MAX_EXP, jnp.float32))


def merge(a1, b1, p1, a2, b2, p2):
  """Returns (a, b, p) with e^p (a, b) = e^p1 (a1, b1) + e^p2 (a2, b2) and p = max(p1, p2)."""
  p = jnp.maximum(p1, p2)
  e1 = jnp.exp(p1 - p)
  e2 = jnp.exp(p2 - p)
  return e1 * a1 + e2 * a2, e1 * b1 + e2 * b2, p


def _readout(num, den, max_exp, u, k, v):
  """Eq. 16: the state plus the current token weighted by its bonus e^{u + k}."""
  a, b, _ = merge(num, den, max_exp, v, jnp.ones_like(v), u + k)
  return a / b


def check_inputs(w: Array, u: Array, k: Array, v: Array, state: WKVState | None) -> WKVState:
  """Validates the contract's shapes (every implementation calls this) and returns the float32
  incoming state, empty if `state` is None."""
  if k.ndim != 3 or v.shape != k.shape or v.dtype != k.dtype:
    raise ValueError(f"k and v must be [batch, time, channels] of one dtype; got "
                     f"{k.shape=} {k.dtype=}, {v.shape=} {v.dtype=}.")
  b, _, c = k.shape
  if w.shape != (c,) or u.shape != (c,):
    raise ValueError(f"w and u must be [{c}] to match k's channels; got {w.shape=}, {u.shape=}.")
  if state is None:
    return WKVState.empty(b, c)
  state = WKVState(*(jnp.asarray(s, jnp.float32) for s in state))
  if any(s.shape != (b, c) for s in state):
    raise ValueError(f"state tensors must be [{b}, {c}]; got {[tuple(s.shape) for s in state]}.")
  return state


def _prepare(w, u, k, v, state):
  state = check_inputs(w, u, k, v, state)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return f32(w), f32(u), f32(k), f32(v), state


def wkv_step(w: Array, u: Array, k: Array, v: Array, state: WKVState) -> tuple[Array, WKVState]:
  """One token: k, v [b, c] -> (y [b, c] float32, new state). The recurrent (RNN) form."""
  y = _readout(*state, u, k, v)
  num, den, max_exp = merge(*state[:2], state.max_exp - w, v, jnp.ones_like(v), k)
  return y, WKVState(num, den, max_exp)


def wkv_scan(w: Array, u: Array, k: Array, v: Array, state: WKVState | None = None
             ) -> tuple[Array, WKVState]:
  """Sequential WKV by `lax.scan` over time, O(t) depth: the RNN form, the kernels' reference.

  Args:
    w: [c] per-step decay rate, exp(time_decay) > 0.
    u: [c] bonus of the current token (time_first).
    k, v: [b, t, c] keys and values, float32 or bfloat16.
    state: incoming WKVState or None for an empty one.

  Returns:
    y [b, t, c] in k's dtype, and the state after the last token.
  """
  out_dtype = k.dtype
  w, u, k, v, state = _prepare(w, u, k, v, state)

  def step(carry, kv):
    y, carry = wkv_step(w, u, kv[0], kv[1], carry)
    return carry, y

  state, y_tbc = jax.lax.scan(step, state, (jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)))
  return jnp.swapaxes(y_tbc, 0, 1).astype(out_dtype), state


def combine(left, right):
  """Monoid combine of two consecutive segments (num, den, max_exp, log_decay)."""
  a1, b1, p1, d1 = left
  a2, b2, p2, d2 = right
  # The left segment's sums decay across the whole right segment before they are added.
  a, b, p = merge(a1, b1, p1 + d2, a2, b2, p2)
  return a, b, p, d1 + d2


def wkv_associative(w: Array, u: Array, k: Array, v: Array, state: WKVState | None = None
                    ) -> tuple[Array, WKVState]:
  """Parallel WKV with `jax.lax.associative_scan`: O(log t) depth, same contract as wkv_scan.

  Token i is the segment (num=v_i, den=1, max_exp=k_i, log_decay=-w); the inclusive scan gives
  the state after each token, the incoming state is folded in with the accumulated decay, and
  the output reads the state one token back plus the current token's bonus.
  """
  out_dtype = k.dtype
  w, u, k, v, state = _prepare(w, u, k, v, state)
  log_decay = jnp.broadcast_to(-w, k.shape)
  num, den, max_exp, decay = jax.lax.associative_scan(
      combine, (v, jnp.ones_like(v), k, log_decay), axis=1)
  s0 = [s[:, None, :] for s in state]
  num, den, max_exp = merge(s0[0], s0[1], s0[2] + decay, num, den, max_exp)
  prev = [jnp.concatenate([s, x[:, :-1]], axis=1) for s, x in zip(s0, (num, den, max_exp))]
  y = _readout(*prev, u, k, v)
  final = WKVState(num[:, -1], den[:, -1], max_exp[:, -1])
  return y.astype(out_dtype), final


def wkv_state_after(w: Array, k: Array, v: Array, state: WKVState | None, lengths: Array
                    ) -> WKVState:
  """The WKV state after the first lengths[b] tokens of each row, in one parallel reduction.

  Rows of a batch can hold prompts of different lengths padded to a common t. The outputs y of any
  implementation are causal, so y at positions < lengths[b] need nothing new; only the state must
  stop at each row's end. Unrolling wkv_step over L tokens gives it in closed form:

      num_L = e^{max_exp_0 - L w} num_0 + sum_{i<L} e^{-(L-1-i) w + k_i} v_i   (den: v_i -> 1)

  kept, as in the scan, relative to the largest exponent (which is the scan's max_exp exactly).
  Padding (i >= L) gets a vanishing exponent, so it never reaches the state or its gradients.

  Args:
    w: [c] per-step decay rate, exp(time_decay) > 0.
    k, v: [b, t, c] keys and values, float32 or bfloat16.
    state: incoming WKVState or None for an empty one.
    lengths: int [b], 1 <= lengths[b] <= t; may be traced.

  Returns:
    The float32 WKVState [b, c] after each row's first lengths[b] tokens.
  """
  w, _, k, v, state = _prepare(w, w, k, v, state)
  if lengths.shape != k.shape[:1]:
    raise ValueError(f"lengths must be [{k.shape[0]}] (one per row); got {lengths.shape}.")
  t = k.shape[1]
  length_b11 = lengths.astype(jnp.int32)[:, None, None]
  i_1t1 = jnp.arange(t, dtype=jnp.int32)[None, :, None]
  # Decay steps between token i and the end of its row; padding is masked out below.
  age_bt1 = (length_b11 - 1 - i_1t1).astype(jnp.float32)
  exp_btc = jnp.where(i_1t1 < length_b11, k - age_bt1 * w, EMPTY_MAX_EXP)
  exp0_bc = state.max_exp - length_b11[:, 0].astype(jnp.float32) * w
  max_exp = jnp.maximum(exp0_bc, jnp.max(exp_btc, axis=1))
  scale_btc = jnp.exp(exp_btc - max_exp[:, None])
  scale0_bc = jnp.exp(exp0_bc - max_exp)
  num = scale0_bc * state.num + jnp.sum(scale_btc * v, axis=1)
  den = scale0_bc * state.den + jnp.sum(scale_btc, axis=1)
  return WKVState(num, den, max_exp)


# ----------------------------------------------------------------------------------------------
# Dispatcher. Kernel backends live in `kernels/` (importable as `rwkv_jax_kernels`) and register
# themselves on import; they are imported lazily because some need a GPU build of jax.

WKVFn = Callable[..., tuple[Array, WKVState]]

_REGISTRY: dict[str, WKVFn] = {"scan": wkv_scan, "associative": wkv_associative}
# Implementations that differ by platform: name -> {lowering platform: fn}. `wkv` stages them with
# `lax.platform_dependent`, so the kernel is chosen by where the code is lowered (a TPU export
# from a CPU machine gets the TPU kernel), not by the machine that traces it.
_BY_PLATFORM: dict[str, dict[str, WKVFn]] = {}
# name -> the module that registers it on import, and further ones that register the same name
# for other platforms.
_PLUGINS = {"pallas": "rwkv_jax_kernels.wkv_pallas_seq",
            "triton": "rwkv_jax_kernels.wkv_triton_seq",
            "pallas_chunked": "rwkv_jax_kernels.wkv_pallas",
            "triton_chunked": "rwkv_jax_kernels.wkv_triton"}
_MORE_PLUGINS = {"pallas": ("rwkv_jax_kernels.wkv_pallas_tpu_seq",),
                 "pallas_chunked": ("rwkv_jax_kernels.wkv_pallas_tpu",)}
# Fastest first; the first one that is registered (or importable) wins.
# GPU: the fused Pallas kernel passed its compiled tests on an H200 and was the fastest WKV at every
# shape measured there (experiments/results/gpu/bench/bench_wkv_gpu_h200.json: 8x1024x768 fp32
# forward+backward 0.70 ms against 1.20 ms for the associative scan and 1.95 ms for the Triton
# kernel; 32x1024x768 2.6 ms against 5.2 and 7.4). The associative scan is the fallback where the
# Pallas module does not import.
# TPU: associative (the default) until the Pallas TPU kernel (impl="pallas") has run on a TPU. It
# passes its checks in Pallas's TPU interpreter and lowers to a Mosaic call on a CPU machine, but
# Mosaic's layout passes, which run only when a TPU compiles it, and its speed are unchecked
# (scripts/tpu_check.sh checks both); a kernel that fails to compile there would break "auto".
# CPU: the sequential scan wins (no parallel hardware to spend the associative scan's extra work
# on; experiments/results/bench_wkv_cpu.json measures it about 5x faster at 8x1024x768).
_AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("scan",),
                                           "gpu": ("pallas_chunked", "associative")}
_DEFAULT_AUTO = ("associative",)
# jax.default_backend() names -> `lax.platform_dependent` names.
_PLATFORM_NAMES = {"gpu": {"cuda", "rocm"}}

_log = logging.getLogger(__name__)


def register(name: str, fn: WKVFn, platforms: tuple[str, ...] | None = None, *,
             per_shard: bool = False) -> None:
  """Makes `fn` selectable as wkv(..., impl=name). It must honour the wkv_scan contract.

  Args:
    name: the `impl` name.
    fn: the implementation.
    platforms: lowering platforms ("cpu", "cuda", "rocm", "tpu") that `fn` serves under `name`;
      None means all of them.
    per_shard: `fn` cannot be partitioned by XLA (a Mosaic call): under a multi-device mesh it
      runs once per shard (`sharding.wkv_per_shard`).
  """
  if per_shard:
    sharded = sharding.wkv_per_shard(fn)
    fn = lambda w, u, k, v, state=None: sharded(w, u, k, v, check_inputs(w, u, k, v, state))
  if platforms is None:
    _REGISTRY[name] = fn
  else:
    _BY_PLATFORM.setdefault(name, {}).update(dict.fromkeys(platforms, fn))


def _registered(name: str) -> bool:
  return name in _REGISTRY or name in _BY_PLATFORM


def _load(name: str) -> bool:
  # Every module of the name, even where one is registered already: a module may import another
  # name's module for its helpers, which registers that name for its own platforms only.
  for module in (_PLUGINS[name], *_MORE_PLUGINS.get(name, ())) if name in _PLUGINS else ():
    if module not in sys.modules:
      try:
        importlib.import_module(module)
      except ImportError as e:  # e.g. jax-triton without a GPU build of jax
        _log.info("WKV backend %r (%s) unavailable: %s", name, module, e)
      except Exception as e:  # pylint: disable=broad-except  (a broken backend: fall back, loudly)
        _log.warning("WKV backend %r (%s) failed to load (%s: %s); it is skipped.", name, module,
                     type(e).__name__, e)
  return _registered(name)


def implementations() -> list[str]:
  """Names accepted by `impl`, besides "auto"."""
  return sorted(set(_REGISTRY) | set(_BY_PLATFORM) | set(_PLUGINS))


@functools.lru_cache(maxsize=None)
def resolve(impl: str = "auto", platform: str | None = None) -> str:
  """Maps "auto" to the fastest implementation for `platform` (default: jax's backend)."""
  if impl != "auto":
    if not _registered(impl) and impl not in _PLUGINS:
      raise ValueError(f"Unknown WKV implementation {impl!r}; choose from "
                       f"{['auto'] + implementations()}.")
    if not _load(impl):
      raise ValueError(f"WKV implementation {impl!r} cannot be loaded on this machine "
                       f"(see the log for the import error); try impl='associative'.")
    platform = platform or jax.default_backend()
    served = _BY_PLATFORM.get(impl, {})
    if impl not in _REGISTRY and not served.keys() & _PLATFORM_NAMES.get(platform, {platform}):
      raise ValueError(f"WKV implementation {impl!r} has no kernel for {platform!r} (only for "
                       f"{sorted(served)}; see the log for import errors); try "
                       f"impl='associative'.")
    return impl
  platform = platform or jax.default_backend()
  for name in _AUTO_ORDER.get(platform, _DEFAULT_AUTO):
    if _load(name):
      _log.info("WKV impl='auto' on %s resolved to %r.", platform, name)
      return name
  raise RuntimeError("No WKV implementation is available.")  # unreachable: associative exists


def for_platform(impl: str, platform: str) -> WKVFn:
  """The function wkv(..., impl=impl) runs when lowered for `platform` ("cpu", "cuda", "tpu")."""
  name = resolve(impl, platform)
  return _BY_PLATFORM.get(name, {}).get(platform) or _REGISTRY[name]


def wkv(w: Array, u: Array, k: Array, v: Array, state: WKVState | None = None,
        impl: str = "auto") -> tuple[Array, WKVState]:
  """WKV by the implementation named `impl` (see `implementations()`); contract of wkv_scan."""
  name = resolve(impl)
  if name not in _BY_PLATFORM:
    return _REGISTRY[name](w, u, k, v, state)
  return jax.lax.platform_dependent(w, u, k, v, state, default=_REGISTRY.get(name),
                                    **_BY_PLATFORM[name])

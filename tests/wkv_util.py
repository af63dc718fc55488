"""Inputs and error measures shared by the WKV and kernel tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from rwkv_jax import wkv as wkv_lib


def random_inputs(seed, b, t, c, dtype=jnp.float32, time_decay=(-3.0, 1.0), k_max=3.0):
  """Random w, u, k, v and a realistic incoming state (the scan of a random 3-token prefix).

  time_decay: range of the raw time_decay (w = exp(time_decay)); k_max: keys in [-k_max, k_max].
  """
  rng = np.random.default_rng(seed)
  w = jnp.asarray(np.exp(rng.uniform(*time_decay, c)), jnp.float32)
  u = jnp.asarray(rng.normal(size=c), jnp.float32)
  k = jnp.asarray(rng.uniform(-k_max, k_max, (b, t, c)), dtype)
  v = jnp.asarray(rng.normal(size=(b, t, c)), dtype)
  prefix_k = jnp.asarray(rng.uniform(-k_max, k_max, (b, 3, c)), jnp.float32)
  _, state = wkv_lib.wkv_scan(w, u, prefix_k, jnp.asarray(rng.normal(size=(b, 3, c))))
  return w, u, k, v, state


def rel_err(x, ref) -> float:
  """Largest absolute error relative to the largest magnitude of the reference (at least 1e-6)."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-6))

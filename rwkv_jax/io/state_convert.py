"""The recurrent state in the layouts of the reference packages: `rwkv` (pip) and HF RwkvModel.

Both keep the same scaled representation as RWKVState (num, den and max_exp), so converting only
reorders and transposes; no value changes.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from rwkv_jax import model as model_lib
from rwkv_jax.io import formats


def state_to_rwkv_package(state: model_lib.RWKVState) -> list[Any]:
  """Converts a batch-1 RWKVState to the rwkv package's list (5 float32 tensors per layer).

  Args:
    state: RWKVState with fields [l, 1, c].

  Returns:
    [att_xx, aa, bb, pp, ffn_xx] * n_layer as torch tensors; the same scaled representation
    (aa = num, bb = den, pp = max_exp), so no value changes.
  """
  torch = formats.import_torch()
  if state.num.ndim != 3 or state.num.shape[1] != 1:
    raise ValueError(f"state_to_rwkv_package takes a batch-1 state ([l, 1, c] fields); got "
                     f"num of shape {tuple(state.num.shape)}. Slice one sequence first.")
  fields = [np.asarray(f, np.float32)[:, 0] for f in state]
  return [torch.from_numpy(np.array(f[i])) for i in range(fields[0].shape[0]) for f in fields]


def state_from_rwkv_package(tensors: list[Any]) -> model_lib.RWKVState:
  """Converts the rwkv package's RWKV-4 state list to a batch-1 RWKVState ([l, 1, c] fields)."""
  if len(tensors) % 5 or not tensors:
    raise ValueError(f"An RWKV-4 rwkv-package state has 5 tensors per layer; got {len(tensors)}.")
  arrays = [formats.torch_to_numpy(t.float().cpu()) for t in tensors]
  fields = [np.stack(arrays[j::5])[:, None, :] for j in range(5)]
  return model_lib.RWKVState(*(jnp.asarray(f, jnp.float32) for f in fields))


# HF RwkvModel keeps 5 tensors [b, c, l]: (ffn shift, att shift, num, den, max_exp).
_HF_STATE_ORDER = (4, 0, 1, 2, 3)  # HF slot -> RWKVState field


def state_to_hf(state: model_lib.RWKVState) -> list[Any]:
  """Converts an RWKVState ([l, b, c] fields) to HF RwkvModel's `state` list."""
  torch = formats.import_torch()
  return [torch.from_numpy(np.ascontiguousarray(np.asarray(state[f], np.float32)
                                                .transpose(1, 2, 0)))
          for f in _HF_STATE_ORDER]


def state_from_hf(tensors: list[Any]) -> model_lib.RWKVState:
  """Converts HF RwkvModel's `state` list (5 tensors [b, c, l]) to an RWKVState."""
  if len(tensors) != 5:
    raise ValueError(f"HF RWKV state is a list of 5 tensors; got {len(tensors)}.")
  fields = [None] * 5
  for slot, f in enumerate(_HF_STATE_ORDER):
    fields[f] = jnp.asarray(formats.torch_to_numpy(tensors[slot].float().cpu()).transpose(2, 0, 1))
  return model_lib.RWKVState(*fields)

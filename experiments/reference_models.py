"""The models rwkv_jax is compared with, and the random weights they are compared on.

Random RWKV-4 weights are written with plain torch code under the official names and shapes (not
with rwkv_jax's init or exporter), so a mistake in the mapping table cannot cancel itself out.
References: the rwkv PyPI package (ChatRWKV's inference code, `rwkv_package`) and HF
transformers' RwkvForCausalLM with rescale_every=0 (`hf_model`). torch, rwkv and transformers
are test dependencies, imported where they are used.

Two sets of weights: a small model (L, C, A, F, V) for parity, and a deep model whose float32
residual stream goes beyond float16's range (DEEP_*) for the precisions.

experiments.accuracy measures and records with these, experiments.bench_decode times the rwkv
package against rwkv_jax, and the tests assert on the same measurements.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax import model as model_lib

# Both references assume dim_att == n_embd (their WKV state is sized by n_embd), so A = C here;
# test_weights covers dim_att != n_embd.
L, C, A, F, V = 3, 64, 64, 160, 211
T = 29

# Deep (four rescale groups of 6 blocks) and narrow; the FFN width is 16 groups of int8 scales
# per column.
DEEP_LAYERS, DEEP_WIDTH, DEEP_FFN, DEEP_VOCAB = 24, 64, 256, 97
DEEP_TOKENS_SHAPE = (4, 48)  # (batch, time) of the compared logits
# att.output and ffn.value DEEP_BIG * 2^(layer // 6) times their usual scale: each block adds more
# to the residual stream than the last group did (as trained models do), and the float32 stream
# passes float16's largest value (65504) well before the last block.
DEEP_BIG = 3000.0


def official_state_dict(seed: int = 0, *, n_layer: int = L, n_embd: int = C, dim_att: int = A,
                        dim_ffn: int = F, vocab: int = V,
                        output_scale: Callable[[int], float] = lambda layer: 1.0
                        ) -> dict[str, Any]:
  """Random RWKV-4 weights (torch tensors) with the official names and shapes, none zero.

  Args:
    seed: the torch generator's seed.
    n_layer, n_embd, dim_att, dim_ffn, vocab: the shapes.
    output_scale: layer -> the factor on the usual scale of att.output and ffn.value, the two
      matrices that write into the residual stream.

  Returns:
    name -> tensor.
  """
  import torch  # pylint: disable=g-import-not-at-top

  c, a, f = n_embd, dim_att, dim_ffn
  g = torch.Generator().manual_seed(seed)
  randn = lambda *s, std=1.0: torch.randn(*s, generator=g) * std
  uniform = lambda *s, lo, hi: torch.rand(*s, generator=g) * (hi - lo) + lo
  sd = {"emb.weight": randn(vocab, c, std=0.5),
        "blocks.0.ln0.weight": uniform(c, lo=0.5, hi=1.5), "blocks.0.ln0.bias": randn(c, std=0.1)}
  for i in range(n_layer):
    p, scale = f"blocks.{i}.", output_scale(i)
    sd.update({
        p + "ln1.weight": uniform(c, lo=0.5, hi=1.5), p + "ln1.bias": randn(c, std=0.1),
        p + "ln2.weight": uniform(c, lo=0.5, hi=1.5), p + "ln2.bias": randn(c, std=0.1),
        p + "att.time_decay": uniform(a, lo=-6, hi=2),
        p + "att.time_first": uniform(a, lo=-1, hi=1.5),
        p + "att.time_mix_k": uniform(1, 1, c, lo=0, hi=1),
        p + "att.time_mix_v": uniform(1, 1, c, lo=0, hi=1),
        p + "att.time_mix_r": uniform(1, 1, c, lo=0, hi=1),
        p + "att.key.weight": randn(a, c, std=c ** -0.5),
        p + "att.value.weight": randn(a, c, std=c ** -0.5),
        p + "att.receptance.weight": randn(a, c, std=c ** -0.5),
        p + "att.output.weight": randn(c, a, std=scale * a ** -0.5),
        p + "ffn.time_mix_k": uniform(1, 1, c, lo=0, hi=1),
        p + "ffn.time_mix_r": uniform(1, 1, c, lo=0, hi=1),
        p + "ffn.key.weight": randn(f, c, std=c ** -0.5),
        p + "ffn.receptance.weight": randn(c, c, std=c ** -0.5),
        p + "ffn.value.weight": randn(c, f, std=scale * f ** -0.5),
    })
  sd.update({"ln_out.weight": uniform(c, lo=0.5, hi=1.5), "ln_out.bias": randn(c, std=0.1),
             "head.weight": randn(vocab, c, std=c ** -0.5)})
  return sd


def write_checkpoint(directory: str | os.PathLike[str], seed: int = 0
                     ) -> tuple[pathlib.Path, dict[str, Any]]:
  """Saves `official_state_dict(seed)` as an official .pth; returns its path and the tensors."""
  import torch  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(directory) / "rwkv4_random.pth"
  sd = official_state_dict(seed)
  torch.save(sd, path)
  return path, sd


def random_tokens(seed: int = 1) -> list[int]:
  """T token ids of the small model's vocabulary."""
  return np.random.default_rng(seed).integers(0, V, size=T).tolist()


def deep_state_dict(seed: int = 0) -> dict[str, Any]:
  """The deep model's weights (torch tensors) under the official names."""
  return official_state_dict(seed, n_layer=DEEP_LAYERS, n_embd=DEEP_WIDTH, dim_att=DEEP_WIDTH,
                             dim_ffn=DEEP_FFN, vocab=DEEP_VOCAB,
                             output_scale=lambda layer: DEEP_BIG * 2 ** (layer // 6))


def deep_tokens() -> np.ndarray:
  """The int [batch, time] tokens the precisions are compared on."""
  return np.random.default_rng(1).integers(0, DEEP_VOCAB, size=DEEP_TOKENS_SHAPE)


class Jitted:
  """The loaded model's __call__ and step under jax.jit (eager dispatch is slow per token)."""

  def __init__(self, model: model_lib.RWKV):
    self.config = model.config
    graphdef, params = nnx.split(model)
    self._params = params
    self._call = jax.jit(lambda p, t, s: nnx.merge(graphdef, p)(t, s))
    self._step = jax.jit(lambda p, t, s: nnx.merge(graphdef, p).step(t, s))

  def _state(self, state, batch):
    return model_lib.empty_state(self.config, batch) if state is None else state

  def __call__(self, tokens_bt, state=None):
    return self._call(self._params, tokens_bt, self._state(state, tokens_bt.shape[0]))

  def step(self, token_b, state=None):
    return self._step(self._params, token_b, self._state(state, token_b.shape[0]))


def logits_of(model: model_lib.RWKV) -> np.ndarray:
  """float32 [batch, time, vocab] logits of `model` on deep_tokens()."""
  return np.asarray(jax.jit(lambda m, t: m(t)[0])(model, jnp.asarray(deep_tokens())))


def rwkv_package(path: str | os.PathLike[str], strategy: str = "cpu fp32", *, jit: bool = False):
  """The rwkv package's RWKV loaded from an official .pth, without its CUDA kernel.

  The package reads RWKV_JIT_ON and RWKV_CUDA_ON when rwkv.model is first imported, so a process
  runs with the settings of its first call.

  Args:
    path: the .pth file.
    strategy: the package's strategy, e.g. "cpu fp32" or "cpu fp32i8" (its int8).
    jit: TorchScript on, as ChatRWKV runs by default (the speed baseline); otherwise as
      RWKV_JIT_ON says, off when unset (plain eager code, the parity reference).

  Returns:
    The package's model.

  Raises:
    ImportError: the rwkv package (or torch) is not installed.
  """
  if jit:
    os.environ["RWKV_JIT_ON"] = "1"
  else:
    os.environ.setdefault("RWKV_JIT_ON", "0")
  os.environ["RWKV_CUDA_ON"] = "0"
  from rwkv.model import RWKV  # pylint: disable=g-import-not-at-top

  with contextlib.redirect_stdout(io.StringIO()):  # it prints a table of every tensor it loads
    return RWKV(model=str(path), strategy=strategy)


def rwkv_package_logits(path: str | os.PathLike[str], strategy: str) -> np.ndarray:
  """The rwkv package's logits on deep_tokens() with `strategy` (e.g. "cpu fp32i8")."""
  package = rwkv_package(path, strategy)
  return np.stack([package.forward(row.tolist(), None, full_output=True)[0].numpy()
                   for row in deep_tokens()])


def to_hf_name(name: str) -> str:
  """Official -> HF name by the renaming rules in FACTS.md, written independently of weights.py."""
  if name == "head.weight":
    return name
  for old, new in ((".att.", ".attention."), (".ffn.", ".feed_forward."),
                   ("blocks.0.ln0.", "blocks.0.pre_ln.")):
    name = name.replace(old, new)
  if name.startswith("emb."):
    name = "embeddings." + name[len("emb."):]
  for short, long in (("_k", "_key"), ("_v", "_value"), ("_r", "_receptance")):
    if name.endswith("time_mix" + short):
      name = name[:-len(short)] + long
  return "rwkv." + name


def hf_model(state_dict: dict[str, Any]):
  """transformers' RwkvForCausalLM (rescale_every=0) holding the official tensors, renamed."""
  import transformers  # pylint: disable=g-import-not-at-top

  cfg = transformers.RwkvConfig(
      vocab_size=V, hidden_size=C, num_hidden_layers=L, attention_hidden_size=A,
      intermediate_size=F, context_length=64, rescale_every=0)
  model = transformers.RwkvForCausalLM(cfg).eval()
  hf_sd = {to_hf_name(k): v for k, v in state_dict.items()}
  model.load_state_dict(hf_sd, strict=True)  # raises on any name or shape mismatch
  return model

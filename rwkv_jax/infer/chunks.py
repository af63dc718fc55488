"""Runs a long token array through the parallel model in fixed-size chunks, carrying the state.

Prefill, logits and scoring share this one runner. Memory is bounded by the chunk, not by the
sequence, and there is one compiled program per chunk length and batch size, whatever the
lengths:

  * Every chunk, the last one too, reaches the program padded to `chunk` tokens, with each row's
    real length in it as a traced number, and runs as one model call.
  * RWKV has no padding mask, so padding must not reach the state: the model's `lengths=` takes
    each row's state after its own last real token (rwkv_jax.wkv.wkv_state_after, and the token
    shift's last real input), and a row with nothing left in a chunk keeps its state. The model
    is causal, so padding after a row's tokens changes none of its logits. Prompts of different
    lengths therefore share every call (batched prefill); once some have ended, a chunk runs only
    the rows still going (padded to a power of two).
  * Scoring asks for per-token losses instead of logits (`targets=`): they are computed on the
    device, so only one float per token reaches the host and [t, v] logits never do.

Shapes: b = batch, t = time, v = vocab, c = chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax import model as model_lib
from rwkv_jax import wkv as wkv_lib
from rwkv_jax.train import losses

Array = jax.Array


# Platforms whose chunk programs run the blocks as one loop (`model.RWKV(loop_layers=True)`): on
# CPU, compiling is most of a command's start (2.0 s -> 0.7 s for a 169M model's 128-token chunk
# on 2 cores, the chunk then running 104 ms instead of 83-98 ms); accelerators keep the unrolled
# program, which runs faster and compiles once per machine (rwkv_jax.compile_cache).
LOOP_LAYERS_ON = ("cpu",)


@functools.partial(jax.jit, static_argnames=("impl", "last_only"))
def _run_chunk(graphdef, params, tokens_bc, lengths_b, state, logits_in, targets_bc, impl,
               last_only):
  """The first lengths_b[i] tokens of row i of the padded chunk tokens_bc [b, c] through the model.

  Module-level, so every call with the same model structure, batch and chunk length reuses one
  compilation. One model call over the whole chunk; its `lengths=` keeps padding out of the state,
  and a row with no tokens keeps the state it had. Returns (out, the state after each row's last
  real token), out being: with targets_bc [b, c], the per-token losses [b, c] (0 past a row's
  length and where a target is < 0); else with last_only, the logits [b, v] after each row's
  last real token (logits_in [b, v] for rows with no tokens); else the logits [b, c, v] (zeros
  past each row's length).
  """
  model = nnx.merge(graphdef, params)
  chunk = tokens_bc.shape[1]
  keep_b = lengths_b > 0
  out, new_state = model(tokens_bc, state, impl=impl, last_only=last_only and targets_bc is None,
                         lengths=jnp.maximum(lengths_b, 1),
                         loop_layers=jax.default_backend() in LOOP_LAYERS_ON)
  state = jax.tree.map(lambda x, y: jnp.where(keep_b[None, :, None], x, y), new_state, state)
  real_bc = jnp.arange(chunk) < lengths_b[:, None]
  if targets_bc is not None:
    return jnp.where(real_bc, losses.token_losses(out, targets_bc), 0.0), state
  if last_only:
    return jnp.where(keep_b[:, None], out[:, 0], logits_in), state
  return jnp.where(real_bc[..., None], out, 0.0), state


def compile_chunk(graphdef: nnx.GraphDef, params, config, batch: int, chunk: int, *,
                  impl: str = "auto", last_only: bool = False, targets: bool = False) -> None:
  """Compiles the program `run_chunks` calls for `batch` rows in chunks of `chunk` tokens, ahead
  of time: a later call with the same arguments finds it compiled (jax keeps it).

  Needs only shapes: `graphdef, params` may be those of `model_lib.abstract_model(config)`, so
  the compilation can run (on another thread) while the weights are still being read.
  """
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  state = jax.eval_shape(functools.partial(model_lib.empty_state, config, batch))
  last_only = last_only and not targets
  logits = jax.ShapeDtypeStruct((batch, config.vocab_size), jnp.float32) if last_only else None
  _run_chunk.lower(graphdef, params, i32(batch, chunk), i32(batch), state, logits,
                   i32(batch, chunk) if targets else None, impl, last_only).compile()


def empty_state(config, batch: int) -> model_lib.RWKVState:
  """`model_lib.empty_state`, made on the host and put on the device (no program compiled)."""
  shapes = jax.eval_shape(functools.partial(model_lib.empty_state, config, batch))
  return model_lib.RWKVState(*(
      jax.device_put(np.full(s.shape, wkv_lib.EMPTY_MAX_EXP if name == "max_exp" else 0.0,
                             s.dtype)) for name, s in zip(shapes._fields, shapes)))


def _rows_to_run(real_b: np.ndarray) -> np.ndarray | None:
  """The rows a chunk must run when some have no tokens left (their prompts ended), or None
  for all. Padded with ended rows (which keep their state) to a power of two, so that at most
  log2(batch) + 1 batch sizes are compiled; a long prompt among short ones then costs one row,
  not the whole batch, once the others have ended."""
  active = np.flatnonzero(real_b > 0)
  size = 1 << max(len(active) - 1, 0).bit_length()
  if size >= len(real_b):
    return None
  return np.concatenate([active, np.flatnonzero(real_b == 0)[:size - len(active)]])


def run_chunks(model: model_lib.RWKV, tokens_bt: np.ndarray | Array,
               state: model_lib.RWKVState | None = None, *, chunk: int = 1024,
               impl: str = "auto", last_only: bool = False, lengths=None, targets=None
               ) -> tuple[np.ndarray | Array, model_lib.RWKVState]:
  """Logits (or per-token losses) of [b, t] tokens and the state after them, chunk by chunk.

  Args:
    model: the model.
    tokens_bt: int [b, t] tokens, t >= 1; with `lengths`, row i's tokens are its first
      lengths[i], and the rest is padding (any valid ids, e.g. 0) that no result sees.
    state: state to continue from, or None for an empty one.
    chunk: tokens per parallel call; memory is bounded by this, not by t. The first call with
      a new chunk length (or batch size) compiles one program that serves every t.
    impl: WKV implementation (see rwkv_jax.wkv).
    last_only: return only the logits after each row's last token, [b, v] (the head runs on one
      position per call).
    lengths: int [b] real tokens per row, each in [0, t]; None means all t. A row of length 0
      keeps its state, and its last_only logits are zeros.
    targets: int [b, t] next-token ids; when given, the result is the cross-entropy (nats) of
      each target under the logits at its position (`losses.token_losses`), 0 where a target is
      < 0 or past a row's length, instead of the logits.

  Returns:
    (out, state): out is float32 [b, v] logits as a jax.Array if last_only, else a numpy array
    of [b, t, v] logits, or [b, t] losses with `targets` (gathered on the host chunk by chunk,
    so device memory stays bounded; zeros past a row's length); the state after each row's last
    token, as exact as one model call over its tokens.
  """
  if not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise ValueError(f"chunk={chunk!r} must be an integer >= 1 (tokens per model call).")
  tokens_bt = np.asarray(tokens_bt)
  model_lib.check_tokens(tokens_bt, model.config.vocab_size)
  b, t = tokens_bt.shape
  if lengths is None:
    lengths_b = np.full((b,), t, np.int64)
  else:
    lengths_b = np.asarray(lengths, np.int64).reshape(-1)
    if lengths_b.shape != (b,) or lengths_b.min() < 0 or lengths_b.max() > t:
      raise ValueError(f"lengths={lengths_b.tolist()} must give one count in [0, {t}] for each "
                       f"of the {b} rows of tokens.")
  if targets is not None:
    targets = np.asarray(targets)
    if targets.shape != tokens_bt.shape:
      raise ValueError(f"targets must have the tokens' shape {tokens_bt.shape}; got "
                       f"{targets.shape}.")
    last_only = False
  graphdef, params = nnx.split(model)
  # Arrays made on the host and put on the device: no program is compiled to make them.
  if state is None:  # a fine-tuned model (rwkv_jax/train/adapters.py) starts from its own
    state = (model.initial_state(b) if hasattr(model, "initial_state")
             else empty_state(model.config, b))
  logits = (jax.device_put(np.zeros((b, model.config.vocab_size), np.float32)) if last_only
            else None)

  def padded(x_bt, start, rows=slice(None)):
    piece = x_bt[rows, start:start + chunk]
    return jax.device_put(np.pad(piece, ((0, 0), (0, chunk - piece.shape[1]))).astype(np.int32))

  out = []
  for start in range(0, max(int(lengths_b.max()), 1), chunk):
    real = min(chunk, t - start)
    real_b = np.clip(lengths_b - start, 0, chunk)
    rows = _rows_to_run(real_b)
    if rows is None:
      out_b, state = _run_chunk(graphdef, params, padded(tokens_bt, start),
                                jax.device_put(real_b.astype(np.int32)), state, logits,
                                None if targets is None else padded(targets, start), impl,
                                last_only)
    else:  # only the rows with tokens left, and the state of the others is not touched
      sub_out, sub_state = _run_chunk(
          graphdef, params, padded(tokens_bt, start, rows),
          jax.device_put(real_b[rows].astype(np.int32)),
          jax.tree.map(lambda x: x[:, rows], state), None if logits is None else logits[rows],
          None if targets is None else padded(targets, start, rows), impl, last_only)
      state = jax.tree.map(lambda x, y: x.at[:, rows].set(y), state, sub_state)
      if last_only:
        out_b = logits.at[rows].set(sub_out)
      else:
        out_b = np.zeros((b, *sub_out.shape[1:]), np.float32)
        out_b[rows] = np.asarray(sub_out)
    if last_only:
      logits = out_b
    else:
      out.append(np.asarray(out_b)[:, :real])
  if last_only:
    return logits, state
  out_bt = np.concatenate(out, axis=1)
  if out_bt.shape[1] < t:  # every row shorter than t
    out_bt = np.pad(out_bt, ((0, 0), (0, t - out_bt.shape[1])) + ((0, 0),) * (out_bt.ndim - 2))
  return out_bt, state

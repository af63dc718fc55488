"""Text generation: sampling from logits, and prompt prefill plus token-by-token decoding.

  token_b = sample_logits(logits_bv, key, temperature=1.0, top_p=0.85, top_k=0)
  result = generate(model, prompt_tokens, max_new_tokens, key,
                    sampling=SamplingConfig(temperature=1.0, top_p=0.85))

Sampling follows ChatRWKV: the nucleus (top_p) and the top_k set are chosen from the untempered
distribution softmax(logits); temperature then reshapes the probabilities inside that set
(p ** (1 / T), renormalized, which is softmax(logits / T) restricted to the set). Temperature 0 is
greedy. The optional presence and frequency penalties are those of ChatRWKV's chat: every token
generated so far has its logit lowered by alpha_presence + count * alpha_frequency.

Generation prefills the prompts with the parallel model in chunks (the state is carried between
chunks, so memory does not grow with the prompt; prompts of different lengths share each chunk's
call, see rwkv_jax.infer.chunks), then decodes one token per step with the recurrent form. The
decoding is one compiled program per batch size and model: a `lax.while_loop` of up to
DECODE_BLOCK steps whose sampling settings (`RowSampling`, one row per sequence), first step and
step count are traced, so no setting or length compiles anything new (greedy decoding, where no
row samples, has a program of its own without the sampler). Without a callback each call
runs DECODE_BLOCK steps; with one, each call runs one step, so that each token reaches the host
as soon as it is sampled. Both run the same steps with the same keys, so they give the same
tokens.

Shapes: b = batch, t = time, v = vocab, n = new tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax import model as model_lib
from rwkv_jax.config import RWKVConfig
from rwkv_jax.infer import chunks

Array = jax.Array

PAD_ID = -1  # fills `GenerationResult.tokens` after a sequence has stopped; decodes nowhere


# ----------------------------------------------------------------------------------------------
# Sampling from logits.

def seed_key(seed: int) -> Array:
  """jax.random.key(seed), made on the host (no program compiled for it) when it is simply
  [0, seed]: a default threefry key of a seed in [0, 2**31). Other seeds go to jax.random.key."""
  if jax.config.jax_default_prng_impl == "threefry2x32" and 0 <= seed < 2**31:
    return jax.random.wrap_key_data(np.asarray([0, seed], np.uint32))
  return jax.random.key(seed)


def _check_sampling_args(temperature: float, top_p: float, top_k: int) -> None:
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy).")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1]; 1 disables nucleus sampling.")
  if not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"top_k={top_k!r} must be an integer >= 0; 0 disables top-k.")


def filter_logits(logits_bv: Array, *, top_p: float = 1.0, top_k: int = 0) -> Array:
  """Sets the logits of tokens outside the nucleus and the top-k set to -inf.

  Args:
    logits_bv: scores [b, v].
    top_p: keep the smallest set of most probable tokens whose probability mass is >= top_p
      (every token as probable as the least probable one kept is kept too); 1 keeps all.
    top_k: keep the k most probable tokens (ties with the k-th are kept); 0 keeps all.

  Returns:
    float32 [b, v]: the logits, -inf outside the kept set (never empty: the argmax is kept).
  """
  b = logits_bv.shape[0]
  return _filter_rows(logits_bv, jnp.full((b,), top_p, jnp.float32),
                      jnp.full((b,), top_k, jnp.int32))


def _filter_rows(logits_bv: Array, top_p_b: Array, top_k_b: Array) -> Array:
  """`filter_logits` with a top_p and a top_k per row (traced); rows with neither are kept whole,
  and a batch where no row filters skips the sort."""
  logits_bv = logits_bv.astype(jnp.float32)
  v = logits_bv.shape[-1]
  by_p_b = top_p_b < 1
  by_k_b = (top_k_b > 0) & (top_k_b < v)

  def filtered(logits_bv):
    probs_bv = jax.nn.softmax(logits_bv, axis=-1)
    sorted_bv = -jnp.sort(-probs_bv, axis=-1)  # descending
    # Index of the first sorted token at which the mass reaches top_p. Counting the positions
    # still below top_p (rather than argmax of >=) stays correct when rounding keeps the
    # cumulative sum just under top_p at the end: then every token is kept.
    cum_bv = jnp.cumsum(sorted_bv, axis=-1)
    idx_b = jnp.minimum(jnp.sum(cum_bv < top_p_b[:, None], axis=-1), v - 1)
    cutoff_b = jnp.where(by_p_b, jnp.take_along_axis(sorted_bv, idx_b[:, None], axis=-1)[:, 0],
                         0.0)
    kth_b = jnp.take_along_axis(sorted_bv, jnp.clip(top_k_b - 1, 0, v - 1)[:, None], axis=-1)
    cutoff_b = jnp.where(by_k_b, jnp.maximum(cutoff_b, kth_b[:, 0]), cutoff_b)
    return jnp.where(probs_bv >= cutoff_b[:, None], logits_bv, -jnp.inf)

  return jax.lax.cond(jnp.any(by_p_b | by_k_b), filtered, lambda x: x, logits_bv)


@functools.partial(jax.jit, static_argnames=("temperature", "top_p", "top_k"))
def sample_logits(logits_bv: Array, key: Array, *, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0) -> Array:
  """Samples one token per row.

  Args:
    logits_bv: scores [b, v].
    key: PRNG key; the same key and logits give the same tokens.
    temperature: 0 = greedy (argmax); otherwise kept probabilities are raised to 1 / temperature.
    top_p: nucleus mass in (0, 1], chosen before temperature as in ChatRWKV; 1 = off.
    top_k: keep only the k most probable tokens; 0 = off.

  Returns:
    int32 [b]: the sampled token ids.
  """
  _check_sampling_args(temperature, top_p, top_k)
  full = lambda x, dtype: jnp.full(logits_bv.shape[:1], x, dtype)
  return _sample_rows(logits_bv, key, full(temperature, jnp.float32), full(top_p, jnp.float32),
                      full(top_k, jnp.int32))


def _sample_rows(logits_bv: Array, key: Array, temperature_b: Array, top_p_b: Array,
                 top_k_b: Array) -> Array:
  """`sample_logits` with settings per row (traced): one program serves every setting. `key` is
  one key, or one per row ([b]).

  Greedy rows (temperature 0) take the argmax and filter nothing, and a batch with no sampled
  row draws nothing: the nucleus' sort over the vocabulary is most of a sampled step's own work
  (a 169M model's greedy decoding, with the top_p its runner defaults to, took 26 ms a token on
  2 cores where 18 ms was the model's)."""
  greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  sampled_rows_b = temperature_b > 0

  def sample(logits_bv):
    kept_bv = _filter_rows(logits_bv, jnp.where(sampled_rows_b, top_p_b, 1.0),
                           jnp.where(sampled_rows_b, top_k_b, 0))
    scaled_bv = kept_bv / jnp.where(sampled_rows_b, temperature_b, 1.0)[:, None]
    if key.ndim == 1:  # a key per row (the serving engine's slots): each row samples as if alone
      return jax.vmap(jax.random.categorical)(key, scaled_bv).astype(jnp.int32)
    return jax.random.categorical(key, scaled_bv, axis=-1).astype(jnp.int32)

  sampled_b = jax.lax.cond(jnp.any(sampled_rows_b), sample, lambda _: greedy_b, logits_bv)
  return jnp.where(sampled_rows_b, sampled_b, greedy_b)


def apply_penalties(logits_bv: Array, counts_bv: Array, *, alpha_presence: float = 0.0,
                    alpha_frequency: float = 0.0) -> Array:
  """ChatRWKV's repetition penalties: logits - (alpha_presence + count * alpha_frequency).

  Args:
    logits_bv: scores [b, v].
    counts_bv: how often each token was generated so far [b, v] (possibly decayed, so float).
    alpha_presence: subtracted once from every token that occurred.
    alpha_frequency: subtracted per occurrence.

  Returns:
    float32 [b, v]; tokens with count 0 are unchanged.
  """
  counts_bv = counts_bv.astype(jnp.float32)
  penalty_bv = jnp.where(counts_bv > 0, alpha_presence + counts_bv * alpha_frequency, 0.0)
  return logits_bv.astype(jnp.float32) - penalty_bv


# ----------------------------------------------------------------------------------------------
# Generation.

@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Everything that decides the next token (as arrays in the decode program: `RowSampling`).

  Attributes:
    temperature, top_p, top_k: see `sample_logits`.
    alpha_presence, alpha_frequency: see `apply_penalties`; 0 = off.
    penalty_decay: counts are multiplied by this before each new token is added (ChatRWKV's
      later chat uses 0.996 so that old repetitions are forgiven); 1 = never forget.
    stop_tokens: a sequence ends after emitting one of these (it is kept in the output).
    vocab_limit: sample only ids below this (a tokenizer smaller than the model's vocab); None =
      all.
  """

  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  alpha_presence: float = 0.0
  alpha_frequency: float = 0.0
  penalty_decay: float = 1.0
  stop_tokens: tuple[int, ...] = ()
  vocab_limit: int | None = None

  def __post_init__(self):
    _check_sampling_args(self.temperature, self.top_p, self.top_k)
    # A tuple of ints keeps the config hashable and comparable whatever was passed.
    object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))
    if not 0 < self.penalty_decay <= 1:
      raise ValueError(f"penalty_decay={self.penalty_decay} must be in (0, 1].")

  @property
  def samples(self) -> bool:
    """Whether tokens are drawn (temperature > 0); otherwise decoding is greedy and its program
    holds no sampler (`decode_block(sample=False)`)."""
    return self.temperature > 0


class GenerationResult(NamedTuple):
  """What `generate` returns.

  Attributes:
    tokens: int32 [b, n] numpy array of new tokens; PAD_ID (-1) after a sequence stopped.
    lengths: int32 [b]: new tokens per sequence, a stop token included.
    state: the model state after the prompt and every new token (stopped rows: after their
      stop token), ready to continue from.
    logits: float32 [b, n, v] numpy array of the model's logits each token was sampled from
      (before penalties), or None unless `return_logits=True`.
    next_logits: float32 [b, v]: the model's scores for the token after `state` (with the state,
      all that is needed to continue; see rwkv_jax.io.state_file).
  """

  tokens: np.ndarray
  lengths: np.ndarray
  state: model_lib.RWKVState
  logits: np.ndarray | None = None
  next_logits: Array | None = None

  def sequences(self) -> list[list[int]]:
    """The new tokens of each sequence as plain lists, without padding."""
    return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


class RowSampling(NamedTuple):
  """SamplingConfig settings as arrays, one row per sequence: traced in the decode program, so
  sequences may each have their own and no setting compiles a new program. Shapes [b], the stop
  tokens [b, s] padded with -1."""

  temperature: Array
  top_p: Array
  top_k: Array
  alpha_presence: Array
  alpha_frequency: Array
  penalty_decay: Array
  vocab_limit: Array
  stop_tokens: Array

  @classmethod
  def of(cls, configs: Sequence[SamplingConfig], vocab_size: int) -> "RowSampling":
    """The arrays of one config per row. Stop-token lists are padded to a multiple of 8, so
    that lists of different lengths share a program."""
    n_stop = -(-max(len(c.stop_tokens) for c in configs) // 8) * 8 or 8
    stop_bs = np.full((len(configs), n_stop), -1, np.int32)
    for i, c in enumerate(configs):
      stop_bs[i, :len(c.stop_tokens)] = c.stop_tokens
    # Made on the host and put on the device: no program is compiled to make them.
    column = lambda f, dtype: jax.device_put(np.asarray([f(c) for c in configs], dtype))
    return cls(column(lambda c: c.temperature, np.float32),
               column(lambda c: c.top_p, np.float32),
               column(lambda c: c.top_k, np.int32),
               column(lambda c: c.alpha_presence, np.float32),
               column(lambda c: c.alpha_frequency, np.float32),
               column(lambda c: c.penalty_decay, np.float32),
               column(lambda c: min(c.vocab_limit or vocab_size, vocab_size), np.int32),
               jax.device_put(stop_bs))


class DecodeCarry(NamedTuple):
  """What one decode step passes to the next; rows are sequences (or the engine's slots)."""

  logits_bv: Array  # the model's scores for the next token
  state: model_lib.RWKVState
  counts_bv: Array  # float32 penalty counts (they stay 0 in rows without penalties)
  done_b: Array  # bool: the sequence has emitted a stop token


def _keep_rows(active_b: Array, new: Any, old: Any, batch_axis: int) -> Any:
  """Takes `new` for active rows and `old` for the others, on every array of a pytree."""
  def pick(x, y):
    shape = [1] * x.ndim
    shape[batch_axis] = -1
    return jnp.where(active_b.reshape(shape), x, y)
  return jax.tree.map(pick, new, old)


def decode_step(graphdef: nnx.GraphDef, params: Any, carry: DecodeCarry, step: Array, key: Array,
                rows: RowSampling, sample: bool = True) -> tuple[DecodeCarry, Array, Array]:
  """Samples one token per row and feeds it to the model.

  The token is drawn with fold_in(key, step): `key` and `step` are one for all rows (generate),
  or one per row, [b] (the serving engine, whose slots each run their own request). With
  `sample=False` every row takes its argmax (after penalties and vocab_limit), as greedy rows
  (temperature 0) do anyway: the program then holds no sort and no random draw.

  Returns:
    (next carry, token_b with PAD_ID for rows stopped before this step, the raw logits used).
  """
  logits_bv = carry.logits_bv
  v = logits_bv.shape[-1]
  penalised_b = (rows.alpha_presence != 0) | (rows.alpha_frequency != 0)
  scores_bv = jax.lax.cond(
      jnp.any(penalised_b),
      lambda x: apply_penalties(x, carry.counts_bv, alpha_presence=rows.alpha_presence[:, None],
                                alpha_frequency=rows.alpha_frequency[:, None]),
      lambda x: x.astype(jnp.float32), logits_bv)
  scores_bv = jnp.where(jnp.arange(v) < rows.vocab_limit[:, None], scores_bv, -jnp.inf)
  if sample:
    step_key = (jax.vmap(jax.random.fold_in)(key, jnp.broadcast_to(step, key.shape)) if key.ndim
                else jax.random.fold_in(key, step))
    token_b = _sample_rows(scores_bv, step_key, rows.temperature, rows.top_p, rows.top_k)
  else:
    token_b = jnp.argmax(scores_bv, axis=-1).astype(jnp.int32)
  active_b = ~carry.done_b
  counts_bv = jax.lax.cond(
      jnp.any(penalised_b),
      lambda c: c * rows.penalty_decay[:, None] + jnp.where(
          (active_b & penalised_b)[:, None], jax.nn.one_hot(token_b, v, dtype=jnp.float32), 0.0),
      lambda c: c, carry.counts_bv)
  stopped_b = jnp.any(token_b[:, None] == rows.stop_tokens, axis=-1)
  model = nnx.merge(graphdef, params)
  next_logits_bv, next_state = model.step(token_b, carry.state)
  # Stopped rows keep their state and logits, so the returned state is the one after their
  # stop token whatever happens to the other rows.
  next_carry = DecodeCarry(_keep_rows(active_b, next_logits_bv, logits_bv, batch_axis=0),
                      _keep_rows(active_b, next_state, carry.state, batch_axis=1), counts_bv,
                      carry.done_b | stopped_b)
  return next_carry, jnp.where(active_b, token_b, PAD_ID), logits_bv


# Tokens one decode call can return: generation runs `ceil(n / DECODE_BLOCK)` calls of the one
# compiled program (streaming, one token per call of the same program).
DECODE_BLOCK = 16


@functools.partial(jax.jit, static_argnames=("return_logits", "sample"))
def decode_block(graphdef, params, carry: DecodeCarry, key: Array, rows: RowSampling,
                 start: Array, count: Array, return_logits: bool, sample: bool = True):
  """Steps start .. start + count - 1 (count <= DECODE_BLOCK) in one while_loop, ending early
  once every row has stopped. Every argument but return_logits and sample is traced, so one
  program per (batch, model) serves every sampling setting, length and step; `sample=False`
  (every row greedy) compiles without the sampler, a quarter of the program's compile time at
  169M. `key` and `start` may be one per row ([b]; see `decode_step`).

  Returns:
    (carry, tokens [b, DECODE_BLOCK] with PAD_ID past `count` and after a row stopped, the
    logits each token was sampled from [b, DECODE_BLOCK, v] or [b, 0, v]).
  """
  b, v = carry.logits_bv.shape
  tokens_bn = jnp.full((b, DECODE_BLOCK), PAD_ID, jnp.int32)
  logits_bnv = jnp.zeros((b, DECODE_BLOCK if return_logits else 0, v), jnp.float32)

  def cond(loop):
    i, c, _, _ = loop
    return (i < count) & ~jnp.all(c.done_b)

  def body(loop):
    i, c, toks, logs = loop
    c, token_b, used_bv = decode_step(graphdef, params, c, start + i, key, rows, sample)
    toks = toks.at[:, i].set(token_b)
    if return_logits:
      logs = logs.at[:, i].set(used_bv)
    return i + 1, c, toks, logs

  _, carry, tokens_bn, logits_bnv = jax.lax.while_loop(
      cond, body, (jnp.asarray(0, jnp.int32), carry, tokens_bn, logits_bnv))
  return carry, tokens_bn, logits_bnv


def compile_generate(config: RWKVConfig, batch: int, prompt_length: int, max_new_tokens: int,
                     *, prefill_chunk: int = 1024, sampling: SamplingConfig = SamplingConfig(),
                     return_logits: bool = False, impl: str = "auto",
                     model: model_lib.RWKV | None = None) -> list[Callable[[], None]]:
  """The compilations `generate` needs for `batch` prompts of `prompt_length` tokens and up to
  `max_new_tokens` new ones, ahead of time: each a function that compiles one program, to be run
  (on threads, while the weights are read; `compile_cache.ahead_of_time`) before `generate` is
  called with the same arguments, which then finds them compiled. They come in the order they
  run: the prefill chunk (when there is a prompt), then decoding.

  Only shapes are used: `model` (default `model_lib.abstract_split(config)`, shared with the
  weight loader) may be abstract.
  """
  lock, split = threading.Lock(), []

  def model_split():
    with lock:
      if not split:
        split.extend(nnx.split(model) if model is not None else model_lib.abstract_split(config))
      return split

  work = []
  if prompt_length:
    work.append(lambda: chunks.compile_chunk(*model_split(), config, batch, prefill_chunk,
                                             impl=impl, last_only=True))
  if max_new_tokens:
    work.append(lambda: _compile_decode(*model_split(), config, batch, sampling, return_logits))
  return work


def _compile_decode(graphdef, params, config, batch: int, sampling: SamplingConfig,
                    return_logits: bool) -> None:
  b, v = batch, config.vocab_size
  shaped = jax.ShapeDtypeStruct
  state = jax.eval_shape(functools.partial(model_lib.empty_state, config, b))
  carry = DecodeCarry(shaped((b, v), jnp.float32), state, shaped((b, v), jnp.float32),
                      shaped((b,), jnp.bool_))
  key = jax.eval_shape(lambda: jax.random.key(0))
  rows = jax.eval_shape(lambda: RowSampling.of([sampling] * b, v))
  step = shaped((), jnp.int32)
  decode_block.lower(graphdef, params, carry, key, rows, step, step, return_logits,
                     sampling.samples).compile()


def prefill(model: model_lib.RWKV, tokens_bt: Array | np.ndarray,
            state: model_lib.RWKVState | None = None, *, chunk: int = 1024, impl: str = "auto",
            lengths=None) -> tuple[Array, model_lib.RWKVState]:
  """Runs prompts through the parallel model, `chunk` tokens at a time, all rows in each call.

  Args:
    model: the model.
    tokens_bt: int [b, t] prompts, t >= 1; with `lengths`, row i is its first lengths[i] tokens
      followed by padding (any valid ids).
    state: state to continue from, or None for an empty one.
    chunk: tokens per parallel call; memory is bounded by this, not by t. The state is exact
      and one program is compiled per chunk length, whatever the prompt lengths (see
      rwkv_jax.infer.chunks).
    impl: WKV implementation for the parallel calls (see rwkv_jax.wkv).
    lengths: int [b] prompt length of each row, or None (all t). A row of length 0 keeps its
      state and gets zero logits.

  Returns:
    (logits_bv for the token after each prompt, state after each prompt).
  """
  return chunks.run_chunks(model, tokens_bt, state, chunk=chunk, impl=impl, last_only=True,
                           lengths=lengths)


def prefill_one_by_one(model: model_lib.RWKV, rows: Sequence[np.ndarray], *, chunk: int = 1024,
                       impl: str = "auto") -> tuple[Array, model_lib.RWKVState]:
  """Prompts of different lengths prefilled one at a time and joined: the slow, obvious path
  that batched `prefill(..., lengths=)` replaces (kept as its reference and its benchmark
  baseline)."""
  outs = [prefill(model, np.asarray(r)[None], chunk=chunk, impl=impl) for r in rows]
  return (jnp.concatenate([o[0] for o in outs]),
          jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *(o[1] for o in outs)))


def pad_rows(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Token rows of different lengths as (int32 [b, max length] padded with 0, lengths [b])."""
  lengths_b = np.asarray([len(r) for r in rows], np.int32)
  tokens_bt = np.zeros((len(rows), max(int(lengths_b.max()), 1)), np.int32)
  for i, r in enumerate(rows):
    tokens_bt[i, :len(r)] = r
  return tokens_bt, lengths_b


def _as_batch(prompt_tokens, allow_empty: bool = False) -> list[np.ndarray]:
  """One int array per sequence, from a list of ints, a list of lists, or a [b, t] array."""
  if isinstance(prompt_tokens, (np.ndarray, jax.Array)):
    arr = np.asarray(prompt_tokens)
    if arr.ndim == 1:
      arr = arr[None]
    if arr.ndim != 2:
      raise ValueError(f"prompt_tokens must be [batch, time]; got shape {arr.shape}.")
    rows = list(arr)
  elif isinstance(prompt_tokens, Sequence) and prompt_tokens and all(
      isinstance(p, (Sequence, np.ndarray)) and not isinstance(p, str) for p in prompt_tokens):
    rows = [np.asarray(p) for p in prompt_tokens]
  elif isinstance(prompt_tokens, Sequence) and not isinstance(prompt_tokens, str):
    rows = [np.asarray(prompt_tokens)]
  else:
    raise ValueError(f"prompt_tokens must be a list of token ids, a list of such lists or a "
                     f"[batch, time] array; got {type(prompt_tokens).__name__}.")
  for i, row in enumerate(rows):
    if row.size == 0 and allow_empty:
      row = rows[i] = np.zeros((0,), np.int32)
    if row.size == 0 and not allow_empty:
      raise ValueError(f"prompt {i} is empty; give at least one token (e.g. the tokenizer's "
                       f"end-of-text id to start from nothing).")
    if not np.issubdtype(row.dtype, np.integer):
      raise ValueError(f"prompt {i} must hold integer token ids; got dtype {row.dtype}.")
  return [row.astype(np.int32) for row in rows]


def generate(model: model_lib.RWKV, prompt_tokens: Sequence[int] | Sequence[Sequence[int]] | Array,
             max_new_tokens: int, key: Array, *, sampling: SamplingConfig = SamplingConfig(),
             prefill_chunk: int = 1024, state: model_lib.RWKVState | None = None,
             impl: str = "auto", callback: Callable[[np.ndarray, np.ndarray], None] | None = None,
             return_logits: bool = False, next_logits: Array | None = None
             ) -> GenerationResult:
  """Continues each prompt with up to `max_new_tokens` sampled tokens.

  Args:
    model: the model.
    prompt_tokens: one prompt (list of ids), several (list of lists; lengths may differ) or an
      int [b, t] array. With `state` and `next_logits` (a saved state, see
      rwkv_jax.io.state_file), prompts may be empty: those rows continue from the state as it is.
    max_new_tokens: tokens to generate per sequence (fewer if a stop token comes first).
    key: PRNG key; step i samples with fold_in(key, i).
    sampling: how each token is chosen (temperature, top_p, top_k, penalties, stop tokens,
      vocab_limit); the default samples from the full softmax with no stop token.
    prefill_chunk: prompt tokens per parallel model call.
    state: state to continue from (batch must match), or None.
    impl: WKV implementation for the prefill.
    callback: called after each step with (token_b, emitted_b) as numpy arrays; emitted_b is
      False for rows that had already stopped. Decoding then runs step by step on the host.
    return_logits: also return the logits every token was sampled from.
    next_logits: float32 [b, v] scores for the token after `state` (GenerationResult.next_logits
      of the run that made it); needed only for empty prompts.

  Returns:
    GenerationResult(tokens, lengths, state, logits).
  """
  if not isinstance(sampling, SamplingConfig):
    raise TypeError(f"sampling must be a SamplingConfig, e.g. sampling=SamplingConfig("
                    f"temperature=0.8, top_p=0.9); got {type(sampling).__name__}.")
  cfg = sampling
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0.")
  can_continue = state is not None and next_logits is not None
  rows = _as_batch(prompt_tokens, allow_empty=can_continue)
  b, v = len(rows), model.config.vocab_size
  if state is not None and state.num.shape[1] != b:
    raise ValueError(f"state has batch {state.num.shape[1]} but there are {b} prompts.")
  if next_logits is not None and tuple(next_logits.shape) != (b, v):
    raise ValueError(f"next_logits has shape {tuple(next_logits.shape)}; expected {(b, v)}.")

  tokens_bt, lengths_b = pad_rows(rows)
  if lengths_b.max() == 0:
    logits_bv = jnp.asarray(next_logits, jnp.float32)
  else:
    logits_bv, state = prefill(model, tokens_bt, state, chunk=prefill_chunk, impl=impl,
                               lengths=None if lengths_b.min() == lengths_b.max() else lengths_b)
    if lengths_b.min() == 0:
      logits_bv = jnp.where(jnp.asarray(lengths_b > 0)[:, None], logits_bv, next_logits)

  carry = DecodeCarry(logits_bv, state, jax.device_put(np.zeros((b, v), np.float32)),
                      jax.device_put(np.zeros((b,), bool)))
  rows = RowSampling.of([cfg] * b, v)
  graphdef, params = nnx.split(model)
  block = DECODE_BLOCK if callback is None else 1  # streaming: every token as it is sampled
  tokens, logits = [], []
  for start in range(0, max_new_tokens, block):
    count = min(block, max_new_tokens - start)
    carry, tokens_bn, logits_bnv = decode_block(graphdef, params, carry, key, rows,
                                                jax.device_put(np.int32(start)),
                                                jax.device_put(np.int32(count)), return_logits,
                                                cfg.samples)
    tokens.append(np.asarray(tokens_bn)[:, :count])
    if return_logits:
      logits.append(np.asarray(logits_bnv)[:, :count])
    if callback is not None:
      callback(tokens[-1][:, 0], tokens[-1][:, 0] != PAD_ID)
    if np.all(np.asarray(carry.done_b)):
      break
  tokens_bn = np.full((b, max_new_tokens), PAD_ID, np.int32)
  if tokens:
    got = np.concatenate(tokens, axis=1)
    tokens_bn[:, :got.shape[1]] = got
  logits_bnv = None
  if return_logits:
    logits_bnv = np.zeros((b, max_new_tokens, v), np.float32)
    if logits:
      got = np.concatenate(logits, axis=1)
      logits_bnv[:, :got.shape[1]] = got
  lengths_b = np.sum(tokens_bn != PAD_ID, axis=1).astype(np.int32)
  return GenerationResult(tokens_bn, lengths_b, carry.state, logits_bnv, carry.logits_bv)

"""The serving engine: many requests share a fixed number of decode slots on the device.

    engine = Engine(model, slots=16, tokenizer=tokenizer).start()
    request = engine.submit(prompt_tokens, SamplingParams(max_tokens=64, temperature=0.8))
    for out in request:               # or, in asyncio: async for out in request.stream()
      print(out.text, end="")
    engine.cancel(request.id)         # at any time; its slots are free before the next dispatch
    engine.stop()

Each slot holds one sequence's recurrent state, its next-token logits and its sampling settings
as one row of device arrays (`sampling.DecodeCarry`, `sampling.RowSampling`). The loop (a thread
started by `start()`; `step()` runs one iteration):
  1. Cancelled requests leave. Waiting requests are admitted in arrival order once `n` slots are
     free (reserved for them), each starting from the longest prefix of its prompt in the prefix
     cache.
  2. One prefill chunk: up to `prefill_batch` admitted prompts run their next `prefill_chunk`
     tokens together (`chunks.run_chunks`, the batch padded to a power of two). When every piece
     is short (a prompt's last few tokens, e.g. after a cached prefix) the call is
     prefill_chunk / 8 wide: a padded chunk costs its whole width. The state after each chunk
     goes into the prefix cache; a prompt whose last chunk ran is placed in its slots (forked
     into its n choices).
  3. One decode dispatch (`sampling.decode_block`): up to `decode_steps` tokens for every slot in
     one compiled program. Settings, PRNG keys and step counts are per-slot arrays, so no request
     compiles anything. The tokens reach the host; a choice that ends (a stop token, a stop
     string, max_tokens) frees its slot.
So a running stream waits for at most one prefill chunk between its dispatches, however long the
prompts that join. The programs (decode for the slots, prefill per power-of-two batch and width,
placing a state in a slot) are compiled by `start()`.

Greedy tokens, and seeded sampled ones, are those of `sampling.generate` on the request's prompt
alone with key jax.random.key(seed) (choice i > 0 of a request: fold_in(key, i)), whatever else
shares the slots.

Shapes: s = slots, v = vocab, p = prefill batch, c = prefill chunk.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from rwkv_jax import model as model_lib
from rwkv_jax.data import tokenizer as tokenizer_lib
from rwkv_jax.infer import chunks, prefix_cache, sampling

Array = jax.Array

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"  # finish reasons
MAX_STOP_TOKEN_IDS = 16  # stop token ids per request (a fixed width: no recompilation)
_RATE_WINDOW_S = 10.0  # tokens/s is measured over this much recent time


class ParamError(ValueError):
  """A request's parameter is out of range; `param` names it, `code` says what kind."""

  def __init__(self, message: str, param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.param, self.code = param, code


class QueueFull(RuntimeError):
  """max_queue requests are already waiting; submit again later."""


class EngineStopped(RuntimeError):
  """The engine was stopped; it takes no more requests."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How a request's tokens are chosen and when it ends (named as in the OpenAI API).

  Attributes:
    max_tokens: new tokens per choice, at most.
    temperature, top_p, top_k: see `sampling.sample_logits`; temperature 0 is greedy.
    presence_penalty, frequency_penalty, penalty_decay: ChatRWKV's repetition penalties
      (`sampling.apply_penalties`), alpha_presence and alpha_frequency.
    seed: the PRNG seed; None draws one.
    stop_token_ids: a choice ends after one of these (kept in its token ids, not in its text).
    stop: a choice ends at the first of these strings (neither it nor what follows is returned).
    n: choices, each in its own slot, forked from the prompt's state.
  """

  max_tokens: int = 16
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  penalty_decay: float = 1.0
  seed: int | None = None
  stop_token_ids: tuple[int, ...] = ()
  stop: tuple[str, ...] = ()
  n: int = 1

  def __post_init__(self):
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
    object.__setattr__(self, "stop", tuple(self.stop))
    finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)
    checks = (
        ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1,
         "an integer >= 1"),
        ("temperature", finite(self.temperature) and self.temperature >= 0,
         "a number >= 0 (0 is greedy)"),
        ("top_p", finite(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
        ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
        ("presence_penalty", finite(self.presence_penalty), "a finite number"),
        ("frequency_penalty", finite(self.frequency_penalty), "a finite number"),
        ("penalty_decay", finite(self.penalty_decay) and 0 < self.penalty_decay <= 1,
         "in (0, 1]"),
        ("seed", self.seed is None or isinstance(self.seed, int), "an integer or None"),
        ("stop_token_ids", len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
         f"at most {MAX_STOP_TOKEN_IDS} ids"),
        ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
        ("n", isinstance(self.n, int) and self.n >= 1, "an integer >= 1"),
    )
    for name, ok, what in checks:
      if not ok:
        raise ParamError(f"{name}={getattr(self, name)!r} must be {what}.", param=name)

  def config(self, vocab_limit: int | None = None) -> sampling.SamplingConfig:
    """The decode program's settings (one row of `sampling.RowSampling`)."""
    return sampling.SamplingConfig(
        temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
        alpha_presence=self.presence_penalty, alpha_frequency=self.frequency_penalty,
        penalty_decay=self.penalty_decay, stop_tokens=self.stop_token_ids,
        vocab_limit=vocab_limit)


@dataclasses.dataclass(frozen=True)
class Output:
  """What one choice of a request produced since its last Output.

  Attributes:
    index: the choice (0 .. n - 1).
    token_ids: the new tokens.
    text: their text ("" without a tokenizer); a character split across tokens comes whole.
    finish_reason: None while the choice runs; then "stop" (a stop token or string), "length"
      (max_tokens), "cancelled" or "error" (the dispatch failed).
  """

  index: int
  token_ids: tuple[int, ...]
  text: str
  finish_reason: str | None = None


class Request:
  """A submitted request: iterate over it (blocking) or over `stream()` (asyncio) for its
  Outputs, until every choice has finished. One consumer per request."""

  def __init__(self, request_id: str, prompt_tokens: np.ndarray, params: SamplingParams):
    self.id = request_id
    self.prompt_tokens = prompt_tokens
    self.params = params
    self.n = params.n
    self.cached_tokens = 0  # prompt tokens whose state came from the prefix cache
    self.token_ids: list[list[int]] = [[] for _ in range(self.n)]
    self.finish_reasons: list[str | None] = [None] * self.n
    self.submitted_at = time.perf_counter()
    self.first_token_at: float | None = None
    self._items: collections.deque[Output] = collections.deque()
    self._cond = threading.Condition()
    self._loop: asyncio.AbstractEventLoop | None = None
    self._event: asyncio.Event | None = None

  @property
  def finished(self) -> bool:
    return all(r is not None for r in self.finish_reasons)

  @property
  def completion_tokens(self) -> int:
    return sum(len(t) for t in self.token_ids)

  def _push(self, out: Output) -> None:
    """Called by the engine: records and delivers one Output."""
    self.token_ids[out.index].extend(out.token_ids)
    if out.token_ids and self.first_token_at is None:
      self.first_token_at = time.perf_counter()
    with self._cond:
      if out.finish_reason is not None:
        self.finish_reasons[out.index] = out.finish_reason
      self._items.append(out)
      self._cond.notify_all()
      loop, event = self._loop, self._event
    if loop is not None:
      try:
        loop.call_soon_threadsafe(event.set)
      except RuntimeError:  # the consumer's event loop has closed: nobody is listening
        pass

  def _take(self) -> list[Output]:
    items = list(self._items)
    self._items.clear()
    return items

  def __iter__(self) -> Iterator[Output]:
    while True:
      with self._cond:
        while not self._items:
          self._cond.wait()
        items, done = self._take(), self.finished
      yield from items
      if done:  # a choice's last Output is its finishing one: nothing follows
        return

  async def stream(self) -> AsyncIterator[Output]:
    """The Outputs in an asyncio task (the engine thread wakes it)."""
    with self._cond:
      self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
    while True:
      with self._cond:
        items, done = self._take(), self.finished
        if not items and not done:
          self._event.clear()
      for item in items:
        yield item
      if done:
        return
      if not items:
        await self._event.wait()


@dataclasses.dataclass(frozen=True)
class EngineStats:
  """A snapshot of the engine's counters (read from any thread)."""

  slots: int
  active_slots: int  # decoding
  reserved_slots: int  # held by requests being prefilled
  waiting: int  # requests in the queue
  prefilling: int
  requests_submitted: int
  requests_finished: int  # every choice ended (cancelled ones included)
  requests_cancelled: int
  generated_tokens: int
  prompt_tokens: int  # of admitted requests
  prompt_tokens_computed: int  # prefilled by the model
  prompt_tokens_cached: int  # taken from the prefix cache
  cache_hits: int
  cache_misses: int
  cache_entries: int
  cache_bytes: int
  decode_dispatches: int
  prefill_chunks: int
  errors: int  # failed dispatches
  tokens_per_s: float  # generated, over the last few seconds

  @property
  def busy_slots(self) -> int:
    return self.active_slots + self.reserved_slots


class _Text:
  """The text of one choice as its tokens come, with stop strings: the text before the first
  stop string is returned, and the tail that could still begin one is held back until it cannot.
  """

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer | None, stop: Sequence[str]):
    self._decoder = tokenizer_lib.StreamDecoder(tokenizer) if tokenizer else None
    self._stop = tuple(stop)
    self._held = ""

  def add(self, token: int | None) -> tuple[str, bool]:
    """Adds a token (None: the end) and returns (text now certain, a stop string was found)."""
    if self._decoder is None:
      return "", False
    self._held += self._decoder.add(token) if token is not None else self._decoder.flush()
    found = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
    if found:
      text, self._held = self._held[:min(found)], ""
      return text, True
    keep = 0
    if token is not None:  # hold back the longest tail that begins a stop string
      keep = max((k for s in self._stop for k in range(1, min(len(s), len(self._held) + 1))
                  if s.startswith(self._held[-k:])), default=0)
    text, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
    return text, False


class _Choice:
  """One choice of a request, decoding in a slot."""

  def __init__(self, request: Request, index: int, slot: int,
               tokenizer: tokenizer_lib.Tokenizer | None):
    self.request, self.index, self.slot = request, index, slot
    self.generated = 0
    self._text = _Text(tokenizer, request.params.stop)
    self._stop_ids = set(request.params.stop_token_ids)

  @property
  def remaining(self) -> int:
    return self.request.params.max_tokens - self.generated

  def add(self, token: int) -> tuple[str, str | None]:
    """Takes one generated token: (its text, the finish reason if the choice ends here)."""
    self.generated += 1
    if token in self._stop_ids:
      return self._text.add(None)[0], STOP
    text, stopped = self._text.add(token)
    if stopped:
      return text, STOP
    if self.remaining <= 0:
      end, stopped = self._text.add(None)
      return text + end, STOP if stopped else LENGTH
    return text, None


@dataclasses.dataclass
class _Prefill:
  """A request being prefilled: its reserved slots and where its prompt has got to."""

  request: Request
  slots: list[int]
  pos: int
  state: model_lib.RWKVState | None  # batch 1; None = empty
  logits_1v: Array | None


# ----------------------------------------------------------------------------------------------
# Device programs besides the model's (compiled once each per batch size).

@jax.jit
def _stack(states: list[model_lib.RWKVState]) -> model_lib.RWKVState:
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *states)


@jax.jit
def _row(state: model_lib.RWKVState, logits_pv: Array, i: Array
         ) -> tuple[model_lib.RWKVState, Array]:
  take = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, i, 1, axis=axis)
  return jax.tree.map(lambda x: take(x, 1), state), take(logits_pv, 0)


@jax.jit
def _place(carry: sampling.DecodeCarry, slot: Array, state: model_lib.RWKVState,
           logits_1v: Array) -> sampling.DecodeCarry:
  """Puts a sequence's state and next-token logits in `slot`, with no penalty counts."""
  return sampling.DecodeCarry(
      carry.logits_bv.at[slot].set(logits_1v[0]),
      jax.tree.map(lambda x, y: x.at[:, slot].set(y[:, 0]), carry.state, state),
      carry.counts_bv.at[slot].set(0.0), carry.done_b.at[slot].set(False))


class Engine:
  """Serves requests from a fixed number of decode slots; see the module docstring.

  Args:
    model: the model.
    slots: sequences decoded together (the decode program's batch).
    prefill_chunk: prompt tokens per prefill call; a running stream waits at most one such call
      between dispatches. Prefix cache entries are at its multiples (and at prompts' ends).
    prefill_batch: prompts prefilled together, at most (<= slots).
    decode_steps: tokens per slot per dispatch, at most (<= sampling.DECODE_BLOCK); a dispatch
      right after a request joined runs one, so its first token comes at once.
    cache_bytes: the prefix cache's bound; 0 turns it off.
    max_queue: requests waiting for slots, at most; `submit` raises QueueFull beyond.
    max_prompt_tokens: the longest prompt accepted; None = any.
    tokenizer: decodes the Outputs' text and finds stop strings; None = token ids only.
    vocab_limit: sample only ids below this (a tokenizer smaller than the model's vocabulary).
  """

  def __init__(self, model: model_lib.RWKV, *, slots: int = 16, prefill_chunk: int = 128,
               prefill_batch: int = 8, decode_steps: int = 4, cache_bytes: int = 256 << 20,
               max_queue: int = 256, max_prompt_tokens: int | None = None,
               tokenizer: tokenizer_lib.Tokenizer | None = None,
               vocab_limit: int | None = None):
    for name, value, low, high in (("slots", slots, 1, None),
                                   ("prefill_chunk", prefill_chunk, 1, None),
                                   ("prefill_batch", prefill_batch, 1, slots),
                                   ("decode_steps", decode_steps, 1, sampling.DECODE_BLOCK),
                                   ("max_queue", max_queue, 0, None)):
      if not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ValueError(f"{name}={value!r} must be an integer in [{low}, {high or 'inf'}].")
    self.model, self.config = model, model.config
    self.slots, self.prefill_chunk, self.prefill_batch = slots, prefill_chunk, prefill_batch
    self.decode_steps, self.max_queue, self.max_prompt_tokens = (decode_steps, max_queue,
                                                                 max_prompt_tokens)
    self.tokenizer = tokenizer
    v = self.config.vocab_size
    self.vocab_limit = min(vocab_limit or v, v)
    self.cache = prefix_cache.PrefixCache(cache_bytes)
    self._graphdef, self._params = nnx.split(model)
    self._empty_1 = model_lib.empty_state(self.config, 1)

    self._carry = self._fresh_carry()
    self._active = np.zeros(slots, bool)  # decoding
    self._choices: list[_Choice | None] = [None] * slots
    self._free = list(range(slots))  # neither decoding nor reserved
    self._default_row = self._row_arrays(SamplingParams().config(self.vocab_limit))
    self._rows_np = {k: np.stack([x] * slots) for k, x in self._default_row.items()}
    self._rows: sampling.RowSampling | None = None  # the device copy; None = out of date
    key_data = np.asarray(jax.random.key_data(jax.random.key(0)))
    self._keys_np = np.zeros((slots, *key_data.shape), key_data.dtype)
    self._steps_np = np.zeros(slots, np.int32)

    self._lock = threading.Condition()  # guards _waiting and _cancel, and wakes the loop
    self._waiting: collections.deque[Request] = collections.deque()
    self._cancel: set[str] = set()
    self._prefilling: list[_Prefill] = []
    self._ids = itertools.count()
    self._random = random.SystemRandom()
    self._thread: threading.Thread | None = None
    self._stopping = False
    self._stopped = False
    self._counts = collections.Counter()
    self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)
    self._recent_lock = threading.Lock()  # stats() reads it from other threads

  # --------------------------------------------------------------------------------------------
  # The public API.

  def start(self) -> "Engine":
    """Compiles every program the loop runs, then starts the loop's thread."""
    if self._thread is None:
      started = time.perf_counter()
      self.compile()
      logging.info("Engine: %d slots, chunk %d, compiled in %.1f s.", self.slots,
                   self.prefill_chunk, time.perf_counter() - started)
      self._thread = threading.Thread(target=self._run, name="rwkv-engine", daemon=True)
      self._thread.start()
    return self

  def stop(self, timeout: float | None = 60) -> None:
    """Stops the loop; requests still in flight end with finish reason "cancelled"."""
    with self._lock:
      self._stopping = True
      self._lock.notify_all()
    if self._thread is not None:
      self._thread.join(timeout)
    self._stopped = True
    with self._lock:
      waiting, self._waiting = list(self._waiting), collections.deque()
    for request in waiting + [p.request for p in self._prefilling] + [
        c.request for c in self._choices if c is not None]:
      self._finish_all(request, CANCELLED)
    self._prefilling, self._choices = [], [None] * self.slots

  @property
  def running(self) -> bool:
    return self._thread is not None and self._thread.is_alive() and not self._stopping

  def submit(self, prompt_tokens: Sequence[int] | np.ndarray,
             params: SamplingParams = SamplingParams(), request_id: str | None = None
             ) -> Request:
    """Queues a request.

    Args:
      prompt_tokens: the prompt's token ids (at least one).
      params: how its tokens are chosen; params.n choices share the prompt's prefill.
      request_id: a name for `cancel`; default a new one.

    Returns:
      The Request: iterate over it, or `async for` over its `stream()`.

    Raises:
      ParamError: the prompt or a parameter is out of range (param names it).
      QueueFull: max_queue requests are already waiting.
      EngineStopped: after `stop()`.
    """
    if self._stopping or self._stopped:
      raise EngineStopped("the engine has stopped.")
    prompt = np.asarray(prompt_tokens)
    if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
      raise ParamError("the prompt must be a non-empty list of token ids.", param="prompt")
    if prompt.min() < 0 or prompt.max() >= self.config.vocab_size:
      raise ParamError(f"token ids must be in [0, {self.config.vocab_size}); got "
                       f"{prompt[(prompt < 0) | (prompt >= self.config.vocab_size)][:5].tolist()}.",
                       param="prompt")
    if self.max_prompt_tokens is not None and prompt.size > self.max_prompt_tokens:
      raise ParamError(f"the prompt has {prompt.size} tokens; this server takes at most "
                       f"{self.max_prompt_tokens}.", param="prompt",
                       code="context_length_exceeded")
    if params.n > self.slots:
      raise ParamError(f"n={params.n} is more than the {self.slots} slots of this server.",
                       param="n")
    if params.stop and self.tokenizer is None:
      raise ParamError("stop strings need a tokenizer; give stop_token_ids.", param="stop")
    if any(not 0 <= t < self.config.vocab_size for t in params.stop_token_ids):
      raise ParamError(f"stop_token_ids must be in [0, {self.config.vocab_size}).",
                       param="stop_token_ids")
    if params.seed is None:
      params = dataclasses.replace(params, seed=self._random.randrange(1 << 31))
    request = Request(request_id or f"req-{next(self._ids)}", prompt.astype(np.int32), params)
    with self._lock:
      if len(self._waiting) >= self.max_queue:
        raise QueueFull(f"{len(self._waiting)} requests are waiting already (max_queue="
                        f"{self.max_queue}); try again shortly.")
      self._waiting.append(request)
      self._counts["submitted"] += 1
      self._lock.notify_all()
    return request

  def cancel(self, request_id: str) -> None:
    """Ends a request wherever it is (waiting, prefilling or decoding) before the next
    dispatch; its unfinished choices end with finish reason "cancelled". Unknown or finished
    ids are ignored."""
    with self._lock:
      self._cancel.add(request_id)
      self._lock.notify_all()

  def stats(self) -> EngineStats:
    now = time.perf_counter()
    with self._recent_lock:
      recent = [(t, n) for t, n in self._recent if now - t <= _RATE_WINDOW_S]
    cache = self.cache.stats()
    c = self._counts
    active = int(self._active.sum())
    return EngineStats(
        slots=self.slots, active_slots=active,
        reserved_slots=self.slots - active - len(self._free), waiting=len(self._waiting),
        prefilling=len(self._prefilling), requests_submitted=c["submitted"],
        requests_finished=c["finished"], requests_cancelled=c["cancelled"],
        generated_tokens=c["generated"], prompt_tokens=c["prompt"],
        prompt_tokens_computed=c["computed"], prompt_tokens_cached=c["cached"],
        cache_hits=cache.hits, cache_misses=cache.misses, cache_entries=cache.entries,
        cache_bytes=cache.bytes, decode_dispatches=c["dispatches"],
        prefill_chunks=c["chunks"], errors=c["errors"],
        tokens_per_s=sum(n for _, n in recent) / _RATE_WINDOW_S)

  def step(self) -> bool:
    """One iteration of the loop: cancellations, admissions, one prefill chunk, one decode
    dispatch. Returns whether there was anything to do."""
    worked = self._take_cancellations()
    worked |= self._admit()
    if self._prefilling:
      self._prefill_chunk()
      worked = True
    if self._active.any():
      self._decode()
      worked = True
    return worked

  def compile(self) -> None:
    """Compiles (or loads from the compilation cache) every program of the loop, by running
    each once on nothing that matters."""
    carry = self._carry
    sampling.decode_block(self._graphdef, self._params, carry,
                          jax.random.wrap_key_data(self._keys_np), self._row_sampling(),
                          jnp.asarray(self._steps_np), jnp.asarray(1, jnp.int32), False)
    for p in self._prefill_sizes():
      for width in self._prefill_widths():
        state = _stack([self._empty_1] * p)
        logits_pv, state = chunks.run_chunks(self.model, np.zeros((p, width), np.int32), state,
                                             chunk=width, last_only=True,
                                             lengths=np.ones(p, np.int32))
      state_1, logits_1v = _row(state, logits_pv, jnp.asarray(0, jnp.int32))
    jax.block_until_ready(_place(carry, jnp.asarray(0, jnp.int32), state_1, logits_1v))

  # --------------------------------------------------------------------------------------------
  # The loop.

  def _run(self) -> None:
    while True:
      with self._lock:
        if self._stopping:
          return
      try:
        worked = self.step()
      except Exception:  # pylint: disable=broad-except
        # A failed dispatch (e.g. out of device memory) ends the requests in flight, not the
        # server: the slots start again from nothing.
        logging.exception("Engine: a dispatch failed; its requests end with an error.")
        self._fail_in_flight()
        worked = True
      if not worked:
        with self._lock:
          if not (self._waiting or self._cancel or self._stopping):
            self._lock.wait(timeout=1.0)

  def _fresh_carry(self) -> sampling.DecodeCarry:
    s, v = self.slots, self.config.vocab_size
    return sampling.DecodeCarry(jnp.zeros((s, v), jnp.float32),
                                model_lib.empty_state(self.config, s),
                                jnp.zeros((s, v), jnp.float32), jnp.ones((s,), bool))

  def _prefill_sizes(self) -> list[int]:
    sizes = {min(1 << k, self.prefill_batch) for k in range(self.prefill_batch.bit_length() + 1)}
    return sorted(sizes)

  def _prefill_widths(self) -> list[int]:
    return sorted({max(1, self.prefill_chunk // 8), self.prefill_chunk})

  def _row_arrays(self, config: sampling.SamplingConfig) -> dict[str, np.ndarray]:
    rows = sampling.RowSampling.of([config], self.config.vocab_size)
    out = {k: np.asarray(x)[0] for k, x in rows._asdict().items()}
    stop = np.full(MAX_STOP_TOKEN_IDS, -1, np.int32)
    stop[:len(config.stop_tokens)] = config.stop_tokens
    out["stop_tokens"] = stop
    return out

  def _row_sampling(self) -> sampling.RowSampling:
    if self._rows is None:
      self._rows = sampling.RowSampling(**{k: jnp.asarray(x) for k, x in self._rows_np.items()})
    return self._rows

  def _set_row(self, slot: int, row: dict[str, np.ndarray]) -> None:
    for k, x in row.items():
      self._rows_np[k][slot] = x
    self._rows = None

  def _take_cancellations(self) -> bool:
    with self._lock:
      ids, self._cancel = self._cancel, set()
      cancelled_waiting = [r for r in self._waiting if r.id in ids]
      for request in cancelled_waiting:
        self._waiting.remove(request)
    if not ids:
      return False
    for request in cancelled_waiting:
      self._finish_all(request, CANCELLED)
    for pf in [p for p in self._prefilling if p.request.id in ids]:
      self._prefilling.remove(pf)
      self._free.extend(pf.slots)
      self._finish_all(pf.request, CANCELLED)
    for choice in [c for c in self._choices if c is not None and c.request.id in ids]:
      self._release(choice.slot)
      self._finish_all(choice.request, CANCELLED)
    return True

  def _finish_all(self, request: Request, reason: str) -> None:
    """Ends every unfinished choice of `request` with `reason`."""
    if request.finished:
      return
    for i, r in enumerate(request.finish_reasons):
      if r is None:
        request._push(Output(i, (), "", reason))  # pylint: disable=protected-access
    self._counts["finished"] += 1
    self._counts["cancelled"] += reason == CANCELLED

  def _release(self, slot: int) -> None:
    self._active[slot] = False
    self._choices[slot] = None
    self._set_row(slot, self._default_row)
    self._free.append(slot)

  def _admit(self) -> bool:
    admitted = False
    while True:
      with self._lock:
        if not self._waiting or self._waiting[0].n > len(self._free):
          return admitted
        request = self._waiting.popleft()
      admitted = True
      slots, self._free = self._free[:request.n], self._free[request.n:]
      self._counts["prompt"] += len(request.prompt_tokens)
      hit = self.cache.longest_prefix(request.prompt_tokens)
      pf = _Prefill(request, slots, 0, None, None)
      if hit is not None:
        pf.pos, (pf.state, pf.logits_1v) = hit
        request.cached_tokens = pf.pos
        self._counts["cached"] += pf.pos
      if pf.pos == len(request.prompt_tokens):
        self._start_decoding(pf)
      else:
        self._prefilling.append(pf)

  def _prefill_chunk(self) -> None:
    """The next chunk of up to prefill_batch prompts, as one batch."""
    batch = self._prefilling[:self.prefill_batch]
    p = next(size for size in self._prefill_sizes() if size >= len(batch))
    pieces = [pf.request.prompt_tokens[pf.pos:pf.pos + self.prefill_chunk] for pf in batch]
    c = next(w for w in self._prefill_widths() if w >= max(len(x) for x in pieces))
    tokens_pc = np.zeros((p, c), np.int32)
    lengths_p = np.zeros((p,), np.int32)
    for i, piece in enumerate(pieces):
      tokens_pc[i, :len(piece)], lengths_p[i] = piece, len(piece)
    states = [pf.state if pf.state is not None else self._empty_1 for pf in batch]
    state = _stack(states + [self._empty_1] * (p - len(batch)))
    logits_pv, state = chunks.run_chunks(self.model, tokens_pc, state, chunk=c, last_only=True,
                                         lengths=lengths_p)
    self._counts["chunks"] += 1
    self._counts["computed"] += int(lengths_p.sum())
    for i, pf in enumerate(batch):
      pf.pos += int(lengths_p[i])
      pf.state, pf.logits_1v = _row(state, logits_pv, jnp.asarray(i, jnp.int32))
      self.cache.put(pf.request.prompt_tokens[:pf.pos], (pf.state, pf.logits_1v))
      if pf.pos == len(pf.request.prompt_tokens):
        self._prefilling.remove(pf)
        self._start_decoding(pf)

  def _start_decoding(self, pf: _Prefill) -> None:
    """Places a prefilled prompt's state in its slots, one per choice."""
    request = pf.request
    row = self._row_arrays(request.params.config(self.vocab_limit))
    key = jax.random.key(request.params.seed % (1 << 32))  # what key() keeps of it without x64
    for i, slot in enumerate(pf.slots):
      self._carry = _place(self._carry, jnp.asarray(slot, jnp.int32), pf.state, pf.logits_1v)
      self._set_row(slot, row)
      self._keys_np[slot] = np.asarray(jax.random.key_data(
          key if i == 0 else jax.random.fold_in(key, i)))
      self._steps_np[slot] = 0
      self._active[slot] = True
      self._choices[slot] = _Choice(request, i, slot, self.tokenizer)

  def _decode(self) -> None:
    """One dispatch of up to decode_steps tokens for every slot; the tokens go to their
    requests, and choices that end free their slots."""
    choices = [c for c in self._choices if c is not None]
    count = min(self.decode_steps, max(c.remaining for c in choices))
    if any(c.generated == 0 for c in choices):
      count = 1  # someone has just joined: its first token comes first
    carry = self._carry._replace(done_b=jnp.asarray(~self._active))
    self._carry, tokens_bn, _ = sampling.decode_block(
        self._graphdef, self._params, carry, jax.random.wrap_key_data(self._keys_np),
        self._row_sampling(), jnp.asarray(self._steps_np), jnp.asarray(count, jnp.int32), False)
    tokens_bn = np.asarray(tokens_bn[:, :count])
    self._counts["dispatches"] += 1
    produced = 0
    for choice in choices:
      row = tokens_bn[choice.slot]
      made = int(np.sum(row != sampling.PAD_ID))
      self._steps_np[choice.slot] += made
      new, text, reason = [], [], None
      for token in row[:made].tolist():
        new.append(token)
        piece, reason = choice.add(token)
        text.append(piece)
        if reason is not None:
          break
      produced += len(new)
      if reason is not None:
        self._release(choice.slot)
      # pylint: disable-next=protected-access
      choice.request._push(Output(choice.index, tuple(new), "".join(text), reason))
      if reason is not None and choice.request.finished:
        self._counts["finished"] += 1
    self._counts["generated"] += produced
    now = time.perf_counter()
    with self._recent_lock:
      self._recent.append((now, produced))
      while self._recent and now - self._recent[0][0] > _RATE_WINDOW_S:
        self._recent.popleft()

  def _fail_in_flight(self) -> None:
    for request in {id(r): r for r in [p.request for p in self._prefilling] + [
        c.request for c in self._choices if c is not None]}.values():
      self._finish_all(request, ERROR)
    self._counts["errors"] += 1
    self._prefilling = []
    self._choices = [None] * self.slots
    self._active[:] = False
    self._free = list(range(self.slots))
    self._rows_np = {k: np.stack([x] * self.slots) for k, x in self._default_row.items()}
    self._rows = None
    self._carry = self._fresh_carry()

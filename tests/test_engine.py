"""The serving engine and its prefix cache, in process: every request decodes as if alone while
others join and leave, per-slot settings, n choices, stops, cancellation, the cache, failures."""

import asyncio

import jax
import numpy as np
import pytest

import training_util
from rwkv_jax.config import RWKVConfig
from rwkv_jax.data.tokenizer import ByteTokenizer
from rwkv_jax.infer import engine as engine_lib
from rwkv_jax.infer import chunks, prefix_cache, sampling
from rwkv_jax.infer.engine import SamplingParams

CFG = RWKVConfig(n_layer=2, n_embd=32, vocab_size=256)
SLOTS, CHUNK = 4, 8
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model():
  return training_util.random_model(CFG, 0)


def make_engine(model, **kwargs):
  kwargs = {"slots": SLOTS, "prefill_chunk": CHUNK, "prefill_batch": 4, "decode_steps": 4,
            **kwargs}
  return engine_lib.Engine(model, **kwargs)


def prompt(length, seed):
  return np.random.default_rng(seed).integers(0, CFG.vocab_size, size=length).tolist()


def alone(model, tokens, params: SamplingParams, key=None):
  """What `sampling.generate` makes of the prompt alone, with the request's settings."""
  key = jax.random.key(params.seed or 0) if key is None else key
  out = sampling.generate(model, [tokens], params.max_tokens, key, sampling=params.config(),
                          prefill_chunk=64)
  return out.sequences()[0]


def run_until_done(engine, requests, max_steps=500):
  for _ in range(max_steps):
    if all(r.finished for r in requests):
      return
    engine.step()
  raise AssertionError(f"requests not finished after {max_steps} steps: {engine.stats()}")


@pytest.mark.slow
def test_greedy_requests_decode_as_if_alone_while_others_join_and_leave(model):
  engine = make_engine(model)
  lengths = [3, 21, 1, 37, 9, 16, 30, 5]  # more requests than slots; a 37-token prompt is 5 chunks
  max_tokens = [12, 5, 20, 7, 16, 3, 9, 14]
  requests = []
  for i, (n, m) in enumerate(zip(lengths, max_tokens)):
    requests.append(engine.submit(prompt(n, i), SamplingParams(temperature=0.0, max_tokens=m)))
    for _ in range(i % 3):  # joins at different points of the others' decoding
      engine.step()
  run_until_done(engine, requests)
  for i, r in enumerate(requests):
    assert r.token_ids[0] == alone(model, prompt(lengths[i], i), r.params), i
    assert r.finish_reasons == ["length"]
  stats = engine.stats()
  assert stats.busy_slots == 0 and stats.requests_finished == len(requests)
  assert stats.generated_tokens == sum(max_tokens)


@pytest.mark.slow
def test_each_slot_samples_with_its_own_settings_as_if_alone(model):
  engine = make_engine(model)
  settings = [SamplingParams(temperature=0.9, seed=11, max_tokens=10),
              SamplingParams(temperature=1.2, top_p=0.6, seed=12, max_tokens=10),
              SamplingParams(temperature=0.7, top_k=5, presence_penalty=0.5,
                             frequency_penalty=0.3, penalty_decay=0.9, seed=13, max_tokens=10),
              SamplingParams(temperature=0.0, presence_penalty=1.5, max_tokens=10, seed=14)]
  requests = [engine.submit(prompt(5 + 7 * i, 100 + i), p) for i, p in enumerate(settings)]
  run_until_done(engine, requests)
  for i, (r, p) in enumerate(zip(requests, settings)):
    assert r.token_ids[0] == alone(model, prompt(5 + 7 * i, 100 + i), p), i
  # The same seed again gives the same tokens; another seed, others.
  again = engine.submit(prompt(5, 100), settings[0])
  other = engine.submit(prompt(5, 100), SamplingParams(temperature=0.9, seed=99, max_tokens=10))
  run_until_done(engine, [again, other])
  assert again.token_ids == requests[0].token_ids
  assert other.token_ids != requests[0].token_ids


@pytest.mark.slow
def test_n_choices_fork_the_prompt_state_each_with_its_own_key(model):
  engine = make_engine(model)
  greedy = engine.submit(prompt(19, 1), SamplingParams(temperature=0.0, max_tokens=8, n=3))
  sampled = engine.submit(prompt(19, 1), SamplingParams(temperature=1.0, max_tokens=8, n=2,
                                                        seed=5))
  run_until_done(engine, [greedy, sampled])
  assert engine.stats().prefill_chunks == 3  # one prefill (19 tokens), the second from the cache
  expected = alone(model, prompt(19, 1), greedy.params)
  assert greedy.token_ids == [expected] * 3
  key = jax.random.key(5)
  assert sampled.token_ids[0] == alone(model, prompt(19, 1), sampled.params, key)
  assert sampled.token_ids[1] == alone(model, prompt(19, 1), sampled.params,
                                       jax.random.fold_in(key, 1))


@pytest.mark.slow
def test_stop_tokens_and_stop_strings_end_a_choice(model):
  tokenizer = ByteTokenizer()
  engine = make_engine(model, tokenizer=tokenizer)
  p = prompt(6, 3)
  free = engine.submit(p, SamplingParams(temperature=0.0, max_tokens=12))
  run_until_done(engine, [free])
  tokens = free.token_ids[0]
  text = tokenizer.decode(tokens)
  stop_id = tokens[4]
  by_token = engine.submit(p, SamplingParams(temperature=0.0, max_tokens=12,
                                             stop_token_ids=(stop_id,)))
  stop_text = text[3:5]
  by_string = engine.submit(p, SamplingParams(temperature=0.0, max_tokens=12, stop=(stop_text,)))
  for _ in range(100):
    if by_token.finished and by_string.finished:
      break
    engine.step()
  assert by_token.token_ids[0] == tokens[:tokens.index(stop_id) + 1]  # the stop token is kept
  assert by_token.finish_reasons == ["stop"]
  outputs = list(by_string)
  assert "".join(o.text for o in outputs) == text[:text.find(stop_text)]
  assert by_string.finish_reasons == ["stop"]
  assert engine.stats().busy_slots == 0


@pytest.mark.slow
def test_a_long_prompt_pauses_running_streams_for_one_chunk_at_most(model):
  engine = make_engine(model)
  running = engine.submit(prompt(4, 7), SamplingParams(temperature=0.0, max_tokens=200))
  engine.step()
  long = engine.submit(prompt(6 * CHUNK, 8), SamplingParams(temperature=0.0, max_tokens=2))
  for _ in range(6):  # each step: one chunk of the long prompt, then tokens for the running one
    before = len(running.token_ids[0])
    engine.step()
    assert len(running.token_ids[0]) > before
  assert engine.stats().prefill_chunks == 1 + 6
  engine.cancel(running.id)
  run_until_done(engine, [running, long])


@pytest.mark.slow
def test_cancel_frees_slots_wherever_the_request_is(model):
  engine = make_engine(model, slots=2, prefill_batch=1)
  decoding = engine.submit(prompt(3, 1), SamplingParams(temperature=0.0, max_tokens=500, n=2))
  engine.step()
  engine.step()
  waiting = engine.submit(prompt(3, 2), GREEDY)
  assert engine.stats().active_slots == 2
  engine.cancel(decoding.id)
  engine.cancel(waiting.id)
  engine.step()
  assert decoding.finish_reasons == ["cancelled"] * 2 and waiting.finish_reasons == ["cancelled"]
  prefilling = engine.submit(prompt(5 * CHUNK, 3), GREEDY)
  engine.step()
  assert engine.stats().reserved_slots == 1
  engine.cancel(prefilling.id)
  engine.step()
  stats = engine.stats()
  assert (stats.busy_slots, stats.waiting, stats.prefilling) == (0, 0, 0)
  assert stats.requests_cancelled == 3
  # The freed slots serve the next request as if nothing had happened.
  after = engine.submit(prompt(9, 4), SamplingParams(temperature=0.0, max_tokens=6))
  run_until_done(engine, [after])
  assert after.token_ids[0] == alone(model, prompt(9, 4), after.params)


@pytest.mark.slow
def test_prefix_cache_prefills_only_the_rest_of_a_prompt(model):
  engine = make_engine(model)
  shared = prompt(5 * CHUNK + 3, 21)
  first = engine.submit(shared + prompt(4, 22), SamplingParams(temperature=0.0, max_tokens=5))
  run_until_done(engine, [first])
  computed = engine.stats().prompt_tokens_computed
  assert computed == len(shared) + 4
  rest = prompt(11, 23)
  second = engine.submit(shared + rest, SamplingParams(temperature=0.0, max_tokens=5))
  run_until_done(engine, [second])
  stats = engine.stats()
  # The longest chunk boundary inside the shared prefix is 5 chunks: only the rest is computed.
  assert second.cached_tokens == 5 * CHUNK
  assert stats.prompt_tokens_computed - computed == len(shared) + len(rest) - 5 * CHUNK
  assert stats.cache_hits == 1
  assert second.token_ids[0] == alone(model, shared + rest, second.params)
  # A prompt seen whole needs no prefill at all.
  third = engine.submit(shared + rest, SamplingParams(temperature=0.0, max_tokens=5))
  run_until_done(engine, [third])
  assert engine.stats().prompt_tokens_computed == stats.prompt_tokens_computed
  assert third.token_ids == second.token_ids
  # One token more runs one narrow call (CHUNK // 8 wide), as exact as a full one.
  fourth = engine.submit(shared + rest + [7], SamplingParams(temperature=0.0, max_tokens=5))
  run_until_done(engine, [fourth])
  assert engine.stats().prompt_tokens_computed == stats.prompt_tokens_computed + 1
  assert fourth.token_ids[0] == alone(model, shared + rest + [7], fourth.params)


def test_prefix_cache_is_an_lru_bounded_in_bytes():
  value = lambda: np.zeros(100, np.float32)  # 400 bytes, + 4 per key token
  cache = prefix_cache.PrefixCache(max_bytes=1000)
  cache.put(np.arange(4), value())
  cache.put(np.arange(8), value())
  assert cache.longest_prefix(np.arange(10))[0] == 8
  assert cache.longest_prefix(np.arange(6))[0] == 4
  assert cache.longest_prefix(np.arange(1, 9)) is None
  cache.put(np.arange(2), value())  # evicts the least recently used: arange(8)
  assert cache.longest_prefix(np.arange(10))[0] == 4
  assert cache.stats().entries == 2 and cache.stats().bytes <= 1000
  assert cache.stats().evictions == 1
  prefix_cache.PrefixCache(0).put(np.arange(2), value())  # off: stores nothing


@pytest.mark.slow
def test_bad_requests_and_a_full_queue_raise_and_change_nothing(model):
  engine = make_engine(model, max_queue=1, max_prompt_tokens=50)
  cases = [(dict(prompt_tokens=prompt(51, 0)), "prompt"),
           (dict(prompt_tokens=[1, 256]), "prompt"),
           (dict(prompt_tokens=[]), "prompt"),
           (dict(prompt_tokens=[1], params=SamplingParams(n=SLOTS + 1)), "n"),
           (dict(prompt_tokens=[1], params=SamplingParams(stop=("x",))), "stop")]
  for kwargs, param in cases:
    with pytest.raises(engine_lib.ParamError) as e:
      engine.submit(**kwargs)
    assert e.value.param == param
  for field, value in [("temperature", -1.0), ("top_p", 0.0), ("max_tokens", 0), ("n", 0),
                       ("top_k", -2), ("presence_penalty", float("nan"))]:
    with pytest.raises(engine_lib.ParamError, match=field):
      SamplingParams(**{field: value})
  engine.submit([1, 2])
  with pytest.raises(engine_lib.QueueFull):
    engine.submit([1, 2])
  assert engine.stats().waiting == 1 and engine.stats().requests_submitted == 1


@pytest.mark.slow
def test_a_failed_dispatch_ends_its_requests_and_the_engine_goes_on(model, monkeypatch):
  engine = make_engine(model).start()
  try:
    real = sampling.decode_block
    calls = {"n": 0}

    def fail_once(*args):
      calls["n"] += 1
      if calls["n"] == 1:
        raise RuntimeError("device fault")
      return real(*args)

    monkeypatch.setattr(sampling, "decode_block", fail_once)
    broken = engine.submit(prompt(5, 1), SamplingParams(temperature=0.0, max_tokens=4))
    assert [o.finish_reason for o in broken][-1] == "error"
    fine = engine.submit(prompt(5, 1), SamplingParams(temperature=0.0, max_tokens=4))
    assert [t for o in fine for t in o.token_ids] == alone(model, prompt(5, 1), fine.params)
    assert engine.stats().errors == 1 and engine.stats().busy_slots == 0
  finally:
    engine.stop()


@pytest.mark.slow
def test_the_thread_streams_to_asyncio_and_to_blocking_readers(model):
  engine = make_engine(model, tokenizer=ByteTokenizer()).start()
  try:
    params = SamplingParams(temperature=0.0, max_tokens=9)

    async def read_all():
      requests = [engine.submit(prompt(4 + i, i), params) for i in range(6)]
      results = await asyncio.gather(*[collect(r) for r in requests])
      return requests, results

    async def collect(request):
      return [t async for out in request.stream() for t in out.token_ids]

    requests, results = asyncio.run(asyncio.wait_for(read_all(), timeout=120))
    for i, tokens in enumerate(results):
      assert tokens == alone(model, prompt(4 + i, i), params)
    blocking = engine.submit(prompt(4, 0), params)
    assert [t for out in blocking for t in out.token_ids] == results[0]
    assert engine.running and engine.stats().busy_slots == 0
  finally:
    engine.stop()
  assert not engine.running
  with pytest.raises(engine_lib.EngineStopped):
    engine.submit([1])


@pytest.mark.slow
def test_no_request_compiles_anything_after_start(model):
  engine = make_engine(model, slots=3, prefill_batch=3)  # shapes no other test compiles
  engine.compile()
  # pylint: disable=protected-access
  programs = {"decode": sampling.decode_block, "prefill": chunks._run_chunk,
              "place": engine_lib._place, "stack": engine_lib._stack, "row": engine_lib._row}
  compiled = lambda: {name: fn._cache_size() for name, fn in programs.items()}
  before = compiled()
  settings = [SamplingParams(temperature=0.0, max_tokens=3),
              SamplingParams(temperature=0.8, top_p=0.5, top_k=3, seed=1, max_tokens=9, n=2),
              SamplingParams(presence_penalty=0.4, frequency_penalty=0.2, penalty_decay=0.5,
                             stop_token_ids=tuple(range(1, 14)), max_tokens=5),
              SamplingParams(temperature=1.5, n=3, max_tokens=2, seed=3)]
  requests = [engine.submit(prompt(1 + 11 * i, i), p) for i, p in enumerate(settings)]
  requests += [engine.submit(prompt(n, 9), GREEDY) for n in (2, 3, 20)]
  run_until_done(engine, requests)
  assert compiled() == before

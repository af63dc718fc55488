"""The OpenAI-compatible server as a real process on 127.0.0.1, driven by the official `openai`
client (and httpx for what a client library would not send): completions and chat, streamed and
not, n > 1, OpenAI error bodies, a full queue, a disconnecting client, the prefix cache, a soak."""

import concurrent.futures
import contextlib
import json
import pathlib
import random
import sys
import time

import httpx
import jax
import openai
import pytest

import training_util
from experiments import bench_serve
from experiments.bench_serve import idle, metrics
from rwkv_jax.config import RWKVConfig
from rwkv_jax.data.tokenizer import ByteTokenizer
from rwkv_jax.infer import sampling
from rwkv_jax.io import formats

pytestmark = pytest.mark.slow  # every test talks to a server process

CFG = RWKVConfig(n_layer=2, n_embd=32, vocab_size=256)
MODEL = "tiny-rwkv"
SLOTS, CHUNK, MAX_PROMPT, MAX_NEW, MAX_BODY = 4, 16, 200, 64, 4096
START_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def model():
  return training_util.random_model(CFG, 0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
  path = tmp_path_factory.mktemp("serve") / "tiny.pth"
  formats.save_pth(model, path)
  return path


@contextlib.contextmanager
def running_server(checkpoint: pathlib.Path, *flags: str):
  """`python -m experiments.serve` of the tiny model on a free loopback port; yields its URL."""
  env = training_util.subprocess_env(devices=1)
  env["RWKV_JAX_COMPILE_CACHE"] = str(checkpoint.parent / "xla")
  log = checkpoint.parent / f"server_{len(list(checkpoint.parent.glob('*.log')))}.log"
  with bench_serve.server(checkpoint, "--tokenizer=bytes", f"--model_name={MODEL}", *flags,
                          log=log, env=env, start_timeout_s=START_TIMEOUT_S) as srv:
    yield srv.url
  assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def server(checkpoint):
  with running_server(checkpoint, f"--slots={SLOTS}", f"--prefill_chunk={CHUNK}",
                      "--prefill_batch=4", f"--max_prompt_tokens={MAX_PROMPT}",
                      f"--max_new_tokens={MAX_NEW}", f"--max_body_bytes={MAX_BODY}",
                      "--max_queue=64") as url:
    yield url


@pytest.fixture(scope="module")
def one_slot_server(checkpoint):
  """One slot and a queue of one: a long request holds the slot, the next one waits."""
  with running_server(checkpoint, "--slots=1", "--prefill_batch=1", f"--prefill_chunk={CHUNK}",
                      "--max_queue=1", "--max_new_tokens=1000000") as url:
    yield url


def client(url):
  return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def wait_for(url, condition, what, timeout=60):
  deadline = time.monotonic() + timeout
  while not condition(m := metrics(url)):
    assert time.monotonic() < deadline, f"timed out waiting for {what}: {m}"
    time.sleep(0.1)
  return m


def prompt_ids(length, seed):
  return random.Random(seed).choices(range(1, CFG.vocab_size), k=length)


def alone(model, tokens, max_tokens, **settings):
  out = sampling.generate(model, [tokens], max_tokens, jax.random.key(settings.pop("seed", 0)),
                          sampling=sampling.SamplingConfig(**settings), prefill_chunk=64)
  return ByteTokenizer().decode(out.sequences()[0])


def test_models_lists_the_served_model(server):
  assert [m.id for m in client(server).models.list().data] == [MODEL]


def test_completion_is_the_greedy_continuation_of_the_prompt_alone(server, model):
  ids = prompt_ids(23, 0)
  done = client(server).completions.create(model=MODEL, prompt=ids, max_tokens=12,
                                           temperature=0)
  assert done.choices[0].text == alone(model, ids, 12, temperature=0.0)
  assert done.choices[0].finish_reason == "length"
  assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (23, 12)


def test_streaming_sends_the_same_text_as_one_response(server, model):
  text = "Streams of tokens, one event at a time."
  ids = list(text.encode())
  events = list(client(server).completions.create(
      model=MODEL, prompt=text, max_tokens=20, temperature=0, stream=True,
      stream_options={"include_usage": True}))
  assert "".join(e.choices[0].text for e in events if e.choices) == alone(
      model, ids, 20, temperature=0.0)
  assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
  assert events[-1].usage.completion_tokens == 20 and events[-1].usage.prompt_tokens == len(ids)


def test_n_choices_fork_one_prompt(server, model):
  ids = prompt_ids(30, 1)
  greedy = client(server).completions.create(model=MODEL, prompt=ids, max_tokens=10,
                                             temperature=0, n=3)
  assert [c.text for c in greedy.choices] == [alone(model, ids, 10, temperature=0.0)] * 3
  assert greedy.usage.completion_tokens == 30
  sampled = [client(server).completions.create(model=MODEL, prompt=ids, max_tokens=10, n=2,
                                               temperature=1.0, seed=7) for _ in range(2)]
  texts = [[c.text for c in s.choices] for s in sampled]
  assert texts[0] == texts[1]  # the same seed
  assert texts[0][0] == alone(model, ids, 10, temperature=1.0, seed=7)
  assert texts[0][0] != texts[0][1]  # the choices have keys of their own


def test_chat_uses_the_rwkv_format_streamed_or_not(server, model):
  messages = [{"role": "user", "content": "Hello\n\nthere"}]
  formatted = "User: Hello\nthere\n\nAssistant:"
  done = client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                                temperature=0)
  expected = alone(model, list(formatted.encode()), 8, temperature=0.0)
  expected = expected.split("\n\n")[0].lstrip()  # the reply ends at the format's separator
  assert done.choices[0].message.role == "assistant"
  assert done.choices[0].message.content == expected
  assert done.usage.prompt_tokens == len(formatted.encode())
  chunks = list(client(server).chat.completions.create(model=MODEL, messages=messages,
                                                       max_tokens=8, temperature=0, stream=True))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
  assert chunks[-1].choices[0].finish_reason in ("stop", "length")


BAD_REQUESTS = [
    # (name, path, body (dict, or bytes sent as they are), status, param, code)
    ("malformed JSON", "completions", b'{"model": "tiny-rwkv", "prompt": "a",', 400, None,
     "invalid_json"),
    ("not an object", "completions", b'[1, 2]', 400, None, "invalid_value"),
    ("unknown model", "completions", {"model": "gpt-9", "prompt": "a"}, 400, "model",
     "model_not_found"),
    ("no prompt", "completions", {"model": MODEL}, 400, "prompt", "invalid_value"),
    ("max_tokens 0", "completions", {"model": MODEL, "prompt": "a", "max_tokens": 0}, 400,
     "max_tokens", "invalid_value"),
    ("max_tokens over the limit", "completions",
     {"model": MODEL, "prompt": "a", "max_tokens": MAX_NEW + 1}, 400, "max_tokens",
     "invalid_value"),
    ("temperature", "completions", {"model": MODEL, "prompt": "a", "temperature": 2.5}, 400,
     "temperature", "invalid_value"),
    ("negative temperature", "chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "temperature": -1}, 400,
     "temperature", "invalid_value"),
    ("top_p 0", "completions", {"model": MODEL, "prompt": "a", "top_p": 0}, 400, "top_p",
     "invalid_value"),
    ("top_p over 1", "completions", {"model": MODEL, "prompt": "a", "top_p": 1.5}, 400, "top_p",
     "invalid_value"),
    ("n 0", "completions", {"model": MODEL, "prompt": "a", "n": 0}, 400, "n", "invalid_value"),
    ("n over the slots", "completions", {"model": MODEL, "prompt": "a", "n": SLOTS + 1}, 400,
     "n", "invalid_value"),
    ("a string for a number", "completions", {"model": MODEL, "prompt": "a", "n": "two"}, 400,
     "n", "invalid_value"),
    ("token id out of the vocabulary", "completions", {"model": MODEL, "prompt": [1, 999]}, 400,
     "prompt", "invalid_value"),
    ("prompt over the limit", "completions", {"model": MODEL, "prompt": "a" * (MAX_PROMPT + 1)},
     400, "prompt", "context_length_exceeded"),
    ("chat over the limit", "chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "a" * MAX_PROMPT}]}, 400,
     "messages", "context_length_exceeded"),
    ("no messages", "chat/completions", {"model": MODEL, "messages": []}, 400, "messages",
     "invalid_value"),
    ("unknown role", "chat/completions",
     {"model": MODEL, "messages": [{"role": "robot", "content": "a"}]}, 400,
     "messages.0.role", "invalid_value"),
    ("body over the limit", "completions", {"model": MODEL, "prompt": "a" * (MAX_BODY + 10)},
     413, None, "request_too_large"),
]


@pytest.mark.parametrize("name,path,body,status,param,code", BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_an_openai_error_and_change_nothing(server, name, path, body, status,
                                                             param, code):
  before = metrics(server)
  content = body if isinstance(body, bytes) else json.dumps(body).encode()
  response = httpx.post(f"{server}/v1/{path}", content=content, timeout=30,
                        headers={"Content-Type": "application/json"})
  assert response.status_code == status, response.text
  error = response.json()["error"]
  assert set(error) == {"message", "type", "param", "code"}, error
  assert (error["param"], error["code"]) == (param, code), error
  assert error["message"] and error["type"] == "invalid_request_error"
  after = metrics(server)
  assert after["rwkv_requests_submitted_total"] == before["rwkv_requests_submitted_total"]
  assert idle(after)


def test_the_openai_client_sees_bad_requests_as_its_errors(server):
  with pytest.raises(openai.BadRequestError) as e:
    client(server).completions.create(model="gpt-9", prompt="a")
  assert e.value.code == "model_not_found" and e.value.param == "model"
  with pytest.raises(openai.NotFoundError):
    client(server).post("/nowhere", cast_to=object, body={})
  assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_a_full_queue_answers_429_with_retry_after(one_slot_server):
  url = one_slot_server
  body = {"model": MODEL, "prompt": "hold the slot", "max_tokens": 1000000, "stream": True}
  with httpx.Client(timeout=60) as http:
    with http.stream("POST", f"{url}/v1/completions", json=body) as holder:
      lines = holder.iter_lines()  # kept: an iterator dropped closes the connection
      next(lines)  # decoding: the slot is taken
      with http.stream("POST", f"{url}/v1/completions", json=body) as waiter:
        assert waiter.status_code == 200
        wait_for(url, lambda m: m["rwkv_queue_length"] == 1, "the second request to wait")
        refused = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"].isdigit()
        assert refused.json()["error"]["code"] == "queue_full"
  # Both clients have gone: the slot and the queue are free.
  wait_for(url, idle, "the slot and queue to be freed")


def test_a_client_that_disconnects_mid_stream_frees_its_slot(one_slot_server):
  url = one_slot_server
  cancelled = metrics(url)["rwkv_requests_cancelled_total"]
  stream = client(url).completions.create(model=MODEL, prompt="go on and on", stream=True,
                                          max_tokens=1000000)
  for i, _ in enumerate(stream):
    if i == 3:
      break
  assert metrics(url)["rwkv_active_slots"] == 1
  stream.close()
  m = wait_for(url, idle, "the slot to be freed", timeout=30)
  assert m["rwkv_requests_cancelled_total"] == cancelled + 1
  # A non-streaming client that gives up frees its slot too.
  with pytest.raises(openai.APITimeoutError):
    openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=2
                  ).completions.create(model=MODEL, prompt="wait", max_tokens=1000000)
  m = wait_for(url, idle, "the slot to be freed", timeout=30)
  assert m["rwkv_requests_cancelled_total"] == cancelled + 2


def test_a_shared_prefix_is_prefilled_once(server, model):
  shared = prompt_ids(5 * CHUNK + 7, 40)
  first = client(server).completions.create(model=MODEL, prompt=shared + [5, 6], max_tokens=4,
                                            temperature=0)
  before = metrics(server)
  rest = prompt_ids(9, 41)
  second = client(server).completions.create(model=MODEL, prompt=shared + rest, max_tokens=4,
                                             temperature=0)
  after = metrics(server)
  assert first.usage.prompt_tokens_details.cached_tokens == 0
  assert second.usage.prompt_tokens_details.cached_tokens == 5 * CHUNK
  assert after["rwkv_prefix_cache_hits_total"] == before["rwkv_prefix_cache_hits_total"] + 1
  computed = after["rwkv_prompt_tokens_computed_total"] - before[
      "rwkv_prompt_tokens_computed_total"]
  assert computed == len(shared) + len(rest) - 5 * CHUNK
  assert second.choices[0].text == alone(model, shared + rest, 4, temperature=0.0)


def test_a_small_soak_ends_with_no_server_error_and_every_slot_free(server):
  """40 requests from 8 threads: random lengths, streamed or not, every fifth cancelled
  mid-stream, every tenth malformed."""
  def one(i):
    rng = random.Random(i)
    body = {"model": MODEL, "prompt": prompt_ids(rng.randint(1, 120), i),
            "max_tokens": rng.randint(1, MAX_NEW), "temperature": rng.choice([0, 0.8])}
    if i % 10 == 9:
      return httpx.post(f"{server}/v1/completions", content=b'{"model": ', timeout=60,
                        headers={"Content-Type": "application/json"}).status_code
    if i % 2:
      return httpx.post(f"{server}/v1/completions", json=body, timeout=120).status_code
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True},
                      timeout=120) as response:
      for n, _ in enumerate(response.iter_lines()):
        if i % 5 == 0 and n == 2:
          break  # the client leaves
      return response.status_code

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    statuses = list(pool.map(one, range(40)))
  assert statuses.count(400) == 4 and statuses.count(200) == 36, statuses
  m = wait_for(server, idle, "every slot to be freed")
  assert not [k for k, v in m.items() if 'status="5' in k and v], m
  assert m["rwkv_engine_errors_total"] == 0


@pytest.mark.parametrize("flags,expected", [
    (["--checkpoint=/nonexistent/m.pth"], "--checkpoint=/nonexistent/m.pth does not exist"),
    (["--chat_format=klingon"], "--chat_format: chat format 'klingon' is neither one of"),
    (["--prefill_batch=8", "--slots=2"], "--prefill_batch=8 must be <= --slots=2"),
])
def test_serve_usage_errors_are_one_line_and_status_2(checkpoint, flags, expected):
  args = [f"--checkpoint={checkpoint}", *flags]
  result = training_util.run_module([sys.executable, "-m", "experiments.serve", *args],
                                    training_util.subprocess_env(devices=1))
  assert expected in training_util.one_line_error(result)

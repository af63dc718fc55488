"""The OpenAI-compatible HTTP API over the serving engine (FastAPI); it only translates.

    app = create_app(engine, tokenizer, model_name="rwkv-4-169m")
    uvicorn.run(app, host="127.0.0.1", port=8000)      # experiments/serve.py does this

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both streamed as
server-sent events with "stream": true, n > 1 choices forked from one prefill, usage counted),
GET /health and GET /metrics (Prometheus text). Requests are pydantic models named after the
OpenAI API's; top_k, stop_token_ids and ignore_eos are accepted as in vLLM. Chat messages become
one prompt through a `ChatFormat` (RWKV's "User: ...\\n\\nAssistant:" by default).

Every failure is an OpenAI error body {"error": {"message", "type", "param", "code"}}: 400 for
malformed JSON, an unknown model, a parameter out of range or a prompt over the limit, 413 for a
body over the limit, 429 (with Retry-After) when the queue is full. A client that disconnects
cancels its request, streamed or not, so its slots are free before the next dispatch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal

from absl import logging
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from rwkv_jax.data import tokenizer as tokenizer_lib
from rwkv_jax.infer import engine as engine_lib

MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256


# ----------------------------------------------------------------------------------------------
# Chat formats.

@dataclasses.dataclass(frozen=True)
class ChatFormat:
  """How chat messages become one prompt: "Role: content" joined by `separator`, then the
  assistant's role and a colon; the reply ends at one of `stop`.

  As in ChatRWKV, a message's content is stripped and blank lines inside it become single
  newlines, so that the separator only ever separates messages.
  """

  roles: Mapping[str, str] = dataclasses.field(default_factory=lambda: {
      "system": "System", "developer": "System", "user": "User", "assistant": "Assistant"})
  separator: str = "\n\n"
  stop: tuple[str, ...] = ("\n\n",)

  def prompt(self, messages: Sequence[tuple[str, str]]) -> str:
    """The prompt of (role, content) pairs, ready for the assistant's reply."""
    clean = lambda text: "\n".join(
        line for line in text.strip().replace("\r\n", "\n").split("\n") if line.strip())
    turns = [f"{self.roles[role]}: {clean(content)}" for role, content in messages]
    return self.separator.join(turns + [f"{self.roles['assistant']}:"])

  @classmethod
  def load(cls, spec: str) -> "ChatFormat":
    """A format by name (CHAT_FORMATS) or from a JSON file {"roles": {...}, "separator": ...,
    "stop": [...]} (missing keys keep the defaults).

    Raises:
      ValueError: an unknown name, or a file that is not such JSON.
    """
    if spec in CHAT_FORMATS:
      return CHAT_FORMATS[spec]
    path = pathlib.Path(spec)
    if not path.is_file():
      raise ValueError(f"chat format {spec!r} is neither one of {sorted(CHAT_FORMATS)} nor a "
                       f"JSON file.")
    try:
      data = json.loads(path.read_text(encoding="utf-8"))
      fmt = cls(roles={**cls().roles, **data.get("roles", {})},
                separator=data.get("separator", "\n\n"), stop=tuple(data.get("stop", ("\n\n",))))
    except (ValueError, AttributeError, TypeError) as e:
      raise ValueError(f"chat format file {path}: {e}; expected JSON like {{\"roles\": "
                       f"{{\"user\": \"User\", \"assistant\": \"Assistant\"}}, \"separator\": "
                       f"\"\\n\\n\", \"stop\": [\"\\n\\n\"]}}.") from None
    if not all(isinstance(x, str) for x in [*fmt.roles.values(), fmt.separator, *fmt.stop]):
      raise ValueError(f"chat format file {path}: roles, separator and stop must be strings.")
    return fmt


CHAT_FORMATS = {
    "rwkv": ChatFormat(),
    # The Raven models' ChatRWKV names.
    "raven": ChatFormat(roles={"system": "System", "developer": "System", "user": "Bob",
                               "assistant": "Alice"}),
}


# ----------------------------------------------------------------------------------------------
# Requests (OpenAI's names; unknown fields are ignored, as OpenAI clients send new ones).

class StreamOptions(BaseModel):
  include_usage: bool = False


class _SamplingRequest(BaseModel):
  model_config = ConfigDict(extra="ignore")

  model: str
  max_tokens: int | None = Field(None, ge=1)
  temperature: float = Field(1.0, ge=0, le=2)
  top_p: float = Field(1.0, gt=0, le=1)
  top_k: int = Field(0, ge=0)
  n: int = Field(1, ge=1, le=128)
  stream: bool = False
  stream_options: StreamOptions | None = None
  stop: str | list[str] | None = None
  seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 63)
  presence_penalty: float = Field(0.0, ge=-2, le=2)
  frequency_penalty: float = Field(0.0, ge=-2, le=2)
  logit_bias: dict[str, float] | None = None
  user: str | None = None
  stop_token_ids: list[int] | None = None
  ignore_eos: bool = False


class CompletionRequest(_SamplingRequest):
  prompt: str | list[int] | list[str] | list[list[int]]
  echo: bool = False
  logprobs: int | None = None
  suffix: str | None = None
  best_of: int | None = None


class TextContentPart(BaseModel):
  type: Literal["text"]
  text: str


class ChatMessage(BaseModel):
  role: Literal["system", "developer", "user", "assistant"]
  content: str | list[TextContentPart]
  name: str | None = None

  def text(self) -> str:
    return self.content if isinstance(self.content, str) else "".join(
        p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
  messages: list[ChatMessage] = Field(min_length=1)
  max_completion_tokens: int | None = Field(None, ge=1)
  logprobs: bool = False


class APIError(Exception):
  """An OpenAI-shaped error response."""

  def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
               param: str | None = None, code: str | None = None,
               headers: Mapping[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.kind, self.param, self.code = (status, message, kind, param,
                                                                   code)
    self.headers = dict(headers or {})

  def response(self) -> JSONResponse:
    return JSONResponse(error_body(self.message, self.kind, self.param, self.code),
                        status_code=self.status, headers=self.headers)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None
               ) -> dict[str, Any]:
  """OpenAI's error body; `kind` is its "type" (invalid_request_error, server_error, ...)."""
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ----------------------------------------------------------------------------------------------
# Middleware: the body limit, and counting responses by status.

class _BodyLimit:
  """Reads each request's body before the app does, answering 413 past `max_bytes` (by the
  Content-Length header or by what arrives), and counts responses by path and status."""

  def __init__(self, app, max_bytes: int, responses: Counter, paths: set[str]):
    self.app, self.max_bytes, self.responses, self.paths = app, max_bytes, responses, paths

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    path = scope["path"] if scope["path"] in self.paths else "other"

    async def counted_send(message):
      if message["type"] == "http.response.start":
        self.responses.labels(path=path, status=str(message["status"])).inc()
      await send(message)

    too_large = APIError(413, f"The request body is larger than this server's limit of "
                         f"{self.max_bytes} bytes; send a shorter prompt.",
                         code="request_too_large")
    declared = dict(scope.get("headers") or []).get(b"content-length", b"")
    if declared.isdigit() and int(declared) > self.max_bytes:
      return await too_large.response()(scope, receive, counted_send)
    messages, size = [], 0
    while True:
      message = await receive()
      if message["type"] != "http.request":  # the client left before sending its body
        return
      size += len(message.get("body", b""))
      if size > self.max_bytes:
        return await too_large.response()(scope, receive, counted_send)
      messages.append(message)
      if not message.get("more_body"):
        break

    async def replay():
      return messages.pop(0) if messages else await receive()

    await self.app(scope, replay, counted_send)


# ----------------------------------------------------------------------------------------------
# Metrics.

class _EngineCollector:
  """The engine's counters as Prometheus metrics, read at each scrape."""

  def __init__(self, engine: engine_lib.Engine):
    self.engine = engine

  def collect(self):
    s = self.engine.stats()
    gauges = (("rwkv_queue_length", "Requests waiting for slots.", s.waiting),
              ("rwkv_slots", "Decode slots.", s.slots),
              ("rwkv_active_slots", "Slots decoding a request.", s.active_slots),
              ("rwkv_reserved_slots", "Slots held by requests being prefilled.",
               s.reserved_slots),
              ("rwkv_prefilling_requests", "Requests being prefilled.", s.prefilling),
              ("rwkv_tokens_per_second", "Generated tokens per second, over the last 10 s.",
               s.tokens_per_s),
              ("rwkv_prefix_cache_entries", "States in the prefix cache.", s.cache_entries),
              ("rwkv_prefix_cache_bytes", "Bytes held by the prefix cache.", s.cache_bytes))
    for name, doc, value in gauges:
      yield GaugeMetricFamily(name, doc, value=value)
    counters = (("rwkv_generated_tokens", "Tokens generated.", s.generated_tokens),
                ("rwkv_prompt_tokens", "Prompt tokens of admitted requests.", s.prompt_tokens),
                ("rwkv_prompt_tokens_computed", "Prompt tokens prefilled by the model.",
                 s.prompt_tokens_computed),
                ("rwkv_prompt_tokens_cached", "Prompt tokens taken from the prefix cache.",
                 s.prompt_tokens_cached),
                ("rwkv_prefix_cache_hits", "Prompts that found a cached prefix.", s.cache_hits),
                ("rwkv_prefix_cache_misses", "Prompts that found none.", s.cache_misses),
                ("rwkv_requests_submitted", "Requests accepted.", s.requests_submitted),
                ("rwkv_requests_finished", "Requests ended.", s.requests_finished),
                ("rwkv_requests_cancelled", "Requests cancelled (client gone).",
                 s.requests_cancelled),
                ("rwkv_decode_dispatches", "Decode dispatches.", s.decode_dispatches),
                ("rwkv_prefill_chunks", "Prefill chunks.", s.prefill_chunks),
                ("rwkv_engine_errors", "Failed dispatches.", s.errors))
    for name, doc, value in counters:
      yield CounterMetricFamily(name, doc, value=value)


# ----------------------------------------------------------------------------------------------
# The app.

@dataclasses.dataclass(frozen=True)
class _Job:
  """A validated request: what the engine runs and how its answer is shaped."""

  kind: Literal["completion", "chat"]
  prompt_tokens: list[int]
  params: engine_lib.SamplingParams
  stream: bool
  include_usage: bool


def create_app(engine: engine_lib.Engine, tokenizer: tokenizer_lib.Tokenizer, *,
               model_name: str, max_new_tokens: int = 2048, max_body_bytes: int = 1 << 20,
               chat_format: ChatFormat = ChatFormat(), retry_after_s: int = 1) -> FastAPI:
  """The HTTP app serving `engine` (started by the caller) as model `model_name`.

  Args:
    engine: the engine; its max_prompt_tokens is the prompt limit.
    tokenizer: encodes prompts (its end-of-text id is a stop token unless ignore_eos).
    model_name: the one model id the API knows.
    max_new_tokens: the largest max_tokens accepted (and chat's default).
    max_body_bytes: larger request bodies get 413.
    chat_format: how chat messages become a prompt.
    retry_after_s: the Retry-After of a 429.
  """
  app = FastAPI(title="rwkv_jax", docs_url=None, redoc_url=None, openapi_url=None)
  created = int(time.time())
  registry = CollectorRegistry()
  registry.register(_EngineCollector(engine))
  responses = Counter("rwkv_http_responses", "HTTP responses by path and status.",
                      ["path", "status"], registry=registry)
  paths = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"}
  app.add_middleware(_BodyLimit, max_bytes=max_body_bytes, responses=responses, paths=paths)

  @app.exception_handler(APIError)
  async def _api_error(_, e: APIError):
    return e.response()

  @app.exception_handler(RequestValidationError)
  async def _invalid(_, e: RequestValidationError):
    first = (e.errors() or [{}])[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
      return APIError(400, f"The body is not valid JSON ({first.get('ctx', {}).get('error')}); "
                      f"send a JSON object.", code="invalid_json").response()
    param = ".".join(loc) or None
    where = f"{param}: " if param else "the body: "
    return APIError(400, where + str(first.get("msg", "invalid")), param=param,
                    code="invalid_value").response()

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(_, e: StarletteHTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return APIError(e.status_code, str(e.detail), kind=kind).response()

  @app.exception_handler(Exception)
  async def _bug(_, e: Exception):
    logging.exception("Unhandled error in a request: %s", e)
    return APIError(500, "The server failed on this request.", kind="server_error").response()

  @app.get("/health")
  async def health():
    if not engine.running:
      return JSONResponse({"status": "stopped"}, status_code=503)
    return {"status": "ok"}

  @app.get("/metrics")
  async def metrics():
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [
        {"id": model_name, "object": "model", "created": created, "owned_by": "rwkv_jax"}]}

  def check_common(body: _SamplingRequest, default_max_tokens: int) -> engine_lib.SamplingParams:
    if body.model != model_name:
      raise APIError(400, f"The model {body.model!r} does not exist; this server serves "
                     f"{model_name!r}.", param="model", code="model_not_found")
    if body.logit_bias:
      raise APIError(400, "logit_bias is not supported.", param="logit_bias")
    max_tokens = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
      max_tokens = body.max_completion_tokens
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if max_tokens > max_new_tokens:
      raise APIError(400, f"max_tokens={max_tokens} is more than this server's limit of "
                     f"{max_new_tokens}.", param="max_tokens", code="invalid_value")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stop):
      raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings of 1 to "
                     f"{MAX_STOP_CHARS} characters.", param="stop", code="invalid_value")
    stop_ids = list(body.stop_token_ids or [])
    eos = tokenizer.end_of_text_id
    if eos is not None and not body.ignore_eos and eos not in stop_ids:
      stop_ids.append(eos)
    try:
      return engine_lib.SamplingParams(
          max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
          top_k=body.top_k, presence_penalty=body.presence_penalty,
          frequency_penalty=body.frequency_penalty, seed=body.seed,
          stop_token_ids=tuple(stop_ids), stop=tuple(stop), n=body.n)
    except engine_lib.ParamError as e:
      raise APIError(400, str(e), param=e.param, code="invalid_value") from None

  def encode(text: str) -> list[int]:
    ids = tokenizer.encode(text) if text else []
    if not ids:  # start from the end-of-text token, as after a document
      if tokenizer.end_of_text_id is None:
        raise APIError(400, "The prompt is empty; give some text.", param="prompt",
                       code="invalid_value")
      ids = [tokenizer.end_of_text_id]
    return ids

  def completion_job(body: CompletionRequest) -> _Job:
    params = check_common(body, default_max_tokens=16)
    for name, bad in (("echo", body.echo), ("logprobs", body.logprobs is not None),
                      ("suffix", body.suffix is not None),
                      ("best_of", body.best_of not in (None, body.n))):
      if bad:
        raise APIError(400, f"{name} is not supported.", param=name, code="unsupported")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
      if len(prompt) != 1:
        raise APIError(400, f"Give one prompt per request (got {len(prompt)}); use n for "
                       f"several completions of one prompt.", param="prompt")
      prompt = prompt[0]
    tokens = encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not tokens:
      raise APIError(400, "The prompt is empty; give some tokens.", param="prompt")
    return _Job("completion", tokens, params, body.stream,
                bool(body.stream_options and body.stream_options.include_usage))

  def chat_job(body: ChatCompletionRequest) -> _Job:
    params = check_common(body, default_max_tokens=max_new_tokens)
    if body.logprobs:
      raise APIError(400, "logprobs is not supported.", param="logprobs", code="unsupported")
    params = dataclasses.replace(params, stop=tuple(dict.fromkeys(
        params.stop + chat_format.stop)))
    text = chat_format.prompt([(m.role, m.text()) for m in body.messages])
    return _Job("chat", encode(text), params, body.stream,
                bool(body.stream_options and body.stream_options.include_usage))

  @app.post("/v1/completions")
  async def completions(body: CompletionRequest, request: Request):
    return await run(completion_job(body), request)

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await run(chat_job(body), request)

  async def run(job: _Job, http_request: Request):
    try:
      request = engine.submit(job.prompt_tokens, job.params)
    except engine_lib.ParamError as e:
      raise APIError(400, str(e), param="messages" if job.kind == "chat" and
                     e.param == "prompt" else e.param, code=e.code or "invalid_value") from None
    except engine_lib.QueueFull as e:
      raise APIError(429, f"The server is busy: {e}", kind="rate_limit_error",
                     code="queue_full", headers={"Retry-After": str(retry_after_s)}) from None
    except engine_lib.EngineStopped:
      raise APIError(503, "The server is shutting down.", kind="server_error") from None
    response_id = f"{'chatcmpl' if job.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    if job.stream:
      return StreamingResponse(_events(job, request, response_id),
                               media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
    texts = [[] for _ in range(request.n)]

    async def consume():
      async for out in request.stream():
        texts[out.index].append(out.text)

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_disconnected(http_request))
    try:
      await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
      watcher.cancel()
      if not consumer.done():  # the client has gone (or this task was cancelled)
        consumer.cancel()
        engine.cancel(request.id)
    if not consumer.done() or consumer.cancelled():
      return Response(status_code=499)  # nobody reads it
    consumer.result()
    if any(r in (engine_lib.ERROR, engine_lib.CANCELLED) for r in request.finish_reasons):
      raise APIError(500 if engine_lib.ERROR in request.finish_reasons else 503,
                     "The server could not finish this request; try again.", kind="server_error")
    choices = []
    for i, (pieces, reason) in enumerate(zip(texts, request.finish_reasons)):
      text = "".join(pieces)
      if job.kind == "chat":
        choices.append({"index": i, "message": {"role": "assistant", "content": text.lstrip()},
                        "logprobs": None, "finish_reason": reason})
      else:
        choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
    return {"id": response_id, "object": "chat.completion" if job.kind == "chat" else
            "text_completion", "created": int(time.time()), "model": model_name,
            "choices": choices, "usage": _usage(request)}

  async def _events(job: _Job, request: engine_lib.Request, response_id: str
                    ) -> AsyncIterator[str]:
    chat = job.kind == "chat"
    head = {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model_name}
    if job.include_usage:
      head["usage"] = None

    def event(choices, **extra) -> str:
      return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    started = [False] * request.n  # chat: the reply's leading spaces are dropped
    try:
      if chat:
        yield event([{"index": i, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None} for i in range(request.n)])
      async for out in request.stream():
        if out.finish_reason in (engine_lib.ERROR, engine_lib.CANCELLED):
          yield "data: " + json.dumps(error_body(
              "The server could not finish this request; try again.", "server_error")) + "\n\n"
          return
        text = out.text
        if chat and not started[out.index]:
          text = text.lstrip()
          started[out.index] = bool(text)
        if not text and out.finish_reason is None:
          continue
        if chat:
          delta = {"content": text} if text else {}
          choice = {"index": out.index, "delta": delta, "logprobs": None,
                    "finish_reason": out.finish_reason}
        else:
          choice = {"index": out.index, "text": text, "logprobs": None,
                    "finish_reason": out.finish_reason}
        yield event([choice])
      if job.include_usage:
        yield event([], usage=_usage(request))
      yield "data: [DONE]\n\n"
    finally:  # the client has gone (the task is cancelled) or all is sent: free the slots
      engine.cancel(request.id)

  return app


def _usage(request: engine_lib.Request) -> dict[str, Any]:
  prompt = len(request.prompt_tokens)
  return {"prompt_tokens": prompt, "completion_tokens": request.completion_tokens,
          "total_tokens": prompt + request.completion_tokens,
          "prompt_tokens_details": {"cached_tokens": request.cached_tokens}}


async def _disconnected(request: Request) -> None:
  """Returns when the client of a request whose body has been read disconnects."""
  while True:
    message = await request.receive()
    if message["type"] == "http.disconnect":
      return

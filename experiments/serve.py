r"""Serves a checkpoint over an OpenAI-compatible HTTP API (rwkv_jax.infer.openai_api).

    python -m experiments.serve --checkpoint=RWKV-4-Pile-169M-20220807-8023.pth --port=8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "rwkv", "prompt": "The Eiffel tower is in", "max_tokens": 20}'

--checkpoint is anything rwkv_jax.io.weights.load reads. The engine (rwkv_jax.infer.engine)
decodes --slots requests together and compiles its programs before the server listens, so the
first request is as fast as the rest. GET /health answers once it listens; GET /metrics gives
Prometheus text. The server binds to --host (loopback by default: it has no authentication).
"""


import uvicorn
from absl import flags, logging

from experiments import _cli
from experiments._cli import UsageError
from rwkv_jax.infer import engine as engine_lib
from rwkv_jax.infer import openai_api
from rwkv_jax.io import weights

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Official .pth file, HF directory or Orbax export.", required=True)
_DTYPES = list(getattr(weights, "DTYPES", None) or ("float32", "bfloat16"))
_DTYPE = flags.DEFINE_enum("dtype", "float32", _DTYPES, "Parameter and compute dtype.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "neox", "bytes, neox (RWKV-4 Pile models), world, or a tokenizer file path.")
_MODEL_NAME = flags.DEFINE_string("model_name", "rwkv", "The model id clients ask for.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.", lower_bound=0, upper_bound=65535)
_SLOTS = flags.DEFINE_integer("slots", 16, "Requests decoded together.", lower_bound=1)
_MAX_PROMPT_TOKENS = flags.DEFINE_integer("max_prompt_tokens", 8192, "Longest prompt accepted.",
                                          lower_bound=1)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 2048,
                                       "Largest max_tokens accepted (and chat's default).",
                                       lower_bound=1)
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 256,
                                  "Requests waiting for slots; more get 429.", lower_bound=0)
_CACHE_MB = flags.DEFINE_float("cache_mb", 256, "Prefix cache size in MiB; 0 = off.",
                               lower_bound=0)
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 128, "Prompt tokens per prefill call "
                                      "(the longest pause of running streams).", lower_bound=1)
_PREFILL_BATCH = flags.DEFINE_integer("prefill_batch", 8, "Prompts prefilled together.",
                                      lower_bound=1)
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 4, "Tokens per slot per dispatch.",
                                     lower_bound=1, upper_bound=16)
_MAX_BODY_BYTES = flags.DEFINE_integer("max_body_bytes", 1 << 20, "Larger bodies get 413.",
                                       lower_bound=1)
_CHAT_FORMAT = flags.DEFINE_string(
    "chat_format", "rwkv", f"One of {sorted(openai_api.CHAT_FORMATS)} or a JSON file "
    "({\"roles\": {...}, \"separator\": ..., \"stop\": [...]}).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UsageError(f"Unexpected arguments: {argv[1:]}")
  with _cli.user_input(ValueError, flag="--chat_format"):
    chat_format = openai_api.ChatFormat.load(_CHAT_FORMAT.value)
  if _PREFILL_BATCH.value > _SLOTS.value:
    raise UsageError(f"--prefill_batch={_PREFILL_BATCH.value} must be <= --slots={_SLOTS.value}.")
  model, _, tokenizer = _cli.load_model_and_tokenizer(_CHECKPOINT.value, _DTYPE.value,
                                                       _TOKENIZER.value)
  engine = engine_lib.Engine(
      model, slots=_SLOTS.value, prefill_chunk=_PREFILL_CHUNK.value,
      prefill_batch=_PREFILL_BATCH.value, decode_steps=_DECODE_STEPS.value,
      cache_bytes=int(_CACHE_MB.value * (1 << 20)), max_queue=_MAX_QUEUE.value,
      max_prompt_tokens=_MAX_PROMPT_TOKENS.value, tokenizer=tokenizer,
      vocab_limit=tokenizer.vocab_size).start()
  app = openai_api.create_app(engine, tokenizer, model_name=_MODEL_NAME.value,
                              max_new_tokens=_MAX_NEW_TOKENS.value,
                              max_body_bytes=_MAX_BODY_BYTES.value, chat_format=chat_format)
  logging.info("Serving %s as %r on http://%s:%d", _CHECKPOINT.value, _MODEL_NAME.value,
               _HOST.value, _PORT.value)
  try:
    uvicorn.run(app, host=_HOST.value, port=_PORT.value, log_level="warning",
                access_log=False, timeout_graceful_shutdown=5)
  finally:
    engine.stop()


if __name__ == "__main__":
  _cli.run(main)

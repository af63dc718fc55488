r"""Generates text from an RWKV-4 checkpoint, printing it as it comes.

    python -m experiments.generate --checkpoint=RWKV-4-Pile-169M-20220807-8023.pth \
        --tokenizer=neox --prompt="The Eiffel tower is in" --max_tokens=100

--checkpoint is anything rwkv_jax.weights.load reads: an official .pth file, a HuggingFace
directory, or an Orbax export / training work directory of experiments.train. Only the
continuation goes to stdout; with --num_samples > 1 the samples are generated as one batch and
printed one after another.
"""

import pathlib
import sys
import time

import jax
from absl import app
from absl import flags
from absl import logging

from rwkv_jax import checkpoint as _  # noqa: F401  (registers Orbax exports with weights.load)
from rwkv_jax import sampling
from rwkv_jax import tokenizer as tokenizer_lib
from rwkv_jax import weights

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Official .pth file, HF directory or Orbax export.", required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "File holding the text to continue.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "neox", "bytes, neox (RWKV-4 Pile models), world, or a tokenizer file path.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 200, "New tokens per sample.", lower_bound=0)
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "0 = greedy.", lower_bound=0.0)
_TOP_P = flags.DEFINE_float("top_p", 0.85, "Nucleus mass; 1 = off.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most probable tokens; 0 = off.",
                              lower_bound=0)
_ALPHA_PRESENCE = flags.DEFINE_float("alpha_presence", 0.0,
                                     "Penalty on tokens already generated (ChatRWKV uses 0.2).")
_ALPHA_FREQUENCY = flags.DEFINE_float("alpha_frequency", 0.0,
                                      "Penalty per earlier occurrence (ChatRWKV uses 0.2).")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True,
                                 "End a sample at the tokenizer's end-of-text token.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Continuations of the same prompt.",
                                    lower_bound=1)
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 1024, "Prompt tokens per parallel call.",
                                      lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")


def _read_prompt() -> str:
  if _PROMPT.value is not None and _PROMPT_FILE.value is not None:
    raise app.UsageError("Pass either --prompt or --prompt_file, not both.")
  if _PROMPT_FILE.value is not None:
    path = pathlib.Path(_PROMPT_FILE.value)
    if not path.is_file():
      raise app.UsageError(f"--prompt_file={path} does not exist.")
    text = path.read_text(encoding="utf-8")
    where = f"--prompt_file={path}"
  else:
    text, where = _PROMPT.value or "", "--prompt"
  if not text:
    raise app.UsageError(f"{where} is empty; give some text to continue (--prompt=... or "
                         f"--prompt_file=...).")
  return text


class _TextStream:
  """Prints decoded tokens as they arrive.

  The text printed so far is always a prefix of the decoding of every token so far: the whole
  list is decoded each time and trailing U+FFFD (possibly a character whose bytes have not all
  arrived yet) is held back until later tokens settle it.
  """

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, skip: set[int]):
    self._tok, self._skip = tokenizer, skip
    self._ids: list[int] = []
    self._printed = ""

  def add(self, token: int) -> None:
    if token not in self._skip:
      self._ids.append(token)
      self._write(self._tok.decode(self._ids).rstrip("\ufffd"))

  def flush(self) -> None:
    self._write(self._tok.decode(self._ids))
    sys.stdout.write("\n")
    sys.stdout.flush()

  def _write(self, text: str) -> None:
    if len(text) > len(self._printed) and text.startswith(self._printed):
      sys.stdout.write(text[len(self._printed):])
      sys.stdout.flush()
      self._printed = text


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpoint = pathlib.Path(_CHECKPOINT.value)
  if not checkpoint.exists():
    raise app.UsageError(f"--checkpoint={checkpoint} does not exist; pass an official RWKV-4 "
                         f".pth file, a HuggingFace directory or an rwkv_jax export.")
  text = _read_prompt()
  try:
    tokenizer = tokenizer_lib.load_tokenizer(_TOKENIZER.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(f"--tokenizer: {e}") from None
  try:
    model, config = weights.load(checkpoint, dtype=_DTYPE.value)
  except weights.CheckpointError as e:
    raise app.UsageError(str(e)) from None
  if tokenizer.vocab_size > config.vocab_size:
    raise app.UsageError(
        f"--tokenizer={_TOKENIZER.value} has {tokenizer.vocab_size} tokens but the model only "
        f"{config.vocab_size}; use the tokenizer the model was trained with (RWKV-4 Pile models: "
        f"neox; byte-level models: bytes).")
  prompt = tokenizer.encode(text)
  if not prompt:
    raise app.UsageError("The prompt encodes to no tokens; give some text to continue.")
  eos = tokenizer.end_of_text_id
  stop = (eos,) if _STOP_AT_EOS.value and eos is not None else ()
  n = _NUM_SAMPLES.value
  logging.info("Model n_layer=%d n_embd=%d vocab=%d; prompt of %d tokens; %s devices.",
               config.n_layer, config.n_embd, config.vocab_size, len(prompt), jax.devices())

  stream = _TextStream(tokenizer, set(stop)) if n == 1 else None

  def on_token(token_b, emitted_b):
    if emitted_b[0]:
      stream.add(int(token_b[0]))

  start = time.perf_counter()
  result = sampling.generate(
      model, [prompt] * n, _MAX_TOKENS.value, jax.random.key(_SEED.value),
      sampling=sampling.SamplingConfig(
          temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value,
          alpha_presence=_ALPHA_PRESENCE.value, alpha_frequency=_ALPHA_FREQUENCY.value,
          stop_tokens=stop, vocab_limit=tokenizer.vocab_size),
      prefill_chunk=_PREFILL_CHUNK.value, callback=on_token if stream else None)
  seconds = time.perf_counter() - start
  if stream:
    stream.flush()
  else:
    for i, seq in enumerate(result.sequences()):
      print(f"--- sample {i + 1} of {n} ---")
      print(tokenizer.decode([t for t in seq if t not in stop]))
  logging.info("%d tokens in %.2f s (compilation included).", int(result.lengths.sum()), seconds)


if __name__ == "__main__":
  app.run(main)

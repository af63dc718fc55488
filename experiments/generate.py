r"""Generates text from an RWKV-4 checkpoint, printing it as it comes.

    python -m experiments.generate --checkpoint=RWKV-4-Pile-169M-20220807-8023.pth \
        --tokenizer=neox --prompt="The Eiffel tower is in" --max_tokens=100

--checkpoint is anything rwkv_jax.io.weights.load reads: an official .pth file, a HuggingFace
directory, or an Orbax export / training work directory of experiments.train. Only the
continuation goes to stdout; with --num_samples > 1 the samples are generated as one batch and
printed one after another.

Scripting: --prompt_tokens=1,2,3 gives token ids instead of text; --output=FILE.json writes the
generated ids (a JSON list with one list per sample, prompt excluded, a stop token included);
--max_tokens=0 only runs the prompt.

Prompt cache: --save_state=FILE writes the recurrent state after everything processed (the prompt
and the generated tokens; with --max_tokens=0, the prompt's) in the format of
rwkv_jax.io.state_file; --load_state=FILE continues from such a state, the prompt then optional.
Continuing a saved prompt's state with more prompt gives the tokens that the whole prompt in one
go gives (same --seed). A state of one sequence is forked into --num_samples.

    python -m experiments.generate --checkpoint=M.pth --prompt_file=long.txt --max_tokens=0 \
        --save_state=long.state
    python -m experiments.generate --checkpoint=M.pth --load_state=long.state --prompt="Q: ..."

A mistake in the flags or the files they name ends in one line and exit status 2, a failure
(e.g. an output that cannot be written) in one line and status 1; --debug shows tracebacks.
"""

import json
import pathlib
import sys
import time

import jax
import numpy as np
from absl import flags, logging

from experiments import _cli
from experiments._cli import UsageError
from rwkv_jax import compile_cache, files
from rwkv_jax.data import tokenizer as tokenizer_lib
from rwkv_jax.infer import sampling
from rwkv_jax.io import state_file, weights

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Official .pth file, HF directory or Orbax export.", required=True)
_ADAPTERS = flags.DEFINE_string(
    "adapters", None, "A fine-tuning run's adapters directory (experiments.finetune's "
    "WORKDIR/adapters) to put on --checkpoint, its base, unmerged: LoRA and the learned state.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "File holding the text to continue.")
_PROMPT_TOKENS = flags.DEFINE_string("prompt_tokens", None,
                                     "Token ids to continue, comma-separated (instead of text).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "neox", "bytes, neox (RWKV-4 Pile models), world, or a tokenizer file path.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 200, "New tokens per sample; 0 = prompt only.",
                                   lower_bound=0)
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "0 = greedy.", lower_bound=0.0)
_TOP_P = flags.DEFINE_float("top_p", 0.85, "Nucleus mass in (0, 1]; 1 = off.", upper_bound=1.0)
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
# The names weights.load accepts (weights.DTYPES where it declares them).
_DTYPES = list(getattr(weights, "DTYPES", None) or ("float32", "bfloat16"))
_DTYPE = flags.DEFINE_enum("dtype", "float32", _DTYPES, "Parameter and compute dtype.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the generated token ids here (.json): one "
                              "list per sample, prompt excluded.")
_SAVE_STATE = flags.DEFINE_string("save_state", None, "Write the state after the prompt and the "
                                  "generated tokens here, to continue from with --load_state.")
_LOAD_STATE = flags.DEFINE_string("load_state", None, "Continue from a state written with "
                                  "--save_state (by the same model); the prompt is optional.")

flags.register_validator("top_p", lambda p: p > 0, "--top_p must be in (0, 1]; 1 disables "
                         "nucleus sampling.")
flags.register_validator("temperature", lambda t: t == t and t != float("inf"),
                         "--temperature must be a finite number >= 0 (0 = greedy).")
for _name in ("alpha_presence", "alpha_frequency"):
  flags.register_validator(_name, lambda a: abs(a) != float("inf") and a == a,
                           f"--{_name} must be a finite number.")


def _read_prompt(optional: bool) -> str | list[int]:
  """The prompt as text or token ids, checked before anything is loaded."""
  given = [f for f in (_PROMPT, _PROMPT_FILE, _PROMPT_TOKENS) if f.value is not None]
  if len(given) > 1:
    raise UsageError(f"Pass only one of {', '.join('--' + f.name for f in given)}.")
  if not given:
    if optional:
      return []
    raise UsageError("Give a prompt: --prompt=TEXT, --prompt_file=FILE or "
                     "--prompt_tokens=1,2,3 (or --load_state=FILE to continue a state).")
  flag = given[0]
  if flag is _PROMPT_TOKENS:
    prompt = _cli.integers(flag.name, flag.value, allow_empty=True)
  elif flag is _PROMPT_FILE:
    path = pathlib.Path(flag.value)
    if not path.is_file():
      raise UsageError(f"--prompt_file={path} does not exist.")
    try:
      prompt = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
      raise UsageError(f"--prompt_file={path} is not UTF-8 text ({e.reason} at byte "
                       f"{e.start}).") from None
    except OSError as e:  # e.g. no permission to read it
      raise UsageError(f"--prompt_file={path}: {e}") from None
  else:
    prompt = flag.value
  if not prompt and not optional:
    where = f"--{flag.name}" + (f"={flag.value}" if flag is _PROMPT_FILE else "")
    raise UsageError(f"{where} is empty; give something to continue.")
  return prompt


def _prompt_ids(prompt: str | list[int], tokenizer, vocab_size: int, optional: bool
                ) -> list[int]:
  if isinstance(prompt, str):
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids and not optional:
      raise UsageError("The prompt encodes to no tokens; give some text to continue.")
    return ids
  bad = [i for i in prompt if not 0 <= i < vocab_size]
  if bad:
    raise UsageError(f"--prompt_tokens: ids {bad[:5]} are outside the model's vocabulary "
                     f"[0, {vocab_size}).")
  return prompt


def _load_state(config, n: int) -> state_file.SavedState | None:
  if _LOAD_STATE.value is None:
    return None
  with _cli.user_input(state_file.StateFileError, flag="--load_state"):
    saved = state_file.load(_LOAD_STATE.value, config=config)
  if saved.batch == 1 and n > 1:
    saved = state_file.SavedState(
        state_file.fork(saved.state, n), saved.next_logits.repeat(n, axis=0),
        saved.tokens_consumed * n, saved.n_layer, saved.n_embd, saved.dim_att,
        saved.vocab_size, saved.param_dtype)
  if saved.batch != n:
    raise UsageError(f"--load_state={_LOAD_STATE.value} holds {saved.batch} sequences but "
                     f"--num_samples={n}; pass --num_samples={saved.batch}, or a state of "
                     f"one sequence (which is forked).")
  return saved


def _sampling_config(tokenizer) -> sampling.SamplingConfig:
  eos = tokenizer.end_of_text_id
  return sampling.SamplingConfig(
      temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value,
      alpha_presence=_ALPHA_PRESENCE.value, alpha_frequency=_ALPHA_FREQUENCY.value,
      stop_tokens=(eos,) if _STOP_AT_EOS.value and eos is not None else (),
      vocab_limit=tokenizer.vocab_size)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UsageError(f"Unexpected arguments: {argv[1:]}")
  output = _cli.output_path(_OUTPUT.name, _OUTPUT.value)
  save_path = _cli.output_path(_SAVE_STATE.name, _SAVE_STATE.value)
  prompt = _read_prompt(optional=_LOAD_STATE.value is not None)
  n = _NUM_SAMPLES.value
  prepared = {}

  def prepare(config, tokenizer) -> None:
    """Checks the prompt against the model, then compiles the programs generate runs while the
    weights are read."""
    ids = _prompt_ids(prompt, tokenizer, config.vocab_size,
                      optional=_LOAD_STATE.value is not None)
    settings = _sampling_config(tokenizer)
    # Adapters change the model's programs: they compile when they first run instead.
    work = () if _ADAPTERS.value else sampling.compile_generate(
        config, n, len(ids), _MAX_TOKENS.value, sampling=settings,
        prefill_chunk=_cli.chunk_for(_PREFILL_CHUNK.value, len(ids)))
    prepared.update(ids=ids, settings=settings, compiling=compile_cache.ahead_of_time(work))

  model, config, tokenizer = _cli.load_model_and_tokenizer(
      _CHECKPOINT.value, _DTYPE.value, _TOKENIZER.value, prepare=prepare,
      adapters=_ADAPTERS.value)
  saved = _load_state(config, n)
  prompt, settings = prepared["ids"], prepared["settings"]
  logging.info("Model n_layer=%d n_embd=%d vocab=%d; prompt of %d tokens%s; %s devices.",
               config.n_layer, config.n_embd, config.vocab_size, len(prompt),
               f" after a saved state of {saved.tokens_consumed[0]}" if saved else "",
               jax.devices())

  stream = (_TextStream(tokenizer_lib.StreamDecoder(tokenizer), set(settings.stop_tokens))
            if n == 1 else None)

  def on_token(token_b, emitted_b):
    if emitted_b[0]:
      stream.add(int(token_b[0]))

  start = time.perf_counter()
  state, next_logits = (saved.state, saved.next_logits) if saved else (None, None)
  if prompt:
    # The prompt runs as soon as its program is ready, while the decoding program (compiled
    # second, see sampling.compile_generate) may still be compiling.
    prepared["compiling"].wait(1)
    next_logits, state = sampling.prefill(
        model, np.asarray([prompt] * n, np.int32), state,
        chunk=_cli.chunk_for(_PREFILL_CHUNK.value, len(prompt)))
  prepared["compiling"].wait()
  result = sampling.generate(
      model, [[]] * n, _MAX_TOKENS.value, sampling.seed_key(_SEED.value), sampling=settings,
      callback=on_token if stream else None, state=state, next_logits=next_logits)
  seconds = time.perf_counter() - start
  if stream:
    stream.flush(newline=_MAX_TOKENS.value > 0)
  else:
    for i, seq in enumerate(result.sequences()):
      print(f"--- sample {i + 1} of {n} ---")
      print(tokenizer.decode([t for t in seq if t not in settings.stop_tokens]))
  logging.info("%d tokens in %.2f s (compilation included).", int(result.lengths.sum()), seconds)

  if output is not None:
    with _cli.writing(_OUTPUT.name, output), files.atomic_write(output, "w") as f:
      json.dump(result.sequences(), f)
      f.write("\n")
  if save_path is not None:
    before = saved.tokens_consumed if saved else (0,) * n
    with _cli.writing(_SAVE_STATE.name, save_path):
      state_file.save(save_path, state_file.SavedState.of(
          config, result.state, result.next_logits,
          [b + len(prompt) + int(k) for b, k in zip(before, result.lengths)]))


class _TextStream:
  """Prints decoded tokens as they arrive; the printed text equals the decoding of all of them.

  Each token is decoded once (tokenizer.StreamDecoder), so the work per token does not grow with
  the text; a character split across tokens is printed when its last byte arrives.
  """

  def __init__(self, decoder: tokenizer_lib.StreamDecoder, skip: set[int]):
    self._decoder, self._skip = decoder, skip

  def add(self, token: int) -> None:
    if token not in self._skip:
      self._write(self._decoder.add(token))

  def flush(self, newline: bool = True) -> None:
    self._write(self._decoder.flush())
    if newline:
      sys.stdout.write("\n")
    sys.stdout.flush()

  def _write(self, text: str) -> None:
    if text:
      sys.stdout.write(text)
      sys.stdout.flush()


if __name__ == "__main__":
  # A mistake in the flags or the files they name is the user's to fix (status 2); an output that
  # cannot be written is a failed run (status 1). --debug shows tracebacks.
  _cli.run(main)

r"""Scores tokens or text with an RWKV-4 checkpoint (.pth, HF directory or Orbax export).

  python -m experiments.score --checkpoint=PATH --tokens=1,2,3 --output=logits.npy
  python -m experiments.score --checkpoint=PATH --text="Hello world" [--tokenizer=neox]
  python -m experiments.score --checkpoint=PATH --text_file=held_out.txt
"""

import pathlib
import sys

from absl import app, flags, logging
import numpy as np

flags.DEFINE_string("checkpoint", None, "Official .pth file, HF directory or Orbax export.")
flags.DEFINE_string("tokens", None, "Comma-separated token ids to score.")
flags.DEFINE_string("output", None, "With --tokens: write float32 logits [T, vocab] here (.npy).")
flags.DEFINE_string("text", None, "Text to score (loss, perplexity, bits per byte).")
flags.DEFINE_string("text_file", None, "File whose text to score.")
flags.DEFINE_string("tokenizer", None, "bytes | neox | world | PATH; default from the vocab size "
                    "(256 -> bytes, 50277 -> neox, 65536 -> world).")
flags.DEFINE_integer("chunk", 1024, "Tokens per model call; state is carried between chunks.")
flags.DEFINE_string("impl", "auto", "WKV implementation.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
flags.DEFINE_integer("show_tokens", 20, "Print the losses of this many tokens.")
FLAGS = flags.FLAGS

_DEFAULT_TOKENIZER = {256: "bytes", 50277: "neox", 65536: "world"}


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse_tokens(text: str) -> np.ndarray:
  try:
    ids = [int(x) for x in text.replace(" ", "").split(",") if x]
  except ValueError:
    _fail(f"--tokens={text!r} must be comma-separated integers, e.g. --tokens=1,2,3.")
  if not ids:
    _fail("--tokens is empty; give at least one token id.")
  return np.asarray(ids, np.int64)


def main(argv):
  del argv
  from rwkv_jax import checkpoint as _  # noqa: F401  (registers the Orbax format)
  from rwkv_jax import files, scoring, weights
  from rwkv_jax.tokenizer import load_tokenizer

  if not FLAGS.checkpoint:
    _fail("--checkpoint is required (an official .pth, an HF directory or an Orbax export).")
  modes = [m for m in ("tokens", "text", "text_file") if FLAGS[m].value is not None]
  if len(modes) != 1:
    _fail("give exactly one of --tokens, --text, --text_file.")
  try:
    model, config = weights.load(FLAGS.checkpoint, dtype=FLAGS.dtype)
  except (ValueError, FileNotFoundError) as e:
    _fail(str(e))
  logging.info("Loaded %s: %s", FLAGS.checkpoint, config)

  if FLAGS.tokens is not None:
    tokens = _parse_tokens(FLAGS.tokens)
    try:
      logits = scoring.logits_for(model, tokens, chunk=FLAGS.chunk, impl=FLAGS.impl)
    except ValueError as e:
      _fail(str(e))
    if FLAGS.output:
      out = pathlib.Path(FLAGS.output)
      with files.atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, logits.astype(np.float32))  # a file object: np.save adds no ".npy"
      print(f"wrote logits {logits.shape} float32 to {out}")
    else:
      print(f"logits {logits.shape}; argmax per position: {logits.argmax(-1).tolist()}")
    return

  if FLAGS.text_file is not None:
    path = pathlib.Path(FLAGS.text_file)
    if not path.is_file():
      _fail(f"--text_file={path} does not exist.")
    text = path.read_text(encoding="utf-8", errors="replace")
  else:
    text = FLAGS.text
  spec = FLAGS.tokenizer or _DEFAULT_TOKENIZER.get(config.vocab_size)
  if spec is None:
    _fail(f"the model's vocabulary has {config.vocab_size} tokens, which matches no built-in "
          f"tokenizer; pass --tokenizer=PATH.")
  try:
    tokenizer = load_tokenizer(spec)
  except (FileNotFoundError, ValueError) as e:
    _fail(str(e))
  if tokenizer.vocab_size > config.vocab_size:
    _fail(f"tokenizer {spec!r} has {tokenizer.vocab_size} tokens but the model only "
          f"{config.vocab_size}; pass the tokenizer the model was trained with.")
  tokens = np.asarray(tokenizer.encode(text), np.int64)
  if len(tokens) < 2:
    _fail(f"the text encodes to {len(tokens)} token(s); need at least 2 to score.")
  num_bytes = len(tokenizer.decode(tokens[1:].tolist()).encode("utf-8"))
  result = scoring.score_tokens(model, tokens, num_bytes, chunk=FLAGS.chunk, impl=FLAGS.impl)
  for tok, loss in list(zip(tokens[1:], result.token_losses))[:FLAGS.show_tokens]:
    print(f"{tok:>8d} {tokenizer.decode([int(tok)])!r:>20}  loss {loss:7.3f}")
  print(f"tokens scored: {len(result.token_losses)}  bytes: {result.num_bytes}")
  print(f"loss: {result.mean_loss:.4f} nats/token  perplexity: {result.perplexity:.3f}  "
        f"bits per byte: {result.bits_per_byte:.4f}")


if __name__ == "__main__":
  app.run(main)

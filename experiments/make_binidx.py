r"""Tokenizes a text file into a Megatron binidx pair (PREFIX.bin + PREFIX.idx).

    python -m experiments.make_binidx --input=corpus.txt --output_prefix=data/corpus \
        --tokenizer=neox

Documents are paragraphs separated by blank lines (or lines, with --split=line), each followed
by token 0; see `rwkv_jax.data.encode_text_file`. Train on the result with
--config.data.path=data/corpus. A mistake in the flags or files ends in one line and exit
status 2 (--debug: the traceback).
"""

import os
import pathlib

from absl import app, flags

from experiments import _cli
from rwkv_jax.data import encode as data_encode

_INPUT = flags.DEFINE_string("input", None, "UTF-8 text file to tokenize.", required=True)
_OUTPUT_PREFIX = flags.DEFINE_string(
    "output_prefix", None, "Output path without suffix; PREFIX.bin and PREFIX.idx are written.",
    required=True)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "neox", "neox, world, bytes, or a path to a tokenizer .json / World .txt file.")
_SPLIT = flags.DEFINE_enum("split", "paragraph", ["paragraph", "line"],
                           "One document per blank-line-separated paragraph, or per line.")


def _check_paths(text: pathlib.Path, prefix: str) -> None:
  """Raises app.UsageError naming the flag if the input or the output cannot be used."""
  if not text.is_file():
    raise app.UsageError(f"--input={text} is {'a directory' if text.is_dir() else 'missing'}; "
                         f"pass a UTF-8 text file.")
  if prefix.endswith(("/", "\\")) or pathlib.Path(prefix).is_dir():
    raise app.UsageError(f"--output_prefix={prefix} is a directory; pass a path without suffix "
                         f"inside it, e.g. {pathlib.Path(prefix) / text.stem}.")
  parent = pathlib.Path(prefix).expanduser().absolute().parent
  existing = next(p for p in (parent, *parent.parents) if p.exists())  # created when writing
  if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
    raise app.UsageError(f"--output_prefix={prefix}: cannot create the directory {parent} "
                         f"({existing} is {'a file' if not existing.is_dir() else 'read-only'});"
                         f" pass a prefix in a directory you can write.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so --help works even where the tokenizer's dependencies are missing.
  from rwkv_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  text = pathlib.Path(_INPUT.value).expanduser()
  _check_paths(text, _OUTPUT_PREFIX.value)
  try:
    tokenizer = tokenizer_lib.load_tokenizer(_TOKENIZER.value)
  except (ValueError, OSError) as e:
    raise app.UsageError(f"--tokenizer={_TOKENIZER.value}: {e}") from e
  try:
    source = data_encode.encode_text_file(text, tokenizer, _OUTPUT_PREFIX.value, split=_SPLIT.value)
  except UnicodeDecodeError as e:
    raise app.UsageError(f"--input={text} is not UTF-8 text ({e.reason}, byte "
                         f"{e.object[e.start:e.start + 1]!r}); convert it to UTF-8 first.") from e
  print(f"Wrote {source.bin_path} and {source.idx_path}: {source.num_sequences} documents, "
        f"{len(source)} {source.dtype.name} tokens (vocab {tokenizer.vocab_size}).")


if __name__ == "__main__":
  _cli.run(main, usage_errors=(ValueError,), failures=(OSError,))  # OSError: a failed write

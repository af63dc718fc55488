r"""Tokenizes a text file into a Megatron binidx pair (PREFIX.bin + PREFIX.idx).

    python -m experiments.make_binidx --input=corpus.txt --output_prefix=data/corpus \
        --tokenizer=neox

Documents are paragraphs separated by blank lines (or lines, with --split=line), each followed
by token 0; see `rwkv_jax.data.encode_text_file`. Train on the result with
--config.data.path=data/corpus. A mistake in the flags or files ends in one line and exit
status 2 (--debug: the traceback).
"""

import pathlib

from absl import flags

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


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise _cli.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so --help works even where the tokenizer's dependencies are missing.
  from rwkv_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  text = pathlib.Path(_INPUT.value).expanduser()
  if not text.is_file():
    raise _cli.UsageError(f"--input={text} is {'a directory' if text.is_dir() else 'missing'}; "
                          f"pass a UTF-8 text file.")
  prefix = _cli.output_path(_OUTPUT_PREFIX.name, _OUTPUT_PREFIX.value)
  with _cli.user_input(ValueError, OSError, flag=f"--tokenizer={_TOKENIZER.value}"):
    tokenizer = tokenizer_lib.load_tokenizer(_TOKENIZER.value)
  try:
    with _cli.writing(_OUTPUT_PREFIX.name, prefix):
      source = data_encode.encode_text_file(text, tokenizer, prefix, split=_SPLIT.value)
  except UnicodeDecodeError as e:
    raise _cli.UsageError(f"--input={text} is not UTF-8 text ({e.reason}, byte "
                          f"{e.object[e.start:e.start + 1]!r}); convert it to UTF-8 first.") from e
  except ValueError as e:  # the text is empty, or its ids do not fit the token type
    raise _cli.UsageError(str(e)) from e
  print(f"Wrote {source.bin_path} and {source.idx_path}: {source.num_sequences} documents, "
        f"{len(source)} {source.dtype.name} tokens (vocab {tokenizer.vocab_size}).")


if __name__ == "__main__":
  _cli.run(main)

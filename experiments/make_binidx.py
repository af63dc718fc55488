r"""Tokenizes a text file into a Megatron binidx pair (PREFIX.bin + PREFIX.idx).

    python -m experiments.make_binidx --input=corpus.txt --output_prefix=data/corpus \
        --tokenizer=neox

Documents are paragraphs separated by blank lines (or lines, with --split=line), each followed
by token 0; see `rwkv_jax.data.encode_text_file`. Train on the result with
--config.data.path=data/corpus.
"""

from absl import app
from absl import flags

from rwkv_jax import data

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
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so --help works even where the tokenizer's dependencies are missing.
  from rwkv_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  tokenizer = tokenizer_lib.load_tokenizer(_TOKENIZER.value)
  source = data.encode_text_file(_INPUT.value, tokenizer, _OUTPUT_PREFIX.value,
                                 split=_SPLIT.value)
  print(f"Wrote {source.bin_path} and {source.idx_path}: {source.num_sequences} documents, "
        f"{len(source)} {source.dtype.name} tokens (vocab {tokenizer.vocab_size}).")


if __name__ == "__main__":
  app.run(main)

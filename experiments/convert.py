r"""Converts RWKV-4 weights between an official .pth file, a HuggingFace directory and an Orbax
export (rwkv_jax's native format; a training work directory is read at its latest checkpoint).

    python -m experiments.convert --input=RWKV-4-Pile-169M.pth --output=hf/rwkv-4-169m
    python -m experiments.convert --input=hf/rwkv-4-169m --output=back.pth --dtype=bfloat16
    python -m experiments.convert --input=RWKV-4-Pile-169M.pth --output=orbax/169m --format=orbax
    python -m experiments.convert --input=workdir/run --output=trained.pth

The output format follows the output path (*.pth -> official file, anything else -> HF
directory) unless --format says otherwise. Without --dtype every tensor is written in the dtype
of the input's embedding (a mixed-precision input, e.g. fp32 time_decay in a bf16 file, comes out
uniform).

An output that already exists (a file, or a directory with anything in it) is replaced only with
--overwrite, and never when it is a training work directory.
"""

import pathlib

from absl import app
from absl import flags

from rwkv_jax import weights

_INPUT = flags.DEFINE_string("input", None, "Official .pth file, HuggingFace directory, Orbax "
                             "export or training work directory.",
                             required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Destination .pth file, HuggingFace directory "
                              "or Orbax export directory.", required=True)
_FORMAT = flags.DEFINE_enum("format", None, ["pth", "hf", "orbax"],
                            "Output format; default: pth if --output ends in .pth, else hf.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Tensor dtype of the output; default: that of the input.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")


def output_format(output: str, fmt: str | None) -> str:
  """The format to write: --format if given, else inferred from the output path."""
  if fmt is not None:
    return fmt
  return "pth" if output.endswith(".pth") else "hf"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  src, dst = pathlib.Path(_INPUT.value), pathlib.Path(_OUTPUT.value)
  fmt = output_format(_OUTPUT.value, _FORMAT.value)
  if not src.exists():
    raise app.UsageError(f"--input={src} does not exist.")
  if dst.resolve() == src.resolve():
    raise app.UsageError(f"--output={dst} is the same path as --input; choose another.")
  if fmt in ("hf", "orbax") and dst.is_file():
    raise app.UsageError(f"--output={dst} is an existing file, but the {fmt} format writes a "
                         f"directory; pass a directory path or --format=pth.")
  if fmt == "pth" and dst.is_dir():
    raise app.UsageError(f"--output={dst} is a directory, but the pth format writes a file.")
  if dst.is_dir() and (dst / "checkpoints").is_dir():
    raise app.UsageError(f"--output={dst} is a training work directory; converting into it would "
                         f"take it over. Choose another --output.")
  exists = dst.is_file() or (dst.is_dir() and any(dst.iterdir()))
  if exists and not _OVERWRITE.value:
    raise app.UsageError(f"--output={dst} already exists; pass --overwrite to replace it, or "
                         f"choose another path.")

  try:
    config = weights.convert_checkpoint(src, dst, fmt, dtype=_DTYPE.value)
  except weights.CheckpointError as e:
    raise app.UsageError(str(e)) from None
  print(f"Wrote {dst} ({fmt}, {config.param_dtype}): n_layer={config.n_layer}, "
        f"n_embd={config.n_embd}, vocab_size={config.vocab_size}, "
        f"{config.num_params():,} parameters.")


if __name__ == "__main__":
  app.run(main)

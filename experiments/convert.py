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

    python -m experiments.convert --input=RWKV-4-Pile-169M.pth --output=int8/169m --dtype=int8

writes an int8 export (Orbax; --format=orbax is implied): the block matrices and the head
quantised once, read back by `weights.load` as they are. .pth and HF files hold only float
tensors, so int8 cannot be written to them.

A mistake in the flags or the files they name (a missing or unreadable input, an output that
exists, cannot be written or has the wrong kind, int8 into .pth or HF) ends in one line naming the
flag and exit status 2, with nothing written; a conversion that fails while writing (disk full)
in one line and status 1. --debug shows tracebacks.
"""

import json
import pathlib

from absl import flags

from experiments import _cli, _logs
from experiments._cli import UsageError
from rwkv_jax.io import checkpoint, tensor_names, weights

_INPUT = flags.DEFINE_string("input", None, "Official .pth file, HuggingFace directory, Orbax "
                             "export or training work directory.",
                             required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Destination .pth file, HuggingFace directory "
                              "or Orbax export directory.", required=True)
_FORMAT = flags.DEFINE_enum("format", None, ["pth", "hf", "orbax"],
                            "Output format; default: pth if --output ends in .pth, orbax for "
                            "--dtype=int8, else hf.")
_DTYPE = flags.DEFINE_enum("dtype", None, list(weights.DTYPES),
                           "Precision of the output (int8: an Orbax export); default: that of "
                           "the input.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")


def output_format(output: str, fmt: str | None, dtype: str | None = None) -> str:
  """The format to write: --format if given, else inferred from the output path and dtype."""
  if fmt is not None:
    return fmt
  if output.endswith(".pth"):
    return "pth"
  return "orbax" if dtype == "int8" else "hf"


def _input_quant(src: pathlib.Path) -> str:
  """"int8" for an int8 export, else ""."""
  marker = src / checkpoint.EXPORT_MARKER
  if not marker.is_file():
    return ""
  try:
    return json.loads(marker.read_text())["model"].get("quant", "")
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return ""  # load reports an unreadable export in its own words


def check_paths(src: pathlib.Path, dst: pathlib.Path, fmt: str, dtype: str | None,
                overwrite: bool) -> None:
  """Every check of the command line that needs no checkpoint read; raises UsageError."""
  if not src.exists():
    raise UsageError(f"--input={src} does not exist; pass an official .pth file, a "
                     f"HuggingFace directory, or an rwkv_jax export or work directory.")
  if dst.resolve() == src.resolve():
    raise UsageError(f"--output={dst} is the same path as --input; choose another.")
  if fmt != "orbax" and "int8" in (dtype, _input_quant(src) if dtype is None else None):
    what = "--dtype=int8" if dtype else f"--input={src} is an int8 export, and it"
    raise UsageError(f"{what} cannot be written as {fmt} (--output={dst}): .pth and HF "
                     f"files hold only float tensors. Write an int8 export with "
                     f"--format=orbax, or pass a float --dtype.")
  _cli.output_path("output", dst, directory=fmt != "pth")  # the pth format writes a file
  if dst.is_dir() and (dst / "checkpoints").is_dir():
    raise UsageError(f"--output={dst} is a training work directory; converting into it would "
                     f"take it over. Choose another --output.")
  exists = dst.is_file() or (dst.is_dir() and any(dst.iterdir()))
  if exists and not overwrite:
    raise UsageError(f"--output={dst} already exists; pass --overwrite to replace it, or "
                     f"choose another path.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UsageError(f"Unexpected arguments: {argv[1:]}")
  _logs.quiet_third_party()
  src, dst = pathlib.Path(_INPUT.value), pathlib.Path(_OUTPUT.value)
  fmt = output_format(_OUTPUT.value, _FORMAT.value, _DTYPE.value)
  check_paths(src, dst, fmt, _DTYPE.value, _OVERWRITE.value)
  # The input's fault is the user's to fix (status 2); the disk's is a failed run (status 1).
  with (_cli.user_input(tensor_names.CheckpointError, flag=f"--input={src}"),
        _cli.writing("output", dst)):
    config = weights.convert_checkpoint(src, dst, fmt, dtype=_DTYPE.value)
  print(f"Wrote {dst} ({fmt}, {config.precision}): n_layer={config.n_layer}, "
        f"n_embd={config.n_embd}, vocab_size={config.vocab_size}, "
        f"{config.num_params():,} parameters.")


if __name__ == "__main__":
  # A mistake in the flags or the files they name: one line, status 2. Writing failed: status 1.
  _cli.run(main)

r"""Fine-tunes a released RWKV-4: every parameter, LoRA adapters, the initial state, or both.

  python -m experiments.finetune --base=RWKV-4-Pile-169M.pth \
      --config=experiments/configs/finetune.py --workdir=/tmp/ft \
      --config.data.path=my.txt --config.finetune.mode=lora --config.finetune.r=16
  python -m experiments.finetune --base=hf://RWKV/rwkv-4-169m-pile --config=... --workdir=...
  python -m experiments.finetune --merge --workdir=/tmp/ft --output=merged.pth [--format=hf]

--base is anything `weights.load` reads (.pth, HF directory, Orbax export, training workdir) or
hf://ORG/REPO[/FILE] through huggingface_hub's cache (HF_HUB_OFFLINE=1: the cache only).
--config.finetune.mode: full | lora | state | lora+state; r, lora_alpha, lora_dropout,
target_modules (comma-separated: att.key, ..., ffn.value, head, or a suffix like key) and
base_dtype (the frozen base: float32, bfloat16, float16, int8) as in
rwkv_jax/train/finetune.py. Everything train does holds: re-running resumes, one run per
workdir, metrics in WORKDIR/metrics.jsonl and the curve in WORKDIR/loss.png. The run writes
WORKDIR/adapters (LoRA, state), WORKDIR/learned.state (for generate --load_state) or
WORKDIR/export (full).

--merge writes the base with the adapters folded in (pth, hf, or an Orbax export), refusing an
existing --output without --overwrite. A mistake in the flags or files (a mode, target or rank
that does not exist, a missing base, adapters or a workdir of another base) is one line and exit
status 2; a failed run (divergence, a busy workdir, a full disk) one line and status 1.
"""

import pathlib
import signal

from absl import flags
from ml_collections import config_flags

from experiments import _cli, _runs
from experiments._cli import UsageError

config_flags.DEFINE_config_file("config", None, "Fine-tuning config file "
                                "(experiments/configs/finetune.py).", lock_config=True)
_BASE = flags.DEFINE_string("base", None, "The released model: a checkpoint path or "
                            "hf://ORG/REPO[/FILE]. With --merge: default the run's own.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.", required=True)
_MERGE = flags.DEFINE_bool("merge", False, "Write WORKDIR's base with its adapters folded in "
                           "to --output instead of training.")
_OUTPUT = flags.DEFINE_string("output", None, "--merge: the .pth file, HF directory or export.")
_FORMAT = flags.DEFINE_enum("format", None, ["pth", "hf", "export"], "--merge: the output's "
                            "format; default pth for a name ending in .pth, else hf.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "--merge: replace an existing --output.")
FLAGS = flags.FLAGS


def merge() -> None:
  from rwkv_jax.io.tensor_names import CheckpointError  # pylint: disable=g-import-not-at-top
  from rwkv_jax.train import finetune  # pylint: disable=g-import-not-at-top

  if not _OUTPUT.value:
    raise UsageError("--merge needs --output (a .pth file, an HF directory or an export).")
  workdir, out = pathlib.Path(_WORKDIR.value), pathlib.Path(_OUTPUT.value)
  if not (workdir / finetune.ADAPTERS_DIR).is_dir() and not (workdir / finetune.EXPORT_DIR
                                                            ).is_dir():
    raise UsageError(f"--workdir={workdir} holds no finished fine-tuning run (no "
                     f"{finetune.ADAPTERS_DIR}/ or {finetune.EXPORT_DIR}/); finish the run first.")
  fmt = _FORMAT.value or ("pth" if out.name.endswith(".pth") else "hf")
  _cli.output_path("output", out, directory=fmt != "pth")
  if (out.is_file() or (out.is_dir() and any(out.iterdir()))) and not _OVERWRITE.value:
    raise UsageError(f"--output={out} already exists; pass --overwrite to replace it, or choose "
                     f"another path.")
  with _cli.user_input(CheckpointError, FileNotFoundError, ValueError, flag="--merge"), \
      _cli.writing("output", out):
    finetune.merge(workdir, out, fmt, base=_BASE.value)
  print(f"Wrote {out} ({fmt}): the base with {workdir / finetune.ADAPTERS_DIR} folded in.")


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"Unexpected arguments: {argv[1:]}")
  if _MERGE.value:
    return merge()
  if FLAGS.config is None or not _BASE.value:
    raise UsageError("Fine-tuning needs --base=PATH (or hf://ORG/REPO) and --config=FILE; or "
                     "pass --merge.")
  import jax  # pylint: disable=g-import-not-at-top

  from experiments import _logs, benchlib, plots  # pylint: disable=g-import-not-at-top
  from rwkv_jax.io.tensor_names import CheckpointError  # pylint: disable=g-import-not-at-top
  from rwkv_jax.train import config as train_config  # pylint: disable=g-import-not-at-top
  from rwkv_jax.train import finetune  # pylint: disable=g-import-not-at-top

  _logs.quiet_third_party()
  with _cli.user_input(train_config.ConfigError):
    finetune.check(FLAGS.config)
  with _cli.user_input(FileNotFoundError, CheckpointError, ValueError,
                       flag=f"--base={_BASE.value}"):
    loop_config, hooks = finetune.prepare(FLAGS.config, _WORKDIR.value, _BASE.value)
  final = _runs.train(loop_config, _WORKDIR.value, peak_flops=benchlib.peak_flops(), **hooks)
  if jax.process_index() == 0:
    plots.plot_loss(_WORKDIR.value, f"fine-tuning ({FLAGS.config.finetune.mode})")
  if "stopped_by_signal" in final:
    name = signal.Signals(final["stopped_by_signal"]).name
    print(f"Stopped by {name} at step {final['step']} of {loop_config.train.steps}, with a "
          f"checkpoint; run the same command to resume.")
    return
  print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in sorted(final.items())))


if __name__ == "__main__":
  _runs.run_cli(main)

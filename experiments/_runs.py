"""What the training entry points share: the checks at their boundary, and the claim runners' parts.

`train` is `train_loop.train_and_evaluate` behind the checks that make a mistake in the config,
workdir or data one line (`_cli.UsageError`) and anything else a traceback; `FAILURES` are the
ways a run fails through no mistake in the command (status 1). experiments.train, .demo and the
claim runners (char_level.py, scaling.py, long_context.py) train through them.

In a claim runner each run has its own workdir. `train_run` trains it with `train` (which resumes
from the workdir's latest checkpoint) and then writes WORKDIR/result.json; a later call with the
same config finds that file and returns it without training, so re-running a runner skips the
finished runs and resumes the unfinished one.

A runner adds its own flags, `run` and `plot` to the program's shared parts here: `define_flags`
(--workdir, --out, --tag), `start`, `default_tag`, `save_record` (OUT/NAME_TAG.json and its
.png) and `run_cli`.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from typing import Any, Callable, Sequence

import ml_collections
from absl import flags

from experiments import _cli, _logs, benchlib
from rwkv_jax import sharding, wkv
from rwkv_jax.data import sources as data_sources
from rwkv_jax.io import tensor_names
from rwkv_jax.train import config as train_config
from rwkv_jax.train import loop as train_loop
from rwkv_jax.train import metrics
from rwkv_jax.train import step as step_lib
from rwkv_jax.train import workdir as workdir_lib

RESULT_FILE = "result.json"
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
# A run that diverged, found its workdir busy or a checkpoint unusable failed: status 1.
FAILURES = (train_loop.NonFiniteLossError, workdir_lib.WorkdirBusyError,
            tensor_names.CheckpointError)


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, **kwargs: Any
          ) -> dict[str, float]:
  """`train_loop.train_and_evaluate(config, workdir, **kwargs)` after checking the user's input.

  The library calls that would reject the config, the model and mesh it describes, its WKV
  implementation, the workdir and the data are made first, each raising its error as a
  `_cli.UsageError`; a ValueError from the training itself is a bug and keeps its traceback.
  The data is opened twice, here and by the loop: a memory map, or text encoded once into the
  workdir and read back from there.
  """
  with _cli.user_input(train_config.ConfigError):
    train_config.check(config)
  with _cli.user_input(ValueError):  # RWKVConfig's fields, the mesh against the devices, impl
    step_lib.model_config(config)
    sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    wkv.resolve(config.train.impl)
  with _cli.user_input(workdir_lib.WorkdirError):
    workdir = workdir_lib.make_workdir(workdir)
  with _cli.user_input(ValueError, FileNotFoundError):  # missing, empty, ids beyond the vocab
    data_sources.open_training_source(config.data, workdir, config.model.vocab_size)
  return train_loop.train_and_evaluate(config, workdir, **kwargs)


def _config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def train_run(name: str, config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
              make_model: step_lib.ModelBuilder = step_lib.build_model, num_params: int,
              flops_per_token: int, rules: Sequence[tuple[str, Any]] | None = None
              ) -> dict[str, Any]:
  """Trains `config` in `workdir` unless a finished result for the same config is there.

  Args:
    name: the run's name in logs and records.
    config: a training config (rwkv_jax/train/config.py).
    workdir: this run's directory (checkpoints, metrics.jsonl, result.json).
    make_model: the trainer's model hook.
    num_params: the model's parameter count, for the record.
    flops_per_token: the model's training FLOPs per token, for the record.
    rules: partition rules for a model other than RWKV (rwkv_jax/sharding.py); None: RWKV's.

  Returns:
    The run's record: sizes, steps, tokens, wall time, final validation loss and bits per
    token, and the loss curves.
  """
  workdir = pathlib.Path(workdir)
  done = workdir / RESULT_FILE
  if done.exists():
    record = json.loads(done.read_text())
    if record.get("config") == _config_json(config):
      logging.info("%s: finished earlier (%s); skipped.", name, done)
      return record
    logging.info("%s: %s was written for another config; training again.", name, done)
  t = config.train
  logging.info("%s: %d parameters, %d steps of %d x %d tokens in %s.", name, num_params, t.steps,
               t.batch_size, config.model.ctx_len, workdir)
  start = time.perf_counter()
  final = train(config, workdir, make_model=make_model,
                rules=sharding.PARAM_RULES if rules is None else rules,
                flops_per_token=flops_per_token)
  wall_s = time.perf_counter() - start
  history = metrics.read_history(workdir)
  val = [(r["step"], r["val/loss"]) for r in history if "val/loss" in r]
  if not val:
    raise RuntimeError(f"{name}: {workdir} has no validation loss; set train.eval_every > 0.")
  val_loss = final.get("val/loss", val[-1][1])
  tokens = t.steps * t.batch_size * config.model.ctx_len
  record = {
      "name": name,
      "config": _config_json(config),
      "num_params": num_params,
      "flops_per_token": flops_per_token,
      "steps": t.steps,
      "tokens": tokens,
      "train_flops": flops_per_token * tokens,
      "wall_s": wall_s,  # this invocation's; less than the whole run's if it resumed
      # This invocation's training steps after the first (which compiles), evaluation excluded.
      "train_tokens_per_s": final.get("perf/tokens_per_s"),
      "val_loss": val_loss,
      "val_bits_per_token": val_loss / math.log(2),
      "train_curve": [(r["step"], r["train/loss_avg"]) for r in history if "train/loss_avg" in r],
      "val_curve": val,
  }
  benchlib.write_json(done, record)
  logging.info("%s: validation %.4f bits/token after %d steps, %.0f s.", name,
               record["val_bits_per_token"], t.steps, wall_s)
  return record


def define_flags(name: str, tag_example: str) -> None:
  """Defines --workdir (runs under WORKDIR/NAME_<size>/), --out and --tag.

  They belong to this module: a runner lists them in its --helpshort with
  `flags.adopt_module_key_flags(_runs)`.

  Args:
    name: the prefix of the runner's run directories and result files ("char", "scaling", ...).
    tag_example: a non-CPU default tag for --tag's help (e.g. "gpu_gpu_h100").
  """
  flags.DEFINE_string("workdir", "/tmp/rwkv_claims", f"Runs go under WORKDIR/{name}_<size>/.")
  flags.DEFINE_string("out", str(RESULTS_DIR), "Directory for the JSON and PNG.")
  flags.DEFINE_string("tag", None, "File name suffix; default: the size, then the device "
                      f"unless the size names it (e.g. cpu, tiny_cpu, {tag_example}).")


def start() -> pathlib.Path:
  """Starts a runner's main: logs the runner's and the trainer's progress at INFO, without
  third-party chatter, and returns --out, checked (`_cli.output_path`) before the first run."""
  logging.getLogger().setLevel(logging.INFO)
  _logs.quiet_third_party()
  return _cli.output_path("out", flags.FLAGS.out, directory=True)


def default_tag(size: str, suffix: str = "") -> str:
  """The size, then the device's tag unless the size is that tag, then `suffix`.

  On a CPU "cpu" stays "cpu" and "tiny" is "tiny_cpu"; on an H100 "paper" is "paper_gpu_h100".
  """
  device = benchlib.default_tag()
  return (size if size == device else f"{size}_{device}") + suffix


def save_record(name: str, record: dict[str, Any], out: str | pathlib.Path, tag: str,
                plot: Callable[[dict[str, Any], pathlib.Path], None]) -> pathlib.Path:
  """Writes OUT/NAME_TAG.json and `plot(record, OUT/NAME_TAG.png)`; returns the JSON's path."""
  out = pathlib.Path(out)
  path = benchlib.write_json(out / f"{name}_{tag}.json", record)
  plot(record, out / f"{name}_{tag}.png")
  return path


def run_cli(main: Callable[[list[str]], None]) -> None:
  """Runs a runner's `main` as a program.

  A bad flag, workdir or data file is the user's to fix (status 2); a run that diverged, found
  its workdir busy or a checkpoint unusable failed (status 1). --debug: tracebacks.
  """
  _cli.run(main, failures=FAILURES)

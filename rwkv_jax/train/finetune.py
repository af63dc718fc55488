"""Fine-tuning a released RWKV-4 with the training loop: full, LoRA, state tuning, or both.

  config = finetune.default_config()            # train's keys plus a `finetune` section
  finetune.train(config, workdir, base="RWKV-4-Pile-169M.pth")   # or hf://ORG/REPO[/FILE]
  finetune.merge(workdir, "merged.pth", fmt="pth")

`train` loads the base (`weights.load` at finetune.base_dtype), puts the adapters of
finetune.mode on it (rwkv_jax/train/adapters.py) and runs `loop.train_and_evaluate` with a
TrainState whose `params` are the trained part and whose `frozen` is the rest: everything train
does (exact resume, the workdir lock, damaged-checkpoint triage, the NaN stop, sharding, chunked
windows, metrics) holds, and checkpoints hold only the trained part and its optimizer state. At
the end WORKDIR holds:
  adapters/       adapter_config.json + adapter_model.npz (modes lora, state, lora+state)
  learned.state   the learned initial state as a state file (modes state, lora+state), for
                  `generate --load_state` and `sampling.generate(state=)`
  export/         the whole model (mode full), as train writes it
  finetune.json   the base's path and digest: a resume onto another base is refused

Shapes of the model (n_layer, n_embd, vocab_size, dim_att, dim_ffn) and its dtypes come from the
base; the config's model section gives only ctx_len (and remat).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import ml_collections
from absl import logging

from rwkv_jax import files, sharding
from rwkv_jax.config import RWKVConfig
from rwkv_jax.io import state_file
from rwkv_jax.train import adapters
from rwkv_jax.train import config as train_config
from rwkv_jax.train import loop
from rwkv_jax.train import step as step_lib

HF_PREFIX = "hf://"
RECORD = "finetune.json"
ADAPTERS_DIR, STATE_FILE, EXPORT_DIR = "adapters", "learned.state", "export"
FORMATS = ("pth", "hf", "export")


def default_config() -> ml_collections.ConfigDict:
  """train's defaults plus the `finetune` section (a short, gentle schedule)."""
  c = train_config.default_config()
  c.finetune = ml_collections.ConfigDict()
  c.finetune.mode = "lora"  # full | lora | state | lora+state
  c.finetune.r = 8  # LoRA rank
  c.finetune.lora_alpha = 16.0  # LoRA scale is lora_alpha / r
  c.finetune.lora_dropout = 0.0  # dropout on the LoRA path's input while training
  c.finetune.target_modules = ",".join(adapters.DEFAULT_TARGETS)  # comma-separated
  c.finetune.base_dtype = "float32"  # the frozen base: float32, bfloat16, float16 or int8
  c.optim.update(lr_init=1e-3, lr_final=1e-4, warmup_steps=10, layerwise_lr=False)
  c.train.update(steps=200, batch_size=8, log_every=10, eval_every=50, checkpoint_every=50)
  c.model.ctx_len = 256
  return c


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  f = config.finetune
  return {"mode": f.mode, "r": int(f.r), "lora_alpha": float(f.lora_alpha),
          "lora_dropout": float(f.lora_dropout),
          "target_modules": list(adapters.check_settings(f.mode, f.r, f.lora_alpha,
                                                         f.lora_dropout, f.target_modules))}


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line naming the setting) unless `config` is a valid fine-tuning
  config."""
  train_config._check_keys(config, default_config(), "config")  # pylint: disable=protected-access
  train_config.check(training_config(config))
  f = config.finetune
  try:
    adapters.check_settings(f.mode, f.r, f.lora_alpha, f.lora_dropout, f.target_modules)
  except ValueError as e:
    raise train_config.ConfigError(f"--config.{e}") from None
  from rwkv_jax.io import weights  # pylint: disable=g-import-not-at-top
  if f.base_dtype not in weights.DTYPES:
    raise train_config.ConfigError(f"--config.finetune.base_dtype={f.base_dtype!r} is not one "
                                   f"of {', '.join(weights.DTYPES)}.")
  if f.mode == "full" and f.base_dtype not in ("float32", "bfloat16", "float16"):
    raise train_config.ConfigError("--config.finetune.mode=full trains every parameter, which "
                                   f"{f.base_dtype} cannot hold; use base_dtype=float32.")


def training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config without its finetune section: what the training loop reads."""
  d = config.to_dict()
  d.pop("finetune", None)
  return ml_collections.ConfigDict(d)


def resolve_base(base: str | os.PathLike) -> pathlib.Path:
  """A local path for --base: itself, or hf://ORG/REPO[/FILE] fetched through huggingface_hub
  (its cache; with HF_HUB_OFFLINE=1 only the cache is read).

  Raises:
    FileNotFoundError: the path does not exist, or the hub has no such repository or file (or
      it is not in the cache when offline).
  """
  text = os.fspath(base)
  if not text.startswith(HF_PREFIX):
    path = pathlib.Path(text).expanduser()
    if not path.exists():
      raise FileNotFoundError(f"--base={text} does not exist; pass an official .pth file, a "
                              f"HuggingFace directory, an rwkv_jax export or work directory, or "
                              f"hf://ORG/REPO[/FILE].")
    return path
  parts = text[len(HF_PREFIX):].strip("/").split("/")
  if len(parts) < 2 or not all(parts):
    raise FileNotFoundError(f"--base={text} must be hf://ORG/REPO or hf://ORG/REPO/FILE.")
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors as hf_errors  # pylint: disable=g-import-not-at-top

  repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
  try:
    if filename:
      return pathlib.Path(huggingface_hub.hf_hub_download(repo, filename))
    return pathlib.Path(huggingface_hub.snapshot_download(repo))
  except (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError, OSError, ValueError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise FileNotFoundError(f"--base={text} could not be fetched ({type(e).__name__}: "
                            f"{first[:200]}); check the name, or the network and "
                            f"HF_HUB_OFFLINE.") from None


def load_base(base: str | os.PathLike, dtype: str) -> tuple[Any, RWKVConfig, pathlib.Path]:
  """(model, config, local path) of --base at `dtype`."""
  from rwkv_jax.io import weights  # pylint: disable=g-import-not-at-top
  path = resolve_base(base)
  model, config = weights.load(path, dtype=dtype)
  return model, config, path


def _model_section(config: ml_collections.ConfigDict, base_config: RWKVConfig
                   ) -> ml_collections.ConfigDict:
  c = training_config(config)
  c.model.update(n_layer=base_config.n_layer, n_embd=base_config.n_embd,
                 vocab_size=base_config.vocab_size, dim_att=base_config.dim_att,
                 dim_ffn=base_config.dim_ffn, dtype=base_config.dtype,
                 param_dtype=base_config.param_dtype)
  return c


def prepare(config: ml_collections.ConfigDict, workdir: str | os.PathLike, base: str
            ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """Loads `base` and adds the adapters of `config`; returns the loop's config (the model
  section the base's) and the keyword arguments `loop.train_and_evaluate` takes for them
  (make_state, finish).

  Raises:
    ConfigError: an invalid config (one line).
    FileNotFoundError: no such base.
    CheckpointError: the base is not a checkpoint; BaseMismatchError: WORKDIR was fine-tuned
      from another base or with other settings.
  """
  check(config)
  model, base_config, path = load_base(base, config.finetune.base_dtype)
  mode, chosen = config.finetune.mode, settings(config)
  workdir = pathlib.Path(workdir)
  record = {"base": str(base), "base_path": str(path), "base_digest": adapters.base_digest(path),
            "base_model": base_config.to_dict(), "finetune": chosen}
  check_record(workdir, record)  # before any work; again under the workdir's lock
  held = {"model": adapters.apply(model, mode, **{k: v for k, v in chosen.items() if k != "mode"},
                                  seed=config.train.seed)}
  del model

  def make_state(unused_config, mesh, tx) -> step_lib.TrainState:
    check_record(workdir, record)
    if jax.process_index() == 0:
      with files.atomic_write(workdir / RECORD, "w") as f:
        f.write(json.dumps(record, indent=2))
    return adapted_state(held.pop("model"), mode, mesh, tx)

  def finish(state: step_lib.TrainState) -> None:
    write_outputs(step_lib.merged_model(state), workdir, mode, record)

  return _model_section(config, base_config), {"make_state": make_state, "finish": finish}


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, base: str,
          **kwargs: Any) -> dict[str, float]:
  """Fine-tunes `base` with `config` in `workdir` (resuming if it holds a run); returns the
  loop's final metrics. kwargs go to `loop.train_and_evaluate` (e.g. peak_flops).

  Raises:
    What `prepare` and `loop.train_and_evaluate` raise.
  """
  loop_config, hooks = prepare(config, workdir, base)
  return loop.train_and_evaluate(loop_config, workdir, **hooks, **kwargs)


def check_record(workdir: pathlib.Path, record: dict[str, Any]) -> None:
  """Refuses to resume a workdir that was fine-tuned from another base or with other settings."""
  path = workdir / RECORD
  if not path.is_file():
    return
  saved = json.loads(path.read_text())
  if saved.get("base_digest") != record["base_digest"]:
    raise adapters.BaseMismatchError(
        f"{workdir} was fine-tuned from another base ({saved.get('base')}); pass that --base to "
        f"resume, or a new --workdir.")
  if saved.get("finetune") != record["finetune"]:
    raise adapters.BaseMismatchError(
        f"{workdir} was fine-tuned with finetune={saved.get('finetune')}; pass the same settings "
        f"to resume, or a new --workdir.")


def adapted_state(model, mode: str, mesh, tx) -> step_lib.TrainState:
  """The TrainState of an adapted model: the trained part in `params` (with its optimizer
  state), the rest in `frozen`, each placed on `mesh` by `adapters.rules()`."""
  graphdef, trainable, frozen = adapters.split(model, mode)
  del model
  rules = adapters.rules()
  param_sh = sharding.param_shardings(mesh, trainable, rules)
  frozen_sh = sharding.param_shardings(mesh, frozen, rules)
  trainable = jax.device_put(trainable, param_sh)
  frozen = jax.device_put(frozen, frozen_sh)
  opt_sh = sharding.tree_shardings(mesh, jax.eval_shape(tx.init, trainable), rules)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
  return step_lib.TrainState(graphdef, trainable, opt_state, param_sh, opt_sh, frozen=frozen,
                             frozen_shardings=frozen_sh)


def write_outputs(model, workdir: pathlib.Path, mode: str, record: dict[str, Any]) -> None:
  """The adapters, the learned state or the export of a finished run (process 0 writes)."""
  from rwkv_jax.io import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  if mode == "full":
    ckpt_lib.export(model, workdir / EXPORT_DIR)  # collective
    return
  if jax.process_index() != 0:
    return
  adapters.save(model, workdir / ADAPTERS_DIR, settings=record["finetune"],
                base_config=RWKVConfig.from_dict(record["base_model"]),
                base_digest=record["base_digest"], base_path=record["base_path"])
  if adapters.uses_state(mode):
    state_file.save(workdir / STATE_FILE, adapters.learned_state(model))
  logging.info("Adapters written to %s%s.", workdir / ADAPTERS_DIR,
               f", the learned state to {workdir / STATE_FILE}" if adapters.uses_state(mode)
               else "")


def merge(workdir: str | os.PathLike, output: str | os.PathLike, fmt: str = "pth",
          base: str | None = None) -> pathlib.Path:
  """Writes the base with a finished run's adapters folded in as a full checkpoint.

  Args:
    workdir: a fine-tuning run's directory (its adapters/ or export/).
    output: a .pth file ("pth"), an HF directory ("hf") or an Orbax export ("export").
    fmt: one of FORMATS.
    base: the base; default the one the run recorded.

  Returns:
    The output path. A learned state is not part of a checkpoint: it stays WORKDIR/learned.state.

  Raises:
    ValueError: an unknown fmt.
    CheckpointError: the workdir holds no finished run, or the base is not the run's.
  """
  from rwkv_jax.io import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from rwkv_jax.io import formats, weights  # pylint: disable=g-import-not-at-top
  writers = {"pth": formats.save_pth, "hf": formats.save_hf, "export": ckpt_lib.export}
  if fmt not in writers:
    raise ValueError(f"format={fmt!r} is not one of {', '.join(FORMATS)}.")
  workdir = pathlib.Path(workdir)
  if (workdir / EXPORT_DIR / ckpt_lib.EXPORT_MARKER).is_file():  # mode full: no adapters
    model, _ = weights.load(workdir / EXPORT_DIR, dtype="float32")
  else:
    meta = adapters.read_config(workdir / ADAPTERS_DIR)
    source = resolve_base(base or meta.get("base_path") or "")
    model, _ = weights.load(source, dtype="float32", adapters=workdir / ADAPTERS_DIR)
    model = adapters.merge_and_unload(model)
  writers[fmt](model, output)
  return pathlib.Path(output)

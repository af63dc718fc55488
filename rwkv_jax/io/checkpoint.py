"""Orbax checkpoints: the training state (resumable) and inference exports.

Training checkpoints live in WORKDIR/checkpoints/<step>/ with four items:
  params     the model parameters (nnx.State as a pure dict), float32 master weights
  opt_state  the optax state
  data       the grain iterator's position (one small JSON file per host)
  meta       {"step", "model": RWKVConfig dict, "config": the experiment config}
Orbax writes each step into a temporary directory and renames it once complete, so a process
killed in the middle of a save leaves the previous steps intact and the half-written one is
ignored on the next start. Restoring takes abstract arrays carrying the target shardings, so a
checkpoint written on one mesh restores onto any other. A save that finds the disk full raises
`files.NoSpaceError` naming the step and the newest complete checkpoint (at the next call of
`check`, `save`, `wait` or `close`: the arrays are written in the background).

An export (WORKDIR/export/) is the inference-only form: params plus rwkv_jax.json with the model
config. `load_export` reads either form, in any precision; `rwkv_jax.io.weights.load` calls it
for them. An int8 export (the model of `weights.load(..., dtype="int8")` exported) holds the int8
kernels and their scales and is read back as they are; it cannot be read in a float precision.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from rwkv_jax import files
from rwkv_jax import model as model_lib
from rwkv_jax import quant
from rwkv_jax.config import RWKVConfig
from rwkv_jax.io.tensor_names import CheckpointError

EXPORT_MARKER = "rwkv_jax.json"
FORMAT_VERSION = 1


class _DropOrbaxLogOfNoRoom(logging.Filter):
  """Drops the logged tracebacks of an Orbax write that found the disk full.

  Orbax logs a background save's exception with its traceback (and asyncio those of its write
  tasks), and raises the same exception in the caller, which reports it as one
  `files.NoSpaceError` line; the logs would repeat it several times over.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is None or files.no_room(error) is None:
      return True
    orbax = f"{os.sep}orbax{os.sep}"
    if orbax in record.pathname:
      return False
    # asyncio's "exception was never retrieved" of an Orbax write task.
    tb = error.__traceback__
    while tb is not None:
      if orbax in tb.tb_frame.f_code.co_filename:
        return False
      tb = tb.tb_next
    return "orbax-checkpoint-tmp" not in f"{record.getMessage()} {error}"


for _logger in ("absl", "asyncio"):  # Orbax logs through absl
  logging.getLogger(_logger).addFilter(_DropOrbaxLogOfNoRoom())


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                      if hasattr(x, "sharding") else x, tree)


def _flat(tree: Any) -> dict[str, Any]:
  """Optimizer states mix optax NamedTuples and nnx.State nodes; store their leaves by index."""
  return {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _pure(state: Any) -> Any:
  return nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state


class TrainCheckpointer:
  """Saves and restores the training state under WORKDIR/checkpoints (async, keeps the last K).

  Args:
    workdir: the run's directory.
    keep: number of most recent checkpoints kept.
    async_save: write in a background thread while training continues.
  """

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    import grain  # noqa: F401  (the data item handler)

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    with files.reporting_no_room(self.directory):
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._saving: int | None = None  # the step of the last save, until it is known complete

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """Whether every process has agreed to stop and save at `step` (Orbax's preemption check).

    After a preemption notice (SIGTERM) to any process of a multi-process run, jax.distributed
    picks the step at which all of them stop; call this after every step. Always False in a
    single-process run, which has no such service.
    """
    return self._manager.reached_preemption(step)

  @contextlib.contextmanager
  def _reporting_no_room(self):
    """Raises a save that found the disk full as NoSpaceError naming its step and the remedy."""
    step = self._saving
    try:
      with files.reporting_no_room(self.directory / str(step) if step is not None
                                   else self.directory):
        yield
    except files.NoSpaceError as e:
      self._manager.reload()  # its list already holds `step`, and not the steps it would replace
      complete = [s for s in self.all_steps() if s != step]
      e.advice = (f"training stops; the newest complete checkpoint is step {max(complete)}. "
                  f"Free space there and run the same command to resume from it."
                  if complete else "training stops, with no complete checkpoint yet. Free "
                  "space there and run the same command to start again.")
      raise

  def check(self) -> None:
    """Raises the error of a background save that failed (NoSpaceError for a full disk)."""
    with self._reporting_no_room():
      self._manager.check_for_errors()

  def save(self, step: int, params, opt_state, data_iterator, meta: dict) -> None:
    """Starts saving `step` (in the background if async); raises a previous save's error first."""
    import grain

    self.wait()  # as Orbax would, but naming the step whose save failed
    self._saving = step
    with self._reporting_no_room():
      self._manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(_pure(params)),
          opt_state=ocp.args.StandardSave(_flat(opt_state)),
          data=grain.checkpoint.CheckpointSave(data_iterator),
          meta=ocp.args.JsonSave({"step": step, "format_version": FORMAT_VERSION, **meta}),
      ), force=True)

  def read_meta(self, step: int) -> dict:
    try:
      restored = self._manager.restore(step,
                                       args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # A missing or unreadable item: the same advice as for the arrays.
      raise self._damaged(step, e) from e
    return restored["meta"]

  def _damaged(self, step: int, cause: Exception) -> CheckpointError:
    return CheckpointError(
        f"Could not restore checkpoint step {step} in {self.directory}. If it is damaged, "
        f"delete {self.directory / str(step)} to resume from the previous step, or use a new "
        f"--workdir. Cause: {type(cause).__name__}: {str(cause)[:500]}")

  def restore(self, step: int, abstract_params, abstract_opt_state, data_iterator
              ) -> tuple[Any, Any]:
    """Restores params and optimizer state onto the shardings of the abstract trees given."""
    import grain

    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(_abstract(_pure(abstract_params))),
          opt_state=ocp.args.StandardRestore(_abstract(_flat(abstract_opt_state))),
          data=grain.checkpoint.CheckpointRestore(data_iterator),
      ))
    except Exception as e:  # Orbax/tensorstore raise many kinds; say which checkpoint is bad.
      raise self._damaged(step, e) from e
    params = jax.tree.map(lambda x: x, abstract_params)  # same nnx.State structure, new leaves
    nnx.replace_by_pure_dict(params, restored["params"])
    opt_leaves = [restored["opt_state"][str(i)] for i in range(len(restored["opt_state"]))]
    return params, jax.tree.unflatten(jax.tree.structure(abstract_opt_state), opt_leaves)

  def wait(self) -> None:
    """Waits for a background save; raises its error (NoSpaceError for a full disk)."""
    with self._reporting_no_room():
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    self._saving = None

  def close(self) -> None:
    """Waits for a background save and closes; raises the save's error after closing."""
    try:
      self.wait()
    finally:
      self._manager.close()


def check_compatible(meta: dict, config: RWKVConfig, where: str) -> None:
  """Raises CheckpointError unless the checkpoint's model config equals `config`."""
  saved = meta.get("model")
  if saved is None:
    raise CheckpointError(f"{where} has no model config; it was not written by rwkv_jax.")
  saved_cfg = RWKVConfig.from_dict(saved)
  if saved_cfg != config:
    diff = {k: (v, getattr(config, k)) for k, v in saved_cfg.to_dict().items()
            if getattr(config, k) != v}
    raise CheckpointError(
        f"{where} was written for a different model: (checkpoint, requested) = {diff}. Use the "
        f"same --config.model settings, or a new --workdir to start a fresh run.")


# ----------------------------------------------------------------------------------------------
# Inference exports.

def export(model: model_lib.RWKV, directory: str | os.PathLike) -> pathlib.Path:
  """Writes an inference checkpoint: params (Orbax) + rwkv_jax.json. Atomic per item.

  The marker rwkv_jax.json is written last and an older one removed first, so a directory with
  a marker is complete. A disk that fills up raises `files.NoSpaceError` naming `directory`.
  """
  directory = pathlib.Path(directory).absolute()
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if jax.process_index() == 0:
    (directory / EXPORT_MARKER).unlink(missing_ok=True)  # Orbax replaces params in place
  with files.reporting_no_room(directory), ocp.StandardCheckpointer() as ckptr:
    directory.mkdir(parents=True, exist_ok=True)
    ckptr.save(directory / "params", params, force=True)
    ckptr.wait_until_finished()
  meta = {"format": "rwkv_jax", "format_version": FORMAT_VERSION,
          "model": model.config.to_dict()}
  # The params save above is collective; the marker is one file, so one process writes it.
  if jax.process_index() == 0:
    with files.atomic_write(directory / EXPORT_MARKER, "w") as f:  # last: means complete
      f.write(json.dumps(meta, indent=2))
  return directory


def _model_from_params(config: RWKVConfig, load_params) -> model_lib.RWKV:
  graphdef, abstract_state = nnx.split(model_lib.abstract_model(config))
  # An explicit target sharding: without one Orbax reuses the saved sharding, which fails on a
  # machine with other devices than the one that trained (e.g. scoring on a laptop).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  pure = load_params(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      nnx.to_pure_dict(abstract_state)))
  nnx.replace_by_pure_dict(abstract_state, pure)
  return nnx.merge(graphdef, abstract_state)


def load_export(directory: str | os.PathLike, dtype: str | None = None
                ) -> tuple[model_lib.RWKV, RWKVConfig]:
  """Loads an export written by `export`, or the latest checkpoint of a training workdir.

  Args:
    directory: the export, or the work directory (or its checkpoints/ folder).
    dtype: precision (`RWKVConfig.with_precision`); None keeps the saved one (an int8 export
      stays int8, its activation dtype chosen for this machine). Orbax casts while restoring into
      the abstract model of this dtype, so no second copy in the saved dtype is made; int8 asked
      of float parameters quantises them after restoring.

  Returns:
    (model, config), config.precision the precision it runs in.

  Raises:
    CheckpointError: no complete checkpoint in `directory`, or a float precision asked of an
      int8 export.
  """
  directory = pathlib.Path(directory).absolute()

  def load(saved: RWKVConfig, restore) -> tuple[model_lib.RWKV, RWKVConfig]:
    if saved.quant and dtype not in (None, saved.quant):
      raise CheckpointError(
          f"{directory} is an {saved.quant} export; it cannot be loaded as {dtype}. Load it with "
          f"dtype={saved.quant!r}, or load the checkpoint it was made from.")
    name = dtype or (saved.quant or None)
    config = saved.with_precision(name) if name else saved
    if config.quant and not saved.quant:  # quantise once the float parameters are in memory
      return quant.quantize_model(_model_from_params(saved, restore),
                                 model_lib.abstract_model(config)), config
    return _model_from_params(config, restore), config

  if (directory / EXPORT_MARKER).is_file():
    meta = json.loads((directory / EXPORT_MARKER).read_text())
    with ocp.StandardCheckpointer() as ckptr:
      return load(RWKVConfig.from_dict(meta["model"]),
                  lambda t: ckptr.restore(directory / "params", t))
  ckpt_dir = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
  manager = ocp.CheckpointManager(ckpt_dir)
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f"{directory} holds no complete rwkv_jax checkpoint.")
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  try:
    return load(RWKVConfig.from_dict(meta["model"]),
                lambda t: manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(t)))["params"])
  finally:
    manager.close()


def is_rwkv_jax_dir(path: pathlib.Path) -> bool:
  """True for an export or a training work directory (what `load_export` reads)."""
  if not path.is_dir():
    return False
  if (path / EXPORT_MARKER).is_file():
    return True
  ckpt = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  return any(p.is_dir() and p.name.isdigit() and (p / "meta").exists() for p in ckpt.iterdir())

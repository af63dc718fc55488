"""Training: sharded state, the jitted step, evaluation and the loop with checkpoints and logs.

The loop (`train_and_evaluate`) is driven by an ml_collections config whose keys and defaults
are rwkv_jax/train_config.py's. Parameters and optimizer state are created directly on the mesh
by a jitted init with out_shardings from `sharding.py`; the step is `jax.jit` with in/out
shardings and donated state, and accumulates gradients over micro-batches itself (a `lax.scan`,
one micro-batch's activations alive at a time) before its one optimizer update. Step N is
dispatched before step N-1's metrics are fetched, so the host never waits for the device except
at logging, evaluation and checkpoint boundaries. Metrics go to rwkv_jax/metrics.py's writer.

A non-finite loss or gradient norm stops the run with an error and writes nothing: the last
checkpoint on disk is the last good state. One run at a time trains in a workdir: process 0 holds
WORKDIR/.lock (an flock, which the OS drops when the process dies) from start to end, and
first removes what a killed run's unfinished checkpoint save left behind. A run resumes from the
newest checkpoint that reads back whole: newer damaged ones are moved to WORKDIR/damaged_checkpoints
with a warning naming them and the step used. Long windows train in chunks that carry the
recurrent state (train.chunk_len, train.bptt; rwkv_jax/bptt.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import itertools
import json
import math
import os
import pathlib
import shutil
import socket
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from rwkv_jax import bptt as bptt_lib
from rwkv_jax import checkpoint as ckpt_lib
from rwkv_jax import data as data_lib
from rwkv_jax import files, losses, optim, sharding, train_config
from rwkv_jax import metrics as metrics_lib
from rwkv_jax import model as model_lib
from rwkv_jax.config import RWKVConfig


class NonFiniteLossError(RuntimeError):
  """Raised when the training loss or gradient norm becomes NaN or Inf."""


class WorkdirBusyError(RuntimeError):
  """Raised when another live process holds the workdir's lock."""


class WorkdirError(ValueError):
  """Raised when the workdir is a file or cannot be created or written."""


LOCK_FILE = ".lock"
DAMAGED_DIR = "damaged_checkpoints"  # where unreadable checkpoints are moved, in the workdir
# What Orbax appends to a checkpoint directory's name until its save completes.
_ORBAX_TMP = ".orbax-checkpoint-tmp"


def model_config(config: ml_collections.ConfigDict) -> RWKVConfig:
  """The model's frozen config from an experiment config's `model` section."""
  m = config.model
  return RWKVConfig(n_layer=m.n_layer, n_embd=m.n_embd, vocab_size=m.vocab_size,
                    dim_att=m.dim_att, dim_ffn=m.dim_ffn, ctx_len=m.ctx_len, dtype=m.dtype,
                    param_dtype=m.param_dtype)


# Builds the model to train from the config; `build_model` (RWKV) unless the caller passes another
# with RWKV's calling convention, e.g. the Transformer baseline of experiments/baselines.
ModelBuilder = Callable[[ml_collections.ConfigDict, nnx.Rngs], nnx.Module]


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> model_lib.RWKV:
  return model_lib.RWKV(model_config(config), rngs=rngs, init=config.model.init,
                        emb_scale=config.optim.lr_init, remat=config.model.remat)


def build_optimizer(config: ml_collections.ConfigDict
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer of `config` and the one schedule it follows (the loop logs its rate).

  Raises:
    ValueError: the config is invalid (`train_config.check`), e.g. its steps do not outlast
      the warmup.
  """
  train_config.check(config)
  o = config.optim
  schedule = optim.learning_rate_schedule(lr_init=o.lr_init, lr_final=o.lr_final,
                                          warmup_steps=o.warmup_steps,
                                          total_steps=config.train.steps)
  tx = optim.make_optimizer(schedule, betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay, grad_clip=o.grad_clip,
                            layerwise_lr=o.layerwise_lr)
  return tx, schedule


@dataclasses.dataclass
class TrainState:
  """What the loop carries: static structure plus the sharded arrays."""

  graphdef: Any
  params: Any  # nnx.State of nnx.Param, sharded by the rules
  opt_state: Any
  param_shardings: Any
  opt_shardings: Any


def abstract_state(config: ml_collections.ConfigDict, mesh, tx,
                   make_model: ModelBuilder = build_model,
                   rules: sharding.Rules = sharding.PARAM_RULES) -> TrainState:
  """The TrainState's structure, shapes and shardings, with no array allocated.

  `rules` place the parameters and the optimizer state that mirrors them (rwkv_jax/sharding.py);
  a model other than RWKV passes its own.
  """
  abstract_model = nnx.eval_shape(lambda: make_model(config, nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  return TrainState(graphdef, abstract_params, abstract_opt,
                    sharding.param_shardings(mesh, abstract_params, rules),
                    sharding.tree_shardings(mesh, abstract_opt, rules))


def init_state(config: ml_collections.ConfigDict, mesh, tx,
               make_model: ModelBuilder = build_model,
               rules: sharding.Rules = sharding.PARAM_RULES) -> TrainState:
  """Creates params and optimizer state directly in their sharded layout (no host copy)."""
  abstract = abstract_state(config, mesh, tx, make_model, rules)

  @functools.partial(jax.jit, out_shardings=abstract.param_shardings)
  def init_params():
    return nnx.state(make_model(config, nnx.Rngs(config.train.seed)), nnx.Param)

  params = init_params()
  opt_state = jax.jit(tx.init, out_shardings=abstract.opt_shardings)(params)
  return dataclasses.replace(abstract, params=params, opt_state=opt_state)


def make_train_step(state: TrainState, tx, mesh, *, accumulate_steps: int, l2wrap: float,
                    impl: str, chunk_len: int = 0, bptt: str = "full") -> Callable:
  """Returns step(params, opt_state, batch) -> (params, opt_state, metrics), jitted and sharded.

  This is the one gradient-accumulation path: with accumulate_steps = k the batch [b, t] is
  split into k micro-batches whose gradients are averaged before one optimizer update. A
  `lax.scan` runs them, so one micro-batch's activations are alive at a time, and each
  micro-batch stays spread over the data axes of the mesh. With chunk_len > 0 each window runs
  in chunks that carry the state (rwkv_jax/bptt.py, `bptt` "full" or "truncated"), so one
  chunk's activations are alive at a time.
  """
  graphdef = state.graphdef

  def loss_fn(params, inputs_bt, targets_bt):
    return bptt_lib.window_loss(graphdef, params, inputs_bt, targets_bt, chunk_len=chunk_len,
                                bptt=bptt, l2wrap_factor=l2wrap, impl=impl)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(params, opt_state, batch):
    inputs, targets = batch["inputs"], batch["targets"]
    if accumulate_steps == 1:
      (_, metrics), grads = grad_fn(params, inputs, targets)
    else:
      b, t = inputs.shape
      # [b, t] -> [k, b/k, t] keeping each micro-batch spread over the data axes.
      split = lambda x: x.reshape(b // accumulate_steps, accumulate_steps, t).swapaxes(0, 1)

      def micro(carry, mb):
        (_, m), g = grad_fn(params, *mb)
        return jax.tree.map(jnp.add, carry, (g, m)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      zero_metrics = {"loss": 0.0, "accuracy": 0.0, "num_tokens": 0.0}
      zero_metrics = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), zero_metrics)
      (grads, metrics), _ = jax.lax.scan(micro, (zeros, zero_metrics),
                                         (split(inputs), split(targets)))
      grads = jax.tree.map(lambda g: g / accumulate_steps, grads)
      metrics = {k: v / accumulate_steps if k != "num_tokens" else v
                 for k, v in metrics.items()}
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return params, opt_state, metrics

  batch_sh = sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(state.param_shardings, state.opt_shardings, batch_sh),
                 out_shardings=(state.param_shardings, state.opt_shardings, None),
                 donate_argnums=(0, 1))


def make_eval_step(state: TrainState, mesh, impl: str) -> Callable:
  graphdef = state.graphdef

  def step(params, batch):
    logits, _ = nnx.merge(graphdef, params)(batch["inputs"], impl=impl)
    return losses.cross_entropy(logits, batch["targets"])

  return jax.jit(step, in_shardings=(state.param_shardings, sharding.batch_sharding(mesh)))


def make_datasets(config: ml_collections.ConfigDict, source):
  """This host's training iterator and validation dataset over `source`."""
  d, t = config.data, config.train
  common = dict(ctx_len=config.model.ctx_len, batch_size=t.batch_size, seed=d.seed,
                val_fraction=d.val_fraction, shard_index=jax.process_index(),
                shard_count=jax.process_count(), worker_count=d.worker_count)
  train_ds = data_lib.make_dataset(source, split="train", **common)
  val_ds = data_lib.make_dataset(source, split="val", **common)
  return iter(train_ds), val_ds


# ----------------------------------------------------------------------------------------------
# The loop.

@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path):
  """Holds WORKDIR/.lock for the block, or raises WorkdirBusyError naming its holder.

  An flock rather than a pid file: the OS releases it when the holder dies, however it dies,
  so a killed run never blocks the next one. The holder's pid and host are written into the
  file only for the message.
  """
  path = workdir / LOCK_FILE
  f = open(path, "a+", encoding="utf-8")  # "a+": opening must not erase the holder's name
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "another process"
    f.close()
    raise WorkdirBusyError(
        f"{workdir} is in use by {holder} (it holds {path}); wait for that run to end or stop "
        f"it, or pass another --workdir.") from None
  try:
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    f.flush()
    yield
  finally:
    f.truncate(0)
    f.close()  # releases the lock


def _non_finite_message(what: str, value: float, at_step: int,
                        ckpt: ckpt_lib.TrainCheckpointer) -> str:
  """Names the checkpoint to resume from after a non-finite `what` (loss, ...) at `at_step`.

  The loss and gradients of step s are computed from the parameters saved as step s - 1, so
  checkpoint s - 1 (if it was saved) holds the parameters that gave the bad value; only
  checkpoints up to s - 2 are known to be good.
  """
  ckpt.wait()
  saved = ckpt.all_steps()
  good = max((s for s in saved if s < at_step - 1), default=None)
  message = f"Training {what} is {value} at step {at_step}; stopping without saving."
  if at_step - 1 in saved:
    message += (f" Checkpoint {at_step - 1} holds the parameters that gave this {what}: delete "
                f"{ckpt.directory / str(at_step - 1)} before resuming.")
  if good is None:
    message += f" No good checkpoint is left in {ckpt.directory}; start again from scratch."
  else:
    message += f" The last good checkpoint is step {good} in {ckpt.directory}."
  return message + " Lower --config.optim.lr_init or check the data."


def evaluate(eval_step, params, val_ds, mesh, max_batches: int) -> float:
  """Mean loss over the first `max_batches` validation batches (all of them if 0)."""
  total, n = 0.0, 0
  for i, batch in enumerate(val_ds):
    if max_batches and i >= max_batches:
      break
    with jax.set_mesh(mesh):  # as the train step: Mosaic kernels run per shard
      total += float(eval_step(params, sharding.make_global_batch(mesh, batch)))
    n += 1
  return total / max(n, 1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       peak_flops: float | None = None,
                       make_model: ModelBuilder = build_model,
                       rules: sharding.Rules = sharding.PARAM_RULES,
                       flops_per_token: int | None = None) -> dict[str, float]:
  """Trains (resuming from WORKDIR's latest checkpoint if any) and returns final metrics.

  Args:
    config: a training config (rwkv_jax/train_config.py); checked before anything is written.
    workdir: where the config, checkpoints, metrics (rwkv_jax/metrics.py) and export go.
    peak_flops: dense peak FLOP/s of one device; when given, the logs carry model FLOPs
      utilization (perf/mfu). experiments/benchlib.py knows the common accelerators'.
    make_model: builds the model from the config (default: RWKV). Another model trains with the
      same data, optimizer and loop; only RWKV is exported at the end.
    rules: partition rules of the model's parameters (rwkv_jax/sharding.py); default RWKV's.
      Another model passes its own (e.g. experiments/baselines/transformer.PARAM_RULES).
    flops_per_token: the model's training FLOPs per token for perf/mfu; default RWKV's
      (`RWKVConfig.flops_per_token`). Another model passes its own.

  Returns:
    The last logged training and validation metrics, and "step". "perf/tokens_per_s" (and
    "perf/mfu") there cover this invocation's whole run after its first step (which compiles),
    evaluation time excluded (NaN for a run of one step); metrics.jsonl holds each logging
    window's own.

  Raises:
    WorkdirError: WORKDIR is a file, or cannot be created or written.
    WorkdirBusyError: another live run holds WORKDIR/.lock.
    NonFiniteLossError: the loss or gradient norm became NaN or Inf.
  """
  train_config.check(config)
  workdir = _make_workdir(workdir)
  with contextlib.ExitStack() as stack:
    # Only process 0: the processes of one multi-host run share the workdir.
    if jax.process_index() == 0:
      stack.enter_context(workdir_lock(workdir))
      _remove_unfinished_saves(workdir)
    return _train_and_evaluate(config, workdir, peak_flops, make_model, rules, flops_per_token)


def _make_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
  """The absolute workdir, created if new; WorkdirError if it is not a writable directory."""
  workdir = pathlib.Path(workdir).expanduser().absolute()
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory; pass a new directory "
                       f"or an earlier run's workdir.")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be created ({e.strerror}: {e.filename}); "
                       f"pass a directory you can write.") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir={workdir} is not writable; pass a directory you can write.")
  return workdir


def _remove_unfinished_saves(workdir: pathlib.Path) -> None:
  """Deletes the temporary directories of checkpoints whose save was killed midway.

  Orbax saves step s into "s.orbax-checkpoint-tmp-*" and renames it when complete, so one left
  behind belongs to a dead run; with the workdir's lock held no live run is writing it.
  """
  for tmp in sorted((workdir / "checkpoints").glob(f"*{_ORBAX_TMP}*")):
    logging.warning("Removing %s, the unfinished save of a run that was stopped.", tmp)
    if tmp.is_dir():
      shutil.rmtree(tmp)
    else:
      tmp.unlink()


def _restore_newest_complete(ckpt: ckpt_lib.TrainCheckpointer, state: TrainState, train_it,
                             cfg: RWKVConfig, workdir: pathlib.Path) -> tuple[int, list[int]]:
  """Restores into `state` and `train_it` the newest checkpoint that reads back whole.

  A newer checkpoint that cannot be read (a file truncated or missing, e.g. a disk that filled
  up) is passed over for the one before it, with a warning naming both.

  Returns:
    (the restored step, or 0 when the workdir has no checkpoint; the damaged newer steps).

  Raises:
    CheckpointError: a checkpoint was written for another model, or none reads back whole.
  """
  damaged: list[tuple[int, ckpt_lib.CheckpointError]] = []
  for s in sorted(ckpt.all_steps(), reverse=True):
    try:
      meta = ckpt.read_meta(s)
    except ckpt_lib.CheckpointError as e:
      damaged.append((s, e))
      continue
    # Another model's checkpoint is the user's mistake, not damage: never pass over it.
    ckpt_lib.check_compatible(meta, cfg, f"Checkpoint {s} in {workdir}")
    try:
      state.params, state.opt_state = ckpt.restore(s, state.params, state.opt_state, train_it)
    except ckpt_lib.CheckpointError as e:
      damaged.append((s, e))
      continue
    for bad, error in damaged:
      logging.warning(
          "CHECKPOINT STEP %d IN %s IS DAMAGED; resuming from step %d, the newest complete one "
          "(the steps after it are trained again). Step %d is moved to %s. %s", bad,
          ckpt.directory, s, bad, workdir / DAMAGED_DIR, error)
    return s, [bad for bad, _ in damaged]
  if len(damaged) > 1:
    raise ckpt_lib.CheckpointError(
        f"Every checkpoint in {ckpt.directory} (steps {sorted(s for s, _ in damaged)}) is "
        f"damaged; use a new --workdir to start again. Newest: {damaged[0][1]}")
  if damaged:
    raise damaged[0][1]
  return 0, []


def _set_aside(steps: list[int], ckpt: ckpt_lib.TrainCheckpointer, workdir: pathlib.Path,
               reopen: Callable[[], ckpt_lib.TrainCheckpointer]) -> ckpt_lib.TrainCheckpointer:
  """Moves damaged checkpoints out of checkpoints/ and returns a checkpointer without them.

  Kept, not deleted, for a post-mortem; out of the way, since the run saves those steps again.
  """
  multi = jax.process_count() > 1
  if multi:  # every process has finished reading them
    multihost_utils.sync_global_devices("rwkv_jax: damaged checkpoints found")
  if jax.process_index() == 0:
    aside = workdir / DAMAGED_DIR
    aside.mkdir(exist_ok=True)
    for s in steps:
      target = aside / str(s)
      for i in itertools.count(1):
        if not target.exists():
          break
        target = aside / f"{s}.{i}"
      shutil.move(ckpt.directory / str(s), target)
  if multi:
    multihost_utils.sync_global_devices("rwkv_jax: damaged checkpoints moved")
  ckpt.close()
  return reopen()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                        peak_flops: float | None, make_model: ModelBuilder,
                        rules: sharding.Rules, flops_per_token: int | None
                        ) -> dict[str, float]:
  t = config.train
  lead = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  cfg = model_config(config)
  flops_per_token = flops_per_token or cfg.flops_per_token()

  source = data_lib.open_training_source(config.data, workdir, config.model.vocab_size)
  train_it, val_ds = make_datasets(config, source)
  tx, schedule = build_optimizer(config)
  state = init_state(config, mesh, tx, make_model, rules)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Mesh %s over %d devices (%d processes); model %s, %s parameters.",
               dict(mesh.shape), mesh.size, jax.process_count(),
               cfg if make_model is build_model else type(nnx.merge(state.graphdef, state.params))
               .__name__, f"{num_params:,}")
  open_checkpoints = lambda: ckpt_lib.TrainCheckpointer(workdir, keep=t.keep_checkpoints,
                                                        async_save=t.async_checkpoints)
  ckpt = open_checkpoints()
  step, damaged = _restore_newest_complete(ckpt, state, train_it, cfg, workdir)
  if damaged:
    ckpt = _set_aside(damaged, ckpt, workdir, open_checkpoints)
  if step:
    logging.info("Resumed from step %d in %s.", step, ckpt.directory)
  if lead:  # only now: a refused resume leaves the accepted run's config.json as it was
    with files.atomic_write(workdir / "config.json", "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  train_step = make_train_step(state, tx, mesh, accumulate_steps=t.accumulate_steps,
                               l2wrap=config.optim.l2wrap, impl=t.impl, chunk_len=t.chunk_len,
                               bptt=t.bptt)
  eval_step = make_eval_step(state, mesh, t.impl)
  writer = metrics_lib.MetricWriter(workdir, lead, start_step=step)
  tokens_per_step = t.batch_size * config.model.ctx_len
  meta = {"model": cfg.to_dict(), "config": json.loads(config.to_json_best_effort())}

  def save(at_step):
    ckpt.save(at_step, state.params, state.opt_state, train_it, meta)

  progress = None
  # A bar on a terminal; log lines (every log_every steps) when output goes to a file or CI log.
  if lead and t.progress_bar and sys.stderr.isatty():
    from tqdm import tqdm

    progress = tqdm(total=t.steps, initial=step, unit="step", dynamic_ncols=True)

  pending = None  # (step, metrics) dispatched but not yet fetched
  window_start, window_steps = time.perf_counter(), 0
  window_losses: list[float] = []  # since the last log line: one step's loss is noisy
  # The whole run's throughput: from the end of its first step (the compilation's) to the end of
  # its last, less the time spent evaluating.
  run_start, run_steps, run_paused = None, 0, 0.0
  final: dict[str, float] = {}

  def fetch(pending_step, step_metrics):
    nonlocal window_start, window_steps, run_start, run_steps
    m = jax.device_get(step_metrics)
    window_steps += 1  # counted once finished, so back-to-back fetches do not report 0 tokens/s
    if run_start is None:
      run_start = time.perf_counter()
    else:
      run_steps += 1
    loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
    window_losses.append(loss)
    # An infinite gradient norm with a finite loss is divergence too: clipping scales such
    # gradients to zero or NaN, and the loss goes on at 1e13 without ever becoming NaN.
    for what, value in (("loss", loss), ("gradient norm", grad_norm)):
      if not math.isfinite(value):
        raise NonFiniteLossError(_non_finite_message(what, value, pending_step, ckpt))
    if pending_step % t.log_every == 0 or pending_step == t.steps:
      elapsed = time.perf_counter() - window_start
      tok_s = window_steps * tokens_per_step / elapsed if elapsed > 0 else float("nan")
      mean_loss = sum(window_losses) / len(window_losses)
      window_losses.clear()
      record = {"train/loss": loss, "train/loss_avg": mean_loss,
                "train/bits_per_token": mean_loss / math.log(2),
                "train/accuracy": float(m["accuracy"]), "train/grad_norm": grad_norm,
                "train/lr": float(schedule(pending_step - 1)), "perf/tokens_per_s": tok_s}
      if peak_flops:
        record["perf/mfu"] = tok_s * flops_per_token / (peak_flops * jax.device_count())
      writer.write(pending_step, record)
      final.update(record)
      if progress is not None:
        progress.set_postfix(loss=f"{mean_loss:.3f}", bpt=f"{mean_loss / math.log(2):.3f}",
                             tok_s=f"{tok_s:,.0f}")
      else:
        logging.info("step %d: loss %.4f (%.3f bits/token), %.0f tokens/s", pending_step,
                     mean_loss, mean_loss / math.log(2), tok_s)
      window_start, window_steps = time.perf_counter(), 0

  try:
    while step < t.steps:
      batch = sharding.make_global_batch(mesh, next(train_it))
      # Traced under the mesh: a Mosaic (TPU) WKV kernel is then run per shard, which XLA
      # cannot arrange by itself (tests/test_kernels_tpu.py lowers this step for TPU).
      with jax.set_mesh(mesh):
        state.params, state.opt_state, step_metrics = train_step(state.params, state.opt_state,
                                                                 batch)
      step += 1
      if pending is not None:
        fetch(*pending)
      pending = (step, step_metrics)
      if progress is not None:
        progress.update(1)
      boundary = step == t.steps
      if t.eval_every and (step % t.eval_every == 0 or boundary):
        fetch(*pending)
        pending = None
        eval_start = time.perf_counter()
        val_loss = evaluate(eval_step, state.params, val_ds, mesh, t.eval_batches)
        run_paused += time.perf_counter() - eval_start
        writer.write(step, {"val/loss": val_loss, "val/bits_per_token": val_loss / math.log(2)})
        final.update({"val/loss": val_loss, "val/bits_per_token": val_loss / math.log(2)})
        logging.info("step %d: validation loss %.4f, %.4f bits/token", step, val_loss,
                     val_loss / math.log(2))
        window_start, window_steps = time.perf_counter(), 0
      if step % t.checkpoint_every == 0 or boundary:
        if pending is not None:
          fetch(*pending)  # never save a state whose loss we have not seen to be finite
          pending = None
        save(step)
    if pending is not None:
      fetch(*pending)
    if run_start is not None:  # NaN for a single step: there is no step after the first
      run_s = time.perf_counter() - run_start - run_paused
      final["perf/tokens_per_s"] = (run_steps * tokens_per_step / run_s if run_steps
                                    else float("nan"))
      if peak_flops:
        final["perf/mfu"] = (final["perf/tokens_per_s"] * flops_per_token
                             / (peak_flops * jax.device_count()))
  finally:
    if progress is not None:
      progress.close()
    ckpt.close()
    writer.close()

  if t.export and make_model is build_model:
    ckpt_lib.export(nnx.merge(state.graphdef, state.params), workdir / "export")
  final["step"] = step
  return final

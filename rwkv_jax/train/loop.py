"""The training loop: data, resume, steps, evaluation, checkpoints, metrics and export.

`train_and_evaluate` is driven by an ml_collections config whose keys and defaults are
rwkv_jax/train/config.py's. Step N is dispatched before step N-1's metrics are fetched, so the
host never waits for the device except at logging, evaluation and checkpoint boundaries.
Metrics go to rwkv_jax/train/metrics.py's writer.

A non-finite loss or gradient norm stops the run with an error and writes nothing: the last
checkpoint on disk is the last good state. A checkpoint that cannot be saved (a full disk) stops
the run with `files.NoSpaceError`: training on would leave nothing to resume from. SIGTERM or
SIGINT stops it at the next step boundary with a checkpoint of that step
(rwkv_jax/train/preemption.py). The workdir's lock, leftover saves and damaged checkpoints are
rwkv_jax/train/workdir.py's.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import sys
import time
from typing import Callable

import jax
import ml_collections
from absl import logging
from flax import nnx

from rwkv_jax import files, sharding
from rwkv_jax.data import pipeline as data_pipeline
from rwkv_jax.data import sources as data_sources
from rwkv_jax.io import checkpoint as ckpt_lib
from rwkv_jax.train import config as train_config
from rwkv_jax.train import metrics as metrics_lib
from rwkv_jax.train import preemption
from rwkv_jax.train import step as step_lib
from rwkv_jax.train import workdir as workdir_lib


class NonFiniteLossError(RuntimeError):
  """Raised when the training loss or gradient norm becomes NaN or Inf."""


def make_datasets(config: ml_collections.ConfigDict, source):
  """This host's training iterator and validation dataset over `source`."""
  d, t = config.data, config.train
  common = dict(ctx_len=config.model.ctx_len, batch_size=t.batch_size, seed=d.seed,
                val_fraction=d.val_fraction, shard_index=jax.process_index(),
                shard_count=jax.process_count(), worker_count=d.worker_count)
  train_ds = data_pipeline.make_dataset(source, split="train", **common)
  val_ds = data_pipeline.make_dataset(source, split="val", **common)
  return iter(train_ds), val_ds


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
  """Mean loss per counted target over the first `max_batches` validation batches (all of them
  if 0): a batch of padded documents weighs what it counts, not one batch's worth."""
  total, counted = 0.0, 0.0
  for i, batch in enumerate(val_ds):
    if max_batches and i >= max_batches:
      break
    with jax.set_mesh(mesh):  # as the train step: Mosaic kernels run per shard
      loss_sum, count = eval_step(params, sharding.make_global_batch(mesh, batch))
    total += float(loss_sum)
    counted += float(count)
  return total / max(counted, 1.0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       peak_flops: float | None = None,
                       make_model: step_lib.ModelBuilder = step_lib.build_model,
                       rules: sharding.Rules = sharding.PARAM_RULES,
                       flops_per_token: int | None = None,
                       make_state: step_lib.StateBuilder | None = None,
                       finish: Callable[[step_lib.TrainState], None] | None = None
                       ) -> dict[str, float]:
  """Trains (resuming from WORKDIR's latest checkpoint if any) and returns final metrics.

  Args:
    config: a training config (rwkv_jax/train/config.py); checked before anything is written.
    workdir: where the config, checkpoints, metrics (rwkv_jax/train/metrics.py) and export go.
    peak_flops: dense peak FLOP/s of one device; when given, the logs carry model FLOPs
      utilization (perf/mfu). experiments/benchlib.py knows the common accelerators'.
    make_model: builds the model from the config (default: RWKV). Another model trains with the
      same data, optimizer and loop; only RWKV is exported at the end.
    rules: partition rules of the model's parameters (rwkv_jax/sharding.py); default RWKV's.
      Another model passes its own (e.g. experiments/baselines/transformer.PARAM_RULES).
    flops_per_token: the model's training FLOPs per token for perf/mfu; default RWKV's
      (`RWKVConfig.flops_per_token`). Another model passes its own.
    make_state: builds the TrainState instead of `step_lib.init_state(config, mesh, tx,
      make_model, rules)`: fine-tuning (rwkv_jax/train/finetune.py) loads a base and trains only
      part of it, the rest held in `TrainState.frozen`. Checkpoints hold the trained part.
    finish: called with the final TrainState by every process at the end of a completed run,
      in place of the export (fine-tuning writes its adapters there).

  Returns:
    The last logged training and validation metrics, and "step". "perf/tokens_per_s" (and
    "perf/mfu") there cover this invocation's whole run after its first step (which compiles),
    evaluation time excluded (NaN for a run of one step); metrics.jsonl holds each logging
    window's own. A run stopped by SIGTERM or SIGINT returns at the step it saved (before
    train.steps, with no export) and "stopped_by_signal", the signal's number.

  Raises:
    WorkdirError: WORKDIR is a file, or cannot be created or written.
    WorkdirBusyError: another live run holds WORKDIR/.lock.
    NonFiniteLossError: the loss or gradient norm became NaN or Inf.
    files.NoSpaceError: a checkpoint, the metrics, the encoded data or the export could not be
      written for want of room; what was written before is whole.
    sharding.LostProcessError: a multi-process run lost one of its processes (jax.distributed
      ends this one too, within the heartbeat timeout: sharding.initialize_distributed).
  """
  train_config.check(config)
  workdir = workdir_lib.make_workdir(workdir)
  with contextlib.ExitStack() as stack:
    # Only process 0: the processes of one multi-host run share the workdir.
    if jax.process_index() == 0:
      stack.enter_context(workdir_lib.workdir_lock(workdir))
      workdir_lib.remove_unfinished_saves(workdir)
    return _train_and_evaluate(config, workdir, peak_flops, make_model, rules, flops_per_token,
                               make_state, finish)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                        peak_flops: float | None, make_model: step_lib.ModelBuilder,
                        rules: sharding.Rules, flops_per_token: int | None,
                        make_state: step_lib.StateBuilder | None,
                        finish: Callable[[step_lib.TrainState], None] | None
                        ) -> dict[str, float]:
  t = config.train
  lead = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  cfg = step_lib.model_config(config)
  flops_per_token = flops_per_token or cfg.flops_per_token()

  source = data_sources.open_training_source(config.data, workdir, config.model.vocab_size)
  train_it, val_ds = make_datasets(config, source)
  tx, schedule = step_lib.build_optimizer(config)
  if make_state is None:
    state = step_lib.init_state(config, mesh, tx, make_model, rules)
  else:
    state = make_state(config, mesh, tx)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  num_frozen = sum(x.size for x in jax.tree.leaves(state.frozen))
  logging.info("Mesh %s over %d devices (%d processes); model %s, %s parameters%s.",
               dict(mesh.shape), mesh.size, jax.process_count(),
               cfg if make_model is step_lib.build_model and make_state is None
               else type(step_lib.merged_model(state)).__name__, f"{num_params:,}",
               f" trained, {num_frozen:,} frozen" if num_frozen else "")
  open_checkpoints = lambda: ckpt_lib.TrainCheckpointer(workdir, keep=t.keep_checkpoints,
                                                        async_save=t.async_checkpoints)
  ckpt = open_checkpoints()
  step, damaged = workdir_lib.restore_newest_complete(ckpt, state, train_it, cfg, workdir)
  if damaged:
    ckpt = workdir_lib.set_aside(damaged, ckpt, workdir, open_checkpoints)
  if step:
    logging.info("Resumed from step %d in %s.", step, ckpt.directory)
  if lead:  # only now: a refused resume leaves the accepted run's config.json as it was
    with files.atomic_write(workdir / "config.json", "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  train_step = step_lib.make_train_step(state, tx, mesh, accumulate_steps=t.accumulate_steps,
                                        l2wrap=config.optim.l2wrap, impl=t.impl,
                                        chunk_len=t.chunk_len, bptt=t.bptt)
  eval_step = step_lib.make_eval_step(state, mesh, t.impl)
  writer = metrics_lib.MetricWriter(workdir, lead, start_step=step)
  meta = {"model": cfg.to_dict(), "config": json.loads(config.to_json_best_effort())}

  progress = None
  # A bar on a terminal; log lines (every log_every steps) when output goes to a file or CI log.
  if lead and t.progress_bar and sys.stderr.isatty():
    from tqdm import tqdm

    progress = tqdm(total=t.steps, initial=step, unit="step", dynamic_ncols=True)
  log = _StepLog(config, schedule, writer, progress, ckpt,
                 mfu_per_token_s=(flops_per_token / (peak_flops * jax.device_count())
                                  if peak_flops else None))

  pending = None  # (step, metrics) dispatched but not yet fetched
  stop = preemption.StopSignals(ckpt.reached_preemption)
  try:
    with stop:
      while step < t.steps:
        batch = sharding.make_global_batch(mesh, next(train_it))
        # Traced under the mesh: a Mosaic (TPU) WKV kernel is then run per shard, which XLA
        # cannot arrange by itself (tests/test_kernels_tpu.py lowers this step for TPU).
        with jax.set_mesh(mesh):
          state.params, state.opt_state, step_metrics = train_step(state.params,
                                                                   state.opt_state, batch)
        step += 1
        if pending is not None:
          log.fetch(*pending)
        pending = (step, step_metrics)
        if progress is not None:
          progress.update(1)
        stopping = stop.should_stop(step)  # every step, in every process: they must agree
        boundary = step == t.steps
        if t.eval_every and (step % t.eval_every == 0 or boundary):
          log.fetch(*pending)
          pending = None
          with log.paused():
            val_loss = evaluate(eval_step, state.params, val_ds, mesh, t.eval_batches)
          log.validation(step, val_loss)
        if step % t.checkpoint_every == 0 or boundary or stopping:
          if pending is not None:
            # Never save a state whose loss we have not seen to be finite; a stopped run
            # records the metrics of the step it stops at.
            log.fetch(*pending, always_log=stopping)
            pending = None
          ckpt.save(step, state.params, state.opt_state, train_it, meta)
        else:
          ckpt.check()  # a background save that failed stops the run here, not at the next
        if stopping:
          break
      if pending is not None:
        log.fetch(*pending)
      throughput = log.run_throughput()  # before the last save completes and the export
      # Inside `stop`: a second signal while the last save completes ends the process at once.
      ckpt.close()
  except BaseException as e:
    lost = sharding.lost_process(e)
    if lost is not None:  # a save in flight waits for the lost process: leave it
      with contextlib.suppress(Exception):
        writer.close()
      raise lost from e
    _close_after_error(progress, ckpt, writer)
    raise
  if progress is not None:
    progress.close()
  writer.close()

  result = {**log.final, **throughput, "step": step}
  if stop.reason is not None and step < t.steps:
    logging.warning("Stopped by %s at step %d, its checkpoint saved in %s; run the same command "
                    "to resume from it.", stop.reason, step, ckpt.directory)
    return {**result, "stopped_by_signal": int(stop.signal_number)}
  if finish is not None:
    finish(state)
  elif t.export and make_model is step_lib.build_model:
    ckpt_lib.export(nnx.merge(state.graphdef, state.params), workdir / "export")
  return result


def _close_after_error(progress, ckpt: ckpt_lib.TrainCheckpointer,
                       writer: metrics_lib.MetricWriter) -> None:
  """Closes what the loop opened while an error propagates; their own errors would hide it.

  A save that failed for a full disk fails again here, and the metrics may too.
  """
  for close in (progress.close if progress is not None else None, ckpt.close, writer.close):
    if close is None:
      continue
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      logging.info("While stopping on an error, %s failed too: %s", close.__qualname__, e)


class _StepLog:
  """Fetches each finished step's metrics, stops on a non-finite value, logs every log_every.

  Two clocks: the logging window's (tokens/s since the last log line; the loss is averaged over
  the window, since one step's is noisy) and the run's (from the end of its first step, which
  compiles, to the end of its last, less the time spent evaluating).
  """

  def __init__(self, config: ml_collections.ConfigDict, schedule, writer, progress,
               ckpt: ckpt_lib.TrainCheckpointer, mfu_per_token_s: float | None):
    self.log_every, self.steps = config.train.log_every, config.train.steps
    self.tokens_per_step = config.train.batch_size * config.model.ctx_len
    self.schedule, self.writer, self.progress, self.ckpt = schedule, writer, progress, ckpt
    self.mfu_per_token_s = mfu_per_token_s  # MFU of one token/s; None without a peak FLOP/s
    self.final: dict[str, float] = {}  # the last logged value of every metric
    self._window_start, self._window_steps = time.perf_counter(), 0
    self._window_losses: list[float] = []
    self._run_start, self._run_steps, self._paused_s = None, 0, 0.0

  def _restart_window(self) -> None:
    self._window_start, self._window_steps = time.perf_counter(), 0

  def fetch(self, step: int, step_metrics, always_log: bool = False) -> None:
    """Waits for `step`'s metrics; NonFiniteLossError if its loss or gradient norm is not finite.

    They are logged every log_every steps, at the last step, and when `always_log`.
    """
    m = jax.device_get(step_metrics)
    self._window_steps += 1  # counted once finished: back-to-back fetches never give 0 tokens/s
    if self._run_start is None:
      self._run_start = time.perf_counter()
    else:
      self._run_steps += 1
    loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
    self._window_losses.append(loss)
    # An infinite gradient norm with a finite loss is divergence too: clipping scales such
    # gradients to zero or NaN, and the loss goes on at 1e13 without ever becoming NaN.
    for what, value in (("loss", loss), ("gradient norm", grad_norm)):
      if not math.isfinite(value):
        raise NonFiniteLossError(_non_finite_message(what, value, step, self.ckpt))
    if step % self.log_every and step != self.steps and not always_log:
      return
    elapsed = time.perf_counter() - self._window_start
    tok_s = self._window_steps * self.tokens_per_step / elapsed if elapsed > 0 else float("nan")
    mean_loss = sum(self._window_losses) / len(self._window_losses)
    self._window_losses.clear()
    record = {"train/loss": loss, "train/loss_avg": mean_loss,
              "train/bits_per_token": mean_loss / math.log(2),
              "train/accuracy": float(m["accuracy"]), "train/grad_norm": grad_norm,
              "train/lr": float(self.schedule(step - 1)), "perf/tokens_per_s": tok_s}
    if self.mfu_per_token_s:
      record["perf/mfu"] = tok_s * self.mfu_per_token_s
    self.writer.write(step, record)
    self.final.update(record)
    if self.progress is not None:
      self.progress.set_postfix(loss=f"{mean_loss:.3f}", bpt=f"{mean_loss / math.log(2):.3f}",
                                tok_s=f"{tok_s:,.0f}")
    else:
      logging.info("step %d: loss %.4f (%.3f bits/token), %.0f tokens/s", step, mean_loss,
                   mean_loss / math.log(2), tok_s)
    self._restart_window()

  @contextlib.contextmanager
  def paused(self):
    """Time spent in the block (evaluation) counts in neither clock."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._paused_s += time.perf_counter() - start
      self._restart_window()

  def validation(self, step: int, val_loss: float) -> None:
    record = {"val/loss": val_loss, "val/bits_per_token": val_loss / math.log(2)}
    self.writer.write(step, record)
    self.final.update(record)
    logging.info("step %d: validation loss %.4f, %.4f bits/token", step, val_loss,
                 val_loss / math.log(2))

  def run_throughput(self) -> dict[str, float]:
    """The whole run's tokens/s (and MFU); NaN for a single step, {} for none."""
    if self._run_start is None:
      return {}
    run_s = time.perf_counter() - self._run_start - self._paused_s
    tok_s = self._run_steps * self.tokens_per_step / run_s if self._run_steps else float("nan")
    out = {"perf/tokens_per_s": tok_s}
    if self.mfu_per_token_s:
      out["perf/mfu"] = tok_s * self.mfu_per_token_s
    return out

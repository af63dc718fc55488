"""Training: sharded state, the jitted step, evaluation and the loop with checkpoints and logs.

The loop (`train_and_evaluate`) is driven by an ml_collections config (see
experiments/configs/). Parameters and optimizer state are created directly on the mesh by a
jitted init with out_shardings from `sharding.py`; the step is `jax.jit` with in/out shardings
and donated state. Step N is dispatched before step N-1's metrics are fetched, so the host never
waits for the device except at logging, evaluation and checkpoint boundaries.

A non-finite loss stops the run with an error and writes nothing: the last checkpoint on disk
is the last good state.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from rwkv_jax import checkpoint as ckpt_lib
from rwkv_jax import data as data_lib
from rwkv_jax import losses, optim, sharding
from rwkv_jax import model as model_lib
from rwkv_jax.config import RWKVConfig

# Dense bf16 peak FLOP/s per chip, for model FLOPs utilization. Unknown devices report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


class NonFiniteLossError(RuntimeError):
  """Raised when the training loss becomes NaN or Inf."""


def model_config(config: ml_collections.ConfigDict) -> RWKVConfig:
  m = config.model
  return RWKVConfig(n_layer=m.n_layer, n_embd=m.n_embd, vocab_size=m.vocab_size,
                    dim_att=m.get("dim_att", 0), dim_ffn=m.get("dim_ffn", 0), ctx_len=m.ctx_len,
                    dtype=m.dtype, param_dtype=m.get("param_dtype", "float32"))


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> model_lib.RWKV:
  return model_lib.RWKV(model_config(config), rngs=rngs, init=config.model.init,
                        emb_scale=config.optim.lr_init, remat=config.model.remat)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o, t = config.optim, config.train
  if o.lr_final != o.lr_init and t.steps <= o.warmup_steps:
    raise ValueError(f"--config.train.steps={t.steps} must exceed --config.optim.warmup_steps="
                     f"{o.warmup_steps} (the learning rate decays after the warmup); lower the "
                     f"warmup or train longer.")
  if t.accumulate_steps < 1 or t.batch_size % t.accumulate_steps:
    raise ValueError(f"--config.train.batch_size={t.batch_size} must be a multiple of "
                     f"--config.train.accumulate_steps={t.accumulate_steps} (>= 1).")
  return optim.make_optimizer(
      lr_init=o.lr_init, lr_final=o.lr_final, warmup_steps=o.warmup_steps,
      total_steps=config.train.steps, betas=tuple(o.betas), eps=o.eps,
      weight_decay=o.weight_decay, grad_clip=o.grad_clip, layerwise_lr=o.layerwise_lr)


@dataclasses.dataclass
class TrainState:
  """What the loop carries: static structure plus the sharded arrays."""

  graphdef: Any
  params: Any  # nnx.State of nnx.Param, sharded by the rules
  opt_state: Any
  param_shardings: Any
  opt_shardings: Any


def abstract_state(config: ml_collections.ConfigDict, mesh, tx) -> TrainState:
  """The TrainState's structure, shapes and shardings, with no array allocated."""
  abstract_model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  return TrainState(graphdef, abstract_params, abstract_opt,
                    sharding.param_shardings(mesh, abstract_params),
                    sharding.tree_shardings(mesh, abstract_opt))


def init_state(config: ml_collections.ConfigDict, mesh, tx) -> TrainState:
  """Creates params and optimizer state directly in their sharded layout (no host copy)."""
  abstract = abstract_state(config, mesh, tx)

  @functools.partial(jax.jit, out_shardings=abstract.param_shardings)
  def init_params():
    return nnx.state(build_model(config, nnx.Rngs(config.train.seed)), nnx.Param)

  params = init_params()
  opt_state = jax.jit(tx.init, out_shardings=abstract.opt_shardings)(params)
  return dataclasses.replace(abstract, params=params, opt_state=opt_state)


def make_train_step(state: TrainState, tx, mesh, *, accumulate_steps: int, l2wrap: float,
                    impl: str) -> Callable:
  """Returns step(params, opt_state, batch) -> (params, opt_state, metrics), jitted and sharded.

  With accumulate_steps = k the batch [b, t] is split into k micro-batches whose gradients are
  averaged (lax.scan, so activations of one micro-batch live at a time) before one update.
  """
  graphdef = state.graphdef

  def loss_fn(params, inputs_bt, targets_bt):
    logits, _ = nnx.merge(graphdef, params)(inputs_bt, impl=impl)
    return losses.lm_loss(logits, targets_bt, l2wrap_factor=l2wrap)

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


# ----------------------------------------------------------------------------------------------
# Data.

def open_training_source(config: ml_collections.ConfigDict, workdir: pathlib.Path):
  """The token source named by config.data (a corpus name, or a file / directory / binidx)."""
  from rwkv_jax import corpus

  d = config.data
  if d.source == "wiki_sample":
    path = corpus.wiki_sample()
  elif d.source == "enwik8":
    path = corpus.enwik8()
  elif d.source == "file":
    if not d.path:
      raise ValueError("--config.data.source=file needs --config.data.path=FILE_OR_DIR_OR_PREFIX.")
    path = pathlib.Path(d.path)
  else:
    raise ValueError(f"--config.data.source={d.source!r}; use wiki_sample, enwik8 or file.")
  tokenizer = d.get("tokenizer", "bytes")
  is_binidx = str(path).endswith((".bin", ".idx")) or pathlib.Path(str(path) + ".idx").exists()
  if tokenizer != "bytes" and not is_binidx:
    # Text with a real tokenizer: encode once into binidx next to the run (process 0 writes it).
    from rwkv_jax.tokenizer import load_tokenizer

    prefix = workdir / "data" / pathlib.Path(path).name
    if not pathlib.Path(str(prefix) + ".idx").exists():
      if jax.process_index() == 0:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        data_lib.encode_text_file(path, load_tokenizer(tokenizer), prefix)
      _sync("encoded_data")
    path = prefix
  source = data_lib.open_source(path)
  vocab = int(np.max(source.tokens[: min(len(source.tokens), 1 << 24)])) + 1
  if vocab > config.model.vocab_size:
    raise ValueError(f"{source.path} holds token ids up to {vocab - 1} but "
                     f"--config.model.vocab_size={config.model.vocab_size}; raise the vocabulary "
                     f"size or use the matching tokenizer.")
  return source


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def make_iterators(config, source):
  d, t = config.data, config.train
  common = dict(ctx_len=config.model.ctx_len, batch_size=t.batch_size, seed=d.seed,
                val_fraction=d.val_fraction, shard_index=jax.process_index(),
                shard_count=jax.process_count(), worker_count=d.get("worker_count", 0))
  train_ds = data_lib.make_dataset(source, split="train", **common)
  val_ds = data_lib.make_dataset(source, split="val", **common)
  return iter(train_ds), val_ds


# ----------------------------------------------------------------------------------------------
# Logging.

class MetricWriter:
  """Terminal, TensorBoard event files and metrics.jsonl (process 0 only)."""

  def __init__(self, workdir: pathlib.Path, enabled: bool):
    self.enabled = enabled
    self.history: list[dict] = []
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(workdir / "tb"))
      self._jsonl = open(workdir / "metrics.jsonl", "a")

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    self.history.append(record)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      if v is not None and math.isfinite(float(v)):
        self._tb.add_scalar(k, float(v), step)

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def plot_history(path: pathlib.Path, metrics_file: pathlib.Path, title: str) -> None:
  """Loss curve PNG (train and validation bits per token) from metrics.jsonl."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = [json.loads(l) for l in metrics_file.read_text().splitlines() if l.strip()]
  train = [(r["step"], r["train/bits_per_token"]) for r in records if "train/bits_per_token" in r]
  val = [(r["step"], r["val/bits_per_token"]) for r in records if "val/bits_per_token" in r]
  fig, ax = plt.subplots(figsize=(7, 4))
  if train:
    ax.plot(*zip(*train), label="train")
  if val:
    ax.plot(*zip(*val), "o-", label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("bits per token")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def peak_flops() -> float | None:
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


# ----------------------------------------------------------------------------------------------
# The loop.

def _non_finite_message(loss: float, at_step: int, ckpt: ckpt_lib.TrainCheckpointer) -> str:
  """Names the checkpoint to resume from after a non-finite loss at `at_step`.

  The loss of step s is computed from the parameters saved as step s - 1, so checkpoint s - 1
  (if it was saved) holds the parameters that gave the bad loss; only checkpoints up to s - 2
  are known to be good.
  """
  ckpt.wait()
  saved = ckpt.all_steps()
  good = max((s for s in saved if s < at_step - 1), default=None)
  message = f"Training loss is {loss} at step {at_step}; stopping without saving."
  if at_step - 1 in saved:
    message += (f" Checkpoint {at_step - 1} holds the parameters that gave this loss: delete "
                f"{ckpt.directory / str(at_step - 1)} before resuming.")
  if good is None:
    message += f" No good checkpoint is left in {ckpt.directory}; start again from scratch."
  else:
    message += f" The last good checkpoint is step {good} in {ckpt.directory}."
  return message + " Lower --config.optim.lr_init or check the data."


def evaluate(eval_step, params, val_ds, mesh, max_batches: int) -> float:
  total, n = 0.0, 0
  for i, batch in enumerate(val_ds):
    if max_batches and i >= max_batches:
      break
    total += float(eval_step(params, sharding.make_global_batch(mesh, batch)))
    n += 1
  return total / max(n, 1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
                       ) -> dict[str, float]:
  """Trains (resuming from WORKDIR's latest checkpoint if any) and returns final metrics."""
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  t = config.train
  lead = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  cfg = model_config(config)
  if lead:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  logging.info("Mesh %s over %d devices (%d processes); model %s, %.2fM parameters.",
               dict(mesh.shape), mesh.size, jax.process_count(), cfg, cfg.num_params() / 1e6)

  source = open_training_source(config, workdir)
  train_it, val_ds = make_iterators(config, source)
  tx = build_optimizer(config)
  state = init_state(config, mesh, tx)
  ckpt = ckpt_lib.TrainCheckpointer(workdir, keep=t.keep_checkpoints,
                                    async_save=t.get("async_checkpoints", True))
  step = 0
  latest = ckpt.latest_step()
  if latest is not None:
    ckpt_lib.check_compatible(ckpt.read_meta(latest), cfg, f"Checkpoint {latest} in {workdir}")
    state.params, state.opt_state = ckpt.restore(latest, state.params, state.opt_state, train_it)
    step = latest
    logging.info("Resumed from step %d in %s.", step, ckpt.directory)

  train_step = make_train_step(state, tx, mesh, accumulate_steps=t.accumulate_steps,
                               l2wrap=config.optim.l2wrap, impl=t.impl)
  eval_step = make_eval_step(state, mesh, t.impl)
  schedule = optim.learning_rate_schedule(
      lr_init=config.optim.lr_init, lr_final=config.optim.lr_final,
      warmup_steps=config.optim.warmup_steps, total_steps=t.steps)
  writer = MetricWriter(workdir, lead)
  tokens_per_step = t.batch_size * config.model.ctx_len
  flops_per_step = cfg.flops_per_token() * tokens_per_step
  peak = peak_flops()
  meta = {"model": cfg.to_dict(), "config": json.loads(config.to_json_best_effort())}

  def save(at_step):
    ckpt.save(at_step, state.params, state.opt_state, train_it, meta)

  progress = None
  # A bar on a terminal; log lines (every log_every steps) when output goes to a file or CI log.
  if lead and t.get("progress_bar", True) and sys.stderr.isatty():
    from tqdm import tqdm

    progress = tqdm(total=t.steps, initial=step, unit="step", dynamic_ncols=True)

  pending = None  # (step, metrics) dispatched but not yet fetched
  window_start, window_steps = time.perf_counter(), 0
  window_losses: list[float] = []  # since the last log line: one step's loss is noisy
  final: dict[str, float] = {}

  def fetch(pending_step, metrics):
    nonlocal window_start, window_steps
    m = jax.device_get(metrics)
    window_steps += 1  # counted once finished, so back-to-back fetches do not report 0 tokens/s
    loss = float(m["loss"])
    window_losses.append(loss)
    if not math.isfinite(loss):
      raise NonFiniteLossError(_non_finite_message(loss, pending_step, ckpt))
    if pending_step % t.log_every == 0 or pending_step == t.steps:
      elapsed = time.perf_counter() - window_start
      tok_s = window_steps * tokens_per_step / elapsed if elapsed > 0 else float("nan")
      mean_loss = sum(window_losses) / len(window_losses)
      window_losses.clear()
      record = {"train/loss": loss, "train/loss_avg": mean_loss,
                "train/bits_per_token": mean_loss / math.log(2),
                "train/accuracy": float(m["accuracy"]), "train/grad_norm": float(m["grad_norm"]),
                "train/lr": float(schedule(pending_step - 1)), "perf/tokens_per_s": tok_s}
      if peak:
        record["perf/mfu"] = tok_s * flops_per_step / tokens_per_step / (peak * jax.device_count())
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
      state.params, state.opt_state, metrics = train_step(state.params, state.opt_state, batch)
      step += 1
      if pending is not None:
        fetch(*pending)
      pending = (step, metrics)
      if progress is not None:
        progress.update(1)
      boundary = step == t.steps
      if t.eval_every and (step % t.eval_every == 0 or boundary):
        fetch(*pending)
        pending = None
        val_loss = evaluate(eval_step, state.params, val_ds, mesh, t.eval_batches)
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
  finally:
    if progress is not None:
      progress.close()
    ckpt.close()
    writer.close()

  if lead:
    plot_history(workdir / "loss.png", workdir / "metrics.jsonl",
                 f"{cfg.n_layer} layers x {cfg.n_embd}, ctx {cfg.ctx_len}")
  model = nnx.merge(state.graphdef, state.params)
  if t.get("export", True):
    ckpt_lib.export(model, workdir / "export")
  final["step"] = step
  return final

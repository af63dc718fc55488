r"""Benchmarks one full training step (forward, backward, optimizer) in tokens/s and MFU.

  python -m experiments.bench_train --model=char_tiny --steps=10
  python -m experiments.bench_train --model=169m --batch_size=16 --impls=associative,pallas

The step is `train.make_train_step` on the mesh of all devices (data parallel), with the
official optimizer, so the number is what `experiments.train` gets minus data loading. Each WKV
implementation in --impls is compiled and timed in turn. MFU counts the matrix-product FLOPs of
`RWKVConfig.flops_per_token` (6 per parameter-MAC, no WKV, no rematerialization) against the
device's dense bf16 peak; it is left empty for devices whose peak is unknown (e.g. CPUs).
Writes experiments/results/bench_train_<device>.json (see --out).
"""

from __future__ import annotations

import pathlib
import sys
import time
from typing import Any

from absl import app, flags

_REPO = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("char_tiny", "169m", "430m", "1b5", "3b", "7b", "14b")


def define_flags() -> None:
  """Defines the command-line flags. Called only when run as a program, so that importing
  `run` (as the tests do) next to other entry points cannot collide on flag names."""
  flags.DEFINE_enum("model", "char_tiny", MODELS, "Model: a Pile preset or char_tiny.")
  flags.DEFINE_integer("batch_size", 8, "Global batch size (sequences per step).")
  flags.DEFINE_integer("ctx_len", None, "Tokens per sequence; default: the model's.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                    "Compute dtype; default: the model config's.")
  flags.DEFINE_list("impls", ["auto"], "WKV implementations to time, comma-separated.")
  flags.DEFINE_integer("steps", 10, "Timed steps per repeat.")
  flags.DEFINE_integer("repeats", 3, "Timed repeats; the median is reported.")
  flags.DEFINE_bool("remat", None, "Rematerialize blocks; default: the model config's.")
  flags.DEFINE_string("out", None, "Output JSON; default experiments/results/"
                      "bench_train_<device>.json.")


def experiment_config(model: str, batch_size: int, ctx_len: int | None, dtype: str | None,
                      remat: bool | None):
  """The experiment config the benchmark trains: the model's own config with overrides."""
  if model == "char_tiny":
    from experiments.configs import char_tiny
    config = char_tiny.get_config()
  else:
    from experiments.configs import pile
    config = pile.get_config(model)
  config.train.batch_size = batch_size
  if ctx_len is not None:
    config.model.ctx_len = ctx_len
  if dtype is not None:
    config.model.dtype = dtype
  if remat is not None:
    config.model.remat = remat
  return config


def _peak_memory_bytes() -> int | None:
  import jax

  stats = jax.local_devices()[0].memory_stats()  # None on CPU
  return None if not stats else stats.get("peak_bytes_in_use")


def time_train_step(config, impl: str, steps: int, repeats: int) -> dict[str, Any]:
  """Compiles and times the training step of `config` with WKV implementation `impl`."""
  import jax
  import numpy as np

  from rwkv_jax import sharding, train, wkv

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  tx = train.build_optimizer(config)
  state = train.init_state(config, mesh, tx)
  step_fn = train.make_train_step(state, tx, mesh, accumulate_steps=1,
                                  l2wrap=config.optim.l2wrap, impl=impl)
  b, t, v = config.train.batch_size, config.model.ctx_len, config.model.vocab_size
  tokens = np.random.default_rng(0).integers(0, v, (b, t + 1), dtype=np.int32)
  batch = sharding.shard_batch(mesh, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  params, opt_state = state.params, state.opt_state

  # The step donates its state, so the timing loop carries it (time_fn would reuse freed args).
  start = time.perf_counter()
  params, opt_state, metrics = step_fn(params, opt_state, batch)
  jax.block_until_ready(metrics)
  first_call_s = time.perf_counter() - start
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      params, opt_state, metrics = step_fn(params, opt_state, batch)
    jax.block_until_ready((params, metrics))
    samples.append((time.perf_counter() - start) / steps)
  step_s = float(np.median(samples))
  cfg = train.model_config(config)
  tokens_per_s = b * t / step_s
  peak = train.peak_flops()
  return {
      "impl": impl,
      "impl_resolved": wkv.resolve(impl),
      "step_ms_median": step_s * 1e3,
      "step_ms_min": min(samples) * 1e3,
      "first_call_s": first_call_s,
      "tokens_per_s": tokens_per_s,
      "model_flops_per_s": tokens_per_s * cfg.flops_per_token(),
      "mfu": (tokens_per_s * cfg.flops_per_token() / (peak * jax.device_count())
              if peak else None),
      "peak_memory_bytes": _peak_memory_bytes(),
      "final_loss": float(metrics["loss"]),
  }


def run(model: str, batch_size: int, ctx_len: int | None, dtype: str | None, impls: list[str],
        steps: int, repeats: int, remat: bool | None, out: str | None,
        command: list[str] | None = None) -> pathlib.Path:
  """Benchmarks every implementation in `impls` and writes the JSON record; returns its path."""
  from experiments import benchlib
  from rwkv_jax import train

  config = experiment_config(model, batch_size, ctx_len, dtype, remat)
  cfg = train.model_config(config)
  results = []
  for impl in impls:
    try:
      results.append(time_train_step(config, impl, steps, repeats))
    except (ValueError, NotImplementedError, RuntimeError) as e:  # e.g. a GPU-only kernel
      results.append({"impl": impl, "error": f"{type(e).__name__}: {str(e)[:500]}"})
    print(results[-1], flush=True)
  record = {
      "benchmark": "train_step",
      "environment": benchlib.environment(command),
      "model": model,
      "model_config": cfg.to_dict(),
      "num_params": cfg.num_params(),
      "flops_per_token": cfg.flops_per_token(),
      "batch_size": batch_size,
      "ctx_len": cfg.ctx_len,
      "tokens_per_step": batch_size * cfg.ctx_len,
      "remat": bool(config.model.remat),
      "steps": steps,
      "repeats": repeats,
      "peak_flops_per_device": train.peak_flops(),
      "results": results,
  }
  path = pathlib.Path(out) if out else (
      _REPO / "experiments" / "results" / f"bench_train_{benchlib.default_tag()}.json")
  return benchlib.write_json(path, record)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  path = run(f.model, f.batch_size, f.ctx_len, f.dtype, f.impls, f.steps, f.repeats, f.remat,
             f.out, command=sys.argv)
  print(f"Wrote {path}")


if __name__ == "__main__":
  define_flags()
  app.run(main)

r"""Benchmarks one full training step (forward, backward, optimizer) in tokens/s and MFU.

  python -m experiments.bench_train --model=char_tiny --steps=10
  python -m experiments.bench_train --model=169m --batch_size=16 --impls=associative,pallas

The step is `step_lib.make_train_step` on the mesh of all devices (data parallel), with the
official optimizer, so the number is what `experiments.train` gets minus data loading. Each WKV
implementation in --impls is compiled and timed in turn. MFU counts the matrix-product FLOPs of
`RWKVConfig.flops_per_token` (6 per parameter-MAC, no WKV, no rematerialization) against the
device's dense bf16 peak (`benchlib.peak_flops`); it is left empty for devices whose peak is
unknown (e.g. CPUs).
Each result also carries XLA's memory plan of the compiled step (`memory_plan`: arguments,
outputs, donated aliases, temporaries) next to the device's measured peak where it reports one.

  python -m experiments.bench_train --model=1b5 --batch_size=8 --dtype=bfloat16 --plan_only

compiles the step from shapes alone (nothing allocated, nothing run) and records only the memory
plan: whether a configuration fits a device before it is allocated there. Plan on the device
itself: XLA's CPU backend plans neither fusion nor rematerialization as a GPU does (with jax
0.10.2 a chain of `jax.checkpoint`ed layers plans the same temporaries on CPU as without), so a
CPU plan says little about a GPU.
Writes experiments/results/bench_train_<device>.json (see --out).
"""

from __future__ import annotations

import pathlib
import sys
import time
from typing import Any

from absl import flags

from experiments import _cli

_REPO = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("char_tiny", "169m", "430m", "1b5", "3b", "7b", "14b")


def define_flags() -> None:
  """Defines the command-line flags. Called only when run as a program, so that importing
  `run` (as the tests do) next to other entry points cannot collide on flag names."""
  flags.DEFINE_enum("model", "char_tiny", MODELS, "Model: a Pile preset or char_tiny.")
  flags.DEFINE_integer("batch_size", 8, "Global batch size (sequences per step).",
                       lower_bound=1)
  flags.DEFINE_integer("ctx_len", None, "Tokens per sequence; default: the model's.",
                       lower_bound=1)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                    "Compute dtype; default: the model config's.")
  flags.DEFINE_list("impls", ["auto"], "WKV implementations to time, comma-separated.")
  flags.DEFINE_integer("steps", 10, "Timed steps per repeat.", lower_bound=1)
  flags.DEFINE_integer("repeats", 3, "Timed repeats; the median is reported.",
                       lower_bound=1)
  flags.DEFINE_bool("remat", None, "Rematerialize blocks; default: the model config's.")
  flags.DEFINE_bool("plan_only", False, "Compile from shapes and record XLA's memory plan only: "
                    "no allocation, no timing.")
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


def memory_plan(compiled) -> dict[str, int] | None:
  """XLA's buffer plan of a compiled step, in bytes per device."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  plan = {"argument_bytes": stats.argument_size_in_bytes,
          "output_bytes": stats.output_size_in_bytes,
          "alias_bytes": stats.alias_size_in_bytes,  # outputs written over donated arguments
          "temp_bytes": stats.temp_size_in_bytes}
  plan["total_bytes"] = (plan["argument_bytes"] + plan["output_bytes"] - plan["alias_bytes"]
                         + plan["temp_bytes"])
  return plan


def _compile_step(config, impl: str, state, mesh, tx):
  import jax
  import jax.numpy as jnp

  from rwkv_jax.train import step as step_lib

  step_fn = step_lib.make_train_step(state, tx, mesh, accumulate_steps=1,
                                  l2wrap=config.optim.l2wrap, impl=impl)
  tokens = jax.ShapeDtypeStruct((config.train.batch_size, config.model.ctx_len), jnp.int32)
  start = time.perf_counter()
  with jax.set_mesh(mesh):  # as in train.py: a Mosaic (TPU) WKV kernel runs per shard
    compiled = step_fn.lower(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.opt_state),
        {"inputs": tokens, "targets": tokens}).compile()
  return compiled, time.perf_counter() - start


def plan_train_step(config, impl: str) -> dict[str, Any]:
  """Compiles the training step of `config` from shapes alone; returns XLA's memory plan."""
  from rwkv_jax import sharding, wkv
  from rwkv_jax.train import step as step_lib

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  tx, _ = step_lib.build_optimizer(config)
  compiled, compile_s = _compile_step(config, impl, step_lib.abstract_state(config, mesh, tx), mesh,
                                      tx)
  return {"impl": impl, "impl_resolved": wkv.resolve(impl), "compile_s": compile_s,
          "memory_plan": memory_plan(compiled)}


def time_train_step(config, impl: str, steps: int, repeats: int) -> dict[str, Any]:
  """Compiles and times the training step of `config` with WKV implementation `impl`."""
  import jax
  import numpy as np

  from experiments import benchlib
  from rwkv_jax import sharding, wkv
  from rwkv_jax.train import step as step_lib

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  tx, _ = step_lib.build_optimizer(config)
  state = step_lib.init_state(config, mesh, tx)
  step_fn, compile_s = _compile_step(config, impl, state, mesh, tx)
  b, t, v = config.train.batch_size, config.model.ctx_len, config.model.vocab_size
  tokens = np.random.default_rng(0).integers(0, v, (b, t + 1), dtype=np.int32)
  batch = sharding.shard_batch(mesh, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  params, opt_state, metrics = state.params, state.opt_state, None

  def train_step():
    # The step donates its state, so each call carries it to the next (time_fn would call the
    # step again on the freed arguments).
    nonlocal params, opt_state, metrics
    params, opt_state, metrics = step_fn(params, opt_state, batch)
    return params, metrics

  timing = benchlib.time_rounds({"step": train_step}, repeats, calls_per_repeat=steps)["step"]
  step_s = timing.median_s
  cfg = step_lib.model_config(config)
  tokens_per_s = b * t / step_s
  peak = benchlib.peak_flops()
  return {
      "impl": impl,
      "impl_resolved": wkv.resolve(impl),
      "step_ms_median": timing.median_ms,
      "step_ms_min": timing.min_ms,
      "compile_s": compile_s,
      "first_call_s": timing.first_call_s,
      "tokens_per_s": tokens_per_s,
      "model_flops_per_s": tokens_per_s * cfg.flops_per_token(),
      "mfu": (tokens_per_s * cfg.flops_per_token() / (peak * jax.device_count())
              if peak else None),
      "peak_memory_bytes": _peak_memory_bytes(),
      "memory_plan": memory_plan(step_fn),
      "final_loss": float(metrics["loss"]),
  }


def run(model: str, batch_size: int, ctx_len: int | None, dtype: str | None, impls: list[str],
        steps: int, repeats: int, remat: bool | None, out: str | None,
        command: list[str] | None = None, plan_only: bool = False) -> pathlib.Path:
  """Benchmarks every implementation in `impls` and writes the JSON record; returns its path."""
  from experiments import benchlib
  from rwkv_jax.train import step as step_lib

  config = experiment_config(model, batch_size, ctx_len, dtype, remat)
  cfg = step_lib.model_config(config)
  results = []
  for impl in impls:
    try:
      results.append(plan_train_step(config, impl) if plan_only
                     else time_train_step(config, impl, steps, repeats))
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
      "plan_only": plan_only,
      "steps": None if plan_only else steps,
      "repeats": None if plan_only else repeats,
      "peak_flops_per_device": benchlib.peak_flops(),
      "results": results,
  }
  default_name = (f"bench_train_plan_{model}_{benchlib.default_tag()}.json" if plan_only
                  else f"bench_train_{benchlib.default_tag()}.json")
  path = pathlib.Path(out) if out else _REPO / "experiments" / "results" / default_name
  return benchlib.write_json(path, record)


def main(argv):
  if len(argv) > 1:
    raise _cli.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  _cli.output_path("out", f.out)
  path = run(f.model, f.batch_size, f.ctx_len, f.dtype, f.impls, f.steps, f.repeats, f.remat,
             f.out, command=sys.argv, plan_only=f.plan_only)
  print(f"Wrote {path}")


if __name__ == "__main__":
  define_flags()
  _cli.run(main)

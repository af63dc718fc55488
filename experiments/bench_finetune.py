r"""What fine-tuning costs: peak memory, step time and optimizer state of full, LoRA and state
tuning.

  python -m experiments.bench_finetune            # 169M shape, batch 4, T 512, 3 modes
  python -m experiments.bench_finetune --quick    # a tiny shape: checks that everything runs
  python -m experiments.bench_finetune --chunk_len=128   # each window in chunks (bptt.py)

The base is random weights of the shape in the official .pth format, written once to
CACHE/bench_finetune/. Each mode runs in its own process (a fresh peak resident set), which
loads the base (`finetune.load_base`), puts the mode's adapters on it (rwkv_jax/train/adapters.py),
builds the fine-tuning TrainState (`finetune.adapted_state`: the trained part with its optimizer
state, the rest frozen) and runs the train step (rwkv_jax/train/step.py) `--steps` + 1 times on
random tokens. Modes:

  full    every parameter trains, a float32 base (the official recipe)
  lora    LoRA of rank --r on the default targets, the base frozen in --frozen_dtype
  state   the learned initial state only, the base frozen in --frozen_dtype

Per mode it records the peak resident set (VmHWM, i.e. ru_maxrss) after loading the base and
after the steps, the first step's time (compilation included) and the median of the others, and
the bytes of the trained parameters, the frozen ones and the optimizer state.

Writes experiments/results/bench_finetune_<device>[_chunk<N>].json and .png, with the environment
(device, versions, date, command, load average).
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Sequence

from absl import flags

from experiments import _cli, benchlib, plots

_REPO = pathlib.Path(__file__).resolve().parents[1]
MODES = ("full", "lora", "state")

PILE_VOCAB = 50277
# (n_layer, n_embd, vocab); dim_att = n_embd, dim_ffn = 4 * n_embd.
SHAPE_169M, SHAPE_QUICK = (12, 768, PILE_VOCAB), (2, 64, 256)
_MIB = 2 ** 20


def define_flags() -> None:
  """Defines the flags; only when run as a program, so that tests can import `run`."""
  flags.DEFINE_bool("quick", False, "A tiny shape (L2 D64, vocab 256, batch 2, T 32) and one "
                    "timed step: checks that everything runs.")
  flags.DEFINE_list("modes", list(MODES), f"Which modes, of {', '.join(MODES)}.")
  flags.DEFINE_integer("r", 16, "LoRA rank.", lower_bound=1)
  flags.DEFINE_enum("frozen_dtype", "bfloat16", ["float32", "bfloat16", "float16", "int8"],
                    "The frozen base's dtype in the lora and state modes (full trains float32).")
  flags.DEFINE_integer("batch_size", 4, "Sequences per step.", lower_bound=1)
  flags.DEFINE_integer("ctx_len", 512, "Tokens per sequence.", lower_bound=1)
  flags.DEFINE_integer("steps", 2, "Timed steps after the first (which compiles).", lower_bound=1)
  flags.DEFINE_string("impl", "auto", "WKV implementation.")
  flags.DEFINE_integer("chunk_len", 0, "train.chunk_len: windows run in chunks of this many tokens "
                       "that carry the state, activations recomputed per chunk; 0 = one call.",
                       lower_bound=0)
  flags.DEFINE_string("out", None, "JSON path; default experiments/results/"
                      "bench_finetune_<device>.json (and the .png beside it).")
  flags.DEFINE_string("child", None, "Internal: run one mode given as JSON and print its record.")


def base_checkpoint(n_layer: int, n_embd: int, vocab: int) -> pathlib.Path:
  """Random weights of the shape as an official float32 .pth, written once to the cache."""
  from rwkv_jax import files

  path = files.cache_dir() / "bench_finetune" / f"random_L{n_layer}_D{n_embd}_V{vocab}.pth"
  if not path.is_file():
    import torch  # pylint: disable=g-import-not-at-top

    from experiments import reference_models
    sd = reference_models.official_state_dict(0, n_layer=n_layer, n_embd=n_embd, dim_att=n_embd,
                                              dim_ffn=4 * n_embd, vocab=vocab)
    with files.atomic_path(path) as tmp:
      torch.save(sd, tmp)
  return path


def _bytes(tree) -> int:
  import jax

  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def measure(setting: dict[str, Any]) -> dict[str, Any]:
  """One mode, in this process: memory at each stage, step times and the state's sizes."""
  import jax
  import numpy as np

  from rwkv_jax import sharding, wkv
  from rwkv_jax.train import adapters, finetune
  from rwkv_jax.train import step as step_lib

  mode, base_dtype = setting["mode"], setting["base_dtype"]
  config = finetune.default_config()
  config.finetune.update(mode=mode, r=setting["r"], lora_alpha=2.0 * setting["r"],
                         base_dtype=base_dtype)
  config.model.ctx_len = setting["ctx_len"]
  config.train.update(batch_size=setting["batch_size"], impl=setting["impl"])
  finetune.check(config)

  model, base_config, _ = finetune.load_base(setting["base"], base_dtype)
  after_load = benchlib.peak_rss_bytes()
  chosen = finetune.settings(config)
  model = adapters.apply(model, mode, **{k: v for k, v in chosen.items() if k != "mode"}, seed=0)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tx, _ = step_lib.build_optimizer(finetune.training_config(config))
  state = finetune.adapted_state(model, mode, mesh, tx)
  del model
  jax.block_until_ready((state.params, state.opt_state, state.frozen))
  after_setup = benchlib.peak_rss_bytes()
  step = step_lib.make_train_step(state, tx, mesh, accumulate_steps=1,
                                  l2wrap=config.optim.l2wrap, impl=setting["impl"],
                                  chunk_len=setting.get("chunk_len", 0))

  b, t, v = setting["batch_size"], setting["ctx_len"], base_config.vocab_size
  tokens = np.random.default_rng(0).integers(0, v, (b, t + 1), dtype=np.int32)
  batch = sharding.shard_batch(mesh, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  params, opt_state, times, step_losses = state.params, state.opt_state, [], []
  for _ in range(setting["steps"] + 1):
    start = time.perf_counter()
    with jax.set_mesh(mesh):
      params, opt_state, metrics = step(params, opt_state, batch)
    step_losses.append(float(metrics["loss"]))  # waits for the step
    times.append(time.perf_counter() - start)
  return {**setting, "impl_resolved": wkv.resolve(setting["impl"]),
          "n_layer": base_config.n_layer, "n_embd": base_config.n_embd, "vocab_size": v,
          "trained_params": int(sum(x.size for x in jax.tree.leaves(params))),
          "frozen_params": int(sum(x.size for x in jax.tree.leaves(state.frozen))),
          "trained_bytes": _bytes(params), "frozen_bytes": _bytes(state.frozen),
          "optimizer_state_bytes": _bytes(opt_state),
          "peak_rss_after_load_bytes": after_load,
          "peak_rss_after_setup_bytes": after_setup,
          "peak_rss_bytes": benchlib.peak_rss_bytes(),
          "first_step_s": times[0], "step_s": benchlib.median(times[1:]),
          "step_times_s": times, "losses": step_losses}


def _run_child(setting: dict[str, Any]) -> dict[str, Any]:
  run = benchlib.run_fresh("experiments.bench_finetune", f"--child={json.dumps(setting)}")
  if run.record is None:
    lines = run.stderr.strip().splitlines()
    return {**setting, "error": lines[-1][:500] if lines else f"exit status {run.returncode}"}
  return run.record


def run(modes: Sequence[str], shape: tuple[int, int, int], *, r: int, frozen_dtype: str,
        batch_size: int, ctx_len: int, steps: int, impl: str, chunk_len: int = 0
        ) -> dict[str, Any]:
  """Measures every mode in a fresh process; returns the record (without the environment)."""
  base = base_checkpoint(*shape)
  results = []
  for mode in modes:
    setting = dict(mode=mode, base=str(base), base_dtype="float32" if mode == "full"
                   else frozen_dtype, r=r, batch_size=batch_size, ctx_len=ctx_len, steps=steps,
                   impl=impl, chunk_len=chunk_len)
    results.append(_run_child(setting))
    x = results[-1]
    print(f"{mode:>6} ({x['base_dtype']} base): " + (
        f"peak RSS {x['peak_rss_bytes'] / _MIB:,.0f} MiB, step {x['step_s']:.2f} s, optimizer "
        f"state {x['optimizer_state_bytes'] / _MIB:,.2f} MiB for "
        f"{x['trained_params']:,} trained parameters" if "error" not in x else x["error"]),
          flush=True)
  return {"benchmark": "finetune_step_cost", "shape": dict(zip(("n_layer", "n_embd", "vocab"),
                                                               shape)),
          "batch_size": batch_size, "ctx_len": ctx_len, "chunk_len": chunk_len, "r": r,
          "frozen_dtype": frozen_dtype,
          "results": results, "ratios": ratios(results)}


def ratios(results: list[dict[str, Any]]) -> dict[str, float]:
  """Each mode's peak RSS, step time and optimizer state over full fine-tuning's, and the
  optimizer state per trained byte (2 for Adam's two moments)."""
  ok = {x["mode"]: x for x in results if "error" not in x}
  out = {f"{m}_optimizer_bytes_per_trained_byte": x["optimizer_state_bytes"] / x["trained_bytes"]
         for m, x in ok.items()}
  if "full" in ok:
    full = ok["full"]
    for m, x in ok.items():
      if m != "full":
        for key in ("peak_rss_bytes", "step_s", "optimizer_state_bytes"):
          out[f"{m}_over_full_{key}"] = x[key] / full[key]
  return out


def plot(record: dict[str, Any], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ok = [x for x in record["results"] if "error" not in x]
  names = [f"{x['mode']}\n({x['base_dtype']} base)" for x in ok]
  fig, axes = plt.subplots(1, 3, figsize=(13, 4))
  panels = (
      ("peak resident memory (MiB)", [x["peak_rss_bytes"] / _MIB for x in ok], "linear"),
      ("train step (s, median)", [x["step_s"] for x in ok], "linear"),
      ("optimizer state (MiB, log)", [max(x["optimizer_state_bytes"], 1) / _MIB for x in ok],
       "log"))
  for ax, (title, values, scale) in zip(axes, panels):
    bars = ax.bar(names, values, color=["tab:gray", "tab:blue", "tab:green"][:len(values)])
    ax.bar_label(bars, [f"{value:,.0f}" if value >= 100 else f"{value:.3g}" for value in values],
                 fontsize=8)
    ax.set(title=title, yscale=scale)
    ax.grid(alpha=0.3, axis="y")
    ax.tick_params(axis="x", labelsize=8)
  s, env = record["shape"], record["environment"]
  fig.suptitle(f"one fine-tuning step, L{s['n_layer']} D{s['n_embd']} vocab {s['vocab']}, batch "
               f"{record['batch_size']} x T {record['ctx_len']}"
               f"{' in chunks of %d' % record['chunk_len'] if record.get('chunk_len') else ''}, "
               f"LoRA r={record['r']}; "
               f"{env['device_kind']} x{env['host_cpu_count']} cores, jax {env['jax']}, load "
               f"average {env['host_load_average_1m']:.1f}", fontsize=9)
  plots.save_figure(fig, path)


def main(argv):
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise _cli.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.child:
    print(json.dumps(measure(json.loads(FLAGS.child))))
    return
  unknown = [m for m in FLAGS.modes if m not in MODES]
  if unknown or not FLAGS.modes:
    raise _cli.UsageError(f"--modes={','.join(FLAGS.modes)}: use some of {', '.join(MODES)}.")
  out = _cli.output_path("out", FLAGS.out)
  quick = FLAGS.quick
  record = run(FLAGS.modes, SHAPE_QUICK if quick else SHAPE_169M, r=FLAGS.r,
               frozen_dtype=FLAGS.frozen_dtype, batch_size=2 if quick else FLAGS.batch_size,
               ctx_len=32 if quick else FLAGS.ctx_len, steps=1 if quick else FLAGS.steps,
               impl=FLAGS.impl, chunk_len=FLAGS.chunk_len)
  record = {"environment": benchlib.environment(), **record}
  chunked = f"_chunk{FLAGS.chunk_len}" if FLAGS.chunk_len else ""
  path = out or (_REPO / "experiments" / "results" /
                 f"bench_finetune_{benchlib.default_tag()}{chunked}.json")
  benchlib.write_json(path, record)
  plot(record, path.with_suffix(".png"))
  print(f"{json.dumps(record['ratios'])}\nWrote {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
  define_flags()
  _cli.run(main)

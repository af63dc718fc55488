r"""Peak memory of one training step against the window length, one-call and in chunks.

Each setting runs in its own process (a fresh peak), which builds the model and optimizer,
compiles the train step (rwkv_jax/train/step.py, chunks from rwkv_jax/train/bptt.py) and runs it
once. Per setting it records the process's peak resident memory (VmHWM, as ru_maxrss) after
set-up, after compilation and after the step, and XLA's buffer plan of the step (its temporary
bytes are the activations). On an accelerator the device's peak bytes in use are recorded too.

  python -m experiments.bench_memory            # L4 D256 batch 1, windows 1k..64k, chunks of 512
  python -m experiments.bench_memory --windows=1024,16384 --one_call_windows=1024

Writes experiments/results/bench_memory_<device>.json and .png.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

from absl import flags

from experiments import _cli, benchlib, plots

_REPO = pathlib.Path(__file__).resolve().parents[1]

flags.DEFINE_list("windows", ["1024", "4096", "16384", "65536"], "Window lengths trained in "
                  "chunks of --chunk_len.")
flags.DEFINE_list("one_call_windows", ["1024", "4096"], "Window lengths also trained in one "
                  "call (chunk_len 0), for comparison.")
flags.DEFINE_integer("chunk_len", 512, "Tokens per chunk.", lower_bound=1)
flags.DEFINE_enum("bptt", "full", ["full", "truncated"], "Gradients through the state or not.")
flags.DEFINE_integer("n_layer", 4, "Blocks.", lower_bound=1)
flags.DEFINE_integer("n_embd", 256, "Width.", lower_bound=1)
flags.DEFINE_integer("vocab_size", 256, "Vocabulary (256: bytes).", lower_bound=2)
flags.DEFINE_integer("batch_size", 1, "Windows per step.", lower_bound=1)
flags.DEFINE_string("impl", "auto", "WKV implementation.")
flags.DEFINE_string("out", None, "JSON path; default experiments/results/bench_memory_<device>.json"
                    " (and the .png beside it).")
flags.DEFINE_string("child", None, "Internal: run one setting given as JSON and print its record.")
FLAGS = flags.FLAGS

_MIB = 2 ** 20


def experiment_config(setting: dict[str, Any]):
  from rwkv_jax.train import config as train_config

  c = train_config.default_config()
  c.model.update(n_layer=setting["n_layer"], n_embd=setting["n_embd"],
                 vocab_size=setting["vocab_size"], ctx_len=setting["window"], dtype="float32")
  c.train.update(batch_size=setting["batch_size"], chunk_len=setting["chunk_len"],
                 bptt=setting["bptt"], impl=setting["impl"])
  c.optim.update(warmup_steps=0)
  c.mesh.update(data=1)
  return c


def measure(setting: dict[str, Any]) -> dict[str, Any]:
  """One setting, in this process: its peak resident memory at each stage and XLA's plan."""
  import jax
  import numpy as np

  from experiments import bench_train
  from rwkv_jax import sharding, wkv
  from rwkv_jax.train import step as step_lib

  config = experiment_config(setting)
  t = config.train
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tx, _ = step_lib.build_optimizer(config)
  state = step_lib.init_state(config, mesh, tx)
  jax.block_until_ready(state.params)
  after_setup = benchlib.peak_rss_bytes()
  step = step_lib.make_train_step(state, tx, mesh, accumulate_steps=1, l2wrap=config.optim.l2wrap,
                               impl=t.impl, chunk_len=t.chunk_len, bptt=t.bptt)
  b, w, v = t.batch_size, setting["window"], setting["vocab_size"]
  tokens = np.random.default_rng(0).integers(0, v, (b, w + 1), dtype=np.int32)
  batch = sharding.shard_batch(mesh, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  with jax.set_mesh(mesh):
    compiled = step.lower(state.params, state.opt_state, batch).compile()
  after_compile = benchlib.peak_rss_bytes()
  params, opt_state, metrics = compiled(state.params, state.opt_state, batch)
  jax.block_until_ready((params, opt_state, metrics))
  after_step = benchlib.peak_rss_bytes()
  device_stats = jax.local_devices()[0].memory_stats() or {}
  return {**setting, "impl_resolved": wkv.resolve(t.impl),
          "peak_rss_after_setup_bytes": after_setup,
          "peak_rss_after_compile_bytes": after_compile,
          "peak_rss_bytes": after_step,
          "device_peak_bytes_in_use": device_stats.get("peak_bytes_in_use"),
          "xla_plan": bench_train.memory_plan(compiled),
          "loss": float(metrics["loss"])}


def _run_child(setting: dict[str, Any]) -> dict[str, Any]:
  run = benchlib.run_fresh("experiments.bench_memory", f"--child={json.dumps(setting)}")
  if run.record is None:
    return {**setting, "error": run.stderr.strip().splitlines()[-1][:500] if run.stderr.strip()
            else f"exit status {run.returncode}"}
  return run.record


def run(windows: Sequence[int], one_call_windows: Sequence[int], chunk_len: int, bptt: str,
        model: dict[str, int], impl: str) -> dict[str, Any]:
  """Measures every setting in a subprocess; returns the record (without the environment)."""
  settings = [dict(window=w, chunk_len=0, bptt=bptt) for w in one_call_windows]
  settings += [dict(window=w, chunk_len=min(chunk_len, w), bptt=bptt) for w in windows]
  results = []
  for s in settings:
    results.append(_run_child({**s, **model, "impl": impl}))
    r = results[-1]
    print(f"window {r['window']:>6} chunk_len {r['chunk_len']:>5}: " + (
        f"peak RSS {r['peak_rss_bytes'] / _MIB:,.0f} MiB, XLA temp "
        f"{r['xla_plan']['temp_bytes'] / _MIB:,.1f} MiB" if "error" not in r else r["error"]),
          flush=True)
  return {"benchmark": "train_step_memory_vs_window", "model": model, "bptt": bptt,
          "chunk_len": chunk_len, "results": results,
          "ratios": _ratios(results, chunk_len)}


def _ratios(results: list[dict[str, Any]], chunk_len: int) -> dict[str, float]:
  """Each chunked window's peak RSS over the one-call 1,024-token window's (the issue's test)."""
  ok = [r for r in results if "error" not in r]
  base = next((r for r in ok if r["window"] == 1024 and r["chunk_len"] == 0), None)
  if base is None:
    return {}
  return {f"{r['window']}_chunked_over_1024_one_call": r["peak_rss_bytes"] / base["peak_rss_bytes"]
          for r in ok if r["chunk_len"] == min(chunk_len, r["window"]) and r["chunk_len"]}


def plot(record: dict[str, Any], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax_rss, ax_xla) = plt.subplots(1, 2, figsize=(10, 4))
  for chunked, style, label in ((False, "s--", "one call"),
                                (True, "o-", f"chunks of {record['chunk_len']}")):
    rs = [r for r in record["results"] if "error" not in r and bool(r["chunk_len"]) == chunked]
    if not rs:
      continue
    windows = [r["window"] for r in rs]
    ax_rss.plot(windows, [r["peak_rss_bytes"] / _MIB for r in rs], style, label=label)
    ax_xla.plot(windows, [r["xla_plan"]["temp_bytes"] / _MIB for r in rs], style, label=label)
  m, env = record["model"], record["environment"]
  for ax, title in ((ax_rss, "process peak resident memory (MiB)"),
                    (ax_xla, "XLA temporary buffers of the step (MiB)")):
    ax.set(xscale="log", yscale="log", xlabel="window (tokens)", title=title)
    ax.set_xticks([r["window"] for r in record["results"]])
    ax.set_xticklabels([f"{r['window'] // 1024}k" for r in record["results"]])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.suptitle(f"one training step, L{m['n_layer']} D{m['n_embd']} vocab {m['vocab_size']} "
               f"batch {m['batch_size']}, bptt={record['bptt']}, {env['device_kind']}, "
               f"jax {env['jax']}", fontsize=9)
  plots.save_figure(fig, path)


def _lengths(name: str) -> list[int]:
  values = FLAGS[name].value
  if not all(v.isdigit() and int(v) > 0 for v in values):
    raise _cli.UsageError(f"--{name}={','.join(values)}: give positive integers (tokens), "
                          f"e.g. --{name}=1024,4096.")
  return [int(v) for v in values]


def main(argv):
  if len(argv) > 1:
    raise _cli.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.child:
    print(json.dumps(measure(json.loads(FLAGS.child))))
    return
  out = _cli.output_path("out", FLAGS.out)
  model = dict(n_layer=FLAGS.n_layer, n_embd=FLAGS.n_embd, vocab_size=FLAGS.vocab_size,
               batch_size=FLAGS.batch_size)
  record = run(_lengths("windows"), _lengths("one_call_windows"), FLAGS.chunk_len, FLAGS.bptt,
               model, FLAGS.impl)
  record = {"environment": benchlib.environment(), **record}
  path = out or _REPO / "experiments" / "results" / f"bench_memory_{benchlib.default_tag()}.json"
  benchlib.write_json(path, record)
  plot(record, path.with_suffix(".png"))
  print(f"{json.dumps(record['ratios'])}\nWrote {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
  _cli.run(main)

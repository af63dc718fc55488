r"""Benchmarks generation: decode and prefill tokens/s, and peak memory against generated length.

    python -m experiments.bench_decode                       # the CPU defaults, a few minutes
    python -m experiments.bench_decode --models=169m,1b5 --dtypes=bfloat16 --batches=1,64 \
        --memory_lengths=1024,4096,16384,65536 --memory_model=169m

Models have random weights in the official .pth format with the Pile vocabulary (50277), written
once into the cache directory (rwkv_jax.files.cache_dir) and loaded with `weights.load(path,
dtype)`, so every dtype weights.load accepts is measured the way a user would run it:
  * decode: tokens/s of `sampling.generate` continuing a prefilled state (greedy, so the number is
    the model's; top-p sampling adds a sort over the vocabulary per token), compilation excluded,
    at each batch size; tokens/s counts every row's tokens. A call costs a few ms besides its
    tokens (splitting the model into arrays, starting the loop, fetching the tokens), so on CPU
    each timed call makes 128 tokens: at 32, that cost was ~8% of L6 D256's time.
  * the rwkv package (ChatRWKV) in RNN mode on the same .pth, strategy 'cpu fp32' with
    RWKV_JIT_ON=1 and RWKV_CUDA_ON=0 (batch 1, one `forward([token], state)` per token, greedy):
    the baseline of the targets below, timed in the same rounds as the first dtype at batch 1
    (one of each in turn, so that the load of a shared machine falls on both alike). Skipped
    where the package is not installed.
  Each time is the median of --repeats rounds (tokens_per_s); tokens_per_s_best is from the
  fastest round.
  * prefill: prompts of different lengths through `sampling.prefill(..., lengths=)` in one
    batch, against the same prompts one at a time (`sampling.prefill_one_by_one`).
  * memory: peak memory while generating 1k..64k tokens, each length in its own process (so one
    length's peak cannot hide another's): the device's peak_bytes_in_use where it reports one
    (GPUs), else the process's peak resident set (VmHWM), next to its value right after
    loading the model. It must stay flat: the state is fixed-size and only the [batch, length]
    int32 token array grows.
Targets (reported, not asserted): see TARGETS.

Writes <out>/bench_decode_<tag>.json (rewritten after every entry) and bench_decode_<tag>.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any, Sequence

from absl import flags

from experiments import _cli, benchlib, plots

PILE_VOCAB = 50277
MODELS = {"169m": (12, 768), "l6d256": (6, 256), "430m": (24, 1024), "1b5": (24, 2048),
          "tiny": (2, 64)}
TARGETS = (
    # (name, what is compared, the minimum ratio; applies to)
    ("169m float32 batch 1 vs rwkv package", ("169m", "float32", 1), ("rwkv_package", "169m"),
     2.0, "cpu"),
    ("l6d256 float32 batch 1 vs rwkv package", ("l6d256", "float32", 1),
     ("rwkv_package", "l6d256"), 3.0, "cpu"),
    ("169m int8 vs float32, batch 1", ("169m", "int8", 1), ("169m", "float32", 1), 1.6, "cpu"),
    ("169m float32 batch 8 vs batch 1", ("169m", "float32", 8), ("169m", "float32", 1), 4.0,
     "cpu"),
)
GPU_TARGETS = (  # tokens/s
    ("169m bfloat16 batch 1", ("169m", "bfloat16", 1), 2500.0),
    ("1b5 bfloat16 batch 1", ("1b5", "bfloat16", 1), 600.0),
    ("169m bfloat16 batch 64", ("169m", "bfloat16", 64), 50000.0),
)


def define_flags() -> None:
  """Defines the flags; only when run as a program, so that tests can import `run`."""
  flags.DEFINE_list("models", ["169m", "l6d256"], f"Models from {sorted(MODELS)}.")
  flags.DEFINE_list("dtypes", ["float32", "bfloat16", "int8"],
                    "Precisions (those weights.load does not accept are recorded as skipped).")
  flags.DEFINE_list("batches", ["1", "8", "64"], "Decode batch sizes.")
  flags.DEFINE_integer("decode_tokens", None, "Tokens per timed decode; default 128 on CPU, 256 "
                       "on accelerators.", lower_bound=1)
  flags.DEFINE_integer("repeats", 3, "Timed repeats per entry (the median is reported).",
                       lower_bound=1)
  flags.DEFINE_bool("baseline", True, "Also time the rwkv package (if installed).")
  flags.DEFINE_integer("prefill_prompts", 8, "Prompts in the prefill comparison.", lower_bound=1)
  flags.DEFINE_list("prefill_max_lens", None, "Longest prompt of each prefill comparison; the "
                    "lengths are spread over [max/4, max]. Default 32,256 on CPU, 256,2048 on "
                    "accelerators.")
  flags.DEFINE_integer("prefill_chunk", None, "Prefill chunk; default 128 on CPU, 1024 on "
                       "accelerators.", lower_bound=1)
  flags.DEFINE_list("memory_lengths", None, "Generated lengths for the memory curve; default "
                    "1024,2048,4096 on CPU, 1024,4096,16384,65536 on accelerators; empty = none.")
  flags.DEFINE_string("memory_model", None, "Model for the memory curve; default l6d256 on "
                      "CPU, 169m on accelerators.")
  flags.DEFINE_string("memory_dtype", None, "Its dtype; default float32 on CPU, bfloat16 on "
                      "accelerators.")
  flags.DEFINE_string("weights_dir", None, "Where the random .pth files are kept; default "
                      "<cache>/bench_decode.")
  flags.DEFINE_string("out", str(pathlib.Path(__file__).resolve().parent / "results"),
                      "Directory for the JSON and PNG.")
  flags.DEFINE_string("tag", None, "File name suffix; default the device (cpu, gpu_h200, ...).")
  # One memory measurement in a fresh process (used by the benchmark itself).
  flags.DEFINE_integer("memory_worker", None, "Internal: generate this many tokens, print the "
                       "peak memory as JSON and exit.")


# ----------------------------------------------------------------------------------------------
# Settings and weights.


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `run` measures (the flags of the same names; `main` fills in the device's defaults)."""

  models: Sequence[str]  # from MODELS
  dtypes: Sequence[str]  # the first is also timed for prefill, and beside the rwkv package
  batches: Sequence[int]
  decode_tokens: int  # per timed decode call
  repeats: int  # timed rounds; the median is reported
  baseline: bool  # also time the rwkv package, where installed
  prefill_prompts: int  # prompts in the prefill comparison (1: none)
  prefill_max_lens: Sequence[int]
  prefill_chunk: int
  memory_lengths: Sequence[int]  # generated lengths of the memory curve (empty: none)
  memory_model: str
  memory_dtype: str
  weights_dir: str | None = None  # where the random .pth files are kept; None: the cache


def weights_path(name: str, directory: str | os.PathLike | None = None) -> pathlib.Path:
  """A random official-format .pth of model `name`, written once and reused.

  Every matrix is random (the official init leaves several at zero, which would make int8
  quantisation and the logits degenerate); the values are the init's plus small noise. Models
  of 430M and more are stored in bfloat16 (half the file; float32 loading upcasts exactly).
  """
  from rwkv_jax import files

  n_layer, n_embd = MODELS[name]
  file_dtype = "bfloat16" if n_layer * n_embd >= 24 * 1024 else "float32"
  root = pathlib.Path(directory) if directory else files.cache_dir() / "bench_decode"
  path = root / f"random_{name}_L{n_layer}_D{n_embd}_V{PILE_VOCAB}_{file_dtype}.pth"
  if path.is_file():
    return path
  import jax
  from flax import nnx

  from rwkv_jax import model as model_lib
  from rwkv_jax.config import RWKVConfig
  from rwkv_jax.io import formats

  model = model_lib.RWKV(RWKVConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=PILE_VOCAB),
                         rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [
      x + (0.02 if x.ndim == 2 else 0.0) * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)]))
  formats.save_pth(model, path, dtype=file_dtype)  # atomic
  return path


def supported_dtypes() -> tuple[str, ...]:
  from rwkv_jax.io import weights
  return tuple(getattr(weights, "DTYPES", ("float32", "bfloat16", "float16")))


# ----------------------------------------------------------------------------------------------
# Measurements.

def _rates(timing: benchlib.Timing, batch: int, tokens: int) -> dict[str, Any]:
  return {"batch": batch, "tokens": tokens, "median_s": timing.median_s, "min_s": timing.min_s,
          "first_call_s": timing.first_call_s,
          "tokens_per_s": batch * tokens / timing.median_s,
          "tokens_per_s_best": batch * tokens / timing.min_s,
          "ms_per_step": 1e3 * timing.median_s / tokens}


def decode_entry(model, config, batch: int, tokens: int, repeats: int, baseline=None
                 ) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """Tokens/s of `sampling.generate` continuing a prefilled state, compilation excluded; with
  `baseline` (a function running `tokens` tokens of another implementation), that one timed in
  the same rounds.

  Returns:
    (entry, baseline entry or None).
  """
  import jax
  import numpy as np

  from rwkv_jax.infer import sampling

  prompt = np.random.default_rng(0).integers(0, config.vocab_size, size=(batch, 8))
  greedy = sampling.SamplingConfig(temperature=0.0)
  start = sampling.generate(model, prompt, 0, jax.random.key(0), sampling=greedy,
                            prefill_chunk=8)  # a small program to compile
  rows = [[]] * batch

  def run():
    out = sampling.generate(model, rows, tokens, jax.random.key(0), sampling=greedy,
                            state=start.state, next_logits=start.next_logits)
    jax.block_until_ready(out.state)

  # Timed in the same rounds as the baseline, so that the load of a shared machine falls on both.
  fns = {"rwkv_jax": run, **({"baseline": baseline} if baseline else {})}
  timing = benchlib.time_rounds(fns, repeats)
  return (_rates(timing["rwkv_jax"], batch, tokens),
          _rates(timing["baseline"], 1, tokens) if baseline else None)


def rwkv_package_runner(path: pathlib.Path, tokens: int):
  """(a function decoding `tokens` greedy tokens with the rwkv package in RNN mode, batch 1,
  strategy 'cpu fp32', from the same .pth; facts about it), or (None, why not)."""
  from experiments import reference_models

  try:
    import torch  # pylint: disable=g-import-not-at-top
    model = reference_models.rwkv_package(path, "cpu fp32", jit=True)
  except ImportError as e:
    return None, {"status": "skipped", "error": f"rwkv package not installed ({e})"}
  with torch.no_grad():
    _, start = model.forward([1], None)

  def run():
    with torch.no_grad():
      state, token = [s.clone() for s in start], 1
      for _ in range(tokens):
        logits, state = model.forward([token], state)
        token = int(torch.argmax(logits))

  return run, {"status": "ok", "strategy": "cpu fp32", "RWKV_JIT_ON": "1", "mode": "RNN",
               "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def prefill_entry(model, config, prompts: int, max_len: int, chunk: int, repeats: int
                  ) -> dict[str, Any]:
  """Ragged prompts prefilled in one batch against one at a time, compilation excluded."""
  import numpy as np

  from rwkv_jax.infer import sampling

  rng = np.random.default_rng(0)
  lengths = rng.integers(max(1, max_len // 4), max_len + 1, size=prompts)
  lengths[0] = max_len
  rows = [rng.integers(0, config.vocab_size, size=n) for n in lengths]
  tokens_bt, lengths_b = sampling.pad_rows(rows)
  ways = {
      "batched": lambda: sampling.prefill(model, tokens_bt, chunk=chunk, lengths=lengths_b),
      "one_by_one": lambda: sampling.prefill_one_by_one(model, rows, chunk=chunk),
  }
  entry: dict[str, Any] = {"prompts": prompts, "lengths": lengths.tolist(), "chunk": chunk,
                           "total_tokens": int(lengths.sum())}
  for name, timing in benchlib.time_rounds(ways, repeats).items():
    entry[name] = {"median_s": timing.median_s, "tokens_per_s": lengths.sum() / timing.median_s}
  entry["speedup"] = entry["one_by_one"]["median_s"] / entry["batched"]["median_s"]
  return entry


def memory_worker(path: str, dtype: str, length: int) -> dict[str, Any]:
  """In this (fresh) process: load, generate `length` tokens, report peak memory."""
  import jax
  from flax import nnx

  from rwkv_jax.infer import sampling
  from rwkv_jax.io import weights

  def peaks():
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use"), benchlib.peak_rss_bytes()

  model, _ = weights.load(path, dtype=dtype)
  jax.block_until_ready(nnx.state(model))
  device_loaded, rss_loaded = peaks()[0], benchlib.rss_bytes()
  reset = benchlib.reset_peak_rss()  # the peak below is then the generation's, not the loading's
  t0 = time.perf_counter()
  result = sampling.generate(model, [1, 2, 3, 4], length, jax.random.key(0),
                             sampling=sampling.SamplingConfig(temperature=0.0), prefill_chunk=4)
  seconds = time.perf_counter() - t0
  device_peak, rss_peak = peaks()
  return {"length": length, "generated": int(result.lengths[0]), "seconds": seconds,
          "peak_device_bytes": device_peak, "device_bytes_after_load": device_loaded,
          "peak_rss_bytes": rss_peak, "rss_bytes_after_load": rss_loaded,
          "rss_peak_is": "during generation" if reset else "of the whole process"}


def memory_entry(name: str, dtype: str, length: int, weights_dir: str | None
                 ) -> dict[str, Any]:
  """`memory_worker` in a fresh process, so that one length's peak cannot hide another's."""
  run = benchlib.run_fresh("experiments.bench_decode", f"--memory_worker={length}",
                           f"--memory_model={name}", f"--memory_dtype={dtype}",
                           *([f"--weights_dir={weights_dir}"] if weights_dir else []))
  if run.record is None:
    return {"length": length, "status": "error", "error": run.stderr[-2000:]}
  return {"status": "ok", **run.record}


# ----------------------------------------------------------------------------------------------
# Targets, plot, main.

def _find(record, key):
  if key[0] == "rwkv_package":
    e = record["baseline"].get(key[1], {})
    return e.get("tokens_per_s") if e.get("status") == "ok" else None
  for e in record["decode"]:
    if (e["model"], e["dtype"], e.get("batch")) == key and e["status"] == "ok":
      return e["tokens_per_s"]
  return None


def targets(record) -> list[dict[str, Any]]:
  out = []
  on_cpu = record["environment"]["platform"] == "cpu"
  for name, a, b, ratio, where in TARGETS:
    x, y = _find(record, a), _find(record, b)
    if x and y:
      out.append({"target": name, "ratio": x / y, "min_ratio": ratio, "met": x / y >= ratio,
                  "applies_to": where, "applies_here": on_cpu})
  for name, a, minimum in GPU_TARGETS:
    x = _find(record, a)
    if x and not on_cpu:
      out.append({"target": name, "tokens_per_s": x, "min_tokens_per_s": minimum,
                  "met": x >= minimum, "applies_to": "H200"})
  return out


def plot(record: dict[str, Any], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  env = record["environment"]
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
  ax = axes[0]
  labels, values = [], []
  for e in record["decode"]:
    if e["status"] == "ok":
      labels.append(f"{e['model']} {e['dtype']} b{e['batch']}")
      values.append(e["tokens_per_s"])
  for name, e in record["baseline"].items():
    if e.get("status") == "ok":
      labels.append(f"{name} rwkv pkg b1")
      values.append(e["tokens_per_s"])
  ax.barh(range(len(values)), values, color=["C1" if "pkg" in l else "C0" for l in labels])
  ax.set_yticks(range(len(labels)), labels, fontsize=7)
  ax.set_xscale("log")
  ax.set_xlabel("decode tokens/s (all rows)")
  ax.set_title("decode")
  ax.grid(axis="x", which="both", alpha=0.3)

  ax = axes[1]
  pre = [p for p in record["prefill"] if p.get("status", "ok") == "ok"]
  for i, p in enumerate(pre):
    ax.bar([i - 0.2, i + 0.2], [p["one_by_one"]["tokens_per_s"], p["batched"]["tokens_per_s"]],
           0.4, color=["C1", "C0"])
  ax.set_xticks(range(len(pre)), [f"{p['model']} {p['dtype']}\n{p['speedup']:.1f}x" for p in pre],
                fontsize=7)
  ax.set_ylabel("prefill tokens/s")
  ax.set_title("prefill: one prompt at a time (orange) vs batched (blue)")

  ax = axes[2]
  mem = [m for m in record["memory"] if m["status"] == "ok"]
  if mem:
    key = "peak_device_bytes" if mem[0].get("peak_device_bytes") else "peak_rss_bytes"
    ax.plot([m["length"] for m in mem], [m[key] / 2**20 for m in mem], "o-")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, max(m[key] for m in mem) / 2**20 * 1.2)
    ax.set_ylabel(f"{key} (MiB)")
  ax.set_xlabel("generated tokens")
  ax.set_title(f"peak memory ({record['config']['memory_model']} "
               f"{record['config']['memory_dtype']})")
  fig.suptitle(f"generation on {env['device_kind']} ({env['platform']}), {env['date_utc']}",
               fontsize=10)
  plots.save_figure(fig, path, dpi=100)


def _int8_cpu_kernel() -> bool | None:
  """Whether int8 decoding on CPU runs the C++ kernel (None off CPU: it is not used there)."""
  import jax
  if jax.default_backend() != "cpu":
    return None
  from rwkv_jax_kernels import int8_cpu
  return int8_cpu.available()


def run(settings: Settings, out_dir: str | os.PathLike[str], tag: str) -> dict[str, Any]:
  """Runs every measurement, writing OUT_DIR/bench_decode_TAG.json after each; returns it."""
  from rwkv_jax.io import weights

  s = settings
  out_dir = pathlib.Path(out_dir)
  json_path, png_path = out_dir / f"bench_decode_{tag}.json", out_dir / f"bench_decode_{tag}.png"
  supported = supported_dtypes()
  record: dict[str, Any] = {
      "benchmark": "decode",
      "environment": benchlib.environment(
          ["python", "-m", "experiments.bench_decode", *sys.argv[1:]]),
      "config": {"models": {m: dict(zip(("n_layer", "n_embd"), MODELS[m]), vocab=PILE_VOCAB)
                            for m in s.models},
                 "dtypes": s.dtypes, "batches": s.batches, "decode_tokens": s.decode_tokens,
                 "repeats": s.repeats, "prefill_prompts": s.prefill_prompts,
                 "prefill_max_lens": s.prefill_max_lens, "prefill_chunk": s.prefill_chunk,
                 "memory_lengths": s.memory_lengths, "memory_model": s.memory_model,
                 "memory_dtype": s.memory_dtype, "sampling": "greedy",
                 "weights": "random, official .pth format",
                 "int8_cpu_kernel": _int8_cpu_kernel()},
      "decode": [], "baseline": {}, "prefill": [], "memory": [], "targets": []}

  def save():
    record["targets"] = targets(record)
    benchlib.write_json(json_path, record)

  for name in s.models:
    path = weights_path(name, s.weights_dir)
    package, facts = rwkv_package_runner(path, s.decode_tokens) if s.baseline else (None, None)
    if facts is not None:
      record["baseline"][name] = facts
    for dtype in s.dtypes:
      if dtype not in supported:
        record["decode"].append({"model": name, "dtype": dtype, "status": "skipped",
                                 "error": f"weights.load does not accept {dtype!r} here "
                                          f"(accepts {list(supported)})"})
        save()
        continue
      model, config = weights.load(path, dtype=dtype)
      for batch in s.batches:
        # The rwkv package is timed in the same rounds as the first dtype at batch 1.
        paired = package if (dtype, batch) == (s.dtypes[0], s.batches[0]) and batch == 1 else None
        try:
          entry, other = decode_entry(model, config, batch, s.decode_tokens, s.repeats, paired)
          entry = {"model": name, "dtype": dtype, "status": "ok", **entry}
          if other is not None:
            record["baseline"][name].update(other, paired_with=f"{name} {dtype} batch 1")
            print(name, "rwkv package", json.dumps(record["baseline"][name]), flush=True)
        except Exception as e:  # pylint: disable=broad-except  (recorded, e.g. out of memory)
          entry = {"model": name, "dtype": dtype, "batch": batch, "status": "error",
                   "error": f"{type(e).__name__}: {str(e)[:500]}"}
        record["decode"].append(entry)
        print(json.dumps(entry), flush=True)
        save()
      for max_len in s.prefill_max_lens if dtype == s.dtypes[0] and s.prefill_prompts > 1 else ():
        entry = {"model": name, "dtype": dtype, **prefill_entry(
            model, config, s.prefill_prompts, max_len, min(s.prefill_chunk, max_len), s.repeats)}
        record["prefill"].append(entry)
        print(json.dumps(entry), flush=True)
        save()
      del model
    del package
  if s.memory_lengths:
    weights_path(s.memory_model, s.weights_dir)  # written once, before the workers read it
    for length in s.memory_lengths:
      entry = memory_entry(s.memory_model, s.memory_dtype, length, s.weights_dir)
      record["memory"].append(entry)
      print(json.dumps(entry), flush=True)
      save()
  save()
  plot(record, png_path)
  for t in record["targets"]:
    print(t, flush=True)
  print(f"Wrote {json_path} and {png_path}.")
  return record


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise _cli.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax

  f = flags.FLAGS
  on_cpu = jax.default_backend() == "cpu"
  if f.memory_worker is not None:
    path = weights_path(f.memory_model, f.weights_dir)
    print(json.dumps(memory_worker(str(path), f.memory_dtype or "float32", f.memory_worker)))
    return
  unknown = [m for m in f.models if m not in MODELS]
  if unknown:
    raise _cli.UsageError(f"--models: unknown {unknown}; choose from {sorted(MODELS)}.")
  known = {*supported_dtypes(), "int8"}
  if set(f.dtypes) - known:
    raise _cli.UsageError(f"--dtypes: unknown {sorted(set(f.dtypes) - known)}; choose from "
                         f"{sorted(known)}.")
  batches = _cli.integers("batches", f.batches, minimum=1)
  lengths = _cli.integers("memory_lengths", f.memory_lengths if f.memory_lengths is not None else
                          (["1024", "2048", "4096"] if on_cpu else
                           ["1024", "4096", "16384", "65536"]), minimum=1, allow_empty=True)
  prefill_lens = _cli.integers("prefill_max_lens", f.prefill_max_lens or (
      ["32", "256"] if on_cpu else ["256", "2048"]), minimum=1)
  memory_model = f.memory_model or ("l6d256" if on_cpu else "169m")
  if memory_model not in MODELS:
    raise _cli.UsageError(f"--memory_model={memory_model}: choose from {sorted(MODELS)}.")
  out = _cli.output_path("out", f.out, directory=True)
  run(Settings(models=f.models, dtypes=f.dtypes, batches=batches,
               decode_tokens=f.decode_tokens or (128 if on_cpu else 256), repeats=f.repeats,
               baseline=f.baseline, prefill_prompts=f.prefill_prompts,
               prefill_max_lens=prefill_lens,
               prefill_chunk=f.prefill_chunk or (128 if on_cpu else 1024),
               memory_lengths=lengths, memory_model=memory_model,
               memory_dtype=f.memory_dtype or ("float32" if on_cpu else "bfloat16"),
               weights_dir=f.weights_dir),
      out, f.tag or benchlib.default_tag())


if __name__ == "__main__":
  define_flags()
  _cli.run(main)

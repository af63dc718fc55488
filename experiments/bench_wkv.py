r"""Benchmarks the WKV implementations: time, achieved bandwidth and share of the memory roofline.

    python -m experiments.bench_wkv                                   # defaults for this device
    python -m experiments.bench_wkv --impls=scan,associative,pallas,triton --out=/tmp/res
    python -m experiments.bench_wkv --shapes=8x1024x768 --dtypes=float32 --modes=fwd

Every (implementation, shape, dtype, mode) is timed with `benchlib.time_fn`: "fwd" is the jitted
`wkv(w, u, k, v, impl=...)` returning y and the state; "fwd_bwd" is the jitted
`jax.value_and_grad` with respect to k, v, w and u of sum(y * g) for a fixed random g. The WKV is
memory-bound, so each time is turned into GB/s with the minimum-traffic byte model below
(`BYTE_MODEL`) and compared with the bandwidth of a large device-to-device copy measured in the
same run (and with the vendor's peak where the device is known). The associative-vs-scan speedup
is printed and stored.

Writes `<out>/bench_wkv_<tag>.json` (rewritten after every entry, so a run cut short keeps its
results) and `<out>/bench_wkv_<tag>.png`. An entry that fails (out of memory, compile error,
backend missing) records its error and the run goes on.

Shapes: b = batch, t = time, c = channels; n = b * t * c, s = bytes per element of k's dtype.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import time
from typing import Any, Callable, Iterator, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # Headless machines; must precede pyplot.
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

from experiments import _cli, benchlib, kernel_traffic, plots
from rwkv_jax import wkv as wkv_lib

Shape = tuple[int, int, int]

MODES = ("fwd", "fwd_bwd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
GPU_SHAPES: tuple[Shape, ...] = ((8, 1024, 768), (32, 1024, 768), (8, 1024, 2048),
                                 (8, 1024, 4096), (1, 16384, 768), (4, 8192, 2048))
# Two to three minutes on 2 shared CPU cores, much of it compiling the associative scan.
CPU_SHAPES: tuple[Shape, ...] = ((1, 256, 64), (4, 1024, 256), (8, 1024, 768))
# Pallas off a GPU runs in its interpreter: a correctness tool whose timings mean nothing.
_INTERPRETED_ON_CPU = ("pallas", "triton")
_SPEEDUP_TARGET = {"shape": (8, 1024, 768), "impl": "associative", "min_x": 20.0}

BYTE_MODEL = {
    "fwd": "read k, v; write y (s bytes each per element); write the float32 state "
           "(num, den, max_exp); read w, u: 3*n*s + 12*b*c + 8*c",
    "fwd_bwd": "the forward's k, v reads and y write, then read k, v and the y-cotangent, "
               "write dk, dv (s bytes each); read w, u, write dw, du (float32): 8*n*s + 16*c",
    "units": "GB/s = 1e9 bytes/s from the median time; percentages are of the copy bandwidth "
             "(read + write counted) measured in the same run, and of the vendor peak",
}

_IMPLS = flags.DEFINE_list(
    "impls", None, "WKV implementations to time (see rwkv_jax.wkv.implementations()); default: "
    "every one that loads here, without Pallas on CPU (interpreter timings are meaningless).")
_SHAPES = flags.DEFINE_list(
    "shapes", None, "BxTxC shapes, e.g. 8x1024x768,32x1024x768; default: a GPU set on GPUs, a "
    "small set on CPU.")
_DTYPES = flags.DEFINE_list("dtypes", list(DTYPES), f"k and v dtypes, from {list(DTYPES)}.")
_MODES = flags.DEFINE_list("modes", list(MODES), f"What to time, from {list(MODES)}.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per entry (median and min).",
                                lower_bound=1)
_OUT = flags.DEFINE_string("out", str(pathlib.Path(__file__).resolve().parent / "results"),
                           "Directory for the JSON and PNG results.")
_TAG = flags.DEFINE_string("tag", None, "File name suffix (bench_wkv_<tag>.json); default: the "
                           "device, e.g. cpu or gpu_h200.")
_COPY_MIB = flags.DEFINE_integer("copy_mib", None, "Array size of the bandwidth copy in MiB; "
                                 "default 1024 on accelerators, 256 on CPU.", lower_bound=1)
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", None, "Also record a jax.profiler trace of three forward+backward calls of each "
    "implementation in --profile_impls, per shape and dtype, under this directory.")
_PROFILE_IMPLS = flags.DEFINE_list("profile_impls", ["pallas"], "What --profile_dir traces.")
_BUDGET_S = flags.DEFINE_float(
    "budget_s", None, "Stop starting new entries after this many seconds and record the rest as "
    "skipped; entries run shape by shape in --shapes order. Default: no limit.", lower_bound=0)


def parse_shapes(specs: Sequence[str]) -> list[Shape]:
  """Parses ["8x1024x768", ...] into [(8, 1024, 768), ...]."""
  shapes = []
  for spec in specs:
    parts = spec.lower().split("x")
    try:
      shape = tuple(int(p) for p in parts)
    except ValueError:
      shape = ()
    if len(shape) != 3 or min(shape) < 1:
      raise _cli.UsageError(f"--shapes entry {spec!r} is not BxTxC with positive integers, "
                            f"e.g. 8x1024x768.")
    shapes.append(shape)
  return shapes


def _check_choices(name: str, values: Sequence[str], choices: Sequence[str]) -> list[str]:
  bad = [v for v in values if v not in choices]
  if bad or not values:
    raise _cli.UsageError(f"--{name}={','.join(values)}: {bad or 'empty'} not among "
                          f"{list(choices)}.")
  return list(values)


def default_impls(platform: str) -> list[str]:
  """Every implementation that loads on `platform`, minus the interpreted ones on CPU."""
  names = []
  # The reference first: every speedup is measured against it.
  for name in sorted(wkv_lib.implementations(), key=lambda n: (n != "scan", n)):
    if platform == "cpu" and name in _INTERPRETED_ON_CPU:
      continue
    try:
      wkv_lib.resolve(name)
    except ValueError as e:
      logging.info("Skipping %s: %s", name, e)
      continue
    names.append(name)
  return names


def bytes_moved(shape: Shape, dtype: Any, mode: str) -> int:
  """Minimum memory traffic of one call under BYTE_MODEL."""
  b, t, c = shape
  n, s = b * t * c, jnp.dtype(dtype).itemsize
  if mode == "fwd":
    return 3 * n * s + 12 * b * c + 8 * c
  return 8 * n * s + 16 * c


def make_inputs(shape: Shape, dtype: Any, seed: int = 0) -> dict[str, jax.Array]:
  """Random w, u (float32 [c]), k, v and the y-cotangent g ([b, t, c] in `dtype`)."""
  _, _, c = shape
  kw, ku, kk, kv, kg = jax.random.split(jax.random.key(seed), 5)
  return {
      # Decay rates e^{time_decay} over the spread of trained models.
      "w": jnp.exp(jax.random.uniform(kw, (c,), jnp.float32, -4.0, 1.0)),
      "u": 0.5 * jax.random.normal(ku, (c,), jnp.float32),
      "k": jax.random.normal(kk, shape, dtype),
      "v": jax.random.normal(kv, shape, dtype),
      "g": jax.random.normal(kg, shape, dtype),
  }


def make_fn(impl: str, mode: str) -> tuple[Callable[..., Any], tuple[str, ...]]:
  """The jitted function timed for (impl, mode) and the names of its inputs, in order."""
  if mode == "fwd":
    return jax.jit(lambda w, u, k, v: wkv_lib.wkv(w, u, k, v, impl=impl)), ("w", "u", "k", "v")

  def loss(k, v, w, u, g):
    y, _ = wkv_lib.wkv(w, u, k, v, impl=impl)
    return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32))

  # g is an argument, not a closure: a captured array would be baked into the program.
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))), ("k", "v", "w", "u", "g")


@contextlib.contextmanager
def _captured_logs(logger_name: str) -> Iterator[list[str]]:
  """Collects the messages of `logger_name` (any level) logged inside the block."""
  messages: list[str] = []
  handler = logging.Handler()
  handler.emit = lambda record: messages.append(record.getMessage())
  logger = logging.getLogger(logger_name)
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.DEBUG)
  try:
    yield messages
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)


def _error_string(e: BaseException, limit: int = 2000) -> str:
  text = f"{type(e).__name__}: {e}"
  return text if len(text) <= limit else text[:limit] + " ..."


def run_entry(impl: str, shape: Shape, dtype_name: str, mode: str, inputs: dict[str, jax.Array],
              repeats: int, roofline_gbps: float, vendor_gbps: float | None) -> dict[str, Any]:
  """Times one (impl, shape, dtype, mode); errors are recorded, not raised."""
  entry: dict[str, Any] = {"impl": impl, "shape": list(shape), "dtype": dtype_name, "mode": mode}
  if impl in _INTERPRETED_ON_CPU and jax.default_backend() == "cpu":
    entry["note"] = "kernel interpreter on CPU: not a kernel timing"
  try:
    fn, names = make_fn(impl, mode)
    timing = benchlib.time_fn(fn, *(inputs[n] for n in names), repeats=repeats)
  except Exception as e:  # pylint: disable=broad-except
    # OOM, compile errors and missing backends all end up here; the run goes on.
    logging.warning("%s %s %s %s failed: %s", impl, shape, dtype_name, mode, e)
    return entry | {"status": "error", "error": _error_string(e)}
  nbytes = bytes_moved(shape, DTYPES[dtype_name], mode)
  gbps = nbytes / (timing.median_ms * 1e-3) / 1e9
  if mode == "fwd_bwd":
    entry["kernel_passes"] = kernel_passes(impl, shape, DTYPES[dtype_name])
    if _PROFILE_DIR.value and impl in _PROFILE_IMPLS.value:
      entry["profile"] = profile(fn, [inputs[n] for n in names], pathlib.Path(
          _PROFILE_DIR.value) / f"{impl}_{'x'.join(map(str, shape))}_{dtype_name}")
  return entry | {
      "status": "ok", **timing.as_dict(), "bytes": nbytes, "gbps": gbps,
      "pct_roofline": 100.0 * gbps / roofline_gbps,
      "pct_vendor_peak": None if vendor_gbps is None else 100.0 * gbps / vendor_gbps,
  }


# jax.default_backend() -> the lowering platform whose kernels the traffic model reads.
_LOWERING = {"gpu": "cuda", "cuda": "cuda", "rocm": "rocm", "tpu": "tpu"}


def kernel_passes(impl: str, shape: Shape, dtype: Any) -> float | None:
  """The traffic model of experiments/kernel_traffic.py: full-array passes of the Pallas kernels
  of fwd+bwd according to their BlockSpecs (None where impl runs no pallas_call here)."""
  platform = _LOWERING.get(jax.default_backend())
  if platform is None:
    return None
  try:
    kernels = kernel_traffic.traffic(wkv_lib.for_platform(impl, platform), shape, dtype)
  except Exception as e:  # pylint: disable=broad-except  (a model, not the timing: never fatal)
    logging.warning("No traffic model for %s at %s: %s", impl, shape, e)
    return None
  return kernel_traffic.passes(kernels, shape, dtype) if kernels else None


def profile(fn: Callable[..., Any], args: Sequence[jax.Array], directory: pathlib.Path) -> str:
  """Three calls of fn under jax.profiler.trace (TensorBoard's profile plugin reads the dir)."""
  jax.block_until_ready(fn(*args))
  with jax.profiler.trace(str(directory)):
    for _ in range(3):
      jax.block_until_ready(fn(*args))
  return str(directory)


def speedups(entries: Sequence[dict[str, Any]], base: str = "scan") -> list[dict[str, Any]]:
  """Median-time speedup of every implementation over `base`, where both ran."""
  key = lambda e: (tuple(e["shape"]), e["dtype"], e["mode"])
  base_ms = {key(e): e["median_ms"] for e in entries if e["impl"] == base and e["status"] == "ok"}
  out = []
  for e in entries:
    if e["impl"] != base and e["status"] == "ok" and key(e) in base_ms:
      out.append({"impl": e["impl"], "vs": base, "shape": e["shape"], "dtype": e["dtype"],
                  "mode": e["mode"], "speedup": base_ms[key(e)] / e["median_ms"]})
  return out


def plot(record: dict[str, Any], path: pathlib.Path) -> None:
  """Bars of ms per implementation per shape (log scale), one panel per dtype x mode."""
  cfg, env = record["config"], record["environment"]
  impls, dtypes, modes = cfg["impls"], cfg["dtypes"], cfg["modes"]
  labels = ["x".join(map(str, s)) for s in cfg["shapes"]]
  fig, axes = plt.subplots(len(dtypes), len(modes), squeeze=False,
                           figsize=(max(6.0, 1.3 * len(labels) * len(modes) + 2),
                                    3.6 * len(dtypes) + 0.8))
  width = 0.8 / max(1, len(impls))
  colors = {impl: f"C{i}" for i, impl in enumerate(impls)}  # One colour per impl everywhere.
  for (row, dtype), (col, mode) in ((r, m) for r in enumerate(dtypes) for m in enumerate(modes)):
    ax = axes[row][col]
    for i, impl in enumerate(impls):
      ms = {"x".join(map(str, e["shape"])): e["median_ms"] for e in record["entries"]
            if (e["impl"], e["dtype"], e["mode"], e["status"]) == (impl, dtype, mode, "ok")}
      if not ms:
        continue
      xs = [j + (i - (len(impls) - 1) / 2) * width for j, lab in enumerate(labels) if lab in ms]
      ax.bar(xs, [ms[lab] for lab in labels if lab in ms], width, label=impl, color=colors[impl])
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax.set_ylabel("ms (median)")
    ax.set_title(f"{dtype}, {mode}", fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
  missing = sorted({e["impl"] for e in record["entries"] if e["status"] != "ok"})
  fig.suptitle(f"WKV on {env['device_kind']} ({env['platform']}), {env['date_utc']}\n"
               f"copy bandwidth {record['memory']['gbps']:.1f} GB/s"
               + (f"; failed or skipped entries of: {', '.join(missing)}" if missing else ""),
               fontsize=10)
  plots.save_figure(fig, path)


def _print_entry(e: dict[str, Any]) -> None:
  name = f"{e['impl']:>12} {'x'.join(map(str, e['shape'])):>13} {e['dtype']:>8} {e['mode']:>7}"
  if e["status"] != "ok":
    print(f"{name}  {e['status'].upper()}: {e.get('error', '')[:160]}", flush=True)
    return
  print(f"{name}  {e['median_ms']:10.3f} ms (min {e['min_ms']:.3f})  {e['gbps']:8.1f} GB/s  "
        f"{e['pct_roofline']:5.1f}% of copy", flush=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise _cli.UsageError(f"Unexpected arguments: {argv[1:]}")
  platform = jax.default_backend()
  on_cpu = platform == "cpu"
  impls = _IMPLS.value or default_impls(platform)
  _check_choices("impls", impls, wkv_lib.implementations())
  shapes = parse_shapes(_SHAPES.value) if _SHAPES.value else list(
      CPU_SHAPES if on_cpu else GPU_SHAPES)
  dtypes = _check_choices("dtypes", _DTYPES.value, list(DTYPES))
  modes = _check_choices("modes", _MODES.value, MODES)
  out_dir = _cli.output_path(_OUT.name, _OUT.value, directory=True)
  tag = _TAG.value or benchlib.default_tag()
  json_path, png_path = out_dir / f"bench_wkv_{tag}.json", out_dir / f"bench_wkv_{tag}.png"

  # A requested backend that cannot load (e.g. triton where triton is not installed) becomes
  # error entries.
  unavailable = {}
  for impl in impls:
    try:
      with _captured_logs(wkv_lib.__name__) as why:
        wkv_lib.resolve(impl)
    except ValueError as e:
      # The dispatcher logs the import error and raises a generic one: keep both.
      unavailable[impl] = _error_string(e) + "".join(f" [{m}]" for m in why)

  env = benchlib.environment()
  memory = benchlib.copy_bandwidth((_COPY_MIB.value or (256 if on_cpu else 1024)) << 20)
  vendor = benchlib.vendor_peak_gbps(env["device_kind"])
  memory["vendor_peak_gbps"] = vendor
  print(f"{env['device_kind']} ({platform}): copy {memory['gbps']:.1f} GB/s"
        + (f", vendor peak {vendor:.0f} GB/s" if vendor else ""), flush=True)

  record: dict[str, Any] = {
      "benchmark": "wkv",
      "environment": env,
      "config": {"impls": impls, "shapes": [list(s) for s in shapes], "dtypes": dtypes,
                 "modes": modes, "repeats": _REPEATS.value, "budget_s": _BUDGET_S.value},
      "memory": memory,
      "byte_model": BYTE_MODEL,
      "entries": [],
      "speedups": [],
      "speedup_target": {"impl": _SPEEDUP_TARGET["impl"], "vs": "scan",
                         "shape": list(_SPEEDUP_TARGET["shape"]),
                         "min_x": _SPEEDUP_TARGET["min_x"], "applies_to": "gpu"},
  }
  start = time.perf_counter()
  # Shape by shape, in the order given, so a time budget keeps the first shapes complete.
  for shape in shapes:
    for dtype_name in dtypes:
      inputs = None
      for mode in modes:
        for impl in impls:
          if _BUDGET_S.value is not None and time.perf_counter() - start > _BUDGET_S.value:
            entry = {"impl": impl, "shape": list(shape), "dtype": dtype_name, "mode": mode,
                     "status": "skipped", "error": f"--budget_s={_BUDGET_S.value} spent"}
          elif impl in unavailable:
            entry = {"impl": impl, "shape": list(shape), "dtype": dtype_name, "mode": mode,
                     "status": "error", "error": unavailable[impl]}
          else:
            if inputs is None:
              inputs = make_inputs(shape, DTYPES[dtype_name])
            entry = run_entry(impl, shape, dtype_name, mode, inputs, _REPEATS.value,
                              memory["gbps"], vendor)
          record["entries"].append(entry)
          _print_entry(entry)
          record["speedups"] = speedups(record["entries"])
          benchlib.write_json(json_path, record)
      del inputs  # Frees the device arrays before the next, possibly larger, shape.
  record["total_s"] = time.perf_counter() - start
  benchlib.write_json(json_path, record)
  plot(record, png_path)

  print("\nspeedup over scan (median times):")
  for s in record["speedups"]:
    print(f"  {s['impl']:>12} {'x'.join(map(str, s['shape'])):>13} {s['dtype']:>8} "
          f"{s['mode']:>7}  {s['speedup']:8.2f}x")
  target = [s for s in record["speedups"] if s["impl"] == _SPEEDUP_TARGET["impl"]
            and tuple(s["shape"]) == _SPEEDUP_TARGET["shape"]]
  if target and not on_cpu:
    for s in target:
      print(f"GPU target {s['impl']} >= {_SPEEDUP_TARGET['min_x']:.0f}x scan at "
            f"{'x'.join(map(str, s['shape']))} {s['dtype']} {s['mode']}: {s['speedup']:.1f}x "
            f"({'met' if s['speedup'] >= _SPEEDUP_TARGET['min_x'] else 'NOT met'})")
  print(f"Wrote {json_path} and {png_path} in {record['total_s']:.0f} s.")


if __name__ == "__main__":
  _cli.run(main)

"""Timing, memory, environment and results helpers shared by the `bench_*` scripts.

A benchmark here is a script that writes a JSON record (and usually a plot), never an assertion:
`time_fn` times a jitted callable and `time_rounds` several calls in alternating rounds (both
report a `Timing`: median, minimum, compile time), `run_fresh` measures in a new process and
`peak_rss_bytes` reads its peak resident memory (`run_process` runs any command so, measuring its
wall time and peak resident memory from outside; `compiled_programs` reads what it compiled from
JAX's compile log), `environment` says where and from what code the
numbers came, `copy_bandwidth` measures the memory roofline on the same device in the same run,
`peak_flops` gives the device's dense bf16 peak for model FLOPs utilization, and `write_json`
stores the record atomically so a run killed midway keeps what it had written.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform as platform_lib
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from rwkv_jax import files

_REPO = pathlib.Path(__file__).resolve().parents[1]

# Vendor peak memory bandwidth in GB/s (1e9 bytes/s), matched against `device_kind` in order.
# Only a secondary number: the roofline a result is compared with is `copy_bandwidth`'s.
_VENDOR_PEAK_GBPS: tuple[tuple[str, float], ...] = (
    (r"H200", 4800.0),
    (r"H100.*PCIe", 2000.0),
    (r"H100.*NVL", 3900.0),
    (r"H100", 3350.0),  # SXM5, HBM3 (device_kind "NVIDIA H100 80GB HBM3").
)

# Dense bf16 peak FLOP/s per chip, for model FLOPs utilization, matched against `device_kind`
# as substrings; unknown devices (CPUs included) report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall-clock time of one call, from `repeats` timed groups of `calls_per_repeat` calls."""

  median_ms: float
  min_ms: float
  repeats: int
  calls_per_repeat: int
  first_call_s: float  # Compilation plus one run: what a user waits for once.

  @classmethod
  def of(cls, samples_s: Sequence[float], calls_per_repeat: int, first_call_s: float
         ) -> Timing:
    """The Timing of per-call times in seconds, one per timed group."""
    return cls(median_ms=median(samples_s) * 1e3, min_ms=min(samples_s) * 1e3,
               repeats=len(samples_s), calls_per_repeat=calls_per_repeat,
               first_call_s=first_call_s)

  @property
  def median_s(self) -> float:
    return self.median_ms * 1e-3

  @property
  def min_s(self) -> float:
    return self.min_ms * 1e-3

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def median(xs: Sequence[float]) -> float:
  """The median (the mean of the middle two for an even count)."""
  xs = sorted(xs)
  mid = len(xs) // 2
  return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _first_call_s(call: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(call())
  return time.perf_counter() - start


def _group_s(call: Callable[[], Any], calls: int) -> float:
  """Seconds per call of `calls` calls run back to back, blocking once at the end."""
  start = time.perf_counter()
  out = None
  for _ in range(calls):
    # Rebinding drops the previous outputs, so memory stays at one call's worth while the
    # device works through the queue in order; blocking on the last output waits for all.
    out = call()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 0,
            min_repeat_s: float = 0.01, max_calls_per_repeat: int = 1000) -> Timing:
  """Times `fn(*args)` (typically jitted) to completion of all its outputs.

  The first call compiles and is timed apart. Each of the `repeats` measurements then runs the
  function back to back enough times to last about `min_repeat_s` and blocks once at the end:
  for sub-millisecond device work this hides the per-call Python dispatch behind the device's
  queue instead of adding it to every sample. The per-call time is the group's time divided by
  its calls; the median and minimum are taken over the groups.

  Args:
    fn: the callable to time.
    *args: its arguments, created (and on the device) beforehand.
    repeats: number of timed groups (>= 1).
    warmup: extra untimed calls after the first; the call that sizes the groups already
      follows the first one, which is enough for jitted functions.
    min_repeat_s: target duration of one group, which sets calls_per_repeat.
    max_calls_per_repeat: upper bound on calls_per_repeat.

  Returns:
    The Timing.
  """
  if repeats < 1:
    raise ValueError(f"{repeats=} must be at least 1.")
  call = lambda: fn(*args)
  first_call_s = _first_call_s(call)
  for _ in range(warmup):
    jax.block_until_ready(call())
  one = max(_group_s(call, 1), 1e-9)
  calls = int(min(max_calls_per_repeat, max(1, math.ceil(min_repeat_s / one))))
  return Timing.of([_group_s(call, calls) for _ in range(repeats)], calls, first_call_s)


def time_rounds(calls: Mapping[str, Callable[[], Any]], repeats: int,
                calls_per_repeat: int = 1) -> dict[str, Timing]:
  """Times several calls in the same rounds, so that the load of a shared machine falls on all.

  Each call runs once first (compiling; timed apart), then `repeats` rounds time
  `calls_per_repeat` back-to-back calls of each in turn, blocking once at the end of each group
  as `time_fn` does. A call may carry state from one call to the next (a training step's
  parameters), as long as it returns what to block on.

  Args:
    calls: name -> a function of no arguments running one call and returning its outputs.
    repeats: timed rounds (>= 1).
    calls_per_repeat: calls of each function per round.

  Returns:
    name -> its Timing.
  """
  if repeats < 1:
    raise ValueError(f"{repeats=} must be at least 1.")
  first = {name: _first_call_s(call) for name, call in calls.items()}
  samples = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      samples[name].append(_group_s(call, calls_per_repeat))
  return {name: Timing.of(samples[name], calls_per_repeat, first[name]) for name in calls}


def rss_bytes() -> int:
  """This process's resident set (VmRSS) in bytes."""
  return _proc_status("VmRSS")


def peak_rss_bytes() -> int:
  """This process's peak resident set (VmHWM; ru_maxrss where /proc is missing) in bytes."""
  return _proc_status("VmHWM")


def reset_peak_rss() -> bool:
  """Resets the peak resident set to the current one (Linux >= 4.0); False where it cannot."""
  try:
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def _proc_status(field: str) -> int:
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith(f"{field}:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@dataclasses.dataclass(frozen=True)
class FreshRun:
  """What a measurement in its own process printed: its record (None if none) and stderr."""

  record: dict[str, Any] | None
  returncode: int
  stderr: str


def run_fresh(module: str, *flags: str) -> FreshRun:
  """Runs `python -m module *flags` from the repository root in a new process.

  For measurements one process must not see another's (peak memory, a first compilation). The
  module prints its record as one line of JSON, its last line that starts with "{".
  """
  run = run_process([sys.executable, "-m", module, *flags])
  lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
  record = json.loads(lines[-1]) if lines and not run.returncode else None
  return FreshRun(record, run.returncode, run.stderr)


@dataclasses.dataclass(frozen=True)
class ProcessRun:
  """A finished process: its wall time, its own peak resident set, its status and output."""

  wall_s: float
  peak_rss_bytes: int
  returncode: int
  stdout: str
  stderr: str


# Runs argv[2:] as a child of this small process and writes the child's wall time, own peak
# resident set and status to the file argv[1]. A child of a large process would not do: Linux
# keeps, across exec, the peak of the memory a child shares with its parent when it forks (the
# caller's whole resident set), so every child of a process that imported jax would seem to
# start at its size.
_LAUNCHER = """
import json, os, signal, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
  try:
    os.execvp(sys.argv[2], sys.argv[2:])
  finally:
    os._exit(127)
signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
  json.dump({"wall_s": time.perf_counter() - start, "peak_rss_bytes": usage.ru_maxrss * 1024,
             "returncode": os.waitstatus_to_exitcode(status)}, f)
"""


def run_process(command: Sequence[str], env: Mapping[str, str] | None = None,
                timeout_s: float | None = None) -> ProcessRun:
  """Runs `command` from the repository root in a new process and waits for it.

  The wall time runs from its start to its exit (imports included); the peak resident set is the
  process's own (`os.wait4` in a small launcher that starts it, see _LAUNCHER). Its output goes
  to files, so that no pipe can block it; past `timeout_s` it is killed (returncode -9).
  """
  with tempfile.TemporaryDirectory() as tmp:
    measured = pathlib.Path(tmp) / "measured.json"
    with open(measured.with_suffix(".out"), "w+") as out, \
         open(measured.with_suffix(".err"), "w+") as err:
      proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(measured), *command],
                              cwd=_REPO, env=None if env is None else dict(env), stdout=out,
                              stderr=err, text=True)
      try:
        proc.wait(timeout=timeout_s)
      except subprocess.TimeoutExpired:
        proc.terminate()  # the launcher kills the command
        proc.wait()
      out.seek(0)
      err.seek(0)
      stdout, stderr = out.read(), err.read()
    if not measured.is_file():
      return ProcessRun(0.0, 0, -9, stdout, stderr)
    got = json.loads(measured.read_text())
    return ProcessRun(got["wall_s"], got["peak_rss_bytes"], got["returncode"], stdout, stderr)


_COMPILING = re.compile(r"Compiling (\S+) with global shapes and types (.*?)\. Argument mapping")
_CACHE_HIT = re.compile(r"Persistent compilation cache hit for '([^']+)'")


def compiled_programs(stderr: str, model_marker: str | None = None, n_layer: int = 1
                      ) -> dict[str, Any]:
  """The programs a run compiled and loaded, from JAX's compile log (JAX_LOG_COMPILES=1).

  A program holds the model when `model_marker`, the shape of a matrix each of the `n_layer`
  blocks has once (the ffn.key kernel, "float32[C,4C]"), is among its inputs: once per n_layer
  times the shape occurs there (a train step takes the parameters and Adam's two moments).

  Returns:
    {"compiled": how many programs were compiled, "loaded": how many were loaded from the
     persistent cache instead, "loaded_names": their names, "names": {name: how many compiled
     or loaded}, "model": {name: [copies of the model in the inputs, for each compiled or
     loaded]} for those holding the model}.
  """
  names, model = collections.Counter(), {}
  for name, shapes in _COMPILING.findall(stderr):
    name = name.removeprefix("jit(").removesuffix(")")
    names[name] += 1
    if model_marker and shapes.count(model_marker) >= n_layer:
      model.setdefault(name, []).append(shapes.count(model_marker) // n_layer)
  loaded = _CACHE_HIT.findall(stderr)
  return {"compiled": sum(names.values()) - len(loaded), "loaded": len(loaded),
          "loaded_names": loaded, "names": dict(names), "model": model}


def copy_bandwidth(nbytes: int, repeats: int = 5) -> dict[str, Any]:
  """Measures device memory bandwidth with a jitted device-to-device array copy.

  `jnp.copy` under jit lowers to an HLO copy into a fresh output buffer (the input is not
  donated), so each call reads and writes `nbytes`; both are counted, as in the byte models of
  the benchmarks this is compared with.

  Args:
    nbytes: size of the array copied (float32, rounded down to a multiple of 4).
    repeats: timed groups, as in `time_fn`.

  Returns:
    {"method", "bytes_copied", "bytes_moved", "median_ms", "min_ms", "gbps", "gbps_best"}.
  """
  n = max(1, nbytes // 4)
  x = jnp.ones((n,), jnp.float32)
  timing = time_fn(jax.jit(jnp.copy), x, repeats=repeats)
  del x
  moved = 2 * 4 * n
  return {
      "method": "jax.jit(jnp.copy) of a float32 array; read + write bytes counted",
      "bytes_copied": 4 * n,
      "bytes_moved": moved,
      "median_ms": timing.median_ms,
      "min_ms": timing.min_ms,
      "gbps": moved / (timing.median_ms * 1e-3) / 1e9,
      "gbps_best": moved / (timing.min_ms * 1e-3) / 1e9,
  }


def vendor_peak_gbps(device_kind: str) -> float | None:
  """The vendor's peak memory bandwidth for a known device kind, in GB/s, else None."""
  for pattern, gbps in _VENDOR_PEAK_GBPS:
    if re.search(pattern, device_kind, re.IGNORECASE):
      return gbps
  return None


def peak_flops(device_kind: str | None = None) -> float | None:
  """Dense bf16 peak FLOP/s of one device (default: this process's first), else None."""
  kind = (device_kind or jax.devices()[0].device_kind).lower()
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind:
      return flops
  return None


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10,
                         check=True)
  except (OSError, subprocess.SubprocessError):
    return None  # No git or no repository (e.g. a copied working tree).
  return out.stdout.strip()


def _version(module: str) -> str | None:
  try:
    return __import__(module).__version__
  except (ImportError, AttributeError):
    return None


def environment(command: Sequence[str] | None = None) -> dict[str, Any]:
  """Where and from what code a result came: device, versions, date, command, commit."""
  device = jax.devices()[0]
  status = _git("status", "--porcelain", "--untracked-files=no")
  return {
      "device_kind": device.device_kind,
      "platform": device.platform,
      "device_count": jax.device_count(),
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "flax": _version("flax"),
      "python": platform_lib.python_version(),
      "host_cpu_count": os.cpu_count(),
      # Other work on the host slows CPU results (and the host side of accelerator runs).
      "host_load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": shlex.join(sys.argv if command is None else command),
      "git_commit": _git("rev-parse", "HEAD"),
      "git_dirty": None if status is None else bool(status),
  }


def default_tag() -> str:
  """A file-name suffix naming the device: "cpu", "gpu_h200", "gpu_h100", ..."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return "cpu"
  model = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", device.device_kind)
  name = model.group(1) if model else re.sub(r"\W+", "_", device.device_kind)
  return f"{device.platform}_{name}".lower()


def write_json(path: str | os.PathLike[str], record: Any) -> pathlib.Path:
  """Writes `record` as indented JSON, atomically (a reader never sees half a file)."""
  text = json.dumps(record, indent=1, allow_nan=False) + "\n"  # Raises before any file exists.
  with files.atomic_write(path, "w") as f:
    f.write(text)
  return pathlib.Path(path)

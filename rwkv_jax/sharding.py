"""Where every array lives: the device mesh, the partition rules, batches and multi-host set-up.

The mesh has three axes:
  data    pure data parallelism (parameters replicated),
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style),
  tensor  tensor parallelism inside a layer (Megatron style).
The batch is split over ("data", "fsdp"), so data * fsdp must divide the global batch.

Tensor parallelism follows the WKV's structure. Time mixing projects C -> A with key, value and
receptance, whose outputs are split along A over "tensor"; the WKV treats every channel
independently (time_decay and time_first [A] are split the same way), so it runs with no
communication; the output projection A -> C is split along its input and ends in one all-reduce.
Channel mixing does the same with its C -> F -> C MLP; its receptance [C, C] gates the reduced,
replicated output, so its output dimension stays whole. Embedding and head are split along the
vocabulary. LayerNorms and time_mix vectors are small and replicated.

Every parameter must match a rule, including the deliberately replicated ones: renaming an
attribute then fails loudly (ValueError naming the path) instead of quietly replicating a large
matrix. Rules match the '/'-joined key path of a leaf (e.g. 'blocks/3/att/key/kernel') with
`re.search`, so they also place optimizer state whose leaves mirror the parameters (Adam's mu and
nu sit under paths like '1/mu/blocks/3/att/key/kernel'); scalar leaves (step counts) are
replicated. A dimension is only split over mesh axes whose size divides it; otherwise that
dimension is replicated, so any model size runs on any mesh. Another model (e.g. a baseline)
passes its own `rules`.

Shapes: b = batch, t = time, c = n_embd, a = dim_att, f = dim_ffn, v = vocab, l = n_layer.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

Rules = Sequence[tuple[str, P]]

# (regex on the '/'-joined path, spec); first match wins. nnx.Linear kernels are [in, out].
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"(^|/)att/(key|value|receptance)/kernel$", P("fsdp", "tensor")),  # [c, a]
    (r"(^|/)att/output/kernel$", P("tensor", "fsdp")),  # [a, c]
    (r"(^|/)att/time_(decay|first)$", P("tensor")),  # [a], per WKV channel
    (r"(^|/)ffn/key/kernel$", P("fsdp", "tensor")),  # [c, f]
    (r"(^|/)ffn/value/kernel$", P("tensor", "fsdp")),  # [f, c]
    (r"(^|/)ffn/receptance/kernel$", P("fsdp", None)),  # [c, c]
    (r"(^|/)emb/embedding$", P("tensor", "fsdp")),  # [v, c]
    (r"(^|/)head/kernel$", P("fsdp", "tensor")),  # [c, v]
    # int8 matrices (quant.py): the kernel [in, out] as its float one, the scales [groups, out]
    # split along out with it.
    (r"(^|/)(att/(key|value|receptance)|ffn/key|head)/qkernel$", P("fsdp", "tensor")),
    (r"(^|/)(att/(key|value|receptance)|ffn/key|head)/qscale$", P(None, "tensor")),
    (r"(^|/)(att/output|ffn/value)/qkernel$", P("tensor", "fsdp")),
    (r"(^|/)(att/output|ffn/value)/qscale$", P(None, "fsdp")),
    (r"(^|/)ffn/receptance/qkernel$", P("fsdp", None)),
    (r"(^|/)ffn/receptance/qscale$", P()),
    # Small vectors, replicated on purpose.
    (r"(^|/)(att|ffn)/time_mix_[kvr]$", P()),  # [c]
    (r"(^|/)ln(0|1|2|_out)/(scale|bias)$", P()),  # [c]
)

def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over all devices of all processes.

  Args:
    data: data-parallel size; -1 means "whatever devices remain".
    fsdp: parameter-sharding data-parallel size (-1 allowed likewise).
    tensor: tensor-parallel size (-1 allowed likewise). Keep it within one host: the default
      device order puts it innermost.
    devices: devices to use; defaults to `jax.devices()` (global across processes).

  Returns:
    The mesh, with Auto axis types (jit propagates shardings from the in/out shardings).
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  flags = "config fields mesh.data/mesh.fsdp/mesh.tensor, e.g. --config.mesh.data=2"
  for name, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise ValueError(f"mesh {name}={size!r} must be a positive integer or -1 ({flags}).")
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"Only one mesh axis may be -1; got {sizes} ({flags}).")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if fill:
    if n % fixed:
      raise ValueError(f"Mesh sizes {sizes}: the fixed axes multiply to {fixed}, which does not "
                       f"divide the {n} devices; change {flags}.")
    sizes[fill[0]] = n // fixed
  elif fixed != n:
    raise ValueError(f"Mesh sizes {sizes} multiply to {fixed} but there are {n} devices; "
                     f"make {flags} multiply to {n} (or set one of them to -1).")
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def path_name(key_path: Sequence[Any]) -> str:
  """'blocks/3/att/key/kernel' for a jax key path; drops nnx.Variable's trailing '.value'."""
  keys = tuple(key_path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]  # nnx.State leaves are Variable(value=...)
  return jax.tree_util.keystr(keys, simple=True, separator="/")


def spec_for(name: str, shape: Sequence[int], mesh: Mesh, rules: Rules = PARAM_RULES) -> P:
  """The PartitionSpec of the array `name` with `shape`: the first matching rule, fitted.

  A rule whose spec has more entries than the array has dimensions does not apply (e.g. a
  factored optimizer statistic) and the array is replicated; a dimension whose size is not a
  multiple of its mesh axes' size is replicated.

  Raises:
    ValueError: no rule matches `name`.
  """
  for pattern, spec in rules:
    if re.search(pattern, name):
      break
  else:
    raise ValueError(
        f"No sharding rule matches the array {name!r} {tuple(shape)}; add a (regex, "
        f"PartitionSpec) rule for it to PARAM_RULES in rwkv_jax/sharding.py (P() to replicate), "
        f"or pass rules= for a model other than RWKV.")
  if len(spec) > len(shape):
    return P()
  fitted = []
  for dim, axes in zip(shape, spec):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names]))
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def tree_shardings(mesh: Mesh, tree: Any, rules: Rules = PARAM_RULES) -> Any:
  """A NamedSharding for every leaf of `tree`, by key path (see the module docstring).

  Works on an nnx.State (concrete or from nnx.eval_shape), a pure dict of arrays, and optimizer
  states whose leaves mirror the parameters (their path ends with the parameter's path).
  Scalars (optimizer step counts) are replicated; every other leaf must match a rule.

  Args:
    mesh: from `make_mesh`.
    tree: pytree of arrays or ShapeDtypeStructs.
    rules: (regex, PartitionSpec) pairs, first match wins; defaults to PARAM_RULES. To shard
      another model, pass its own rules (`my_rules + PARAM_RULES` to fall back on RWKV's).

  Returns:
    A pytree of the same structure with NamedSharding leaves.

  Raises:
    ValueError: a leaf of rank >= 1 matches no rule.
  """
  def one(path, leaf):
    shape = np.shape(leaf)
    spec = P() if not shape else spec_for(path_name(path), shape, mesh, rules)
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(one, tree)


def param_shardings(mesh: Mesh, state: Any, rules: Rules = PARAM_RULES) -> Any:
  """NamedShardings for an nnx.State of parameters (see `tree_shardings`)."""
  return tree_shardings(mesh, state, rules)


def shard_tree(mesh: Mesh, tree: Any, rules: Rules = PARAM_RULES) -> Any:
  """Places `tree` (parameters or optimizer state) on `mesh` according to the rules.

  With several processes every process must pass the same values (e.g. the same init seed); to
  avoid a full copy per host, create the state inside `jax.jit(..., out_shardings=...)` instead.
  """
  return jax.device_put(tree, tree_shardings(mesh, tree, rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ("data", "fsdp"); the rest replicated. Any rank >= 1."""
  return NamedSharding(mesh, P(BATCH_AXES))


def _check_batch(mesh: Mesh, global_batch: int) -> None:
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % ways:
    raise ValueError(f"The global batch size {global_batch} must be a multiple of "
                     f"mesh data * fsdp = {ways}; change the batch size or the mesh.")


def shard_batch(mesh: Mesh, batch: Any) -> Any:
  """Puts a batch (an array or pytree of [b, ...] arrays, whole on this process) on `mesh`."""
  for leaf in jax.tree.leaves(batch):
    _check_batch(mesh, np.shape(leaf)[0])
  return jax.device_put(batch, batch_sharding(mesh))


def make_global_batch(mesh: Mesh, local_batch: Any) -> Any:
  """Assembles each process's part of the batch into global arrays split over ("data", "fsdp").

  Each process passes its own [b_local, ...] slice (a numpy array or pytree of them), in process
  order; the global batch is b_local * process_count. With one process this equals
  `shard_batch`.

  Args:
    mesh: from `make_mesh`.
    local_batch: numpy array(s) [b_local, ...].

  Returns:
    jax.Array(s) [b_local * jax.process_count(), ...] with `batch_sharding(mesh)`.
  """
  sharding = batch_sharding(mesh)
  for leaf in jax.tree.leaves(local_batch):
    _check_batch(mesh, np.shape(leaf)[0] * jax.process_count())
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


class LostProcessError(RuntimeError):
  """A multi-process run lost contact with one of its processes (killed, crashed, cut off)."""


# How a collective or a barrier fails when a process of the run is gone.
_LOST_PROCESS = re.compile(r"Gloo|Connection (reset|closed)|heartbeat|UNAVAILABLE|Barrier failed|"
                           r"DEADLINE_EXCEEDED|Socket closed")


def lost_process(error: BaseException) -> LostProcessError | None:
  """`error` as a LostProcessError if it is a multi-process run's failed collective, else None.

  Its message is one line: what failed, and to restart every process with the same command.
  """
  if jax.process_count() == 1 or not isinstance(error, Exception):
    return None
  text = str(error)
  if not _LOST_PROCESS.search(text):
    return None
  cause = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
  return LostProcessError(
      f"process {jax.process_index()} of {jax.process_count()} lost contact with another "
      f"process of this run ({cause[:300]}): it was killed or crashed, or the network failed. "
      f"Restart every process with the same command to resume from the newest complete "
      f"checkpoint.")


HEARTBEAT_TIMEOUT_ENV = "RWKV_JAX_HEARTBEAT_TIMEOUT"
# Seconds without a heartbeat after which a process counts as lost: jax.distributed's default.
DEFAULT_HEARTBEAT_TIMEOUT_S = 100

# How jax.distributed ends a process when the run loses one: the coordinator stopped hearing from
# a process for the heartbeat timeout, or the coordinator itself (process 0) is gone. Its client
# then logs this as FATAL, prints a C++ stack trace and aborts; jax 0.10's Python API cannot
# replace that callback (a Python one fails to receive its absl::Status).
_JAX_FATAL = "Terminating process because the JAX distributed service detected fatal errors"

# The stderr of a multi-process run goes through this small process: every line is passed on
# until jax's fatal message, and the crash report that follows is replaced by one line (none when
# the program has written its own `error: ...` line already, e.g. a LostProcessError).
# Arguments: the fatal message, this process's index, the process count, the heartbeat timeout.
_STDERR_FILTER = r"""
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # signals to the run are the run's
signal.signal(signal.SIGTERM, signal.SIG_IGN)
fatal, index, count, timeout = sys.argv[1:5]
out, report, said = sys.stdout.buffer, None, False

def one_line():
  text = b"".join(report).decode(errors="replace")
  lost = (re.search(r"unhealthy \(stopped sending heartbeats\):\s*([\d\s,]+)", text)
          or re.search(r"Task (\d+) heartbeat timeout", text))
  if lost:
    what = ("process " + ", ".join(lost.group(1).split()) + " of this run sent no heartbeat for "
            + timeout + " s (it was killed or crashed, or the network failed)")
  elif "leader task" in text or "coordination service" in text:
    what = "the coordinator, process 0, is gone (it was killed or crashed, or the network failed)"
  else:
    what = "jax.distributed ended the run: " + text.split("absl::Status:")[-1].split(chr(10))[0]
  return ("error: process " + index + " of " + count + " stops: " + what + ". Restart every "
          "process with the same command to resume from the newest complete checkpoint.")

for line in sys.stdin.buffer:
  if report is None and fatal.encode() in line:
    report = [line]
  elif report is None:
    said = said or line.startswith(b"error: ")
    out.write(line)
    out.flush()
  elif line.startswith(b"*** Check failure") and not said:  # the message is whole: say it now
    out.write((one_line() + chr(10)).encode())
    out.flush()
    said = True
  else:
    report.append(line)
if report is not None and not said:
  out.write((one_line() + chr(10)).encode())
  out.flush()
"""
_stderr_filter: subprocess.Popen | None = None


def _report_lost_processes_in_one_line(heartbeat_timeout_s: int) -> None:
  """Sends this process's stderr through _STDERR_FILTER (see there), for the rest of its life."""
  global _stderr_filter
  try:
    _stderr_filter = subprocess.Popen(
        [sys.executable, "-c", _STDERR_FILTER, _JAX_FATAL, str(jax.process_index()),
         str(jax.process_count()), str(heartbeat_timeout_s)],
        stdin=subprocess.PIPE, stdout=sys.stderr.fileno(), start_new_session=True)
    sys.stderr.flush()
    os.dup2(_stderr_filter.stdin.fileno(), sys.stderr.fileno())
    _stderr_filter.stdin.close()  # fd 2 holds the pipe now; the filter ends when this process does
  except (OSError, ValueError) as e:  # e.g. no stderr to redirect: jax's own report stays
    _log.warning("Losing a process will end this one with jax.distributed's crash report: the "
                 "one-line report could not be set up (%s).", e)


def heartbeat_timeout_s(value: int | None = None) -> int:
  """The heartbeat timeout: `value`, else $RWKV_JAX_HEARTBEAT_TIMEOUT, else 100 s (jax's)."""
  text = os.environ.get(HEARTBEAT_TIMEOUT_ENV, "") if value is None else str(value)
  if not text:
    return DEFAULT_HEARTBEAT_TIMEOUT_S
  try:
    seconds = int(text)
  except ValueError:
    seconds = 0
  if seconds < 1:
    where = (f"heartbeat_timeout_s={value!r}" if value is not None
             else f"{HEARTBEAT_TIMEOUT_ENV}={text!r}")
    raise ValueError(f"{where} must be a whole number of seconds >= 1.")
  return seconds


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           heartbeat_timeout: int | None = None) -> bool:
  """Starts jax.distributed for multi-process runs; a no-op for a single process.

  Call it first, before anything touches a device. Arguments left as None are read from the
  environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; when none
  are set, a SLURM or Open MPI job of more than one task is detected by jax itself.

  A process that dies (or stops answering) ends all the others: within the heartbeat timeout,
  or at once when it is process 0, the coordinator. Each of them writes one line on stderr
  saying which process was lost and to restart them all, and exits with SIGABRT's status (jax's
  crash report is left out).

  Args:
    coordinator_address: "host:port" of process 0.
    num_processes: total number of processes.
    process_id: this process's index in [0, num_processes).
    heartbeat_timeout: seconds without a heartbeat after which a process counts as lost;
      default $RWKV_JAX_HEARTBEAT_TIMEOUT, else 100 (jax's own default).

  Returns:
    True if jax.distributed is initialized (now or before), False for a single-process run.
  """
  if jax.distributed.is_initialized():
    return True
  env = os.environ
  timeout = heartbeat_timeout_s(heartbeat_timeout)
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes={num_processes} must be >= 1.")
  if num_processes == 1:
    return False
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} must be in [0, {num_processes}).")
  explicit = coordinator_address is not None or num_processes is not None
  cluster = any(int(env.get(v, "1") or "1") > 1 for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
  if not (explicit or cluster):
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=timeout)
  _report_lost_processes_in_one_line(timeout)
  _log.info("jax.distributed: process %d of %d, %d local / %d global devices; a process silent "
            "for %d s counts as lost.", jax.process_index(), jax.process_count(),
            jax.local_device_count(), jax.device_count(), timeout)
  return True


def wkv_per_shard(kernel: Callable) -> Callable:
  """`kernel(w, u, k, v, state)` called once per shard under a multi-device mesh.

  For WKV kernels that XLA cannot partition by itself (Mosaic, i.e. Pallas TPU, calls). WKV needs
  no communication across batch or channels, so under a mesh in context (`jax.set_mesh`) the call
  runs in a `shard_map` with the batch split over BATCH_AXES and the channels over "tensor" (the
  layout these rules give k, v and the state), each only where it divides evenly. With no mesh,
  one device, or inside a manual region, `kernel` is called as it is.

  Args:
    kernel: a WKV function of the `rwkv_jax.wkv` contract; `state` is a (num, den, max_exp)
      NamedTuple of [b, c] arrays (never None here).

  Returns:
    A function of the same signature.
  """

  def sharded(w, u, k, v, state):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
      return kernel(w, u, k, v, state)
    b, _, c = k.shape
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    if not batch or b % math.prod(mesh.shape[a] for a in batch):
      batch = None
    channels = "tensor" if "tensor" in mesh.axis_names and c % mesh.shape["tensor"] == 0 else None
    kv, per_row = P(batch, None, channels), type(state)(*(P(batch, channels),) * len(state))
    return jax.shard_map(kernel, in_specs=(P(channels), P(channels), kv, kv, per_row),
                         out_specs=(kv, per_row), check_vma=False)(w, u, k, v, state)

  return sharded

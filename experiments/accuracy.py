r"""Records the accuracy figures quoted in the README, with device, versions, date and command.

  python -m experiments.accuracy [--out=experiments/results/accuracy_cpu.json]

1. WKV in float32 against the same recurrence in float64 (numpy, log-sum-exp every step) at
   T=4096, time_decay in [-9, 4], |k| up to 60: max |y - y_ref| for the sequential and the
   associative scan.
2. Parity with the reference implementations: runs `pytest -s tests/test_parity.py` and keeps the
   error lines it prints (rwkv package and transformers, sequence / RNN / chunked mode, states).
"""

import pathlib
import re
import subprocess
import sys

from absl import app, flags

flags.DEFINE_string("out", "experiments/results/accuracy_cpu.json", "Output JSON.")
FLAGS = flags.FLAGS
_REPO = pathlib.Path(__file__).resolve().parents[1]


def wkv_drift(t: int = 4096, b: int = 2, c: int = 8, seed: int = 0) -> dict[str, float]:
  import jax
  import numpy as np

  from rwkv_jax import wkv

  rng = np.random.default_rng(seed)
  w = np.exp(rng.uniform(-9, 4, size=c)).astype(np.float32)
  u = rng.normal(size=c).astype(np.float32)
  k = rng.uniform(-60, 60, size=(b, t, c)).astype(np.float32)
  v = rng.normal(size=(b, t, c)).astype(np.float32)
  num, den, p = np.zeros((b, c)), np.zeros((b, c)), np.full((b, c), -1e38)
  w64, u64, k64, v64 = (x.astype(np.float64) for x in (w, u, k, v))
  y_ref = np.empty((b, t, c))
  for i in range(t):
    q = np.maximum(p, u64 + k64[:, i])
    e1, e2 = np.exp(p - q), np.exp(u64 + k64[:, i] - q)
    y_ref[:, i] = (e1 * num + e2 * v64[:, i]) / (e1 * den + e2)
    q = np.maximum(p - w64, k64[:, i])
    e1, e2 = np.exp(p - w64 - q), np.exp(k64[:, i] - q)
    num, den, p = e1 * num + e2 * v64[:, i], e1 * den + e2, q
  out = {}
  for name in ("scan", "associative"):
    y, _ = jax.jit(lambda *a, n=name: wkv.wkv(*a, impl=n))(w, u, k, v)
    out[name] = float(np.max(np.abs(np.asarray(y, np.float64) - y_ref)))
  return out


def parity() -> list[str]:
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "tests/test_parity.py"],
                        cwd=_REPO, capture_output=True, text=True, timeout=1200)
  if proc.returncode != 0:
    raise RuntimeError(f"tests/test_parity.py failed:\n{proc.stdout[-3000:]}")
  return re.findall(r"^\[[^\]]+\] .*$", proc.stdout, re.MULTILINE)


def main(argv):
  del argv
  from experiments import benchlib

  record = {"benchmark": "accuracy", "environment": benchlib.environment(sys.argv),
            "wkv_vs_float64_T4096_k60_max_abs_error": wkv_drift(), "parity": parity()}
  print(benchlib.write_json(_REPO / FLAGS.out, record))


if __name__ == "__main__":
  app.run(main)

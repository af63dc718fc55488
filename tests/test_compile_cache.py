"""The persistent compilation cache: a second process loads what the first compiled, it changes
no result, and it can be turned off."""

import json
import os
import subprocess
import sys

import pytest

import fake_devices

pytestmark = pytest.mark.slow

# Generates greedily from a small random model with the cache as the environment says, and prints
# the tokens and which cache events JAX recorded.
_GENERATE = """
import json, sys
import jax, numpy as np
from flax import nnx
from jax._src import monitoring
from rwkv_jax import compile_cache, model as model_lib
from rwkv_jax.config import RWKVConfig
from rwkv_jax.infer import sampling
events = []
monitoring.register_event_listener(lambda event, **kw: events.append(event))
directory = compile_cache.enable()
model = model_lib.RWKV(RWKVConfig(n_layer=2, n_embd=32, vocab_size=64), rngs=nnx.Rngs(0))
result = sampling.generate(model, [[1, 2, 3, 4, 5]], 12, jax.random.key(0),
                           sampling=sampling.SamplingConfig(temperature=0.0))
print(json.dumps({"dir": directory and str(directory), "tokens": result.tokens.tolist(),
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _run(tmp_path, setting: str) -> dict:
  # Compiled as users compile: which programs pass the cache's compile-time threshold depends on it.
  env = dict(os.environ, RWKV_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu",
             XLA_FLAGS=fake_devices.xla_flags(1, fast_compile=False))
  env["RWKV_JAX_COMPILE_CACHE"] = setting
  proc = subprocess.run([sys.executable, "-c", _GENERATE], capture_output=True, text=True,
                        env=env, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_programs_and_gets_the_same_tokens(tmp_path):
  directory = tmp_path / "xla"
  first = _run(tmp_path, str(directory))
  assert first["dir"] == str(directory) and first["hits"] == 0
  names = " ".join(p.name for p in directory.iterdir())
  assert "jit__run_chunk" in names and "jit_decode_block" in names  # prefill and decode, written
  second = _run(tmp_path, str(directory))
  # Loaded; what still compiles is too small to be worth a file (MIN_COMPILE_SECONDS).
  assert second["hits"] >= 2 and second["misses"] <= first["misses"] - 2
  off = _run(tmp_path, "0")
  assert off["dir"] is None and off["hits"] == off["misses"] == 0
  assert first["tokens"] == second["tokens"] == off["tokens"]


def test_the_default_directory_is_in_the_project_cache(tmp_path):
  assert _run(tmp_path, "")["dir"] == str(tmp_path / "cache" / "xla")

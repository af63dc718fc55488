"""Test set-up: 8 fake CPU devices (for sharding tests) before jax is imported anywhere."""

import atexit
import os
import shutil
import tempfile

import fake_devices

os.environ.setdefault("XLA_FLAGS", fake_devices.xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The rwkv package reads these at import time.
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")
# The runners and notebooks keep compiled programs on disk (rwkv_jax.compile_cache): the processes
# of one test run share a directory of their own, never the user's cache.
if "RWKV_JAX_COMPILE_CACHE" not in os.environ:
  os.environ["RWKV_JAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="rwkv_jax_test_xla_")
  atexit.register(shutil.rmtree, os.environ["RWKV_JAX_COMPILE_CACHE"], ignore_errors=True)
# The test processes keep theirs in another (tests/training_util.py's compile_cache), shared by
# the pytest-xdist workers: many tests compile the same small programs, once per run this way.
if "RWKV_JAX_TEST_PROGRAMS" not in os.environ:
  os.environ["RWKV_JAX_TEST_PROGRAMS"] = tempfile.mkdtemp(prefix="rwkv_jax_test_programs_")
  atexit.register(shutil.rmtree, os.environ["RWKV_JAX_TEST_PROGRAMS"], ignore_errors=True)

# Shared training fixtures, defined here once so that each test process builds them once (a
# fixture imported into several test modules would be built once per module).
from training_util import compile_cache, corpus, full_run, half_run  # noqa: E402,F401  pylint: disable=g-import-not-at-top,wrong-import-position

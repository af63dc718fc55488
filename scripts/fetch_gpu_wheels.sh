#!/usr/bin/env bash
# Downloads (here, with network) the wheels that scripts/gpu_check.sh installs on a GPU machine
# that has no network: what rwkv_jax needs beyond that machine's jax, flax, optax, orbax, absl,
# numpy, torch and triton: grain with portpicker (grain does not import without it), and the rwkv
# package so that every test module collects. Pure-Python or manylinux wheels for CPython 3.12, no
# dependencies (the machine's own numpy/jax must not be shadowed).
#
# Usage: scripts/fetch_gpu_wheels.sh [DIR]      (default: wheels/, which git ignores)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-wheels}"
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$DIR" \
  grain==0.2.18 array-record cloudpickle portpicker jax-triton==0.3.1 rwkv==0.8.32 \
  ml_collections tensorboardX tqdm \
  matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil \
  tokenizers safetensors
ls "$DIR"

#!/usr/bin/env bash
# Every GPU check of rwkv_jax in one run (about 12 minutes; each stage has its own time limit):
# the GPU tests (`pytest -m gpu`: compiled Pallas and Triton WKV kernels), the WKV benchmark at the
# target shapes, the training-step benchmark (169M and 1.5B) and the generation benchmark (decode
# and prefill at 169M, decode at 1.5B, memory over 1k..64k generated tokens), results into one
# folder.
#
# Usage: scripts/gpu_check.sh [RESULTS_DIR]     (default: $OUT, else experiments/results/gpu)
#        STAGES="wkv train169" scripts/gpu_check.sh ...   runs only the named stages
#        (tests, wkv, train169, train1b5, decode169, decode1b5; default: all), e.g. to rerun the
#        ones that failed.
#
# The GPU machine has no network. What rwkv_jax needs beyond its preinstalled jax/flax/optax/orbax/
# torch/triton (grain, jax-triton, ml_collections, matplotlib, ...) travels as wheels in $WHEELS
# (default: wheels/), fetched beforehand on a machine with PyPI access by
#   scripts/fetch_gpu_wheels.sh wheels
# They are installed with --no-deps into a private folder, so the machine's own packages stay.
#
# Time: the training step compiles in about 60-70 s per WKV implementation on an H200 (measured),
# so each training stage times one or two implementations only.
set -uo pipefail
cd "$(dirname "$0")/.."
RES="${1:-${OUT:-experiments/results/gpu}}"
WHEELS="${WHEELS:-wheels}"
PY="${PYTHON:-python3}"
STAGES="${STAGES:-tests wkv train169 train1b5 decode169 decode1b5}"
source scripts/device_env.sh
export JAX_PLATFORMS=cuda

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__,
'triton', triton.__version__, jax.devices())"
  "$PY" -c "import jax_triton; print('jax_triton', jax_triton.__version__)"
  "$PY" -c "import grain, rwkv_jax.data.pipeline; print('grain imports')"
} >"$RES/env.txt" 2>&1

stage tests && check pytest 140 -m pytest -q -m gpu -p no:cacheprovider \
  --continue-on-collection-errors --junitxml="$RES/junit.xml" tests
# The sequential-in-kernel WKV (pallas, triton) first, then the chunked kernels it replaces where
# it is faster, then the scans; a profile of the Pallas forward+backward is kept with the results.
stage wkv && check bench 140 -m experiments.bench_wkv \
  --impls=pallas,triton,pallas_chunked,triton_chunked,associative,scan \
  --shapes=$WKV_SHAPES --budget_s=110 --out="$RES/bench" --profile_dir="$RES/profile"
# Training-step throughput (the 169M and 1.5B targets): the sequential Pallas kernel against the
# chunked one (the fastest measured before it) at 169M; Pallas alone at 1.5B.
stage train169 && check bench_train_169m 190 -m experiments.bench_train --model=169m \
  --batch_size=16 --dtype=bfloat16 --impls=pallas,pallas_chunked --steps=5 --repeats=2 \
  --out="$RES/bench_train_169m.json"
stage train1b5 && check bench_train_1b5 150 -m experiments.bench_train --model=1b5 \
  --batch_size=8 --dtype=bfloat16 --impls=pallas --steps=3 --repeats=2 \
  --out="$RES/bench_train_1b5.json"
# Generation (the decode targets: 169M bfloat16 batch 1 and 64; 1.5B batch 1): random official
# .pth weights written once under $BENCH_WEIGHTS (the 1.5B file, in bfloat16, is 3 GB), the rwkv
# package baseline left to the CPU run. Peak device memory over 1k..64k generated tokens at 169M.
BENCH_WEIGHTS="${BENCH_WEIGHTS:-/tmp/rwkv_jax_bench_weights}"
stage decode169 && check bench_decode_169m 240 -m experiments.bench_decode --models=169m \
  --dtypes=bfloat16,float32 --batches=1,64 --decode_tokens=256 --baseline=false \
  --memory_lengths=1024,4096,16384,65536 --weights_dir="$BENCH_WEIGHTS" --out="$RES" \
  --tag=gpu_169m
stage decode1b5 && check bench_decode_1b5 200 -m experiments.bench_decode --models=1b5 \
  --dtypes=bfloat16 --batches=1 --decode_tokens=128 --baseline=false --prefill_prompts=1 \
  --memory_lengths= --weights_dir="$BENCH_WEIGHTS" --out="$RES" --tag=gpu_1b5
exit $status

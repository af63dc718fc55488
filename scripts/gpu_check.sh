#!/usr/bin/env bash
# Every GPU check of rwkv_jax in one run (at most 8 minutes): the GPU tests (`pytest -m gpu`:
# compiled Pallas and Triton WKV kernels), the WKV benchmark and the training-step benchmark
# (169M and 1.5B), results into one folder.
#
# Usage: scripts/gpu_check.sh [RESULTS_DIR]     (default: $OUT, else experiments/results/gpu)
#
# The GPU machine has no network. What rwkv_jax needs beyond its preinstalled jax/flax/optax/orbax/
# torch/triton (grain, jax-triton, ml_collections, matplotlib, ...) travels as wheels in $WHEELS
# (default: wheels/), fetched beforehand on a machine with PyPI access by
#   scripts/fetch_gpu_wheels.sh wheels
# They are installed with --no-deps into a private folder, so the machine's own packages stay.
set -uo pipefail
cd "$(dirname "$0")/.."
RES="${1:-${OUT:-experiments/results/gpu}}"
WHEELS="${WHEELS:-wheels}"
PY="${PYTHON:-python3}"
SITE=/tmp/rwkv_jax_site
mkdir -p "$RES" "$SITE"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || exit 1
fi
# kernels/ is the package rwkv_jax_kernels (pyproject.toml's package-dir): link it, no install.
ln -sfn "$PWD/kernels" "$SITE/rwkv_jax_kernels"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__,
'triton', triton.__version__, jax.devices())"
  "$PY" -c "import jax_triton; print('jax_triton', jax_triton.__version__)"
} >"$RES/env.txt" 2>&1

status=0
timeout 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
  --junitxml="$RES/junit.xml" tests 2>&1 | tee "$RES/pytest.log" || status=1
timeout 120 "$PY" -m experiments.bench_wkv --impls=scan,associative,pallas,triton \
  --budget_s=100 --out="$RES/bench" 2>&1 | tee "$RES/bench.log" || status=1
# Training-step throughput (the 169M and 1.5B targets), per WKV implementation.
timeout 90 "$PY" -m experiments.bench_train --model=169m --batch_size=16 --dtype=bfloat16 \
  --impls=associative,pallas,triton --steps=5 --repeats=2 --out="$RES/bench_train_169m.json" \
  2>&1 | tee "$RES/bench_train_169m.log" || status=1
timeout 65 "$PY" -m experiments.bench_train --model=1b5 --batch_size=8 --dtype=bfloat16 \
  --impls=associative --steps=3 --repeats=2 --out="$RES/bench_train_1b5.json" \
  2>&1 | tee "$RES/bench_train_1b5.log" || status=1
exit $status

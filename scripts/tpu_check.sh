#!/usr/bin/env bash
# Every TPU check of rwkv_jax in one run, the counterpart of gpu_check.sh: the compiled Mosaic WKV
# kernel's tests (`pytest -m tpu`: the checks that CPU runs in Pallas's TPU interpreter, now
# compiled), the WKV benchmark at the target shapes (scan, associative scan, Pallas kernel) and the
# training-step benchmark (169M, Pallas against the associative scan), results into one folder.
#
# Usage: scripts/tpu_check.sh [RESULTS_DIR]     (default: $OUT, else experiments/results/tpu)
#        STAGES="wkv train169" scripts/tpu_check.sh ...   runs only the named stages
#        (tests, wkv, train169; default: all), e.g. to rerun the ones that failed.
#
# Set up beforehand on the TPU VM: `pip install -e .[test]` (or wheels in $WHEELS, installed as in
# gpu_check.sh) with jax[tpu] of the pinned range.
#
# One chip (SINGLE_CHIP=1, the default): the speed targets are for one v5e chip; SINGLE_CHIP=0 uses
# every chip of the host (the training step is traced under `jax.set_mesh`, so the Mosaic kernel,
# which XLA cannot partition by itself, runs per shard).
set -uo pipefail
cd "$(dirname "$0")/.."
RES="${1:-${OUT:-experiments/results/tpu}}"
WHEELS="${WHEELS:-wheels}"
PY="${PYTHON:-python3}"
STAGES="${STAGES:-tests wkv train169}"
source scripts/device_env.sh
export JAX_PLATFORMS=tpu
if [[ "${SINGLE_CHIP:-1}" == 1 ]]; then
  export TPU_VISIBLE_CHIPS=0 TPU_CHIPS_PER_PROCESS_BOUNDS=1,1,1 TPU_PROCESS_BOUNDS=1,1,1
fi

"$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__,
jax.devices(), jax.devices()[0].device_kind)" >"$RES/env.txt" 2>&1

stage tests && check pytest 600 -m pytest -q -m tpu -p no:cacheprovider \
  --junitxml="$RES/junit.xml" tests/test_kernels_tpu.py
stage wkv && check bench 600 -m experiments.bench_wkv --impls=scan,associative,pallas \
  --shapes=$WKV_SHAPES --budget_s=500 --out="$RES/bench"
# The 169M training step with the Mosaic kernel against the associative scan.
stage train169 && check bench_train_169m 600 -m experiments.bench_train --model=169m \
  --batch_size=16 --dtype=bfloat16 --impls=pallas,associative --steps=5 --repeats=2 \
  --out="$RES/bench_train_169m.json"
exit $status

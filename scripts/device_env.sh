# Sourced by gpu_check.sh and tpu_check.sh (from the repository root) after they set RES, WHEELS
# and PY: installs the carried wheels, if any, with --no-deps into a private folder (so the
# machine's own jax and numpy stay), and puts that folder and the checkout on PYTHONPATH.
set -o pipefail  # a failing check, not tee, decides its status
SITE=/tmp/rwkv_jax_site
mkdir -p "$RES" "$SITE"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || exit 1
fi
# kernels/ is the package rwkv_jax_kernels (pyproject.toml's package-dir): link it, no install.
ln -sfn "$PWD/kernels" "$SITE/rwkv_jax_kernels"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

status=0
# Whether stage $1 is in $STAGES.
stage() { [[ " $STAGES " == *" $1 "* ]]; }
# check LOG SECONDS ARGS...: `python ARGS...` under a time limit, its output shown and kept in
# $RES/LOG.log; a failure or timeout sets status=1 and the run goes on with the next stage.
check() {
  local log=$1 seconds=$2
  shift 2
  timeout "$seconds" "$PY" "$@" 2>&1 | tee "$RES/$log.log" || status=1
}
# The WKV benchmark's shapes: the targets first, so that a spent budget skips only the extra one.
WKV_SHAPES=8x1024x768,8x1024x4096,1x16384x768,32x1024x768

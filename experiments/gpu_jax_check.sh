#!/usr/bin/env bash
# The kernel tests under the lent GPU machine's jax, on this CPU machine, before device time.
#
# The GPU machine runs jax 0.11.2 on Python 3.12; `pip install jax` on Python 3.11 here (CI's
# venv) gives 0.10.2. Mosaic GPU changed between the two (0.11 runs its own layout inference on
# warpgroup kernels, which rejects strided shared-memory refs; Triton asks the device's compute
# capability while lowering), so a kernel that lowers under one can fail under the other. This
# builds a Python 3.12 venv with that jax and runs tests/kernels in it: every kernel interpreted,
# and lowered for cuda and tpu (test_lowering.py gives the lowering an abstract H100 / TPU v5e).
#
#   usage: bash experiments/gpu_jax_check.sh [pytest arguments]   (about 2 minutes on 2 cores,
#          plus the first install; the interpreted cases marked slow run too)
#   knobs: JAX_VERSION (default 0.11.2; 0.12.0.1 is the newest release on 2026-11-27),
#          PYTHON312 (a python3.12), VENV (default .venv-jax<version>)
set -euo pipefail
cd "$(dirname "$0")/.."
JAX=${JAX_VERSION:-0.11.2}
PY=$(bash experiments/python312.sh)
VENV=${VENV:-.venv-jax$JAX}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q -e ".[dev]" "jax==$JAX" "jaxlib==$JAX"
fi
"$VENV/bin/python" -c "import jax, sys; print('jax', jax.__version__, 'python', sys.version.split()[0]);
assert jax.__version__ == '$JAX', 'the venv has jax ' + jax.__version__ + ', not $JAX: remove $VENV'"
# every kernel test, the interpreted cases the default suite marks slow included
"$VENV/bin/python" -m pytest -q tests/kernels -m "slow or not slow" "$@"

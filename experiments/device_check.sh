#!/usr/bin/env bash
# The one script run on a lent GPU: install lowbit (no network there), run the
# kernel tests compiled (not interpreted), then the kernel benchmark.
#   usage (device tool): bash experiments/device_check.sh
# Writes logs and bench_kernels.json under $OUT (or ./device_out).
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-device_out}; mkdir -p "$OUT"
REPO=$(pwd)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . 2>&1 | tail -3
export PYTHONPATH=/tmp/site
python3 -c "import jax, lowbit.kernels; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
cd /tmp
LOWBIT_TEST_BACKEND=gpu timeout ${TEST_TIMEOUT:-170} python3 -m pytest -q -x -p no:cacheprovider \
  "$REPO/tests/kernels/test_matmul_kernels.py" 2>&1 | tee "$OUT/kernel_tests.log" | tail -25
timeout ${BENCH_TIMEOUT:-360} python3 "$REPO/experiments/bench_kernels.py" --full --sweep --reps ${REPS:-15} ${BENCH_ARGS:-} \
  --out "$OUT/bench_kernels.json" 2>&1 > "$OUT/bench.log"
echo "bench exit $?"
grep -v '^{' "$OUT/bench.log" | tail -120

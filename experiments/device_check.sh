#!/usr/bin/env bash
# The one script run on a lent GPU: install lowbit (no network there), run the
# kernel tests compiled (not interpreted), then the kernel benchmark (device time
# from CUPTI).
#   usage (device tool): bash experiments/device_check.sh
#   knobs: SWEEP=--sweep (default) or SWEEP= ; BENCH_DEADLINE (s), REPS, BENCH_ARGS;
#          FORWARD=1 adds bench_forward.py (decode, [K, N] vs K-major stored weights);
#          PROFILE=1 adds profile_w4.py (the Mosaic GPU int4 kernel's regions per step)
# Writes logs and bench_kernels.json under $OUT (or ./device_out).
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-device_out}; mkdir -p "$OUT"
REPO=$(pwd)
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . 2>&1 | tail -3
export PYTHONPATH=/tmp/site
cd /tmp  # import the installed package, not the source tree (kernels/ maps to lowbit.kernels)
python3 -c "import jax, lowbit.kernels; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
# Tests in parallel processes: no process may preallocate most of the GPU. A test that
# hangs (a kernel waiting on a barrier or on registers that never come) is ended by
# pytest-timeout, where the image has it: its "thread" method ends the worker process (the
# default, a signal, waits for a CUDA call that never returns; run 8 lost every worker so),
# xdist reports the test and starts another worker. -v names each test as it ends, so the
# log says which never did.
PER_TEST=
python3 -c "import pytest_timeout" 2>/dev/null \
  && PER_TEST="--timeout ${PER_TEST_TIMEOUT:-90} --timeout-method=thread"
XLA_PYTHON_CLIENT_PREALLOCATE=false LOWBIT_TEST_BACKEND=gpu timeout ${TEST_TIMEOUT:-240} \
  python3 -m pytest -v -rfE -n ${TEST_WORKERS:-8} --dist load -p no:cacheprovider $PER_TEST \
  ${KERNEL_TESTS:-"$REPO/tests/kernels/test_matmul_kernels.py" "$REPO/tests/kernels/test_mosaic_gpu.py"} \
  > "$OUT/kernel_tests.log" 2>&1
TESTS_RC=$?
grep -E "^(FAILED|ERROR)|passed|failed|Timeout" "$OUT/kernel_tests.log" | tail -25
[ $TESTS_RC = 124 ] && echo "kernel tests TIMED OUT after ${TEST_TIMEOUT:-240} s (the log lists those that ended)"
echo "tests done at $(( $(date +%s) - T0 )) s"
# A Mosaic GPU kernel or opt-in variant is benchmarked only if its compiled tests passed (a
# kernel that hangs would take the rest of the benchmark with it): experiments/bench_gate.py
# reads the log (FAILED / ERROR, a worker ended by pytest-timeout, or a test this stage's
# timeout cut off while it ran) and prints bench_kernels.py's --no-hopper / --skip-tiles.
LOG="$OUT/kernel_tests.log"
GATE=$(python3 "$REPO/experiments/bench_gate.py" "$LOG") || GATE="--no-hopper"  # (unreadable)
echo "bench flags: ${GATE:-(none: every Mosaic GPU kernel and variant)}"
timeout ${BENCH_TIMEOUT:-300} python3 "$REPO/experiments/bench_kernels.py" --full ${SWEEP---sweep} \
  $GATE \
  --reps ${REPS:-10} --deadline ${BENCH_DEADLINE:-230} ${BENCH_ARGS:-} \
  --out "$OUT/bench_kernels.json" > "$OUT/bench.log" 2>&1
echo "bench exit $? at $(( $(date +%s) - T0 )) s"
grep -v '^{' "$OUT/bench.log" | grep -v '^m=' | tail -150
# Opt-in (FORWARD=1): a converted model's decode forward, weights [K, N] vs stored K-major.
if [ "${FORWARD:-0}" = 1 ]; then
  timeout ${FORWARD_TIMEOUT:-150} python3 "$REPO/experiments/bench_forward.py" --bf16 --d 4096 \
    --layers 2 --batch 1 --seq 16 --reps 20 --rounds 2 --policies w8a8 w4a8 w4a16 \
    --weight-layouts kn nk --out "$OUT/bench_forward.json" 2>&1 | tail -8
  echo "forward done at $(( $(date +%s) - T0 )) s"
fi
# Opt-in (PROFILE=1): where the Mosaic GPU int4 kernel spends a decode step (its own
# profiler: clock stamps per warpgroup region, no hardware counters needed).
if [ "${PROFILE:-0}" = 1 ]; then
  timeout ${PROFILE_TIMEOUT:-120} python3 "$REPO/experiments/profile_w4.py" $GATE --out /tmp/profile_w4 2>&1 \
    | grep -v "^W[0-9]" | tail -40
  cp /tmp/profile_w4/summary.json "$OUT/profile_w4.json" 2>/dev/null
  timeout ${PROFILE_TIMEOUT:-120} python3 "$REPO/experiments/profile_w4.py" $GATE --m 256 \
    --out /tmp/profile_w4_m256 2>&1 | grep -v "^W[0-9]" | tail -16
  cp /tmp/profile_w4_m256/summary.json "$OUT/profile_w4_m256.json" 2>/dev/null
  echo "profile done at $(( $(date +%s) - T0 )) s"
fi
echo "all done at $(( $(date +%s) - T0 )) s"

import os

# Kernel tests run the Pallas kernels interpreted on CPU unless LOWBIT_TEST_BACKEND
# names a real backend ("gpu"), as the device script does.
os.environ.setdefault("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))

# Compile time dominates this suite on CPU (hundreds of small jitted programs, most run once).
# jax_disable_most_optimizations runs XLA's LLVM backend at -O0 without its expensive passes
# (the HLO passes -- fusion, SPMD partitioning, what the tests read of compiled programs -- are
# unchanged): the whole suite passed with it and took 29% less CPU time back to back (user
# 16:41 -> 11:51, 2026-11-28). Set here, before jax is imported, so that the subprocesses the
# tests start (the sharding worker, the README commands) inherit it; JAX_DISABLE_MOST_
# OPTIMIZATIONS=0 runs the suite fully optimized. Not with LOWBIT_TEST_BACKEND=gpu: there the
# compiled kernels run as users run them.
if os.environ.get("LOWBIT_TEST_BACKEND", "interpret") != "gpu":
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

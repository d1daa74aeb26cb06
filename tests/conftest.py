import os

# Kernel tests run the Pallas kernels interpreted on CPU unless LOWBIT_TEST_BACKEND
# names a real backend ("gpu"), as the device script does.
os.environ.setdefault("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))

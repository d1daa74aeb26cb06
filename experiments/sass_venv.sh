#!/usr/bin/env bash
# The venv experiments/sass_stats.py runs in: jax 0.11.2 (the GPU machine's) with its CUDA 12
# plugin, which compiles for a GPU this machine does not have, and NVIDIA's ptxas and nvdisasm
# (CUDA 13: Mosaic GPU emits PTX ISA 9.0, which CUDA 12's ptxas refuses), and Triton from PyPI
# for --triton. About 5 GB, once.
#
#   usage: bash experiments/sass_venv.sh        knobs: PYTHON312, VENV (default .venv-sass)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash experiments/python312.sh)
VENV=${VENV:-.venv-sass}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q -e ".[dev]" "jax[cuda12]==0.11.2" nvidia-cuda-nvcc nvidia-cuda-nvdisasm "triton==3.9.0"
"$VENV/bin/python" -c "import jax; print('jax', jax.__version__)"

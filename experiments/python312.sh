#!/usr/bin/env bash
# Prints a python3.12 that runs ($PYTHON312 if set; a pyenv shim may not run): the Python of
# the lent GPU machine, for experiments/gpu_jax_check.sh and sass_venv.sh.
for c in ${PYTHON312:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
  "$c" --version >/dev/null 2>&1 && { echo "$c"; exit 0; }
done
echo "no python3.12 runs here: set PYTHON312" >&2
exit 2

#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and a checkout of this repository: run the CUDA
# test suite on the real device (no simulator), then a short benchmark.
# Needs numba, numba-cuda, numpy and pytest there (torch optional); installs
# nothing and runs from the source tree.  Finishes in a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NUMBA_KD_REAL_GPU=1
unset NUMBA_ENABLE_CUDASIM

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python -c "import numba, numpy; from numba import cuda; print('numba', numba.__version__, 'numpy', numpy.__version__); cuda.detect()"

status=0
python -m pytest -q -p no:cacheprovider tests/cuda tests/test_cuda_dispatch.py || status=1
python scripts/gpu_bench.py || status=1
exit $status

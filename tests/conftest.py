from __future__ import annotations

import os

import numpy as np
import pytest

# tests/cuda runs the CUDA kernels on a device: the simulator (NUMBA_ENABLE_CUDASIM=1
# must be set before numba is imported, so test_cuda_simulator.py runs it in a
# process of its own) or a real GPU (scripts/gpu_check.sh sets NUMBA_KD_REAL_GPU=1).
if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and os.environ.get("NUMBA_KD_REAL_GPU") != "1":
    collect_ignore = ["cuda"]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)

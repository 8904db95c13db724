"""A corrupt on-disk cache of the CUDA kernels, on a real GPU (the simulator has no cache)."""

from __future__ import annotations

import numba
import pytest
from helpers import check_recompiles_a_damaged_cache

if numba.config.ENABLE_CUDASIM:
    pytest.skip("the CUDA simulator compiles nothing and caches nothing", allow_module_level=True)

DEVICE_LOSS = """
import numpy as np
from numba import cuda
import numba_kd as kd

rng = np.random.default_rng(0)
student, t1, t2 = (rng.normal(size=(16, 300)).astype(np.float32) for _ in range(3))
labels = rng.integers(0, 300, size=16)
d = kd.EnsembleDistiller([1.0, 2.0], 2.0)
teachers = [cuda.to_device(t1), cuda.to_device(t2)]
loss = d.distillation_loss(cuda.to_device(student), teachers, cuda.to_device(labels), 0.5)
print(repr(float(loss)))
"""


@pytest.mark.parametrize("damage", ["garbage index", "truncated data"])
def test_a_corrupt_cuda_cache_is_recompiled_with_one_warning(tmp_path, damage):
    check_recompiles_a_damaged_cache(DEVICE_LOSS, tmp_path / "cache", "*make_kernels*", damage)

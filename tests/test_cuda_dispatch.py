"""Device detection and target choice, without a GPU and without the simulator."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import numba_kd as kd
from numba_kd import _arrays, _targets


class FakeCudaArray:
    """Carries __cuda_array_interface__ like CuPy or numba device arrays."""

    def __init__(self, shape=(2, 3)):
        self.shape = shape
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": "<f4",
            "data": (0, False),
            "version": 3,
            "strides": None,
            "stream": None,
        }


class FakeTensorRequiringGrad:
    """Like a torch CUDA tensor with requires_grad=True: the interface raises."""

    requires_grad = True

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")

    def detach(self):
        return FakeCudaArray()


class FakeCpuTensor:
    """Like a torch CPU tensor: the class has the property, the instance refuses it."""

    @property
    def __cuda_array_interface__(self):
        raise AttributeError("Can't get __cuda_array_interface__ on non-CUDA tensor")

    def __array__(self, dtype=None, copy=None):
        return np.zeros((2, 3), dtype=dtype or np.float32)


def test_detection():
    assert _arrays.is_device_array(FakeCudaArray())
    assert _arrays.is_device_array(FakeTensorRequiringGrad())
    assert not _arrays.is_device_array(FakeCpuTensor())
    assert not _arrays.is_device_array(np.zeros(3))
    assert not _arrays.is_device_array([[1.0, 2.0]])


def test_target_choice():
    host = np.zeros((2, 3))
    assert _targets.backend_for([host, [host, host]], None).target == "cpu"
    assert _targets.backend_for([FakeCpuTensor()], None).target == "cpu"
    with pytest.raises(ValueError, match="inputs mix host"):
        _targets.backend_for([host, [FakeCudaArray(), host]], None)
    with pytest.raises(ValueError, match="inputs mix host"):
        _targets.backend_for([FakeTensorRequiringGrad(), host], None)
    with pytest.raises(ValueError, match='device must be "cpu", "cuda" or None'):
        _targets.backend_for([host], "gpu")
    with pytest.raises(ValueError, match="stream= applies to CUDA inputs only"):
        _targets.backend_for([host], None, stream=5)


def test_mixed_inputs_raise_through_the_api():
    d = kd.EnsembleDistiller.uniform(2, temperature=2.0)
    host = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="inputs mix host"):
        d.distillation_loss(FakeCudaArray(), [host, host], np.zeros(2, dtype=int), 0.5)
    with pytest.raises(ValueError, match="inputs mix host"):
        d.combine_teachers([host, FakeCudaArray()])


def test_cpu_inputs_never_touch_cuda():
    """import numba_kd and every CPU operation leave numba.cuda unimported."""
    code = """
import sys
import numpy as np
import numba_kd as kd
d = kd.EnsembleDistiller([1.0, 2.0], temperature=2.0)
s = np.zeros((3, 4), dtype=np.float32)
t = [s + 1, s - 1]
y = np.array([0, 1, 3])
d.distillation_loss(s, t, y, 0.5)
d.combine_teachers(t)
d.combine_via_probabilities(t, eps=0.0)
d.combine_via_probabilities(np.stack(t))
kd.DistillationLoss(2.0, 0.5)(s, t[0], y)
assert not any(m == "numba.cuda" or m.startswith("numba.cuda.") for m in sys.modules), "numba.cuda imported"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_a_cuda_out_that_requires_grad_is_refused_by_name():
    pytest.importorskip("numba.cuda")
    from numba_kd.cuda.backend import CudaBackend

    with pytest.raises(TypeError, match=r"out is a tensor that requires grad: pass out\.detach\(\)"):
        CudaBackend(0).output(FakeTensorRequiringGrad(), (2, 3), np.dtype(np.float32), [])

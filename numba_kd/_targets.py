"""Which backend serves a call: the host backend for NumPy inputs, the CUDA
backend (imported only then) for inputs that live on a CUDA device.  The only
module that knows both backends."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from numba_kd._arrays import flatten_arrays, is_device_array
from numba_kd.cpu.backend import HOST

__all__ = ["HOST", "backend_for"]


def backend_for(inputs: Iterable[object], device: str | None, stream: object = None):
    """The backend for these inputs: from where they live, or from ``device``."""
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f'device must be "cpu", "cuda" or None, got {device!r}')
    arrays = flatten_arrays(inputs)
    if device is None and all(isinstance(x, np.ndarray) for x in arrays):
        device = "cpu"  # the common case, decided without probing each array
    if device is None:
        on_device = [is_device_array(x) for x in arrays]
        if all(on_device):
            device = "cuda"
        elif not any(on_device):
            device = "cpu"
        else:
            raise ValueError(
                "inputs mix host (NumPy) arrays and CUDA device arrays; numba_kd does not copy "
                'silently: move them to one device, or pass device="cpu" or device="cuda" to copy'
            )
    if device == "cpu":
        if stream is not None:
            raise ValueError("stream= applies to CUDA inputs only")
        return HOST
    from numba_kd.cuda import backend as cuda_backend

    return cuda_backend.CudaBackend(cuda_backend.stream_of(arrays, stream))

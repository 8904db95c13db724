"""Where arrays live, read without importing their libraries: device arrays
(``__cuda_array_interface__``), dask arrays, lists of teacher arrays, and the
checks of a caller's ``out=`` array shared by both backends."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

# 16-bit floats: NumPy's float16, and bfloat16 (ml_dtypes, the NumPy type of JAX's
# bfloat16), recognized by its name so that ml_dtypes is never imported here.  The
# CPU kernels read both as bit patterns of the integer type of the same size
# (numba has no 16-bit float type on the CPU): uint16 for bfloat16, int16 for float16.
_FLOAT16 = np.dtype(np.float16)
_FLOAT32 = np.dtype(np.float32)


def is_bfloat16(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is bfloat16 (ml_dtypes.bfloat16)."""
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16"


def is_sixteen_bit(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is float16 or bfloat16."""
    return dtype == _FLOAT16 or is_bfloat16(dtype)


def arithmetic_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype of the kernels' arithmetic for logits of ``dtype``: float32 for 16-bit floats."""
    return _FLOAT32 if is_sixteen_bit(dtype) else dtype


def bits_view(arr: Any) -> Any:
    """``arr`` as the CPU kernels read it: 16-bit floats as their bits (a view), others as they are."""
    if not isinstance(arr, np.ndarray):
        return arr
    if arr.dtype == _FLOAT16:
        return arr.view(np.int16)
    if is_bfloat16(arr.dtype):
        return arr.view(np.uint16)
    return arr


def is_device_array(x: object) -> bool:
    """True for objects whose data lives on a CUDA device.

    Looks at ``__cuda_array_interface__`` (numba, CuPy, torch CUDA tensors)
    without importing any of those libraries; a torch tensor that requires grad
    refuses the attribute with RuntimeError, which still means "on the device".
    Simulator device arrays have no interface and are recognized by their type.
    """
    try:
        x.__cuda_array_interface__  # noqa: B018
    except AttributeError:
        module = type(x).__module__
        return module.startswith("numba") and "cuda" in module and hasattr(x, "copy_to_host")
    except RuntimeError:
        return True
    return True


def flatten_arrays(inputs: Iterable[object]) -> list[object]:
    """The arrays of ``inputs``, with lists and tuples of teacher arrays opened up."""
    flat: list[object] = []
    for x in inputs:
        if isinstance(x, (list, tuple)):
            flat.extend(x)
        else:
            flat.append(x)
    return flat


def host_layout(student: object, teachers: object, labels: object) -> tuple | None:
    """The dtypes, shapes and strides of NumPy loss inputs (teachers a list or tuple of
    arrays, or one array); None when any input is something else.  Inputs with equal
    layouts pass or fail the same structural checks and compile to the same kernel."""
    if type(student) is not np.ndarray or type(labels) is not np.ndarray:
        return None
    kind = type(teachers)
    if kind is np.ndarray:
        parts: tuple = (teachers.dtype, teachers.shape, teachers.strides)
    elif kind is list or kind is tuple:
        parts = (kind,)
        for t in teachers:
            if type(t) is not np.ndarray:
                return None
            parts += (t.dtype, t.shape, t.strides)
    else:
        return None
    return (
        student.dtype, student.shape, student.strides, labels.dtype, labels.shape, labels.strides, parts
    )  # fmt: skip


def host_has_nonfinite(arr: np.ndarray, read: np.ndarray | None = None) -> bool:
    """Whether the NumPy array ``arr`` ([N, C] or [K, N, C]) holds a NaN or an infinity
    in the rows ``read`` selects (a boolean mask over N; None: every row).  Checked
    in row blocks, so the temporary memory stays small."""
    matrices = arr if arr.ndim == 3 else (arr,)
    for matrix in matrices:
        step = max(1, (1 << 20) // max(1, matrix.shape[-1]))
        for start in range(0, matrix.shape[0], step):
            block = matrix[start : start + step]
            if read is not None:
                block = block[read[start : start + step]]
            if not np.isfinite(block).all():
                return True
    return False


def has_dask_array(inputs: Iterable[object]) -> bool:
    """Whether any input is a dask array (without importing dask)."""
    return any(
        not isinstance(x, np.ndarray) and type(x).__module__.split(".")[0] == "dask"
        for x in flatten_arrays(inputs)
    )


def check_output(out: Any, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Shape and dtype of a caller's ``out=`` array (both targets)."""
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, the result has shape {tuple(shape)}")
    got = np.dtype(out.dtype)
    if got != dtype and not (got == _FLOAT32 and is_sixteen_bit(dtype)):
        also = " (or float32)" if is_sixteen_bit(dtype) else ""
        raise TypeError(f"out has dtype {got}, the result has dtype {dtype}{also}")

"""Where arrays live, read without importing their libraries: device arrays
(``__cuda_array_interface__``), DLPack exporters (torch, JAX, CuPy), dask arrays,
lists of teacher arrays, and the checks of a caller's ``out=`` array shared by
both backends."""

from __future__ import annotations

import ctypes
import sys
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
    """``arr`` (a NumPy or device array) as the kernels read it: 16-bit floats as their
    bits (a view), others as they are."""
    dtype = getattr(arr, "dtype", None)
    if not isinstance(dtype, np.dtype):
        return arr
    if dtype == _FLOAT16:
        return arr.view(np.int16)
    if is_bfloat16(dtype):
        return arr.view(np.uint16)
    return arr


def bfloat16_dtype() -> np.dtype:
    """NumPy's bfloat16 dtype (ml_dtypes.bfloat16), for bfloat16 tensors of other libraries."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(
            "reading a bfloat16 tensor needs ml_dtypes (pip install ml_dtypes), NumPy's bfloat16 type"
        ) from None
    return np.dtype(ml_dtypes.bfloat16)


def names_bfloat16(x: object) -> bool:
    """Whether ``x`` (an array of another library) says its dtype is bfloat16: its
    ``__cuda_array_interface__`` can only say "<V2" (torch), the type string of any
    2-byte record."""
    return str(getattr(x, "dtype", "")).rsplit(".", 1)[-1] == "bfloat16"


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
        if module.startswith("numba") and "cuda" in module and hasattr(x, "copy_to_host"):
            return True
        return dlpack_device(x) == "cuda"
    except RuntimeError:
        return True
    return True


# DLPack (dlpack.h): the device types numba_kd reads, and the C structures of an
# exported tensor, read with ctypes where NumPy's from_dlpack cannot (bfloat16), and
# for CUDA tensors that only DLPack describes.
_DLPACK_DEVICES = {1: "cpu", 3: "cpu", 2: "cuda", 13: "cuda"}  # CPU, CUDA host, CUDA, CUDA managed
_DLPACK_READ_ONLY = 1  # DLPACK_FLAG_BITMASK_READ_ONLY
# (type code, bits) -> NumPy type string; code 0 int, 1 uint, 2 float, 4 bfloat.
_DLPACK_TYPES = {
    (0, 8): "|i1", (0, 16): "<i2", (0, 32): "<i4", (0, 64): "<i8",
    (1, 8): "|u1", (1, 16): "<u2", (1, 32): "<u4", (1, 64): "<u8",
    (2, 16): "<f2", (2, 32): "<f4", (2, 64): "<f8",
    (4, 16): "<u2",  # bfloat16, as its bits
}  # fmt: skip


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("major", ctypes.c_uint32),
        ("minor", ctypes.c_uint32),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", _DLTensor),
    ]


_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)
_capsule_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))


def dlpack_device(x: object) -> str | None:
    """ "cpu" or "cuda" for an object that exports DLPack (other than a NumPy array), the
    device type number as a string for other devices, None for objects without DLPack."""
    if isinstance(x, np.ndarray) or not hasattr(x, "__dlpack__"):
        return None
    probe = getattr(x, "__dlpack_device__", None)
    if probe is None:
        return None
    try:
        device_type = int(probe()[0])
    except Exception as exc:  # a device DLPack has no number for (torch's "meta")
        return f"unknown ({exc})"
    return _DLPACK_DEVICES.get(device_type, str(device_type))


class _Exported:
    """A DLPack tensor's memory described by ``__array_interface__`` (host) or
    ``__cuda_array_interface__`` (CUDA), for NumPy or numba to wrap without a copy.
    It holds the capsule, whose destructor releases the tensor when this goes."""

    def __init__(self, capsule: object, interface: dict, bfloat16: bool) -> None:
        self.capsule = capsule
        self.interface = interface
        self.bfloat16 = bfloat16

    @property
    def __array_interface__(self) -> dict:
        return self.interface

    @property
    def __cuda_array_interface__(self) -> dict:
        return self.interface


def _export(x: Any, stream: int | None) -> _Exported:
    """The DLPack tensor of ``x`` (a versioned capsule where the producer offers one)."""
    kwargs = {} if stream is None else {"stream": stream}
    try:
        capsule = x.__dlpack__(max_version=(1, 0), **kwargs)
    except TypeError:  # a producer older than DLPack 1.0
        capsule = x.__dlpack__(**kwargs)
    if _capsule_name(capsule) == b"dltensor_versioned":
        managed = _DLManagedTensorVersioned.from_address(_capsule_pointer(capsule, b"dltensor_versioned"))
        if managed.major > 1:
            raise TypeError(
                f"its DLPack version {managed.major}.{managed.minor} is newer than 1.x, which numba_kd reads"
            )
        read_only = bool(managed.flags & _DLPACK_READ_ONLY)
    else:
        managed = _DLManagedTensor.from_address(_capsule_pointer(capsule, b"dltensor"))
        # A capsule older than DLPack 1.0 cannot say whether its memory may be
        # written (JAX's arrays, which are immutable, come so): read-only, as NumPy
        # takes it.
        read_only = True
    tensor = managed.dl_tensor
    code, bits, lanes = tensor.dtype.code, tensor.dtype.bits, tensor.dtype.lanes
    typestr = _DLPACK_TYPES.get((code, bits)) if lanes == 1 else None
    if typestr is None:
        raise TypeError(
            f"DLPack type code {code} with {bits} bits and {lanes} lanes is not a type numba_kd reads"
        )
    shape = tuple(tensor.shape[i] for i in range(tensor.ndim))
    itemsize = bits // 8
    strides = None if not tensor.strides else tuple(tensor.strides[i] * itemsize for i in range(tensor.ndim))
    interface = {
        "shape": shape,
        "typestr": typestr,
        "data": ((tensor.data or 0) + tensor.byte_offset, read_only),
        "strides": strides,
        "version": 3,
    }
    return _Exported(capsule, interface, bfloat16=code == 4)


def host_from_dlpack(x: Any) -> np.ndarray:
    """The NumPy view (no copy) of a CPU DLPack tensor; bfloat16 needs ml_dtypes."""
    try:
        return np.from_dlpack(x)
    except (RuntimeError, BufferError, TypeError) as exc:
        refusal = exc
    try:
        exported = _export(x, None)
    except (RuntimeError, BufferError) as exc:
        raise TypeError(str(exc)) from None
    if not exported.bfloat16:
        raise TypeError(str(refusal)) from None
    return np.asarray(exported).view(bfloat16_dtype())


def cuda_dlpack_interface(x: Any, stream: int) -> _Exported:
    """A ``__cuda_array_interface__`` for a CUDA DLPack tensor (exported for ``stream``,
    the DLPack stream number: 1 is the legacy default stream)."""
    return _export(x, stream)


# The module whose from_dlpack rebuilds a result as the type of the caller's array.
_LIBRARY_OF_MODULE = {"jaxlib": "jax.numpy", "jax": "jax.numpy"}


def as_library_array(result: np.ndarray, like: object) -> Any:
    """``result`` (a host array) as the array type of ``like``, a CPU DLPack tensor, where
    that library offers ``from_dlpack``; the NumPy array itself otherwise."""
    if isinstance(like, np.ndarray) or dlpack_device(like) != "cpu":
        return result
    root = type(like).__module__.split(".")[0]
    library = sys.modules.get(_LIBRARY_OF_MODULE.get(root, root))
    from_dlpack = getattr(library, "from_dlpack", None)
    if from_dlpack is None:
        return result
    if is_bfloat16(result.dtype):
        bfloat16 = getattr(library, "bfloat16", None)
        if bfloat16 is None:
            return result
        return from_dlpack(result.view(np.int16)).view(bfloat16)
    return from_dlpack(result)


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

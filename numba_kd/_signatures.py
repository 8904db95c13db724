"""Kernel signatures from argument values: the one resolver of both targets.

A kernel's parameters are declared once, by its ``def``; call sites pass them by
name (:func:`bind` puts them in the kernel's order), and the numba types of a
specialization come from the values themselves (:func:`types_of`).  The
dispatchers keep one compiled specialization per :func:`type_key`, a cheap
hashable summary of exactly what the types depend on.

Host kernels mark the parameters they only read with :func:`reads`: those are
typed as read-only arrays, so that read-only inputs (memory maps) and writable
ones share a specialization.  :func:`cached_kernel` keeps the compiled
specializations of both targets for the process.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numba import from_dtype, types

_PARAMETERS: dict[Callable[..., Any], tuple[str, ...]] = {}
_PARAMETER_SETS: dict[Callable[..., Any], frozenset[str]] = {}
_COMPILED: dict[tuple, Any] = {}
_COMPILE_LOCK = threading.Lock()


def compiled_signature_count() -> int:
    """Number of kernel specializations compiled (or loaded) in this process."""
    return len(_COMPILED)


def cached_kernel(key: tuple, build: Callable[[], Any]) -> Any:
    """The kernel for ``key``, built (compiled or loaded from disk) once per process."""
    kernel = _COMPILED.get(key)
    if kernel is None:
        with _COMPILE_LOCK:
            kernel = _COMPILED.get(key)
            if kernel is None:
                kernel = _COMPILED[key] = build()
    return kernel


def reads(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark the parameters a host kernel reads and never writes (typed read-only)."""

    def mark(function: Callable[..., Any]) -> Callable[..., Any]:
        unknown = set(names) - set(inspect.signature(function).parameters)
        if unknown:
            raise TypeError(f"{function.__name__} has no parameters {sorted(unknown)}")
        function.read_only = frozenset(names)
        return function

    return mark


def parameters(function: Callable[..., Any]) -> tuple[str, ...]:
    """The parameter names of ``function`` (a kernel's Python function), in order."""
    names = _PARAMETERS.get(function)
    if names is None:
        names = _PARAMETERS[function] = tuple(inspect.signature(function).parameters)
    return names


def bind(function: Callable[..., Any], arguments: Mapping[str, Any]) -> tuple[Any, ...]:
    """The values of ``arguments`` (by parameter name) in ``function``'s order."""
    names = parameters(function)
    expected = _PARAMETER_SETS.get(function)
    if expected is None:
        expected = _PARAMETER_SETS[function] = frozenset(names)
    if arguments.keys() != expected:
        raise TypeError(f"{function.__name__} takes {', '.join(names)}; got {', '.join(sorted(arguments))}")
    return tuple([arguments[name] for name in names])


def is_c_contiguous(arr: Any) -> bool:
    """Whether an array (NumPy or device) is C-contiguous, from its shape and strides."""
    if isinstance(arr, np.ndarray):
        return bool(arr.flags.c_contiguous)
    if 0 in tuple(arr.shape):
        return True
    expected = np.dtype(arr.dtype).itemsize
    for size, stride in zip(reversed(arr.shape), reversed(arr.strides), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _is_array(value: Any) -> bool:
    return hasattr(value, "dtype") and hasattr(value, "shape") and not isinstance(value, np.generic)


_PLAIN_SCALARS = frozenset({bool, int, float})


def type_key(value: Any) -> Any:
    """A hashable summary of ``value`` that determines its numba type."""
    kind = type(value)
    if kind is np.ndarray:
        return value.dtype, value.ndim, value.flags.c_contiguous
    if kind in _PLAIN_SCALARS:
        return kind
    if isinstance(value, tuple):
        kinds = tuple(map(type, value))
        if _PLAIN_SCALARS.issuperset(kinds):
            return kind, kinds  # a NamedTuple of parameters: its field types
        if all(k is np.ndarray for k in kinds):
            return kind, tuple([(a.dtype, a.ndim, a.flags.c_contiguous) for a in value])
        return kind, tuple(map(type_key, value))
    if isinstance(value, np.ndarray):
        return value.dtype, value.ndim, value.flags.c_contiguous
    if _is_array(value):
        return np.dtype(value.dtype), len(value.shape), is_c_contiguous(value)
    return type(value)


def numba_type(value: Any, read_only: bool = False) -> types.Type:
    """The numba type of an argument value: arrays are 'C' when C-contiguous, else 'A'."""
    if _is_array(value):
        layout = "C" if is_c_contiguous(value) else "A"
        return types.Array(from_dtype(np.dtype(value.dtype)), len(value.shape), layout, readonly=read_only)
    if isinstance(value, tuple):
        fields = [numba_type(v, read_only) for v in value]
        if hasattr(value, "_fields"):
            return types.NamedTuple(fields, type(value))
        if fields and all(isinstance(f, types.Array) for f in fields):
            # Arrays that differ in layout alone (a list of teachers, some of them
            # strided) share the generic layout, so that the tuple can be indexed.
            generic = {f.copy(layout="A") for f in fields}
            if len(generic) == 1 and len(set(fields)) > 1:
                fields = [generic.pop()] * len(fields)
        if fields and all(f == fields[0] for f in fields):
            return types.UniTuple(fields[0], len(fields))
        return types.Tuple(fields)
    if isinstance(value, (bool, np.bool_)):
        return types.boolean
    if isinstance(value, int):
        return types.int64
    if isinstance(value, float):
        return types.float64
    if isinstance(value, np.generic):
        return from_dtype(value.dtype)
    raise TypeError(f"no kernel argument type for {type(value).__name__}")


def types_of(function: Callable[..., Any], args: tuple[Any, ...], host: bool) -> tuple[types.Type, ...]:
    """The signature of ``function`` for these (bound) argument values.  On the host,
    the parameters marked by :func:`reads` are read-only arrays."""
    read_only = getattr(function, "read_only", frozenset()) if host else frozenset()
    return tuple(
        numba_type(value, name in read_only) for name, value in zip(parameters(function), args, strict=True)
    )


def signature_key(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The cache key of a specialization: one :func:`type_key` per argument (NumPy
    arrays, most of the arguments, spelled out here: this runs on every call)."""
    return tuple(
        [
            (value.dtype, value.ndim, value.flags.c_contiguous)
            if type(value) is np.ndarray
            else type_key(value)
            for value in args
        ]
    )

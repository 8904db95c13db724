"""Target choice and the compiled-kernel cache.

The wrapper in ``distiller.py`` hands this module NumPy arrays that are already
validated and of one float dtype; this module picks the compiled
specialization and calls it.  Specializations are compiled on first use with an
explicit signature, one per (operation, target, dtype, layout, teacher layout,
K), and kept in ``_COMPILED``; numba's on-disk cache makes a later process
load them instead of compiling.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import from_dtype, types

# (operation, target, dtype name, layout, teacher kind, K or None) -> entry point
_COMPILED: dict[tuple, Callable[..., Any]] = {}
_COMPILE_LOCK = threading.Lock()

Teachers = tuple[np.ndarray, ...] | np.ndarray


def compiled_signature_count() -> int:
    """Number of kernel specializations compiled (or loaded) in this process."""
    return len(_COMPILED)


def _layout(*arrays: np.ndarray | tuple[np.ndarray, ...]) -> str:
    """'C' when every array is C-contiguous, else the generic strided 'A'.

    Tuples of teacher arrays are looked into; a stacked teacher array is judged
    as a whole (its slices can be contiguous while the stack is not).
    """
    flat: list[np.ndarray] = []
    for a in arrays:
        flat.extend(a if isinstance(a, tuple) else (a,))
    return "C" if all(a.flags.c_contiguous for a in flat) else "A"


def _input_array_type(dtype: np.dtype, ndim: int, layout: str):
    return types.Array(from_dtype(dtype), ndim, layout, readonly=True)


def _teachers_type(teachers: Teachers, dtype: np.dtype, layout: str):
    if isinstance(teachers, tuple):
        return types.UniTuple(_input_array_type(dtype, 2, layout), len(teachers))
    return _input_array_type(dtype, 3, layout)


def _teacher_key(teachers: Teachers) -> tuple[str, int | None]:
    if isinstance(teachers, tuple):
        return "list", len(teachers)
    return "stacked", None


def _cpu_entry_point(
    op: str, dtype: np.dtype, layout: str, teachers: Teachers, arg_types: Callable[[], tuple]
):
    kind, n_teachers = _teacher_key(teachers)
    key = (op, "cpu", dtype.name, layout, kind, n_teachers)
    entry = _COMPILED.get(key)
    if entry is None:
        with _COMPILE_LOCK:
            entry = _COMPILED.get(key)
            if entry is None:
                from numba_kd.cpu import kernels

                entry = getattr(kernels, op).compile(arg_types())
                _COMPILED[key] = entry
    return entry


def _weights_type():
    return types.Array(types.float64, 1, "C", readonly=True)


def _output_type(dtype: np.dtype):
    return types.Array(from_dtype(dtype), 2, "C")


def combine_logits(teachers: Teachers, weights: np.ndarray, out: np.ndarray) -> None:
    dtype = out.dtype
    layout = _layout(teachers)

    def arg_types():
        return (_teachers_type(teachers, dtype, layout), _weights_type(), _output_type(dtype))

    _cpu_entry_point("combine_logits", dtype, layout, teachers, arg_types)(teachers, weights, out)


def combine_probabilities(
    teachers: Teachers, weights: np.ndarray, temperature: float, eps: float, out: np.ndarray
) -> None:
    dtype = out.dtype
    layout = _layout(teachers)

    def arg_types():
        return (
            _teachers_type(teachers, dtype, layout),
            _weights_type(),
            types.float64,
            types.float64,
            _output_type(dtype),
        )

    entry = _cpu_entry_point("combine_probabilities", dtype, layout, teachers, arg_types)
    entry(teachers, weights, float(temperature), float(eps), out)


def distillation_loss_terms(
    student: np.ndarray,
    teachers: Teachers,
    weights: np.ndarray,
    labels: np.ndarray,
    temperature: float,
    alpha: float,
) -> tuple[float, float]:
    """(soft, hard) parts of the distillation loss; the loss is their sum."""
    dtype = student.dtype
    layout = _layout(student, teachers)

    def arg_types():
        return (
            _input_array_type(dtype, 2, layout),
            _teachers_type(teachers, dtype, layout),
            _weights_type(),
            types.Array(types.int64, 1, "C", readonly=True),
            types.float64,
            types.float64,
        )

    entry = _cpu_entry_point("distillation_loss_terms", dtype, layout, teachers, arg_types)
    return entry(student, teachers, weights, labels, float(temperature), float(alpha))

"""Argument checks shared by the public classes, the offline jobs and the dask path.

Every check raises ``TypeError`` or ``ValueError`` naming the argument; error
messages repeat the wording of the Rust crate entrenar's ``distill`` module
where it has one.  Arrays are checked through a backend (``_backend.Backend``),
so that the same checks serve host and device inputs.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from numba_kd import _arrays, _options
from numba_kd._options import LossOptions

TeacherLogits = Sequence[ArrayLike] | ArrayLike


def some_teachers(count: int) -> None:
    """A call needs at least one teacher."""
    if count == 0:
        raise ValueError("Must have at least one teacher")


def integer_labels(dtype: np.dtype) -> None:
    """Labels are class indices: any integer dtype."""
    if np.dtype(dtype).kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got dtype {dtype}")


def real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


# The CPU kernels keep about 1e-16 T relative precision at large T (kl_from_sums,
# jsd_term_near); the CUDA kernels do for the forward and reverse KL of the logit
# combine, but form the other divergences' soft term as a difference of
# log-sum-exps that agree to about 1/T^2 of their size, with about 1e-16 T^2
# relative error: 1e-4 here, and no correct digits left much above.
MAX_TEMPERATURE = 1e6


def check_temperature(temperature: object) -> float:
    t = real(temperature, "temperature")
    if not t > 0.0:
        raise ValueError(f"Temperature must be positive, got {t}")
    if not math.isfinite(t) or not math.isfinite(1.0 / t):
        raise ValueError(f"Temperature must be finite with a finite 1/T, got {t}")
    if t > MAX_TEMPERATURE:
        raise ValueError(
            f"Temperature must be at most {MAX_TEMPERATURE:g}, got {t}: above it T^2 KL is a difference "
            "of log-sum-exps that agree to about 1/T^2, which float64 cannot resolve"
        )
    return t


def check_alpha(alpha: object) -> float:
    a = real(alpha, "alpha")
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"Alpha must be in [0, 1], got {a}")
    return a


_READ_DTYPES = {np.dtype(t) for t in (np.float16, np.float32, np.float64)}
FLOAT_NAMES = "float16, bfloat16, float32 or float64"


def float_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """The dtype the kernels read logits of ``dtype`` as: float16, bfloat16, float32
    or float64 in native byte order (other byte orders are converted)."""
    if dtype in _READ_DTYPES or _arrays.is_bfloat16(dtype):
        return dtype
    if dtype.kind != "f" or dtype.itemsize > 8:
        raise TypeError(f"{name} must hold floating-point logits ({FLOAT_NAMES}), got dtype {dtype}")
    return dtype.newbyteorder("=")


_SHAPE_NAMES = {
    2: "[batch, classes]",
    3: "[batch, sequence, classes]",
    4: "[teachers, batch, sequence, classes]",
}


def asarray(backend, x: object, name: str):
    """``x`` as an array of the backend (NumPy conversion rules for lists on the host)."""
    if type(x) is np.ndarray:
        return backend.asarray(x)
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a masked array, whose mask the kernels would not see: fill the masked "
            "entries (and use ignore_index for masked rows)"
        )
    if getattr(x, "requires_grad", False) is True:
        raise TypeError(
            f"{name} is a tensor that requires grad; numba_kd records no autograd graph, so its result "
            f"would silently carry no gradient: pass {name}.detach() (loss_and_grad returns the gradient)"
        )
    try:
        return backend.asarray(x)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name} cannot be read as an array: {exc}") from None


def logits(backend, x: object, name: str, ndim: int | tuple[int, ...] = 2):
    arr = asarray(backend, x, name)
    target = float_dtype(np.dtype(arr.dtype), name)
    shape = tuple(arr.shape)
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if len(shape) not in allowed:
        expected = " or ".join(f"{n}-D {_SHAPE_NAMES.get(n, '')}" for n in allowed)
        if len(allowed) == 1 and allowed[0] == 3 and name == "teachers":
            expected = "3-D [teachers, batch, classes]"
        raise ValueError(f"{name} must be a {expected} array, got shape {shape}")
    if shape[-1] == 0:
        raise ValueError(f"{name} must have at least one class, got shape {shape}")
    # Casts only non-native byte order; other arrays pass as they are.
    return arr if np.dtype(arr.dtype) == target else backend.cast(arr, target, name)


def teacher_arrays(backend, teachers: TeacherLogits, n_weights: int, ndim: int = 2):
    """A tuple of ``ndim``-D arrays (a list, read in place) or one (ndim + 1)-D array."""
    if teachers is None or isinstance(teachers, (dict, set, frozenset, Iterator)):
        raise TypeError(
            "teachers must be a list or tuple of arrays, or one array stacking them, "
            f"got {type(teachers).__name__}"
        )
    if isinstance(teachers, (list, tuple)):
        some_teachers(len(teachers))
        result = tuple(logits(backend, t, f"teachers[{k}]", ndim) for k, t in enumerate(teachers))
        shapes = {tuple(t.shape) for t in result}
        if len(shapes) > 1:
            raise ValueError(f"All teacher logits must have the same shape, got {sorted(shapes)}")
    else:
        arr = asarray(backend, teachers, "teachers")
        if arr.ndim != ndim + 1:
            raise ValueError(
                f"teachers must be a list of {_SHAPE_NAMES[ndim]} arrays or one "
                f"{ndim + 1}-D array stacking them, got an array of shape {tuple(arr.shape)}"
            )
        some_teachers(arr.shape[0])
        result = logits(backend, arr, "teachers", ndim + 1)
    if len(result) != n_weights:
        raise ValueError(
            f"Number of teachers must match number of weights: {len(result)} teachers, {n_weights} weights"
        )
    return result


def teacher_shape(teachers) -> tuple[int, ...]:
    shape = teachers[0].shape if isinstance(teachers, tuple) else teachers.shape[1:]
    return tuple(int(n) for n in shape)


def teacher_dtypes(teachers) -> list[np.dtype]:
    arrays = teachers if isinstance(teachers, tuple) else (teachers,)
    return [np.dtype(t.dtype) for t in arrays]


def cast_teachers(backend, teachers, dtype: np.dtype):
    """Teachers as ``dtype``; only those of another dtype are converted."""
    if isinstance(teachers, tuple):
        return tuple(
            t if np.dtype(t.dtype) == dtype else backend.cast(t, dtype, f"teachers[{k}]")
            for k, t in enumerate(teachers)
        )
    return teachers if np.dtype(teachers.dtype) == dtype else backend.cast(teachers, dtype, "teachers")


def loss_inputs(backend, student: object, teachers: TeacherLogits, labels: object, n_weights: int, options):
    """Validated rows: (student [N, C], teachers, labels [N], shape of the labels).

    3-D inputs [B, S, C] with labels [B, S] become B*S rows (a reshape, which is a
    view for any array whose first two axes can be merged)."""
    s = logits(backend, student, "student", (2, 3))
    t = teacher_arrays(backend, teachers, n_weights, s.ndim)
    if tuple(s.shape) != teacher_shape(t):
        raise ValueError(
            f"student logits shape {tuple(s.shape)} does not match teacher logits shape {teacher_shape(t)}"
        )
    shape = tuple(int(n) for n in s.shape)
    lead = shape[:-1]
    n_rows, n_classes = math.prod(lead), shape[-1]
    if n_rows == 0:
        raise ValueError("student logits must have at least one row: the mean over rows is undefined")
    dtypes = teacher_dtypes(t)
    same = all(d == s.dtype for d in dtypes)
    dtype = np.dtype(s.dtype) if same else np.result_type(s.dtype, *dtypes)
    if np.dtype(s.dtype) != dtype:
        s = backend.cast(s, dtype, "student")
    t = cast_teachers(backend, t, dtype)
    y = asarray(backend, labels, "labels")
    if len(shape) == 3:
        if tuple(y.shape) != lead:
            raise ValueError(f"labels must have shape {lead} for student logits of shape {shape}")
        backend.merge_rows(named_inputs(s, t, y))
        s = s.reshape(n_rows, n_classes)
        y = y.reshape(n_rows)
        if isinstance(t, tuple):
            t = tuple(x.reshape(n_rows, n_classes) for x in t)
        else:
            t = t.reshape(len(t), n_rows, n_classes)
    return s, t, backend.labels(y, n_rows, n_classes, options.ignore_index), lead


def named_inputs(s, t, y) -> list[tuple[str, Any]]:
    return [("student", s), ("labels", y), *named_teachers(t)]


def refuse_nonfinite(backend, arrays: list[tuple[str, Any]], ignored: tuple[Any, int] | None = None) -> None:
    """check_finite=True: refuse a NaN or an infinity in a row the kernels read
    (``ignored = (labels, ignore_index)`` excludes the ignored rows)."""
    for name, arr in arrays:
        if backend.has_nonfinite(arr, ignored):
            raise ValueError(f"{name} holds NaN or infinite values (check_finite=True)")


def named_teachers(teachers, single: bool = False) -> list[tuple[str, Any]]:
    if single:
        return [("teacher", teachers[0])]
    if isinstance(teachers, tuple):
        return [(f"teachers[{k}]", t) for k, t in enumerate(teachers)]
    return [("teachers", teachers)]


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return bool(value)


def loss_options(
    reduction: object,
    ignore_index: object,
    combine: object,
    divergence: object,
    beta: object,
    teacher_weighting: object,
    return_components: object,
    check_finite: object,
    skew: object = 0.1,
    scale_by_t2: object = True,
) -> LossOptions:
    """The validated loss options; a call with the options of an earlier one reuses its result."""
    arguments = (
        reduction, ignore_index, combine, divergence, beta, teacher_weighting, return_components,
        check_finite, skew, scale_by_t2,
    )  # fmt: skip
    try:
        return _cached_loss_options(*arguments)
    except TypeError as exc:
        if "unhashable" not in str(exc):
            raise
    return _checked_loss_options(*arguments)


def _checked_loss_options(
    reduction, ignore_index, combine, divergence, beta, teacher_weighting, return_components, check_finite,
    skew, scale_by_t2,
) -> LossOptions:  # fmt: skip
    for name, value, allowed in (
        ("reduction", reduction, _options.REDUCTIONS),
        ("combine", combine, _options.COMBINES),
        ("divergence", divergence, _options.DIVERGENCES),
        ("teacher_weighting", teacher_weighting, _options.WEIGHTINGS),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)
    ):
        raise TypeError(f"ignore_index must be an integer or None, got {type(ignore_index).__name__}")
    if ignore_index is not None and not _options.NO_IGNORE < int(ignore_index) <= np.iinfo(np.int64).max:
        raise ValueError(f"ignore_index must fit in int64 (and not be its minimum), got {ignore_index}")
    b = real(beta, "beta")
    if divergence == "jsd" and not 0.0 < b < 1.0:
        raise ValueError(f"beta must be in (0, 1) for divergence='jsd', got {b}")
    lam = real(skew, "skew")
    if divergence in ("skew_forward_kl", "skew_reverse_kl") and not 0.0 < lam <= 1.0:
        raise ValueError(f"skew must be in (0, 1] for divergence={divergence!r}, got {lam}")
    return LossOptions(
        reduction=reduction,
        ignore_index=None if ignore_index is None else int(ignore_index),
        combine=combine,
        divergence=divergence,
        beta=b,
        teacher_weighting=teacher_weighting,
        skew=lam,
        scale_by_t2=check_bool(scale_by_t2, "scale_by_t2"),
        return_components=check_bool(return_components, "return_components"),
        check_finite=check_bool(check_finite, "check_finite"),
    )


# typed: 1, 1.0 and True are different keys, so that a bool ignore_index is still refused.
_cached_loss_options = functools.lru_cache(maxsize=64, typed=True)(_checked_loss_options)


def weights(values: ArrayLike) -> NDArray[np.float64]:
    """Teacher weights normalized to sum 1, as a read-only float64 array."""
    try:
        raw = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"weights must be a sequence of real numbers: {exc}") from None
    if raw.dtype.kind not in "iuf":
        # Strings, None and other objects are not converted (NumPy would parse "1" and
        # turn None into NaN); a temperature given as a string is refused the same way.
        shown = f"dtype {raw.dtype}"
        if raw.dtype.kind in "OSU":
            numbers_only = (
                v for v in raw.reshape(-1).tolist() if isinstance(v, bool) or not isinstance(v, (int, float))
            )
            bad = next(numbers_only, None)
            shown = f"{bad!r} ({type(bad).__name__})"
        raise TypeError(f"weights must be a sequence of real numbers, got {shown}")
    w = np.array(raw, dtype=np.float64, copy=True)
    if w.ndim != 1:
        raise ValueError(f"weights must be a 1-D sequence, got shape {w.shape}")
    some_teachers(w.size)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"Teacher weights must be finite and non-negative, got {w.tolist()}")
    if w.max() > 0.0:
        w /= w.max()  # so that the sum cannot overflow
    total = w.sum()
    if not total > 0.0:
        raise ValueError("Teacher weights must sum to positive value")
    w /= total
    w.flags.writeable = False
    return w


def num_teachers(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"num_teachers must be an integer, got {type(value).__name__}")
    if value < 1:
        some_teachers(0)
    return int(value)


def eps(value: object) -> float:
    e = real(value, "eps")
    if not (e >= 0.0 and math.isfinite(e)):
        raise ValueError(f"eps must be finite and non-negative, got {e}")
    return e

"""User-facing classes: validation, weights and argument normalization.

The semantics are those of the Rust crate entrenar's ``distill`` module; error
messages repeat its wording where it has one.  No kernel code lives here: once
the arguments are checked and normalized, ``_dispatch`` runs the kernels.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from numba_kd import _dispatch

FloatArray = NDArray[np.floating[Any]]
TeacherLogits = Sequence[ArrayLike] | ArrayLike


def _real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _check_temperature(temperature: object) -> float:
    t = _real(temperature, "temperature")
    if not t > 0.0:
        raise ValueError(f"Temperature must be positive, got {t}")
    if not math.isfinite(t):
        raise ValueError(f"Temperature must be finite, got {t}")
    return t


def _check_alpha(alpha: object) -> float:
    a = _real(alpha, "alpha")
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"Alpha must be in [0, 1], got {a}")
    return a


def _float_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """The kernel dtype for logits of ``dtype``: float16 computes as float32."""
    if dtype.kind != "f" or dtype.itemsize > 8:
        raise TypeError(
            f"{name} must hold floating-point logits (float16, float32 or float64), got dtype {dtype}"
        )
    return np.dtype(np.float64) if dtype.itemsize == 8 else np.dtype(np.float32)


def _logits(x: ArrayLike, name: str, ndim: int = 2) -> np.ndarray:
    arr = np.asarray(x)
    target = _float_dtype(arr.dtype, name)
    if arr.ndim != ndim:
        expected = "[batch, classes]" if ndim == 2 else "[teachers, batch, classes]"
        raise ValueError(f"{name} must be a {ndim}-D {expected} array, got shape {arr.shape}")
    if arr.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one class, got shape {arr.shape}")
    # Casts only for float16 or non-native byte order; float32/float64 pass as views.
    return arr if arr.dtype == target else arr.astype(target)


def _teachers(teachers: TeacherLogits, n_weights: int) -> tuple[np.ndarray, ...] | np.ndarray:
    """A tuple of 2-D arrays (a list, read in place) or one 3-D array."""
    if isinstance(teachers, (list, tuple)):
        if len(teachers) == 0:
            raise ValueError("Must have at least one teacher")
        result: tuple[np.ndarray, ...] | np.ndarray = tuple(
            _logits(t, f"teachers[{k}]") for k, t in enumerate(teachers)
        )
        shapes = {t.shape for t in result}
        if len(shapes) > 1:
            raise ValueError(f"All teacher logits must have the same shape, got {sorted(shapes)}")
    else:
        arr = np.asarray(teachers)
        if arr.ndim != 3:
            raise ValueError(
                "teachers must be a list of [batch, classes] arrays or one "
                f"[teachers, batch, classes] array, got an array of shape {arr.shape}"
            )
        if arr.shape[0] == 0:
            raise ValueError("Must have at least one teacher")
        result = _logits(arr, "teachers", ndim=3)
    if len(result) != n_weights:
        raise ValueError(
            f"Number of teachers must match number of weights: {len(result)} teachers, {n_weights} weights"
        )
    return result


def _teacher_shape(teachers: tuple[np.ndarray, ...] | np.ndarray) -> tuple[int, int]:
    first = teachers[0]
    return first.shape[0], first.shape[1]


def _teacher_dtypes(teachers: tuple[np.ndarray, ...] | np.ndarray) -> list[np.dtype]:
    return [t.dtype for t in teachers] if isinstance(teachers, tuple) else [teachers.dtype]


def _cast_teachers(
    teachers: tuple[np.ndarray, ...] | np.ndarray, dtype: np.dtype
) -> tuple[np.ndarray, ...] | np.ndarray:
    """Promote to ``dtype`` (NumPy's rules); arrays already of it are not copied."""
    if isinstance(teachers, tuple):
        return tuple(t if t.dtype == dtype else t.astype(dtype) for t in teachers)
    return teachers if teachers.dtype == dtype else teachers.astype(dtype)


def _labels(labels: ArrayLike, n_rows: int, n_classes: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D array with one label per row, got shape {arr.shape}")
    if arr.shape[0] != n_rows:
        raise ValueError(f"labels has {arr.shape[0]} entries but the logits have {n_rows} rows")
    bad = (arr < 0) | (arr >= n_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"labels must be in [0, {n_classes}): labels[{first}] = {arr[first]}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _loss_inputs(
    student: ArrayLike, teachers: TeacherLogits, labels: ArrayLike, n_weights: int
) -> tuple[np.ndarray, tuple[np.ndarray, ...] | np.ndarray, np.ndarray]:
    s = _logits(student, "student")
    t = _teachers(teachers, n_weights)
    if s.shape != _teacher_shape(t):
        raise ValueError(
            f"student logits shape {s.shape} does not match teacher logits shape {_teacher_shape(t)}"
        )
    if s.shape[0] == 0:
        raise ValueError("student logits must have at least one row: the mean over rows is undefined")
    dtype = np.result_type(s.dtype, *_teacher_dtypes(t))
    s = s if s.dtype == dtype else s.astype(dtype)
    return s, _cast_teachers(t, dtype), _labels(labels, s.shape[0], s.shape[1])


class EnsembleDistiller:
    """Multi-teacher knowledge distillation (entrenar's ``EnsembleDistiller``).

    Parameters
    ----------
    weights:
        One non-negative weight per teacher; normalized to sum to 1.
    temperature:
        Softmax temperature ``T > 0``.
    """

    def __init__(self, weights: ArrayLike, temperature: float) -> None:
        try:
            w = np.array(weights, dtype=np.float64, copy=True)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"weights must be a sequence of real numbers: {exc}") from None
        if w.ndim != 1:
            raise ValueError(f"weights must be a 1-D sequence, got shape {w.shape}")
        if w.size == 0:
            raise ValueError("Must have at least one teacher")
        self._temperature = _check_temperature(temperature)
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"Teacher weights must be finite and non-negative, got {w.tolist()}")
        total = w.sum()
        if not total > 0.0:
            raise ValueError("Teacher weights must sum to positive value")
        w /= total
        w.flags.writeable = False
        self._weights = w

    @classmethod
    def uniform(cls, num_teachers: int, temperature: float) -> EnsembleDistiller:
        """Equal weights for ``num_teachers`` teachers."""
        if isinstance(num_teachers, bool) or not isinstance(num_teachers, numbers.Integral):
            raise TypeError(f"num_teachers must be an integer, got {type(num_teachers).__name__}")
        if num_teachers < 1:
            raise ValueError("Must have at least one teacher")
        return cls(np.ones(int(num_teachers)), temperature)

    @property
    def weights(self) -> NDArray[np.float64]:
        """Normalized teacher weights (read-only, sum to 1)."""
        return self._weights

    @property
    def temperature(self) -> float:
        return self._temperature

    @property
    def num_teachers(self) -> int:
        return int(self._weights.shape[0])

    def __repr__(self) -> str:
        return f"EnsembleDistiller(weights={self._weights.tolist()}, temperature={self._temperature})"

    def combine_teachers(self, teachers: TeacherLogits) -> FloatArray:
        """Weighted average of the teacher logits, ``sum_k w_k t_k``: ``[B, C]``."""
        t = self._checked_teachers(teachers)
        out = np.empty(_teacher_shape(t), dtype=np.result_type(*_teacher_dtypes(t)))
        _dispatch.combine_logits(_cast_teachers(t, out.dtype), self._weights, out)
        return out

    def combine_via_probabilities(self, teachers: TeacherLogits, eps: float = 1e-10) -> FloatArray:
        """``T * log(sum_k w_k softmax(t_k / T) + eps)``: ``[B, C]``.

        ``eps = 0`` gives the exact log-mixture, computed in log space.
        """
        e = _real(eps, "eps")
        if not (e >= 0.0 and math.isfinite(e)):
            raise ValueError(f"eps must be finite and non-negative, got {e}")
        t = self._checked_teachers(teachers)
        out = np.empty(_teacher_shape(t), dtype=np.result_type(*_teacher_dtypes(t)))
        _dispatch.combine_probabilities(
            _cast_teachers(t, out.dtype), self._weights, self._temperature, e, out
        )
        return out

    def distillation_loss(
        self, student: ArrayLike, teachers: TeacherLogits, labels: ArrayLike, alpha: float
    ) -> float:
        """``alpha * T^2 * mean KL(p || q) + (1 - alpha) * mean CE`` with ``p`` from the
        weighted logit average of the teachers."""
        a = _check_alpha(alpha)
        s, t, y = _loss_inputs(student, teachers, labels, self.num_teachers)
        soft, hard = _dispatch.distillation_loss_terms(s, t, self._weights, y, self._temperature, a)
        return soft + hard

    def _checked_teachers(self, teachers: TeacherLogits) -> tuple[np.ndarray, ...] | np.ndarray:
        return _teachers(teachers, self.num_teachers)


_SINGLE_TEACHER_WEIGHT = np.ones(1)
_SINGLE_TEACHER_WEIGHT.flags.writeable = False


class DistillationLoss:
    """Single-teacher distillation loss (entrenar's ``DistillationLoss``).

    ``alpha * T^2 * mean KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * mean CE(s, y)``.
    """

    def __init__(self, temperature: float, alpha: float) -> None:
        self._temperature = _check_temperature(temperature)
        self._alpha = _check_alpha(alpha)

    @property
    def temperature(self) -> float:
        return self._temperature

    @property
    def alpha(self) -> float:
        return self._alpha

    def __repr__(self) -> str:
        return f"DistillationLoss(temperature={self._temperature}, alpha={self._alpha})"

    def forward(self, student: ArrayLike, teacher: ArrayLike, labels: ArrayLike) -> float:
        """The loss of ``student`` logits against one ``teacher``'s logits, as a float."""
        s, t, y = _loss_inputs(student, (_logits(teacher, "teacher"),), labels, 1)
        soft, hard = _dispatch.distillation_loss_terms(
            s, t, _SINGLE_TEACHER_WEIGHT, y, self._temperature, self._alpha
        )
        return soft + hard

    __call__ = forward

"""User-facing classes: validation, weights and argument normalization.

The semantics are those of the Rust crate entrenar's ``distill`` module; error
messages repeat its wording where it has one.  No kernel code lives here: once
the arguments are checked and normalized, ``_dispatch`` runs the kernels.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from numba_kd import _dispatch

TeacherLogits = Sequence[ArrayLike] | ArrayLike
Device = Literal["cpu", "cuda"] | None


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


def _logits(backend, x: object, name: str, ndim: int = 2):
    arr = backend.asarray(x)
    target = _float_dtype(np.dtype(arr.dtype), name)
    shape = tuple(arr.shape)
    if len(shape) != ndim:
        expected = "[batch, classes]" if ndim == 2 else "[teachers, batch, classes]"
        raise ValueError(f"{name} must be a {ndim}-D {expected} array, got shape {shape}")
    if shape[-1] == 0:
        raise ValueError(f"{name} must have at least one class, got shape {shape}")
    # Casts only float16 or non-native byte order; float32/float64 pass as they are.
    return arr if np.dtype(arr.dtype) == target else backend.cast(arr, target, name)


def _teachers(backend, teachers: TeacherLogits, n_weights: int):
    """A tuple of 2-D arrays (a list, read in place) or one 3-D array."""
    if isinstance(teachers, (list, tuple)):
        if len(teachers) == 0:
            raise ValueError("Must have at least one teacher")
        result = tuple(_logits(backend, t, f"teachers[{k}]") for k, t in enumerate(teachers))
        shapes = {tuple(t.shape) for t in result}
        if len(shapes) > 1:
            raise ValueError(f"All teacher logits must have the same shape, got {sorted(shapes)}")
    else:
        arr = backend.asarray(teachers)
        if arr.ndim != 3:
            raise ValueError(
                "teachers must be a list of [batch, classes] arrays or one "
                f"[teachers, batch, classes] array, got an array of shape {tuple(arr.shape)}"
            )
        if arr.shape[0] == 0:
            raise ValueError("Must have at least one teacher")
        result = _logits(backend, arr, "teachers", ndim=3)
    if len(result) != n_weights:
        raise ValueError(
            f"Number of teachers must match number of weights: {len(result)} teachers, {n_weights} weights"
        )
    return result


def _teacher_shape(teachers) -> tuple[int, int]:
    shape = teachers[0].shape if isinstance(teachers, tuple) else teachers.shape[1:]
    return int(shape[0]), int(shape[1])


def _teacher_dtypes(teachers) -> list[np.dtype]:
    arrays = teachers if isinstance(teachers, tuple) else (teachers,)
    return [np.dtype(t.dtype) for t in arrays]


def _cast_teachers(backend, teachers, dtype: np.dtype):
    """Teachers as ``dtype``; only those of another dtype are converted."""
    if isinstance(teachers, tuple):
        return tuple(
            t if np.dtype(t.dtype) == dtype else backend.cast(t, dtype, f"teachers[{k}]")
            for k, t in enumerate(teachers)
        )
    return teachers if np.dtype(teachers.dtype) == dtype else backend.cast(teachers, dtype, "teachers")


def _loss_inputs(backend, student: object, teachers: TeacherLogits, labels: object, n_weights: int):
    s = _logits(backend, student, "student")
    t = _teachers(backend, teachers, n_weights)
    if tuple(s.shape) != _teacher_shape(t):
        raise ValueError(
            f"student logits shape {tuple(s.shape)} does not match teacher logits shape {_teacher_shape(t)}"
        )
    if s.shape[0] == 0:
        raise ValueError("student logits must have at least one row: the mean over rows is undefined")
    dtype = np.result_type(s.dtype, *_teacher_dtypes(t))
    if np.dtype(s.dtype) != dtype:
        s = backend.cast(s, dtype, "student")
    return s, _cast_teachers(backend, t, dtype), backend.labels(labels, s.shape[0], s.shape[1])


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

    def combine_teachers(
        self, teachers: TeacherLogits, *, device: Device = None, stream: object = None
    ) -> Any:
        """Weighted average of the teacher logits, ``sum_k w_k t_k``: ``[B, C]``.

        The result lives where the teachers live (see :ref:`Devices <devices>`).
        """
        backend = _dispatch.backend_for([teachers], device, stream)
        t, out = self._combine_inputs(backend, teachers)
        backend.combine_logits(t, self._weights, out)
        return backend.wrap(out, _first(teachers))

    def combine_via_probabilities(
        self, teachers: TeacherLogits, eps: float = 1e-10, *, device: Device = None, stream: object = None
    ) -> Any:
        """``T * log(sum_k w_k softmax(t_k / T) + eps)``: ``[B, C]``.

        ``eps = 0`` gives the exact log-mixture, computed in log space.
        """
        e = _real(eps, "eps")
        if not (e >= 0.0 and math.isfinite(e)):
            raise ValueError(f"eps must be finite and non-negative, got {e}")
        backend = _dispatch.backend_for([teachers], device, stream)
        t, out = self._combine_inputs(backend, teachers)
        backend.combine_probabilities(t, self._weights, self._temperature, e, out)
        return backend.wrap(out, _first(teachers))

    def distillation_loss(
        self,
        student: ArrayLike,
        teachers: TeacherLogits,
        labels: ArrayLike,
        alpha: float,
        *,
        device: Device = None,
        stream: object = None,
        return_device_scalar: bool = False,
    ) -> Any:
        """``alpha * T^2 * mean KL(p || q) + (1 - alpha) * mean CE`` with ``p`` from the
        weighted logit average of the teachers, as a Python float.

        With CUDA inputs and ``return_device_scalar=True`` the loss stays on the
        device as a 1-element array and the call does not synchronize.
        """
        a = _check_alpha(alpha)
        backend = _dispatch.backend_for([student, teachers, labels], device, stream)
        s, t, y = _loss_inputs(backend, student, teachers, labels, self.num_teachers)
        loss = backend.loss(s, t, self._weights, y, self._temperature, a, return_device_scalar)
        return backend.wrap(loss, student) if return_device_scalar else loss

    def _combine_inputs(self, backend, teachers: TeacherLogits):
        t = _teachers(backend, teachers, self.num_teachers)
        dtype = np.result_type(*_teacher_dtypes(t))
        return _cast_teachers(backend, t, dtype), backend.empty(_teacher_shape(t), dtype)


def _first(teachers: TeacherLogits) -> object:
    return teachers[0] if isinstance(teachers, (list, tuple)) and len(teachers) else teachers


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

    def forward(
        self,
        student: ArrayLike,
        teacher: ArrayLike,
        labels: ArrayLike,
        *,
        device: Device = None,
        stream: object = None,
        return_device_scalar: bool = False,
    ) -> Any:
        """The loss of ``student`` logits against one ``teacher``'s logits, as a float
        (or a 1-element device array with ``return_device_scalar=True``)."""
        backend = _dispatch.backend_for([student, teacher, labels], device, stream)
        t = (_logits(backend, teacher, "teacher"),)
        s, t, y = _loss_inputs(backend, student, t, labels, 1)
        loss = backend.loss(
            s, t, _SINGLE_TEACHER_WEIGHT, y, self._temperature, self._alpha, return_device_scalar
        )
        return backend.wrap(loss, student) if return_device_scalar else loss

    __call__ = forward

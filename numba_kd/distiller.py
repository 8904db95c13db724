"""User-facing classes: validation, weights and argument normalization.

The semantics are those of the Rust crate entrenar's ``distill`` module; error
messages repeat its wording where it has one.  No kernel code lives here: once
the arguments are checked and normalized, the backend that ``_targets`` picks
runs the kernels.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from numba_kd import _arrays, _options, _targets
from numba_kd._options import LossComponents, LossOptions

TeacherLogits = Sequence[ArrayLike] | ArrayLike
Device = Literal["cpu", "cuda"] | None
Reduction = Literal["mean", "sum", "none"]
Combine = Literal["logits", "probs"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Weighting = Literal["static", "confidence", "entropy"]


def _real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


# Above this the soft term T^2 KL, a difference of log-sum-exps that agree to about
# 1/T^2 of their size, has no correct digits left in float64 (its error is about
# 1e-16 T^2 relative: 1e-4 here).
MAX_TEMPERATURE = 1e6


def _check_temperature(temperature: object) -> float:
    t = _real(temperature, "temperature")
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


def _check_alpha(alpha: object) -> float:
    a = _real(alpha, "alpha")
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"Alpha must be in [0, 1], got {a}")
    return a


_KERNEL_DTYPES = {
    np.dtype(np.float16): np.dtype(np.float32),
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float64),
}


def _float_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """The kernel dtype for logits of ``dtype``: float16 computes as float32."""
    known = _KERNEL_DTYPES.get(dtype)
    if known is not None:
        return known
    if dtype.kind != "f" or dtype.itemsize > 8:
        raise TypeError(
            f"{name} must hold floating-point logits (float16, float32 or float64), got dtype {dtype}"
        )
    return np.dtype(np.float64) if dtype.itemsize == 8 else np.dtype(np.float32)


_SHAPE_NAMES = {
    2: "[batch, classes]",
    3: "[batch, sequence, classes]",
    4: "[teachers, batch, sequence, classes]",
}


def _asarray(backend, x: object, name: str):
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


def _logits(backend, x: object, name: str, ndim: int | tuple[int, ...] = 2):
    arr = _asarray(backend, x, name)
    target = _float_dtype(np.dtype(arr.dtype), name)
    shape = tuple(arr.shape)
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if len(shape) not in allowed:
        expected = " or ".join(f"{n}-D {_SHAPE_NAMES.get(n, '')}" for n in allowed)
        if len(allowed) == 1 and allowed[0] == 3 and name == "teachers":
            expected = "3-D [teachers, batch, classes]"
        raise ValueError(f"{name} must be a {expected} array, got shape {shape}")
    if shape[-1] == 0:
        raise ValueError(f"{name} must have at least one class, got shape {shape}")
    # Casts only float16 or non-native byte order; float32/float64 pass as they are.
    return arr if np.dtype(arr.dtype) == target else backend.cast(arr, target, name)


def _teachers(backend, teachers: TeacherLogits, n_weights: int, ndim: int = 2):
    """A tuple of ``ndim``-D arrays (a list, read in place) or one (ndim + 1)-D array."""
    if isinstance(teachers, (list, tuple)):
        if len(teachers) == 0:
            raise ValueError("Must have at least one teacher")
        result = tuple(_logits(backend, t, f"teachers[{k}]", ndim) for k, t in enumerate(teachers))
        shapes = {tuple(t.shape) for t in result}
        if len(shapes) > 1:
            raise ValueError(f"All teacher logits must have the same shape, got {sorted(shapes)}")
    else:
        arr = _asarray(backend, teachers, "teachers")
        if arr.ndim != ndim + 1:
            raise ValueError(
                f"teachers must be a list of {_SHAPE_NAMES[ndim]} arrays or one "
                f"{ndim + 1}-D array stacking them, got an array of shape {tuple(arr.shape)}"
            )
        if arr.shape[0] == 0:
            raise ValueError("Must have at least one teacher")
        result = _logits(backend, arr, "teachers", ndim + 1)
    if len(result) != n_weights:
        raise ValueError(
            f"Number of teachers must match number of weights: {len(result)} teachers, {n_weights} weights"
        )
    return result


def _teacher_shape(teachers) -> tuple[int, ...]:
    shape = teachers[0].shape if isinstance(teachers, tuple) else teachers.shape[1:]
    return tuple(int(n) for n in shape)


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


def _loss_inputs(backend, student: object, teachers: TeacherLogits, labels: object, n_weights: int, options):
    """Validated rows: (student [N, C], teachers, labels [N], shape of the labels).

    3-D inputs [B, S, C] with labels [B, S] become B*S rows (a reshape, which is a
    view for any array whose first two axes can be merged)."""
    s = _logits(backend, student, "student", (2, 3))
    t = _teachers(backend, teachers, n_weights, s.ndim)
    if tuple(s.shape) != _teacher_shape(t):
        raise ValueError(
            f"student logits shape {tuple(s.shape)} does not match teacher logits shape {_teacher_shape(t)}"
        )
    shape = tuple(int(n) for n in s.shape)
    lead = shape[:-1]
    n_rows, n_classes = math.prod(lead), shape[-1]
    if n_rows == 0:
        raise ValueError("student logits must have at least one row: the mean over rows is undefined")
    dtypes = _teacher_dtypes(t)
    same = all(d == s.dtype for d in dtypes)
    dtype = np.dtype(s.dtype) if same else np.result_type(s.dtype, *dtypes)
    if np.dtype(s.dtype) != dtype:
        s = backend.cast(s, dtype, "student")
    t = _cast_teachers(backend, t, dtype)
    y = _asarray(backend, labels, "labels")
    if len(shape) == 3:
        if tuple(y.shape) != lead:
            raise ValueError(f"labels must have shape {lead} for student logits of shape {shape}")
        backend.merge_rows(_named_inputs(s, t, y))
        s = s.reshape(n_rows, n_classes)
        y = y.reshape(n_rows)
        if isinstance(t, tuple):
            t = tuple(x.reshape(n_rows, n_classes) for x in t)
        else:
            t = t.reshape(len(t), n_rows, n_classes)
    return s, t, backend.labels(y, n_rows, n_classes, options.ignore_index), lead


def _named_inputs(s, t, y) -> list[tuple[str, Any]]:
    return [("student", s), ("labels", y), *_named_teachers(t)]


def _check_finite(backend, arrays: list[tuple[str, Any]]) -> None:
    for name, arr in arrays:
        if backend.has_nonfinite(arr):
            raise ValueError(f"{name} holds NaN or infinite values (check_finite=True)")


def _named_teachers(teachers, single: bool = False) -> list[tuple[str, Any]]:
    if single:
        return [("teacher", teachers[0])]
    if isinstance(teachers, tuple):
        return [(f"teachers[{k}]", t) for k, t in enumerate(teachers)]
    return [("teachers", teachers)]


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return bool(value)


def _loss_options(reduction, ignore_index, combine, divergence, beta, teacher_weighting) -> LossOptions:
    """The validated options; a call with the options of an earlier one reuses its result."""
    try:
        return _cached_loss_options(reduction, ignore_index, combine, divergence, beta, teacher_weighting)
    except TypeError as exc:
        if "unhashable" not in str(exc):
            raise
    return _checked_loss_options(reduction, ignore_index, combine, divergence, beta, teacher_weighting)


def _checked_loss_options(
    reduction, ignore_index, combine, divergence, beta, teacher_weighting
) -> LossOptions:
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
    b = _real(beta, "beta")
    if divergence == "jsd" and not 0.0 < b < 1.0:
        raise ValueError(f"beta must be in (0, 1) for divergence='jsd', got {b}")
    return LossOptions(
        reduction=reduction,
        ignore_index=None if ignore_index is None else int(ignore_index),
        combine=combine,
        divergence=divergence,
        beta=b,
        teacher_weighting=teacher_weighting,
    )


# typed: 1, 1.0 and True are different keys, so that a bool ignore_index is still refused.
_cached_loss_options = functools.lru_cache(maxsize=64, typed=True)(_checked_loss_options)


def _dask():
    """The dask path (imports dask): only for dask inputs."""
    from numba_kd import _dask

    return _dask


def _loss_kwargs(options: LossOptions, return_components: bool, check_finite: bool) -> dict[str, Any]:
    return {
        "reduction": options.reduction,
        "ignore_index": options.ignore_index,
        "combine": options.combine,
        "divergence": options.divergence,
        "beta": options.beta,
        "teacher_weighting": options.teacher_weighting,
        "return_components": return_components,
        "check_finite": check_finite,
    }


def _evaluate(
    backend, like, batch, weights, temperature, alpha, options, *, want_grad, components, device_scalar, out,
):  # fmt: skip
    """Run the loss kernels on ``batch`` (student, teachers, labels, lead shape) and
    shape the results as the caller's inputs."""
    s, t, y, lead = batch
    grad_out = None
    if out is not None:
        if not want_grad:
            raise TypeError("out= is an argument of loss_and_grad (it receives the gradient)")
        target = backend.output(out, (*lead, s.shape[1]), np.dtype(s.dtype), [s, t, y])
        grad_out = target.reshape(s.shape)
    loss, soft, hard, grad = backend.loss(
        s, t, weights, y, temperature, alpha, options, want_grad, device_scalar, grad_out
    )
    if options.reduction == "none":
        loss, soft, hard = (backend.wrap(x.reshape(lead), like) for x in (loss, soft, hard))
    elif device_scalar:
        loss, soft, hard = (backend.wrap(x, like) for x in (loss, soft, hard))
    result = LossComponents(loss, soft, hard) if components else loss
    if not want_grad:
        return result
    if out is not None:
        return result, out
    return result, backend.wrap(grad.reshape((*lead, s.shape[1])), like)


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
        if w.max() > 0.0:
            w /= w.max()  # so that the sum cannot overflow
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
        self,
        teachers: TeacherLogits,
        *,
        out: Any = None,
        check_finite: bool = False,
        device: Device = None,
        stream: object = None,
    ) -> Any:
        """Weighted average of the teacher logits, ``sum_k w_k t_k``: ``[B, C]``.

        The result lives where the teachers live (see :ref:`Devices <devices>`);
        ``out`` receives it when given (and is returned).
        """
        if _arrays.has_dask_array([teachers]):
            return _dask().combine(
                self, teachers, "combine_teachers", {"check_finite": check_finite}, device, out
            )
        backend = _targets.backend_for([teachers], device, stream)
        t, result = self._combine_inputs(backend, teachers, out, check_finite)
        backend.combine_logits(t, self._weights, result)
        return out if out is not None else backend.wrap(result, _first(teachers))

    def combine_via_probabilities(
        self,
        teachers: TeacherLogits,
        eps: float = 1e-10,
        *,
        out: Any = None,
        check_finite: bool = False,
        device: Device = None,
        stream: object = None,
    ) -> Any:
        """``T * log(sum_k w_k softmax(t_k / T) + eps)``: ``[B, C]``.

        ``eps = 0`` gives the exact log-mixture, computed in log space.  A row in
        which any teacher holds a NaN or an infinity is NaN.
        """
        e = _real(eps, "eps")
        if not (e >= 0.0 and math.isfinite(e)):
            raise ValueError(f"eps must be finite and non-negative, got {e}")
        if _arrays.has_dask_array([teachers]):
            kwargs = {"eps": e, "check_finite": check_finite}
            return _dask().combine(self, teachers, "combine_via_probabilities", kwargs, device, out)
        backend = _targets.backend_for([teachers], device, stream)
        t, result = self._combine_inputs(backend, teachers, out, check_finite)
        backend.combine_probabilities(t, self._weights, self._temperature, e, result)
        return out if out is not None else backend.wrap(result, _first(teachers))

    def distillation_loss(
        self,
        student: ArrayLike,
        teachers: TeacherLogits,
        labels: ArrayLike,
        alpha: float,
        *,
        reduction: Reduction = "mean",
        ignore_index: int | None = None,
        combine: Combine = "logits",
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        teacher_weighting: Weighting = "static",
        return_components: bool = False,
        check_finite: bool = False,
        device: Device = None,
        stream: object = None,
        return_device_scalar: bool = False,
    ) -> Any:
        """``alpha * T^2 * D(p, q) + (1 - alpha) * CE`` reduced over rows.

        By default (entrenar's loss) ``D`` is ``KL(p || q)``, ``p = softmax(z / T)``
        with ``z`` the weighted logit average of the teachers, and the result is
        the mean over rows as a Python float.  See the user guide for every
        option; ``return_components=True`` returns ``LossComponents(loss, soft, hard)``.
        """
        return self._loss(
            student,
            teachers,
            labels,
            alpha,
            want_grad=False,
            out=None,
            reduction=reduction,
            ignore_index=ignore_index,
            combine=combine,
            divergence=divergence,
            beta=beta,
            teacher_weighting=teacher_weighting,
            return_components=return_components,
            check_finite=check_finite,
            device=device,
            stream=stream,
            return_device_scalar=return_device_scalar,
        )

    def loss_and_grad(
        self,
        student: ArrayLike,
        teachers: TeacherLogits,
        labels: ArrayLike,
        alpha: float,
        *,
        reduction: Reduction = "mean",
        ignore_index: int | None = None,
        combine: Combine = "logits",
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        teacher_weighting: Weighting = "static",
        return_components: bool = False,
        out: Any = None,
        check_finite: bool = False,
        device: Device = None,
        stream: object = None,
        return_device_scalar: bool = False,
    ) -> tuple[Any, Any]:
        """``(loss, grad)``: the loss of :meth:`distillation_loss` (on the CPU the same
        value, bit for bit) and its gradient with respect to the student logits,
        shaped like them, in the computation dtype (float16 logits compute in
        float32; mixed dtypes promote as NumPy does).  With ``reduction="none"`` the
        gradient is that of the sum of the per-row losses; ignored rows get a zero
        gradient.  ``out`` receives the gradient when given (and is returned)."""
        return self._loss(
            student,
            teachers,
            labels,
            alpha,
            want_grad=True,
            out=out,
            reduction=reduction,
            ignore_index=ignore_index,
            combine=combine,
            divergence=divergence,
            beta=beta,
            teacher_weighting=teacher_weighting,
            return_components=return_components,
            check_finite=check_finite,
            device=device,
            stream=stream,
            return_device_scalar=return_device_scalar,
        )

    def _loss(
        self,
        student,
        teachers,
        labels,
        alpha,
        *,
        want_grad,
        out,
        reduction,
        ignore_index,
        combine,
        divergence,
        beta,
        teacher_weighting,
        return_components,
        check_finite,
        device,
        stream,
        return_device_scalar,
    ):
        a = _check_alpha(alpha)
        options = _loss_options(reduction, ignore_index, combine, divergence, beta, teacher_weighting)
        if _arrays.has_dask_array([student, teachers, labels]):

            def call(s, t, y, grad, **kw):
                return (self.loss_and_grad if grad else self.distillation_loss)(s, t, y, a, **kw)

            kwargs = _loss_kwargs(options, return_components, check_finite)
            return _dask().loss(
                call, student, teachers, labels, want_grad, kwargs, device, out, return_device_scalar
            )
        backend = _targets.backend_for([student, teachers, labels], device, stream)
        s, t, y, lead = _loss_inputs(backend, student, teachers, labels, self.num_teachers, options)
        if _check_bool(check_finite, "check_finite"):
            _check_finite(backend, [("student", s), *_named_teachers(t)])
        return _evaluate(
            backend,
            student,
            (s, t, y, lead),
            self._weights,
            self._temperature,
            a,
            options,
            want_grad=want_grad,
            components=return_components,
            device_scalar=return_device_scalar,
            out=out,
        )

    def _combine_inputs(self, backend, teachers: TeacherLogits, out: Any, check_finite: bool):
        """(teachers as one dtype, the array that receives the result)."""
        t = _teachers(backend, teachers, self.num_teachers)
        dtype = np.result_type(*_teacher_dtypes(t))
        t = _cast_teachers(backend, t, dtype)
        if _check_bool(check_finite, "check_finite"):
            _check_finite(backend, _named_teachers(t))
        shape = _teacher_shape(t)
        if out is None:
            return t, backend.empty(shape, dtype)
        return t, backend.output(out, shape, np.dtype(dtype), [t])


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
        reduction: Reduction = "mean",
        ignore_index: int | None = None,
        combine: Combine = "logits",
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        teacher_weighting: Weighting = "static",
        return_components: bool = False,
        check_finite: bool = False,
        device: Device = None,
        stream: object = None,
        return_device_scalar: bool = False,
    ) -> Any:
        """The loss of ``student`` logits against one ``teacher``'s logits, as a float
        (options as in :meth:`EnsembleDistiller.distillation_loss`; with one teacher
        ``combine`` and ``teacher_weighting`` change nothing)."""
        return self._loss(
            student,
            teacher,
            labels,
            want_grad=False,
            out=None,
            reduction=reduction,
            ignore_index=ignore_index,
            combine=combine,
            divergence=divergence,
            beta=beta,
            teacher_weighting=teacher_weighting,
            return_components=return_components,
            check_finite=check_finite,
            device=device,
            stream=stream,
            return_device_scalar=return_device_scalar,
        )

    def loss_and_grad(
        self,
        student: ArrayLike,
        teacher: ArrayLike,
        labels: ArrayLike,
        *,
        reduction: Reduction = "mean",
        ignore_index: int | None = None,
        combine: Combine = "logits",
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        teacher_weighting: Weighting = "static",
        return_components: bool = False,
        out: Any = None,
        check_finite: bool = False,
        device: Device = None,
        stream: object = None,
        return_device_scalar: bool = False,
    ) -> tuple[Any, Any]:
        """``(loss, grad)`` with the gradient with respect to the student logits
        (written into ``out`` when given)."""
        return self._loss(
            student,
            teacher,
            labels,
            want_grad=True,
            out=out,
            reduction=reduction,
            ignore_index=ignore_index,
            combine=combine,
            divergence=divergence,
            beta=beta,
            teacher_weighting=teacher_weighting,
            return_components=return_components,
            check_finite=check_finite,
            device=device,
            stream=stream,
            return_device_scalar=return_device_scalar,
        )

    def _loss(
        self,
        student,
        teacher,
        labels,
        *,
        want_grad,
        out,
        reduction,
        ignore_index,
        combine,
        divergence,
        beta,
        teacher_weighting,
        return_components,
        check_finite,
        device,
        stream,
        return_device_scalar,
    ):
        options = _loss_options(reduction, ignore_index, combine, divergence, beta, teacher_weighting)
        if _arrays.has_dask_array([student, teacher, labels]):

            def call(s, t, y, grad, **kw):
                return (self.loss_and_grad if grad else self.forward)(s, t[0], y, **kw)

            kwargs = _loss_kwargs(options, return_components, check_finite)
            return _dask().loss(
                call, student, [teacher], labels, want_grad, kwargs, device, out, return_device_scalar
            )
        backend = _targets.backend_for([student, teacher, labels], device, stream)
        s = _asarray(backend, student, "student")
        t = (_logits(backend, teacher, "teacher", s.ndim if s.ndim in (2, 3) else (2, 3)),)
        s, t, y, lead = _loss_inputs(backend, s, t, labels, 1, options)
        if _check_bool(check_finite, "check_finite"):
            _check_finite(backend, [("student", s), *_named_teachers(t, single=True)])
        return _evaluate(
            backend,
            student,
            (s, t, y, lead),
            _SINGLE_TEACHER_WEIGHT,
            self._temperature,
            self._alpha,
            options,
            want_grad=want_grad,
            components=return_components,
            device_scalar=return_device_scalar,
            out=out,
        )

    __call__ = forward

"""The internal entry points of the public classes: ``loss`` and ``combine``.

Each public method is one call into these, with the validated options and a
``Placement`` (where the work runs and where the result goes).  They route dask
inputs to ``_dask`` and everything else to the backend ``_targets`` picks, and
return results shaped like the caller's inputs.  ``DistillationLoss`` is the
one-teacher case of the same path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import numpy as np

from numba_kd import _arrays, _math, _targets, _validate, sparse
from numba_kd._options import LossComponents, LossOptions, SparseTeachers


class Placement(NamedTuple):
    """Where a call runs and where its result goes."""

    #: "cpu" or "cuda" to force a target (copying the inputs there); None: where the inputs live.
    device: str | None = None
    #: The CUDA stream to launch on (a numba stream or a raw handle); None: the inputs' stream.
    stream: object = None
    #: The array that receives the result (the gradient, for loss_and_grad).
    out: object = None
    #: CUDA only: return losses as 1-element device arrays, without synchronizing.
    return_device_scalar: bool = False


_SINGLE_TEACHER_WEIGHT = np.ones(1)
_SINGLE_TEACHER_WEIGHT.flags.writeable = False


def _dask():
    """The dask path (imports dask): only for dask inputs."""
    from numba_kd import _dask

    return _dask


def loss(
    weights: np.ndarray | None,
    temperature: float,
    student: object,
    teachers: object,
    labels: object,
    alpha: float,
    options: LossOptions,
    placement: Placement,
    *,
    want_grad: bool,
) -> Any:
    """The loss (and with ``want_grad`` its gradient) of ``student`` against ``teachers``.

    ``weights`` None means one teacher: ``teachers`` is then that teacher's
    logits (``DistillationLoss``), named "teacher" in errors.
    """
    single = weights is None
    a = _validate.check_alpha(alpha)
    if isinstance(teachers, sparse.TopK):
        return _topk_loss(weights, temperature, student, teachers, labels, a, options, placement, want_grad)
    if _is_default(placement):
        layout = _arrays.host_layout(student, teachers, labels)
        if layout is not None and (layout, 0 if single else len(weights)) in _PLAIN_LAYOUTS:
            return _plain_host_loss(weights, temperature, student, teachers, labels, a, options, want_grad)
    if _arrays.has_dask_array([student, teachers, labels]):

        def call(s, t, y, grad, **kwargs):
            options = _validate.loss_options(**kwargs)
            teachers = t[0] if single else t
            return loss(weights, temperature, s, teachers, y, a, options, Placement(), want_grad=grad)

        return _dask().loss(
            call, student, [teachers] if single else teachers, labels, want_grad,
            dataclasses.asdict(options), placement.device, placement.out, placement.return_device_scalar,
        )  # fmt: skip
    backend = _targets.backend_for([student, teachers, labels], placement.device, placement.stream)
    if single:
        s = _validate.asarray(backend, student, "student")
        t = (_validate.logits(backend, teachers, "teacher", s.ndim if s.ndim in (2, 3) else (2, 3)),)
        s, t, y, lead = _validate.loss_inputs(backend, s, t, labels, 1, options)
        named = _validate.named_teachers(t, single=True)
    else:
        s, t, y, lead = _validate.loss_inputs(backend, student, teachers, labels, len(weights), options)
        named = _validate.named_teachers(t)
    if options.check_finite:
        _validate.refuse_nonfinite(backend, [("student", s), *named], _ignored(y, options))
    w = _SINGLE_TEACHER_WEIGHT if single else weights
    result = _evaluate(backend, student, (s, t, y, lead), w, temperature, a, options, placement, want_grad)
    if _is_default(placement) and _is_plain(backend, student, teachers, labels, (s, t, y, lead), single):
        if len(_PLAIN_LAYOUTS) >= _MAX_PLAIN_LAYOUTS:
            _PLAIN_LAYOUTS.clear()
        _PLAIN_LAYOUTS.add((_arrays.host_layout(student, teachers, labels), 0 if single else len(weights)))
    return result


_HERE = Placement()


def _topk_loss(weights, temperature, student, top, labels, alpha, options, placement, want_grad):
    """``loss`` against sparse top-k teachers (``top``, a TopK)."""
    n_teachers = top.num_teachers
    if weights is None and n_teachers != 1:
        raise ValueError(f"DistillationLoss takes one teacher; this TopK holds {n_teachers}")
    if weights is not None and n_teachers != len(weights):
        raise ValueError("Number of teachers must match number of weights")
    if n_teachers > 1 and options.combine != "probs":
        raise ValueError(
            'TopK teachers combine as a probability mixture: pass combine="probs" (logits of '
            "different top-k supports cannot be averaged)"
        )
    if options.teacher_weighting == "confidence" and top.tail == "bucket":
        raise ValueError(
            'teacher_weighting="confidence" is undefined for tail="bucket": a label that a teacher did '
            'not store has no probability of its own in the bucket; use tail="uniform" or "renormalize"'
        )
    if options.divergence not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError(
            f"divergence={options.divergence!r} is not available with TopK teachers: use "
            '"forward_kl", "reverse_kl" or "jsd"'
        )
    if options.divergence == "reverse_kl" and top.tail == "renormalize":
        raise ValueError(
            'divergence="reverse_kl" is undefined for tail="renormalize": the target is 0 outside the '
            'teachers\' supports, where the student is not; use tail="bucket" or "uniform"'
        )
    if _arrays.has_dask_array([student, labels]):
        raise TypeError("TopK teachers take NumPy or CUDA student logits and labels, not dask arrays")
    backend = _targets.backend_for([student, labels], placement.device, placement.stream)
    s = _validate.logits(backend, student, "student", (2, 3))
    shape = tuple(int(n) for n in s.shape)
    lead = shape[:-1]
    n_rows, n_classes = math.prod(lead), shape[-1]
    if n_rows == 0:
        raise ValueError("student logits must have at least one row: the mean over rows is undefined")
    y = _validate.asarray(backend, labels, "labels")
    if tuple(y.shape) != lead:
        raise ValueError(f"labels must have shape {lead} for student logits of shape {shape}")
    if len(lead) > 1:
        backend.merge_rows([("student", s), ("labels", y)])
    s = s.reshape(n_rows, n_classes)
    y = backend.labels(y.reshape(n_rows), n_rows, n_classes, options.ignore_index)
    if options.check_finite:
        _validate.refuse_nonfinite(backend, [("student", s)], _ignored(y, options))
    dtype = np.dtype(np.float64) if s.dtype == np.float64 else np.dtype(np.float32)
    # The stored entries are host arrays and are checked there, skipping the rows
    # whose labels (copied from the device for CUDA inputs) are ignored.
    host_labels = _targets.HOST.asarray(y)
    indices, logprobs = sparse.rows_for(top, lead, n_classes, dtype, host_labels, options)
    params = _math.TopKParams(_math.TAILS.index(top.tail), top.temperature / temperature)
    t = SparseTeachers(indices, logprobs, params)
    w = _SINGLE_TEACHER_WEIGHT if weights is None else weights
    return _evaluate(backend, student, (s, t, y, lead), w, temperature, alpha, options, placement, want_grad)


def _is_default(placement: Placement) -> bool:
    """Where the inputs live, a new result, host scalars (compared by identity: out may be an array)."""
    device, stream, out, device_scalar = placement
    return device is None and stream is None and out is None and device_scalar is False


# Keys (layout, number of weights or 0 for one teacher) of NumPy inputs that passed
# the structural checks as they are: 2-D, one float dtype, int64 labels, nothing to
# cast or copy (the layout, _arrays.host_layout, is their dtypes, shapes and strides).
# A later call with the same key checks only what the layout does not fix (alpha, the
# label values and, with check_finite, the logits), which keeps small calls cheap.
_PLAIN_LAYOUTS: set[tuple] = set()
_MAX_PLAIN_LAYOUTS = 256


def _is_plain(backend, student, teachers, labels, batch, single) -> bool:
    """Whether validation used the host inputs as they are."""
    s, t, y, lead = batch
    if backend is not _targets.HOST or s is not student or y is not labels or len(lead) != 1:
        return False
    if single:
        return t[0] is teachers
    if isinstance(t, tuple):
        return isinstance(teachers, (list, tuple)) and all(a is b for a, b in zip(t, teachers, strict=True))
    return t is teachers


def _plain_host_loss(weights, temperature, student, teachers, labels, alpha, options, want_grad):
    """``loss`` for inputs whose layout passed validation before (see _PLAIN_LAYOUTS)."""
    backend = _targets.HOST
    single = weights is None
    if single:
        t = (teachers,)
    else:
        t = tuple(teachers) if type(teachers) is list else teachers
    y = backend.labels(labels, student.shape[0], student.shape[1], options.ignore_index)
    if options.check_finite:
        named = _validate.named_teachers(t, single)
        _validate.refuse_nonfinite(backend, [("student", student), *named], _ignored(y, options))
    w = _SINGLE_TEACHER_WEIGHT if single else weights
    batch = (student, t, y, student.shape[:1])
    return _evaluate(backend, student, batch, w, temperature, alpha, options, _HERE, want_grad)


def _ignored(labels, options: LossOptions) -> tuple[Any, int] | None:
    """(labels, ignore_index) when rows can be ignored: check_finite skips them."""
    return None if options.ignore_index is None else (labels, options.ignore_index)


def _evaluate(backend, like, batch, weights, temperature, alpha, options, placement, want_grad):
    """Run the loss kernels on ``batch`` (student, teachers, labels, lead shape) and
    shape the results as the caller's inputs."""
    s, t, y, lead = batch
    out = placement.out
    device_scalar = placement.return_device_scalar
    grad_out = None
    if out is not None:
        if not want_grad:
            raise TypeError("out= is an argument of loss_and_grad (it receives the gradient)")
        target = backend.output(out, (*lead, s.shape[1]), np.dtype(s.dtype), [s, t, y])
        grad_out = target.reshape(s.shape)
    loss_value, soft, hard, grad = backend.loss(
        s, t, weights, y, temperature, alpha, options, want_grad, device_scalar, grad_out
    )
    if options.reduction == "none":
        loss_value, soft, hard = (backend.wrap(x.reshape(lead), like) for x in (loss_value, soft, hard))
    elif device_scalar:
        loss_value, soft, hard = (backend.wrap(x, like) for x in (loss_value, soft, hard))
    result = LossComponents(loss_value, soft, hard) if options.return_components else loss_value
    if not want_grad:
        return result
    if out is not None:
        return result, out
    return result, backend.wrap(grad.reshape((*lead, s.shape[1])), like)


def combine(
    weights: np.ndarray,
    temperature: float,
    teachers: object,
    eps: float | None,
    check_finite: bool,
    placement: Placement,
) -> Any:
    """``sum_k w_k t_k`` (``eps`` None) or ``T log(sum_k w_k softmax(t_k / T) + eps)``."""
    if _arrays.has_dask_array([teachers]):

        def call(blocks):
            return combine(weights, temperature, blocks, eps, check_finite, Placement())

        return _dask().combine(call, teachers, placement.device, placement.out)
    backend = _targets.backend_for([teachers], placement.device, placement.stream)
    t = _validate.teacher_arrays(backend, teachers, len(weights))
    dtype = np.result_type(*_validate.teacher_dtypes(t))
    t = _validate.cast_teachers(backend, t, dtype)
    if _validate.check_bool(check_finite, "check_finite"):
        _validate.refuse_nonfinite(backend, _validate.named_teachers(t))
    shape = _validate.teacher_shape(t)
    out = placement.out
    result = backend.empty(shape, dtype) if out is None else backend.output(out, shape, np.dtype(dtype), [t])
    if eps is None:
        backend.combine_logits(t, weights, result)
    else:
        backend.combine_probabilities(t, weights, temperature, eps, result)
    return out if out is not None else backend.wrap(result, _first(teachers))


def _first(teachers: object) -> object:
    return teachers[0] if isinstance(teachers, (list, tuple)) and len(teachers) else teachers

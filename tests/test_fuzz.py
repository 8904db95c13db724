"""Hypothesis fuzz test of the CPU target against the float64 reference.

Every example draws shapes (B in 0..12, C in 1..40, K in 1..5, sometimes [B, S, C]
inputs with [B, S] labels), dtypes (float16/bfloat16/float32/float64, sometimes mixed),
layouts (C, Fortran, negative strides, sliced, every other row, read-only; teachers
as a list, a tuple or one stacked array), values (normal logits at scales 1e-3 to
1e30, ties, near-identical student and teachers, constant rows, occasional
NaN/+inf/-inf), temperature, alpha, weights, labels (mostly valid; sometimes out of
range, negative, ignored, float/bool, wrong length) and the options, then runs
every public CPU operation on it and compares with ``numba_kd.reference`` or with
the exception the documented rules give.

Oracle.  The reference runs in float64 on the very values the kernels read (16-bit
logits widened to float32, mixed dtypes promoted: both exact widenings), with each
row of the student and of every teacher shifted by its own maximum (``_shifted``:
every loss, gradient, teacher weight and probability combine is invariant under
such shifts, and it keeps the reference's log-softmax exact for huge logits, where
``x - (max + log sum)`` loses ``log sum``).  combine_teachers is compared unshifted.

Tolerances.  Every comparison allows

    ROUNDING * u * (|reference| + M)

where ``u`` is the unit roundoff of the arithmetic the documented path uses
(float64 kernels, and float32 losses outside 1e-6 <= T <= 16, which compute per
element in float64: 2**-53; float32 kernels, which 16-bit inputs use too:
2**-24), and ``M`` is the size of the terms whose
rounding the result inherits:

- per row, ``A = Z / T + log C + 1 (+ max |log w_ik| for the probability combine)``
  with ``Z`` the row's largest |logit|: the size of the tempered logits and of
  their log-sum-exps, of which every log-probability is a difference;
- soft term ``alpha T^2 A`` (at T = 1e6 the KL is a difference of log-sums of size
  log C that agree to ~1/T^2: its float64 error is ~1e-16 T^2 log C, also in the
  reference), hard term ``(1 - alpha) (Z + log C + 1)``;
- gradient row ``(alpha T A G + (1 - alpha)(Z + log C + 1)) / divisor`` with
  ``G = 1 + max_j q_j |g_j - sum q g|`` for reverse KL and JSD (their gradients
  multiply log-ratios of size up to 2A);
- combine_via_probabilities ``Z + T (log C + 1 + max |log w_k|)``;
  combine_teachers ``sum_k |w_k t_k|`` per element.

On top of that it allows FLOOR times the spread of the reference over PERTURBATIONS
random relative perturbations of its inputs of size ``PERTURB * u`` (the problem's
own condition: e.g. tied logits of size 1e30 that one rounding of the teacher
average breaks).  Results stored in float32 or a 16-bit dtype add the stored
dtype's rounding (2**-24, 2**-11 for float16, 2**-8 for bfloat16; twice for the
label's gradient entry, which is stored before (1 - alpha) / divisor is
subtracted), and results that underflow an absolute ``ROUNDING`` subnormals of
the stored dtype.  A 16-bit result beyond its dtype's range is the infinity of
its sign (checked by ``_without_overflow``).

Each comparison reports its error/tolerance ratio to ``hypothesis.target``, so the
search climbs towards large errors.

Profiles: ``ci`` (2,000 examples, derandomized) runs by default; ``slow`` (50,000)
runs with ``--runslow``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import reference as ref
from hypothesis import HealthCheck, currently_in_test_context, given, settings, target
from hypothesis import strategies as st

import numba_kd as kd
from numba_kd import reference as kref
from numba_kd._options import FAST_MAX_TEMPERATURE as FLOAT32_MAX_TEMPERATURE
from numba_kd._options import FLOAT32_MIN_TEMPERATURE

settings.register_profile(
    "ci",
    max_examples=2000,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("slow", parent=settings.get_profile("ci"), max_examples=50_000)

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
BF16 = np.dtype(ml_dtypes.bfloat16)
SIXTEEN_BIT = (F16, BF16)
FLOAT_DTYPES = [F16, BF16, F32, F64]
UNIT_ROUNDOFF = {F16: 2.0**-11, BF16: 2.0**-8, F32: 2.0**-24, F64: 2.0**-53}
# Multiplier of u * (|reference| + M): sums of up to 40 terms, K <= 5 teachers and a
# few roundings per term.
ROUNDING = 64.0
# Reference perturbations: relative size PERTURB * u, tolerance FLOOR times their spread.
PERTURB = 8.0
PERTURBATIONS = 3
FLOOR = 2.0

SCALES = [1e-3, 0.1, 1.0, 3.0, 10.0, 100.0, 1e4, 1e10, 1e30]
TEMPERATURES = [1e-6, 1e-6, 1e-3, 0.01, 0.5, 1.0, 2.0, 4.0, 16.0, 16.5, 20.0, 100.0, 1e6, 1e6]
ALPHAS = [0.0, 1.0, 0.5, 0.3, 0.7, 0.999]
WEIGHT_VALUES = [0.0, 1e-300, 1e-3, 0.1, 0.5, 1.0, 2.0, 3.5, 1e3]
BETAS = [1e-6, 0.1, 0.5, 0.9, 1 - 1e-6]
SKEWS = [1e-6, 0.1, 0.5, 1.0]
NEW_DIVERGENCES = ["tvd", "skew_forward_kl", "skew_reverse_kl"]
LAYOUTS = ["C", "C", "F", "negative", "sliced", "every-other-row"]
INT_LABEL_DTYPES = [np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16, np.uint32, np.uint64]
FLOAT16_MAX_SCALE = 1e3
IGNORE_FAR = 2**40


@dataclass
class Case:
    api: str  # "ensemble" (EnsembleDistiller) or "single" (DistillationLoss)
    shape: tuple[int, ...]  # student shape: [B, C] or [B, S, C]
    student: Any = field(repr=False)  # as passed to the library
    teachers: Any = field(repr=False)  # list/tuple of arrays, one stacked array, or one array
    student_values: np.ndarray  # logical values (float dtype as drawn)
    teacher_values: list[np.ndarray]
    labels: Any  # as passed
    weights: list[float]
    temperature: float
    alpha: float
    eps: float
    options: dict[str, Any]
    check_finite: bool
    return_components: bool
    structural: str | None  # an invalid logits/teachers argument, 2-D only
    bad_option: str | None  # alpha, beta or skew outside its range
    grad_out: Any = field(default=None, repr=False)
    combine_out: Any = field(default=None, repr=False)
    probs_out: Any = field(default=None, repr=False)
    snapshots: list[np.ndarray] = field(default_factory=list, repr=False)
    layouts: str = ""  # how the arrays were passed (for the falsifying example's repr)

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis prints the dataclass repr
        printer.text(repr(self))


def _chance(draw, percent: int) -> bool:
    """True with about ``percent`` % probability; shrinks to False."""
    return draw(st.integers(0, 99)) >= 100 - percent


def _layout(x: np.ndarray, layout: str) -> np.ndarray:
    """The values of ``x`` in another memory layout."""
    if layout == "C":
        return np.ascontiguousarray(x)
    if layout == "F":
        return np.asfortranarray(x)
    if layout == "negative":
        flip = (slice(None, None, -1),) * x.ndim
        return np.ascontiguousarray(x[flip])[flip]
    if layout == "sliced":
        padded = np.zeros((*x.shape[:-1], x.shape[-1] + 3), dtype=x.dtype)
        padded[..., 1 : x.shape[-1] + 1] = x
        return padded[..., 1 : x.shape[-1] + 1]
    if layout == "every-other-row":
        return np.repeat(x, 2, axis=-2)[..., ::2, :]
    raise AssertionError(layout)


def _passed(draw, x: np.ndarray) -> np.ndarray:
    arr = _layout(x, draw(st.sampled_from(LAYOUTS)))
    if _chance(draw, 20):
        arr.flags.writeable = False
    return arr


def _values(rng, style: str, shape, k: int, scale: float):
    """(student, [teachers]) float64 logical values."""
    signal = rng.normal(size=shape) * scale
    if style == "near":  # student and teachers almost agree: a tiny KL, all cancellation
        teachers = [signal + 1e-3 * scale * rng.normal(size=shape) for _ in range(k)]
        student = signal + 1e-3 * scale * rng.normal(size=shape)
    else:
        teachers = [signal + scale * rng.normal(size=shape) for _ in range(k)]
        student = 0.5 * signal + scale * rng.normal(size=shape)
    if style == "ties":  # a coarse grid: many equal logits, also at the row maxima
        student, *teachers = (np.round(x / scale * 2.0) * (scale / 2.0) for x in (student, *teachers))
    if style == "constant" and shape[0] > 0:  # some rows are constant: uniform softmax
        rows = rng.random(shape[:-1]) < 0.5
        for x in (student, *teachers):
            x[rows] = x[rows][..., :1]
    if style == "wide":  # student and teachers at scales 1e3 apart
        student = student * 1e3 if rng.random() < 0.5 else student * 1e-3
    return student, teachers


def _inject_nonfinite(draw, rng, arrays: list[np.ndarray]) -> None:
    if arrays[0].size == 0:
        return
    for _ in range(draw(st.integers(1, 3))):
        array = arrays[draw(st.integers(0, len(arrays) - 1))]
        index = tuple(int(rng.integers(0, n)) for n in array.shape)
        array[index] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))


def _label_dtype(draw, values: np.ndarray):
    fits = [
        dt
        for dt in INT_LABEL_DTYPES
        if values.size == 0
        or (np.iinfo(dt).min <= int(values.min()) and int(values.max()) <= np.iinfo(dt).max)
    ]
    return draw(st.sampled_from(fits))


def _labels(draw, rng, lead: tuple[int, ...], n_classes: int):
    """(labels as passed, ignore_index option)."""
    labels = rng.integers(0, n_classes, size=lead)
    ignore_value = draw(st.sampled_from([None, None, -100, -100, "in-range", IGNORE_FAR]))
    if ignore_value == "in-range":
        ignore_value = draw(st.integers(0, n_classes - 1))
    if ignore_value is not None and labels.size and _chance(draw, 60):
        labels[rng.random(lead) < draw(st.sampled_from([0.2, 0.5, 1.0]))] = ignore_value
    ignore_index = ignore_value
    if _chance(draw, 15):  # the option does not match the labels' ignore value
        ignore_index = draw(st.sampled_from([None, -100, 0, -1]))
    defect = None
    if _chance(draw, 20):
        defect = draw(st.sampled_from(["high", "negative", "float", "bool", "wrong-length"]))
    if defect in ("high", "negative") and labels.size:
        index = tuple(int(rng.integers(0, n)) for n in lead)
        offset = draw(st.integers(0, 3))
        labels[index] = n_classes + offset if defect == "high" else -1 - offset
    labels = labels.astype(_label_dtype(draw, labels))
    if defect == "float":
        labels = labels.astype(draw(st.sampled_from([np.float64, np.float32])))
    elif defect == "bool":
        labels = labels.astype(bool)
    elif defect == "wrong-length":
        if len(lead) == 2:
            labels = draw(st.sampled_from([labels.reshape(-1), np.zeros((lead[0], lead[1] + 1), np.int64)]))
        elif lead[0] > 0 and _chance(draw, 50):
            labels = labels[:-1]
        else:
            labels = np.append(labels, 0).astype(labels.dtype)
    if _chance(draw, 10):
        labels = labels.tolist()
    return labels, ignore_index


def _result_dtype(*dtypes) -> np.dtype:
    """The dtype of array results: NumPy promotion (bfloat16 with float16 gives float32)."""
    return np.dtype(np.result_type(*dtypes))


def _arithmetic(dtype: np.dtype) -> np.dtype:
    """The kernels' arithmetic for results of ``dtype``: 16-bit inputs compute as float32."""
    return F32 if dtype in SIXTEEN_BIT else dtype


def _out(draw, shape: tuple[int, ...], dtype: np.dtype):
    """None, or an out= array: mostly valid, sometimes of a wrong dtype/shape/layout."""
    if not _chance(draw, 15):
        return None
    kind = draw(st.sampled_from(["good", "good", "good", "dtype", "shape", "fortran", "read-only"]))
    if kind == "dtype":
        return np.empty(shape, F32 if dtype == F64 else F64)
    if dtype in SIXTEEN_BIT and _chance(draw, 50):
        dtype = F32  # the other dtype out= may have for 16-bit results
    if kind == "shape":
        return np.empty((*shape[:-1], shape[-1] + 1), dtype)
    out = np.empty(shape, dtype, order="F" if kind == "fortran" else "C")
    if kind == "read-only":
        out.flags.writeable = False
    return out


@st.composite
def cases(draw, family: str = "any") -> Case:
    """A case; ``family`` "float32" or "float64" restricts it to inputs that compute in
    that dtype (so that runs of the two families compile disjoint kernels)."""
    api = draw(st.sampled_from(["ensemble", "ensemble", "single"]))
    k = 1 if api == "single" else draw(st.integers(1, 5))
    three_d = _chance(draw, 25)
    b = draw(st.integers(0, 12))
    c = draw(st.integers(1, 40))
    shape = (b, draw(st.integers(0 if _chance(draw, 5) else 1, 4)), c) if three_d else (b, c)
    stacked = api == "ensemble" and _chance(draw, 35)

    family_dtypes = {"float32": [F16, BF16, F32], "float64": [F64], "any": FLOAT_DTYPES}[family]
    mixable = [F16, BF16, F32] if family == "float32" else FLOAT_DTYPES
    base = draw(st.sampled_from(family_dtypes))
    student_dtype, teacher_dtypes = base, [base] * k
    if _chance(draw, 25):
        student_dtype = draw(st.sampled_from(mixable))
        teacher_dtypes = [draw(st.sampled_from(mixable))] * k
        if not stacked:
            teacher_dtypes = [draw(st.sampled_from(mixable)) for _ in range(k)]
        if family == "float64" and F64 not in (student_dtype, *teacher_dtypes):
            student_dtype = F64

    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from(SCALES))
    if F16 in (student_dtype, *teacher_dtypes):
        scale = min(scale, FLOAT16_MAX_SCALE)
    style = draw(st.sampled_from(["normal", "normal", "ties", "ties", "near", "constant", "wide"]))
    student_values, teacher_values = _values(rng, style, shape, k, scale)
    if _chance(draw, 15):
        _inject_nonfinite(draw, rng, [student_values, *teacher_values])
    student_values = _cast(student_values, student_dtype)
    teacher_values = [_cast(t, dt) for t, dt in zip(teacher_values, teacher_dtypes, strict=True)]

    labels, ignore_index = _labels(draw, rng, shape[:-1], c)

    structural = None
    if not three_d and _chance(draw, 6):
        kinds = ["int-student", "int-teacher", "student-shape"]
        if api == "single" or k > 1:
            kinds.append("teacher-shape")  # (one [B, C + 1] teacher of a list of one is a valid combine)
        if api == "ensemble":
            kinds.append("teacher-count")
        structural = draw(st.sampled_from(kinds))

    student = _passed(draw, student_values)
    passed_teachers = [_passed(draw, t) for t in teacher_values]
    if structural == "int-student":
        student = rng.integers(-5, 5, size=shape).astype(draw(st.sampled_from([np.int32, np.int64, bool])))
    elif structural == "student-shape":
        student = np.zeros((b, c + 1), student_dtype)
    elif structural == "int-teacher":
        passed_teachers[-1] = rng.integers(-5, 5, size=shape).astype(np.int64)
    elif structural == "teacher-shape":
        passed_teachers[-1] = np.zeros((b, c + 1), teacher_dtypes[-1])
    elif structural == "teacher-count":
        if k > 1 and _chance(draw, 50):
            passed_teachers = passed_teachers[:-1]
        else:
            passed_teachers = [*passed_teachers, passed_teachers[0]]
    if api == "single":
        teachers = passed_teachers[0]
    elif stacked and structural != "teacher-shape":
        teachers = _passed(draw, np.stack([np.asarray(t) for t in passed_teachers]))
        if structural == "int-teacher":  # np.stack would have promoted the one integer teacher
            teachers = rng.integers(-5, 5, size=teachers.shape)
    else:
        teachers = passed_teachers if _chance(draw, 80) else tuple(passed_teachers)

    weights = [draw(st.sampled_from(WEIGHT_VALUES)) for _ in range(k)]
    if max(weights) == 0.0:
        weights[draw(st.integers(0, k - 1))] = 1.0
    temperature = draw(st.one_of(st.sampled_from(TEMPERATURES), st.floats(1e-3, 1e3)))
    alpha = draw(st.one_of(st.sampled_from(ALPHAS), st.floats(0.0, 1.0)))
    options = dict(
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        ignore_index=ignore_index,
        combine=draw(st.sampled_from(["logits", "logits", "probs"])),
        divergence=draw(st.sampled_from(["forward_kl", "forward_kl", "reverse_kl", "jsd", *NEW_DIVERGENCES])),
        beta=draw(st.sampled_from(BETAS)),
        skew=draw(st.sampled_from(SKEWS)),
        teacher_weighting=draw(st.sampled_from(["static", "static", "confidence", "entropy"])),
    )
    bad_option = None
    if _chance(draw, 3):
        bad_option = draw(st.sampled_from(["alpha", "beta", "skew"]))
        if bad_option == "alpha":
            alpha = draw(st.sampled_from([-0.1, 1.5, math.nan]))
        elif bad_option == "beta":
            options.update(divergence="jsd", beta=draw(st.sampled_from([0.0, 1.0])))
        else:
            options.update(divergence="skew_reverse_kl", skew=draw(st.sampled_from([0.0, 1.5])))

    loss_dtype = _result_dtype(student_values.dtype, *(t.dtype for t in teacher_values))
    combine_dtype = _result_dtype(*(t.dtype for t in teacher_values))
    case = Case(
        api=api,
        shape=shape,
        student=student,
        teachers=teachers,
        student_values=student_values,
        teacher_values=teacher_values,
        labels=labels,
        weights=weights,
        temperature=temperature,
        alpha=alpha,
        eps=draw(st.sampled_from([1e-10, 0.0])),
        options=options,
        check_finite=_chance(draw, 15),
        return_components=draw(st.booleans()),
        structural=structural,
        bad_option=bad_option,
        grad_out=_out(draw, shape, loss_dtype),
        combine_out=_out(draw, shape, combine_dtype),
        probs_out=_out(draw, shape, combine_dtype),
    )
    case.snapshots = [np.array(x, copy=True) for x in _arrays(case)]
    case.layouts = "; ".join(
        _describe(name, x)
        for name, x in [
            ("student", student),
            ("teachers", teachers),
            ("grad_out", case.grad_out),
            ("combine_out", case.combine_out),
            ("probs_out", case.probs_out),
        ]
        if x is not None
    )
    return case


def _describe(name: str, x) -> str:
    if isinstance(x, (list, tuple)):
        return f"{name}={type(x).__name__}[" + ", ".join(_describe("", t) for t in x) + "]"
    x = np.asarray(x)
    flags = "C" if x.flags.c_contiguous else "F" if x.flags.f_contiguous else "strided"
    flags += "" if x.flags.writeable else ",read-only"
    return f"{name}{'=' if name else ''}{x.dtype}{list(x.shape)} {flags} strides={x.strides}"


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype == F16:  # no overflow to infinity in the cast; injected NaN/inf stay
        x = np.where(np.isfinite(x), np.clip(x, -6e4, 6e4), x)
    return x.astype(dtype)


def _arrays(case: Case) -> list:
    teachers = case.teachers
    return [case.student, *(teachers if isinstance(teachers, (list, tuple)) else [teachers])]


# ------------------------------------------------------------------ expected errors


def _nonfinite(*arrays: np.ndarray) -> bool:
    return any(not np.isfinite(a).all() for a in arrays)


def _out_error(out, shape: tuple[int, ...], dtype: np.dtype):
    """The error of an out= argument (checked after every input), or None."""
    if out is None:
        return None
    if out.shape != shape:
        return ValueError
    if out.dtype != dtype and not (out.dtype == F32 and dtype in SIXTEEN_BIT):
        return TypeError
    if not (out.flags.c_contiguous and out.flags.writeable):
        return ValueError
    return None


def _label_error(case: Case):
    labels = np.asarray(case.labels)
    lead = case.shape[:-1]
    if len(lead) == 2 and labels.shape != lead:
        return ValueError
    if labels.dtype.kind not in "iu":
        return TypeError
    labels = labels.reshape(-1) if len(lead) == 2 else labels
    if labels.ndim != 1 or labels.shape[0] != math.prod(lead):
        return ValueError
    bad = (labels < 0) | (labels >= case.shape[-1])
    if case.options["ignore_index"] is not None:
        bad &= labels != case.options["ignore_index"]
    return ValueError if bad.any() else None


def _loss_error(case: Case, out=None):
    if case.bad_option is not None:
        return ValueError
    if case.structural is not None:
        return TypeError if case.structural.startswith("int") else ValueError
    if math.prod(case.shape[:-1]) == 0:
        return ValueError
    error = _label_error(case)
    if error is not None:
        return error
    if case.check_finite and _nonfinite_read_rows(case):
        return ValueError
    return _out_error(out, case.shape, _loss_dtype(case))


def _nonfinite_read_rows(case: Case) -> bool:
    """A NaN or an infinity in a row the loss reads (check_finite skips ignored rows)."""
    labels = np.asarray(case.labels)
    ignore = case.options["ignore_index"]
    read = np.ones(labels.shape, bool) if ignore is None else labels != ignore
    return _nonfinite(*(np.asarray(a)[read] for a in (case.student_values, *case.teacher_values)))


def _combine_error(case: Case, out=None):
    if case.structural in ("int-teacher",):
        return TypeError
    if case.structural in ("teacher-shape", "teacher-count"):
        return ValueError
    if len(case.shape) == 3:  # combines take [B, C] teachers
        return ValueError
    if case.check_finite and _nonfinite(*case.teacher_values):
        return ValueError
    return _out_error(out, case.shape, _combine_dtype(case))


def _raises(error, call) -> None:
    """``call()`` raises exactly ``error`` (not a subclass, not another exception)."""
    try:
        call()
    except Exception as exc:
        assert type(exc) is error, f"expected {error.__name__}, got {type(exc).__name__}: {exc}"
    else:
        raise AssertionError(f"expected {error.__name__}, nothing was raised")


# ------------------------------------------------------------------ tolerances


def _loss_dtype(case: Case) -> np.dtype:
    return _result_dtype(case.student_values.dtype, *(t.dtype for t in case.teacher_values))


def _combine_dtype(case: Case) -> np.dtype:
    return _result_dtype(*(t.dtype for t in case.teacher_values))


def _assert_close(what: str, got, expected, tol) -> None:
    """|got - expected| <= tol elementwise, with NaN exactly where expected is NaN."""
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), expected.shape)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN positions")
    assert np.isfinite(got[~nan]).all(), f"{what}: non-finite where the reference is finite\n{got}"
    err = np.abs(got - expected)
    # Steer the search towards large errors (targeted property-based testing).
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err > 0, err / tol, 0.0)[~nan]
    if currently_in_test_context():
        target(float(min(ratio.max(), 1e6)) if ratio.size else 0.0, label=what.split(" ")[0])
    bad = ~nan & ~(err <= tol)
    assert not bad.any(), (
        f"{what}: off by {err[bad]} > tolerance {tol[bad]}\n(got {got[bad]}, expected {expected[bad]})"
    )


def _rows(case: Case):
    """(student [N, C], teachers [N, C] list, labels [N]) float64/int64 for the reference."""
    c = case.shape[-1]
    student = case.student_values.astype(np.float64).reshape(-1, c)
    teachers = [t.astype(np.float64).reshape(-1, c) for t in case.teacher_values]
    return student, teachers, np.asarray(case.labels).astype(np.int64).reshape(-1)


def _row_scale(*arrays: np.ndarray) -> np.ndarray:
    """Z: the largest finite |logit| of each row over the given [N, C] arrays."""
    stacked = np.abs(np.stack(arrays))
    return np.where(np.isfinite(stacked), stacked, 0.0).max(axis=(0, 2))


def _underflow(dtype: np.dtype) -> float:
    """Absolute error allowed for results that underflow (to a subnormal or to 0)."""
    return ROUNDING * float(ml_dtypes.finfo(dtype).smallest_subnormal)


def _without_overflow(what: str, got, expected, stored: np.dtype):
    """(got, expected) as float64 with the entries whose expected value lies beyond the
    range of the stored 16-bit dtype set to 0, after checking them: there the result
    is the infinity of the value's sign (IEEE rounding), or at the boundary, where the
    arithmetic's error decides, a value within 1 % of it."""
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if stored not in SIXTEEN_BIT:
        return got, expected
    beyond = np.isfinite(expected) & (np.abs(expected) >= 0.99 * float(ml_dtypes.finfo(stored).max))
    ok = (np.sign(got) == np.sign(expected)) & (
        np.isinf(got) | (np.abs(got - expected) <= 0.01 * np.abs(expected))
    )
    assert ok[beyond].all(), f"{what}: beyond the {stored} range: {got[beyond]} for {expected[beyond]}"
    return np.where(beyond, 0.0, got), np.where(beyond, 0.0, expected)


def _max_abs_log(weights: np.ndarray) -> np.ndarray:
    """Per row, max |log w| over the positive weights of [N, K] (or [K]) weights."""
    w = np.atleast_2d(weights)
    with np.errstate(divide="ignore"):
        logs = np.where(w > 0, np.abs(np.log(np.where(w > 0, w, 1.0))), 0.0)
    return logs.max(axis=1)


def _perturbed(rng, arrays: list[np.ndarray], size: float) -> list[np.ndarray]:
    return [x * (1.0 + size * rng.uniform(-1.0, 1.0, size=x.shape)) for x in arrays]


def _shifted(x: np.ndarray) -> np.ndarray:
    """Each row minus its maximum: the oracle's input.

    Every loss, gradient, per-row teacher weight and probability combine is invariant
    under a per-row shift of the student and of each teacher, but the reference's
    log-softmax ``x - (max + log sum exp(x - max))`` rounds ``log sum`` away when the
    maximum is huge (2x the KL for two tied maxima at |x/T| = 1e17).  Shifted rows
    have maximum 0, so the reference stays exact there; rows holding NaN or an
    infinity stay non-finite."""
    if x.size == 0:
        return x
    with np.errstate(invalid="ignore"):
        return x - np.max(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------ checks


def _check_combines(case: Case, d: kd.EnsembleDistiller) -> None:
    teachers = case.teachers
    out = case.combine_out
    error = _combine_error(case, out)
    kwargs = dict(check_finite=case.check_finite, out=out)
    if error is not None:
        _raises(error, lambda: d.combine_teachers(teachers, **kwargs))
    else:
        result = d.combine_teachers(teachers, **kwargs)
        _check_combine_teachers(case, d, result, out)
    out = case.probs_out
    error = _combine_error(case, out)
    kwargs = dict(check_finite=case.check_finite, out=out)
    if error is not None:
        _raises(error, lambda: d.combine_via_probabilities(teachers, case.eps, **kwargs))
    else:
        result = d.combine_via_probabilities(teachers, case.eps, **kwargs)
        _check_combine_probabilities(case, d, result, out)


def _check_array_result(case: Case, result, out, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    assert isinstance(result, np.ndarray)
    if out is not None:
        assert result is out
        dtype = out.dtype
    assert result.dtype == dtype, (result.dtype, dtype)
    assert result.shape == shape, (result.shape, shape)
    assert result.flags.c_contiguous


def _check_combine_teachers(case: Case, d, result, out) -> None:
    dtype = _combine_dtype(case)
    _check_array_result(case, result, out, dtype, case.shape)
    teachers = [t.astype(np.float64) for t in case.teacher_values]
    with np.errstate(all="ignore"):
        expected = ref.combine_teachers(teachers, d.weights)
        magnitude = np.einsum("k,kbc->bc", d.weights, np.abs(np.stack(teachers)))
    stored = result.dtype
    result = result.astype(np.float64)
    # Elementwise IEEE arithmetic: NaN and infinities exactly where the reference has them.
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.where(finite, 0.0, result), np.where(finite, 0.0, expected))
    u = UNIT_ROUNDOFF[_arithmetic(dtype)]
    stored_rounding = UNIT_ROUNDOFF[stored] * np.abs(np.where(finite, expected, 0.0))
    tol = ROUNDING * u * np.where(finite, magnitude, 0.0) + stored_rounding + _underflow(stored)
    _assert_close("combine_teachers", np.where(finite, result, 0.0), np.where(finite, expected, 0.0), tol)


def _check_combine_probabilities(case: Case, d, result, out) -> None:
    dtype = _combine_dtype(case)
    _check_array_result(case, result, out, dtype, case.shape)
    if case.shape[0] == 0:
        return
    teachers = [t.astype(np.float64) for t in case.teacher_values]
    temperature = case.temperature
    with np.errstate(all="ignore"):
        expected = ref.combine_via_probabilities(
            [_shifted(x) for x in teachers], d.weights, temperature, case.eps
        )
    z = _row_scale(*teachers)
    c = case.shape[-1]
    magnitude = z + temperature * (math.log(c) + 1.0 + _max_abs_log(d.weights))
    u = UNIT_ROUNDOFF[_arithmetic(dtype)]
    stored = result.dtype
    tol = ROUNDING * u * (np.abs(expected) + magnitude[:, None]) + _underflow(stored)
    tol = tol + UNIT_ROUNDOFF[stored] * np.abs(expected)
    bad = kref.nonfinite_rows(teachers)
    assert np.isnan(expected[bad]).all()
    what = f"combine_via_probabilities(eps={case.eps})"
    _assert_close(what, *_without_overflow(what, result, expected, stored), tol)


def _loss_path_roundoff(case: Case, dtype: np.dtype) -> float:
    """u of the loss arithmetic: float32 inputs compute per element in float32 for every
    option at 1e-6 <= T <= 16, in float64 outside (numba_kd._options.compute_dtype)."""
    if _arithmetic(dtype) == F32 and FLOAT32_MIN_TEMPERATURE <= case.temperature <= FLOAT32_MAX_TEMPERATURE:
        return UNIT_ROUNDOFF[F32]
    return UNIT_ROUNDOFF[F64]


def _reference_loss(case: Case, weights, student, teachers, labels):
    opts = dict(case.options)
    reduction = opts.pop("reduction")
    t, a = case.temperature, case.alpha
    student, teachers = _shifted(student), [_shifted(x) for x in teachers]
    with np.errstate(all="ignore"):
        parts = kref.general_loss(student, teachers, labels, weights, t, a, reduction, **opts)
        grad = kref.general_grad(student, teachers, labels, weights, t, a, reduction, **opts)
        rows = kref.general_loss(student, teachers, labels, weights, t, a, "none", **opts)
    return parts, grad, rows


def _gradient_factor(case: Case, weights, student, teachers, labels) -> np.ndarray:
    """G per row: 1 + max_j q_j |g_j - sum_j q_j g_j| (g = dD/dq) for every divergence but
    forward KL, 2 for forward KL."""
    opts = case.options
    if opts["divergence"] == "forward_kl":
        return np.full(student.shape[0], 2.0)
    t = case.temperature
    student, teachers = _shifted(student), [_shifted(x) for x in teachers]
    with np.errstate(all="ignore"):
        row_w = kref.row_teacher_weights(
            teachers, weights, labels, t, opts["teacher_weighting"], opts["ignore_index"]
        )
        log_p = kref.target_log_probs(teachers, row_w, t, opts["combine"])
        log_q = kref.log_softmax(student / t)
        q = np.exp(log_q)
        g = kref.divergence_slopes(log_p, log_q, opts["divergence"], opts["beta"], opts["skew"])
        qg = np.sum(q * g, axis=-1, keepdims=True)
        factor = 1.0 + np.max(q * np.abs(g - qg), axis=-1)
    return np.where(np.isfinite(factor), factor, 0.0)


def _check_losses(case: Case, d: kd.EnsembleDistiller | None) -> None:
    kwargs = dict(case.options)
    kwargs.update(return_components=case.return_components, check_finite=case.check_finite)
    if case.api == "ensemble":

        def with_grad():
            return d.loss_and_grad(case.student, case.teachers, case.labels, case.alpha, out=out, **kwargs)

        def without_grad():
            return d.distillation_loss(case.student, case.teachers, case.labels, case.alpha, **kwargs)

        weights = d.weights
    else:

        def with_grad():
            loss_fn = kd.DistillationLoss(case.temperature, case.alpha)
            return loss_fn.loss_and_grad(case.student, case.teachers, case.labels, out=out, **kwargs)

        def without_grad():
            loss_fn = kd.DistillationLoss(case.temperature, case.alpha)
            return loss_fn.forward(case.student, case.teachers, case.labels, **kwargs)

        weights = np.ones(1)
    out = case.grad_out
    error = _loss_error(case, out)
    if error is not None:
        _raises(error, with_grad)
    error_without = _loss_error(case)
    if error_without is not None:
        _raises(error_without, without_grad)
        return
    value = without_grad()
    if error is not None:
        _check_loss_value(case, weights, value, None)
        return
    value_with, grad = with_grad()
    # On the CPU loss_and_grad gives distillation_loss's value, bit for bit.
    for a, b in zip(_leaves(value_with), _leaves(value), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _check_loss_value(case, weights, value, grad)
    _check_array_result(case, grad, out, _loss_dtype(case), case.shape)


def _leaves(value) -> list:
    return list(value) if isinstance(value, tuple) else [value]


def _check_loss_value(case: Case, weights, value, grad) -> None:
    dtype = _loss_dtype(case)
    reduction = case.options["reduction"]
    lead = case.shape[:-1]
    if case.return_components:
        assert isinstance(value, kd.LossComponents)
        loss, soft, hard = value
    else:
        loss, soft, hard = value, None, None
    for part in (loss, soft, hard):
        if part is None:
            continue
        if reduction == "none":
            assert isinstance(part, np.ndarray) and part.dtype == _arithmetic(dtype) and part.shape == lead
        else:
            assert isinstance(part, float), type(part)

    student, teachers, labels = _rows(case)
    (exp_loss, exp_soft, exp_hard), exp_grad, (_, soft_rows, hard_rows) = _reference_loss(
        case, weights, student, teachers, labels
    )
    ignore_index = case.options["ignore_index"]
    valid = np.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    bad = kref.nonfinite_rows(teachers, student) & valid
    divisor = max(int(valid.sum()), 1) if reduction == "mean" else 1

    # Tolerances (see the module docstring).
    t, alpha, c = case.temperature, case.alpha, case.shape[-1]
    u = _loss_path_roundoff(case, dtype)
    u_store = UNIT_ROUNDOFF[_arithmetic(dtype)]  # per-row losses are stored in the arithmetic's dtype
    # The soft coefficients alpha T^2 / divisor (and alpha T, ...) lose relative precision
    # when they are subnormal (alpha = 5e-324 is a valid alpha).
    tiny = float(np.finfo(F64).smallest_subnormal)
    u_soft = u + (tiny / alpha * max(divisor, labels.shape[0], 1) / min(1.0, t, t * t) if alpha > 0 else 0.0)
    z = _row_scale(student, *teachers)
    lw = 0.0
    if case.options["combine"] == "probs":
        with np.errstate(all="ignore"):
            row_w = kref.row_teacher_weights(
                [_shifted(x) for x in teachers],
                weights,
                labels,
                t,
                case.options["teacher_weighting"],
                ignore_index,
            )
        lw = _max_abs_log(row_w)
    a_mag = z / t + math.log(c) + 1.0 + lw
    soft_mag = alpha * t * t * a_mag
    hard_mag = (1.0 - alpha) * (z + math.log(c) + 1.0)
    soft_tol = ROUNDING * u_soft * (np.abs(soft_rows) + soft_mag)
    hard_tol = ROUNDING * u * (np.abs(hard_rows) + hard_mag)
    soft_tol, hard_tol = (np.where(valid & ~bad, x, 0.0) for x in (soft_tol, hard_tol))

    rng = np.random.default_rng(0)
    spread_parts = np.zeros(3 if reduction != "none" else (3, labels.shape[0]))
    spread_grad = np.zeros_like(exp_grad)
    for _ in range(PERTURBATIONS):
        s_p, *t_p = _perturbed(rng, [student, *teachers], PERTURB * u)
        parts_p, grad_p, _ = _reference_loss(case, weights, s_p, t_p, labels)
        spread_parts = np.fmax(
            spread_parts, np.abs(np.asarray(parts_p) - np.asarray([exp_loss, exp_soft, exp_hard]))
        )
        spread_grad = np.fmax(spread_grad, np.abs(grad_p - exp_grad))

    if reduction == "none":
        tols = [
            soft_tol + hard_tol + 2 * u_store * (np.abs(soft_rows) + np.abs(hard_rows)),
            soft_tol + u_store * np.abs(soft_rows),
            hard_tol + u_store * np.abs(hard_rows),
        ]
        tols = [tol + _underflow(_arithmetic(dtype)) for tol in tols]
        tols = [tol + FLOOR * spread for tol, spread in zip(tols, spread_parts, strict=True)]
        expected = [x.reshape(lead) for x in (exp_loss, exp_soft, exp_hard)]
        for name, got, want, tol in zip(
            ("loss", "soft", "hard"), (loss, soft, hard), expected, tols, strict=True
        ):
            if got is not None:
                assert not np.asarray(want)[~valid.reshape(lead)].any()
                _assert_close(f"{name} (reduction='none')", got, want, tol.reshape(lead))
                assert not np.asarray(got)[~valid.reshape(lead)].any(), "ignored rows must give 0"
    else:
        tols = [
            (soft_tol.sum() + hard_tol.sum()) / divisor,
            soft_tol.sum() / divisor,
            hard_tol.sum() / divisor,
        ]
        tols = [
            tol + _underflow(F64) + FLOOR * spread for tol, spread in zip(tols, spread_parts, strict=True)
        ]
        for name, got, want, tol in zip(
            ("loss", "soft", "hard"), (loss, soft, hard), (exp_loss, exp_soft, exp_hard), tols, strict=True
        ):
            if got is not None:
                assert math.isnan(want) == bool(bad.any())
                _assert_close(f"{name} (reduction={reduction!r})", got, want, tol)

    if grad is None:
        return
    factor = _gradient_factor(case, weights, student, teachers, labels)
    grad_mag = u_soft * alpha * t * a_mag * factor + u * (1.0 - alpha) * (z + math.log(c) + 1.0)
    # Stored in the gradient's dtype; the label's entry is rounded twice: stored, then
    # (1 - alpha) / divisor is subtracted from it.
    u_grad = UNIT_ROUNDOFF[grad.dtype]
    stored = u_grad * (2.0 * np.abs(exp_grad) + (1.0 - alpha) / divisor) + _underflow(grad.dtype)
    grad_tol = ROUNDING * grad_mag[:, None] / divisor + stored + FLOOR * spread_grad
    grad_rows = grad.reshape(-1, c).astype(np.float64)
    assert not grad_rows[~valid].any(), "ignored rows must have a zero gradient"
    assert np.isnan(exp_grad[bad]).all()
    got, want = _without_overflow("gradient", grad_rows, exp_grad, grad.dtype)
    _assert_close("gradient", got, want, np.where(valid[:, None], grad_tol, 0.0))


def check_case(case: Case) -> None:
    if case.api == "ensemble":
        d = kd.EnsembleDistiller(case.weights, case.temperature)
        _check_combines(case, d)
    else:
        d = None
    _check_losses(case, d)
    for before, after in zip(case.snapshots, _arrays(case), strict=True):
        np.testing.assert_array_equal(np.asarray(after), before, err_msg="an input was modified")


# CI: 2,000 examples, half per computation dtype, so that pytest-xdist's workers
# share the compilation of the kernels; --runslow: 50,000.
@pytest.mark.parametrize("family", ["float32", "float64"])
def test_fuzz_cpu(family):
    @settings(settings.get_profile("ci"), max_examples=1000)
    @given(case=cases(family))
    def run(case):
        check_case(case)

    run()


@pytest.mark.slow
@settings(settings.get_profile("slow"))
@given(case=cases())
def test_fuzz_cpu_slow(case):
    check_case(case)

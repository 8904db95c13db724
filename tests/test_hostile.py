"""Unusual and hostile inputs on the CPU: every public operation returns the right
answer or raises TypeError/ValueError naming the argument.

The simulator counterpart is tests/cuda/test_cuda_hostile.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from helpers import LOSS_RTOL, assert_array_close, logit_scale, make_batch

import numba_kd as kd
from numba_kd import registry

# The reference's NumPy arithmetic warns on the NaN and infinite inputs tested here.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

WEIGHTS = [1.0, 2.0, 0.5]
T = 2.0
ALPHA = 0.4


@pytest.fixture
def batch(rng):
    return make_batch(rng, len(WEIGHTS), 9, 6, np.float64)


def _mpmath_divergence(
    student, teachers, weights, temperature, divergence, beta=0.5, skew=0.25, digits=50
) -> float:
    """T^2 times the mean divergence of the rows in ``digits``-digit arithmetic."""
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp.clone()
    mp.dps = digits
    total = mp.mpf(0)
    for i in range(student.shape[0]):
        z = [sum(mp.mpf(float(w)) * mp.mpf(float(t[i, j])) for w, t in zip(weights, teachers, strict=True))
             for j in range(student.shape[1])]  # fmt: skip
        p = [mp.exp(x / temperature) for x in z]
        q = [mp.exp(mp.mpf(float(x)) / temperature) for x in student[i]]
        sp, sq = sum(p), sum(q)
        p, q = [x / sp for x in p], [x / sq for x in q]
        if divergence == "forward_kl":
            total += sum(a * mp.log(a / b) for a, b in zip(p, q, strict=True))
        elif divergence == "reverse_kl":
            total += sum(b * mp.log(b / a) for a, b in zip(p, q, strict=True))
        elif divergence == "jsd":
            for a, b in zip(p, q, strict=True):
                m = beta * a + (1 - beta) * b
                total += beta * a * mp.log(a / m) + (1 - beta) * b * mp.log(b / m)
        elif divergence == "tvd":
            total += sum(abs(a - b) for a, b in zip(p, q, strict=True)) / 2
        else:
            lam = mp.mpf(skew)
            for a, b in zip(p, q, strict=True):
                if divergence == "skew_forward_kl":
                    total += a * mp.log(a / (lam * a + (1 - lam) * b))
                else:
                    total += b * mp.log(b / (lam * b + (1 - lam) * a))
    return float(temperature**2 * total / student.shape[0])


@pytest.mark.parametrize(
    "divergence", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("temperature", [20.0, 1e4, 1e6])
def test_divergences_of_nearly_uniform_rows(rng, divergence, dtype, temperature):
    """Every divergence at large T, where the rows are nearly uniform and the divergence
    is ~1/T^2 of its terms, against 50-digit mpmath: relative error at most 1e-15 T
    (at least 1e-13).  Measured over 8 batches per case: at most 1.6e-16 T for forward
    and reverse KL, and at most 3e-16 for JSD at every T here; over 4 per case, at most
    8e-17 T for the skew KLs and 1.3e-17 T for the TVD.  Before kl_from_sums and
    jsd_term_near the error grew like T^2: about 2e-5 at T = 1e6."""
    student, teachers, labels = make_batch(rng, 2, 8, 20, dtype)
    d = kd.EnsembleDistiller([1.0, 2.0], temperature)
    got = d.distillation_loss(student, teachers, labels, 1.0, divergence=divergence, skew=0.25)
    expected = _mpmath_divergence(student, teachers, d.weights, temperature, divergence)
    assert abs(got - expected) <= max(1e-13, 1e-15 * temperature) * abs(expected), (got, expected)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_float64_rows_near_uniform(divergence):
    """Logits of scale 1e-3 at T = 100 over 50,000 classes (issue: 5e-5 relative error
    against mpmath, where torch float64 gets 5e-6).  The log-ratios are about 1e-5, and
    the error of the sums of kl_from_sums is about 1e-16 / 1e-5: measured (two rows)
    1.5e-10 (forward KL), 8.5e-11 (reverse KL), 3e-16 (JSD); the bound is 1e-9."""
    rng = np.random.default_rng(1)
    student = rng.normal(scale=1e-3, size=(1, 50_000))
    teachers = [rng.normal(scale=1e-3, size=(1, 50_000)) for _ in range(2)]
    d = kd.EnsembleDistiller([1.0, 2.0], 100.0)
    got = d.distillation_loss(student, teachers, np.array([3]), 1.0, divergence=divergence)
    expected = _mpmath_divergence(student, teachers, d.weights, 100.0, divergence, digits=30)
    assert abs(got - expected) <= 1e-9 * expected, (got, expected)


@pytest.mark.parametrize("combine", ["logits", "probs"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_confidence_weights_that_all_underflow(combine, dtype):
    """Logits of scale 1e4: every teacher's confidence (its softmax of the label at T = 1)
    underflows float64, where the weights once fell back to the static ones (10-68 % off).
    The weights are computed as logarithms: the reference's match 50-digit mpmath, and
    the kernels' loss matches the reference."""
    mpmath = pytest.importorskip("mpmath")
    rng = np.random.default_rng(3)
    # Teachers that disagree (so that their weights matter), each sure of its own
    # class; the label is far below every teacher's maximum.
    student, teachers, _ = registry.synthetic_batch(rng, 3, 4, 6, dtype, spread=1e4, independent=True)
    labels = np.argmin(sum(teachers), axis=1)
    weights = [1.0, 2.0, 3.0]
    confidences = ref.log_softmax(ref.stack_teachers(teachers))[:, np.arange(4), labels]
    assert np.all(np.exp(confidences) == 0.0)  # the premise: every confidence underflows
    mp = mpmath.mp.clone()
    mp.dps = 50
    for i in range(4):
        raw = []
        for k, t in enumerate(teachers):
            row = [mp.mpf(float(x)) for x in t[i]]
            raw.append(weights[k] * mp.exp(row[labels[i]]) / sum(mp.exp(x) for x in row))
        exact = [float(r / sum(raw)) for r in raw]
        got = ref.row_teacher_weights(teachers, weights, labels, T, "confidence")[i]
        np.testing.assert_allclose(got, exact, rtol=1e-12, atol=1e-300)
    d = kd.EnsembleDistiller(weights, T)
    opts = {"teacher_weighting": "confidence", "combine": combine}
    got = d.distillation_loss(student, teachers, labels, ALPHA, **opts)
    expected = ref.general_loss(student, teachers, labels, weights, T, ALPHA, "mean", **opts)[0]
    scale = logit_scale(student, *teachers)
    rtol = LOSS_RTOL[np.dtype(dtype)]
    assert abs(got - expected) <= rtol * (abs(expected) + scale), (got, expected)
    static = ref.general_loss(student, teachers, labels, weights, T, ALPHA, "mean", combine=combine)[0]
    assert abs(got - static) > 0.01 * abs(static)  # the old fallback would have been far off


def _ops(student, teachers, labels, **kw):
    """Every public operation on these inputs: name -> zero-argument call."""
    d = kd.EnsembleDistiller(WEIGHTS[: len(teachers)], T)
    single = kd.DistillationLoss(T, ALPHA)
    return {
        "combine_teachers": lambda: d.combine_teachers(teachers, **kw),
        "combine_via_probabilities": lambda: d.combine_via_probabilities(teachers, **kw),
        "distillation_loss": lambda: d.distillation_loss(student, teachers, labels, ALPHA, **kw),
        "loss_and_grad": lambda: d.loss_and_grad(student, teachers, labels, ALPHA, **kw),
        "forward": lambda: single.forward(student, teachers[0], labels, **kw),
        "single_loss_and_grad": lambda: single.loss_and_grad(student, teachers[0], labels, **kw),
    }


LOSS_OPS = ["distillation_loss", "loss_and_grad", "forward", "single_loss_and_grad"]


def _expected(name, student, teachers, labels, weights=WEIGHTS, temperature=T, alpha=ALPHA):
    """The float64 reference result of operation ``name``."""
    s = np.asarray(student, dtype=np.float64)
    t = [np.asarray(x, dtype=np.float64) for x in teachers]
    w = weights[: len(t)]
    if name == "combine_teachers":
        return ref.combine_teachers(t, w)
    if name == "combine_via_probabilities":
        return ref.combine_via_probabilities(t, w, temperature)
    if name in ("forward", "single_loss_and_grad"):
        t, w = t[:1], [1.0]
    loss = ref.general_loss(s, t, labels, w, temperature, alpha)[0]
    if name in ("loss_and_grad", "single_loss_and_grad"):
        return loss, ref.general_grad(s, t, labels, w, temperature, alpha)
    return loss


def _assert_matches(name, got, expected, dtype, scale):
    if isinstance(expected, tuple):
        _assert_matches(name, got[0], expected[0], dtype, scale)
        assert_array_close(got[1], expected[1], dtype)
    elif isinstance(expected, np.ndarray):
        assert_array_close(got, expected, dtype)
    else:
        rtol = LOSS_RTOL[np.dtype(dtype)]
        assert abs(got - expected) <= rtol * (abs(expected) + scale), (name, got, expected)


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize("op", LOSS_OPS)
@pytest.mark.parametrize(
    ("make_labels", "error", "words"),
    [
        (lambda y: np.where(y == y[0], 6, y), ValueError, "labels must be in [0, 6)"),
        (lambda y: np.where(y == y[0], -1, y), ValueError, "labels must be in [0, 6)"),
        (lambda y: y.astype(np.float64), TypeError, "labels must be integer"),
        (lambda y: y > 2, TypeError, "labels must be integer"),
        (lambda y: y[:-1], ValueError, "labels has 8 entries"),
        (lambda y: y[:, None], ValueError, "labels must be a 1-D array"),
        (lambda y: [[1], [1, 2]], ValueError, "labels cannot be read as an array"),
        (lambda y: None, TypeError, "labels must be integer"),
    ],
    ids=["too-large", "negative", "float", "bool", "short", "2-D", "ragged", "None"],
)
def test_bad_labels_are_rejected(batch, op, make_labels, error, words):
    student, teachers, labels = batch
    with pytest.raises(error) as info:
        _ops(student, teachers, make_labels(labels))[op]()
    assert words in str(info.value)


@pytest.mark.parametrize("op", LOSS_OPS)
def test_negative_labels_other_than_ignore_index_are_rejected(batch, op):
    student, teachers, labels = batch
    labels = labels.copy()
    labels[0], labels[1] = -100, -1
    with pytest.raises(ValueError, match=r"labels\[1\] = -1"):
        _ops(student, teachers, labels, ignore_index=-100)[op]()


# ---------------------------------------------------------------- logits that are not arrays


@pytest.mark.parametrize("op", ["combine_teachers", "distillation_loss", "loss_and_grad", "forward"])
def test_nested_lists_convert_like_numpy(batch, op):
    student, teachers, labels = batch
    got = _ops(student.tolist(), [t.tolist() for t in teachers], labels.tolist())[op]()
    expected = _ops(student, teachers, labels)[op]()
    if isinstance(expected, tuple):
        assert got[0] == expected[0]
        np.testing.assert_array_equal(got[1], expected[1])
    else:
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("student", "error", "words"),
    [
        ([[1.0, 2.0], [1.0]], ValueError, "student cannot be read as an array"),
        ("logits", TypeError, "student must hold floating-point logits"),
        (None, TypeError, "student must hold floating-point logits"),
        ([[1, 2], [3, 4]], TypeError, "student must hold floating-point logits"),
        (np.ones((2, 2), dtype=np.complex128), TypeError, "student must hold floating-point logits"),
        (np.ma.masked_array(np.ones((2, 2)), [[0, 1], [0, 0]]), TypeError, "student is a masked array"),
        (np.float64(1.0), ValueError, "student must be a 2-D"),
    ],
    ids=["ragged", "string", "None", "integers", "complex", "masked", "0-D"],
)
def test_student_that_is_not_logits_is_rejected(student, error, words):
    d = kd.EnsembleDistiller([1.0], T)
    with pytest.raises(error) as info:
        d.distillation_loss(student, [np.ones((2, 2))], [0, 1], ALPHA)
    assert words in str(info.value)


class _Unreadable:
    def __array__(self, dtype=None, copy=None):
        raise ValueError("broken")


def test_teachers_that_are_not_logits_are_rejected():
    d = kd.EnsembleDistiller([1.0, 1.0], T)
    with pytest.raises(ValueError, match="teachers cannot be read as an array: broken"):
        d.combine_teachers(_Unreadable())
    with pytest.raises(ValueError, match=r"teachers\[1\] cannot be read as an array"):
        d.combine_teachers([np.ones((2, 2)), [[1.0, 2.0], [1.0]]])
    with pytest.raises(TypeError, match="teachers must be a list or tuple of arrays, or one array"):
        d.combine_teachers({"a": 1})


# ---------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["student", "teacher0", "teacher1"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"combine": "probs"},
        {"divergence": "jsd"},
        {"divergence": "reverse_kl"},
        {"teacher_weighting": "confidence"},
    ],
    ids=["default", "probs", "jsd", "reverse", "confidence"],
)
def test_non_finite_rows_give_nan_like_the_reference(rng, value, where, dtype, options):
    """The policy: a row with a NaN or an infinity in the student or any teacher row
    has a NaN loss, soft and hard part and a NaN gradient row; other rows are exact."""
    student, teachers, labels = make_batch(rng, 2, 5, 7, dtype)
    target = student if where == "student" else teachers[int(where[-1])]
    target[2, 3] = value
    d = kd.EnsembleDistiller([1.0, 3.0], T)
    (loss, soft, hard), grad = d.loss_and_grad(
        student, teachers, labels, ALPHA, reduction="none", return_components=True, **options
    )
    expected = ref.general_loss(student, teachers, labels, d.weights, T, ALPHA, reduction="none", **options)
    expected_grad = ref.general_grad(
        student, teachers, labels, d.weights, T, ALPHA, reduction="none", **options
    )
    for got, want in zip((loss, soft, hard), expected, strict=True):
        assert np.isnan(got[2]) and np.isnan(want[2])
        assert np.isfinite(np.delete(got, 2)).all()
    assert np.isnan(grad[2]).all() and np.isnan(expected_grad[2]).all()
    assert np.isfinite(np.delete(grad, 2, axis=0)).all()
    assert np.isnan(d.distillation_loss(student, teachers, labels, ALPHA, **options))
    # An ignored row is never read: its non-finite logits do not matter.
    labels[2] = -100
    assert np.isfinite(d.distillation_loss(student, teachers, labels, ALPHA, ignore_index=-100, **options))


@pytest.mark.parametrize("eps", [1e-10, 0.0])
def test_non_finite_teacher_rows_give_nan_combine_rows(rng, eps):
    _, teachers, _ = make_batch(rng, 3, 4, 5, np.float64)
    teachers[2][1, 0] = -np.inf
    d = kd.EnsembleDistiller([1.0, 1.0, 0.0], T)  # even a teacher of weight zero
    got = d.combine_via_probabilities(teachers, eps=eps)
    expected = ref.combine_via_probabilities(teachers, d.weights, T, eps)
    assert np.isnan(got[1]).all() and np.isnan(expected[1]).all()
    np.testing.assert_allclose(np.delete(got, 1, axis=0), np.delete(expected, 1, axis=0), rtol=1e-12)
    # The logit average is IEEE arithmetic per element, as in NumPy.
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(d.combine_teachers(teachers), ref.combine_teachers(teachers, d.weights))


@pytest.mark.parametrize(
    ("op", "where"),
    [(op, "teacher") for op in _ops(0, [0], 0)] + [(op, "student") for op in LOSS_OPS],
)
def test_check_finite_raises_naming_the_argument(batch, op, where):
    student, teachers, labels = batch
    if where == "student":
        student = student.copy()
        student[0, 0] = np.nan
        name = "student"
    else:
        teachers = [t.copy() for t in teachers]
        teachers[0][3, 1] = np.inf
        name = "teacher" if op in ("forward", "single_loss_and_grad") else r"teachers\[0\]"
    with pytest.raises(ValueError, match=rf"^{name} holds NaN or infinite values"):
        _ops(student, teachers, labels, check_finite=True)[op]()
    _ops(student, teachers, labels, check_finite=False)[op]()  # the policy instead


@pytest.mark.parametrize("layout", ["list", "stacked"])
def test_check_finite_skips_ignored_rows(batch, layout):
    """Rows that ignore_index excludes are never read, so their NaN is not refused;
    the loss equals the one without those non-finite values."""
    student, teachers, labels = (
        x.copy() if isinstance(x, np.ndarray) else [t.copy() for t in x] for x in batch
    )
    labels[2] = -100
    d = kd.EnsembleDistiller(WEIGHTS, T)
    clean = d.distillation_loss(student, teachers, labels, ALPHA, ignore_index=-100)
    teachers[1][2, 0] = np.nan
    student[2, 3] = -np.inf
    t = np.stack(teachers) if layout == "stacked" else teachers
    assert d.distillation_loss(student, t, labels, ALPHA, ignore_index=-100, check_finite=True) == clean
    labels[2] = 0  # the row is read now
    with pytest.raises(ValueError, match=r"^student holds NaN"):
        d.distillation_loss(student, t, labels, ALPHA, ignore_index=-100, check_finite=True)
    student[2, 3] = 0.0
    name = "teachers" if layout == "stacked" else r"teachers\[1\]"
    with pytest.raises(ValueError, match=f"^{name} holds NaN"):
        d.distillation_loss(student, t, labels, ALPHA, ignore_index=-100, check_finite=True)


def test_check_finite_passes_finite_inputs_and_names_stacked_teachers(batch):
    student, teachers, labels = batch
    d = kd.EnsembleDistiller(WEIGHTS, T)
    assert d.distillation_loss(student, teachers, labels, ALPHA, check_finite=True) == d.distillation_loss(
        student, teachers, labels, ALPHA
    )
    stacked = np.stack(teachers)
    stacked[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^teachers holds NaN"):
        d.combine_teachers(stacked, check_finite=True)
    with pytest.raises(TypeError, match="check_finite must be True or False"):
        d.combine_teachers(teachers, check_finite="yes")


# ---------------------------------------------------------------- extreme values


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("temperature", [1e-6, 1.0, 1e6])
def test_huge_logits_give_finite_results(rng, dtype, temperature):
    """|logits| up to 1e30: every result finite and right (relative to its size)."""
    student, teachers, labels = make_batch(rng, 2, 6, 5, np.float64)
    student, teachers = (student * 1e29).astype(dtype), [(t * 1e29).astype(dtype) for t in teachers]
    assert max(np.abs(student).max(), max(np.abs(t).max() for t in teachers)) <= 1e31
    d = kd.EnsembleDistiller([1.0, 2.0], temperature)
    for options in ({}, {"divergence": "jsd"}, {"combine": "probs"}, {"teacher_weighting": "entropy"}):
        loss, grad = d.loss_and_grad(student, teachers, labels, ALPHA, **options)
        expected = ref.general_loss(student, teachers, labels, d.weights, temperature, ALPHA, **options)[0]
        expected_grad = ref.general_grad(student, teachers, labels, d.weights, temperature, ALPHA, **options)
        assert np.isfinite(loss) and np.isfinite(grad).all(), options
        assert abs(loss - expected) <= 1e-5 * abs(expected), (options, loss, expected)
        np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=1e-5 * np.abs(expected_grad).max())
    for eps in (1e-10, 0.0):
        got = d.combine_via_probabilities(teachers, eps=eps)
        assert np.isfinite(got).all()
        want = ref.combine_via_probabilities(teachers, d.weights, temperature, eps)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _longdouble_kl_loss(student, teachers, labels, weights, temperature, alpha) -> float:
    """entrenar's loss in extended precision: the oracle where T^2 amplifies float64 rounding."""
    s = np.asarray(student, dtype=np.longdouble)
    z = sum(w * np.asarray(t, dtype=np.longdouble) for w, t in zip(weights, teachers, strict=True))

    def log_softmax(x):
        m = x.max(axis=1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))

    log_p, log_q = log_softmax(z / temperature), log_softmax(s / temperature)
    if temperature <= 1.0:
        kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=1).mean()
    else:
        # Nearly flat rows: KL = sum_j p_j d_j - log(sum_j q_j exp(d_j)) with d = a - b of
        # the shifted rows.  The log-sums agree to many digits, so their difference,
        # log1p(sum_j q_j expm1(d_j)), is formed from d itself (error ~1e-19 T relative).
        a = z / temperature
        a = a - a.max(axis=1, keepdims=True)
        b = s / temperature
        b = b - b.max(axis=1, keepdims=True)
        d = a - b
        kl = ((np.exp(log_p) * d).sum(axis=1) - np.log1p((np.exp(log_q) * np.expm1(d)).sum(axis=1))).mean()
    ce = -np.take_along_axis(log_softmax(s), labels[:, None], axis=1).mean()
    return float(alpha * temperature**2 * kl + (1 - alpha) * ce)


@pytest.mark.skipif(np.finfo(np.longdouble).eps >= 1e-18, reason="needs 80-bit long double")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("temperature", "rtol"), [(1e-6, 1e-6), (20.0, 1e-12), (1e4, 1e-11), (1e6, 1e-9)])
def test_extreme_temperatures(rng, dtype, temperature, rtol):
    """At large T both rows are nearly uniform and T^2 KL is ~1/T^2 of its terms: float32
    losses above T = 16 are computed in float64, and above T = 16 the KL comes from
    kl_from_sums, whose relative error grows like 1e-16 T (measured: at most 7e-11 at
    T = 1e6 over 20 batches; the tolerance is 1e-15 T)."""
    student, teachers, labels = make_batch(rng, 2, 64, 50, dtype)
    d = kd.EnsembleDistiller([1.0, 2.0], temperature)
    got = d.distillation_loss(student, teachers, labels, 1.0)
    expected = _longdouble_kl_loss(student, teachers, labels, d.weights, temperature, 1.0)
    assert abs(got - expected) <= rtol * abs(expected), (got, expected)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("op", LOSS_OPS)
def test_alpha_at_its_bounds(batch, alpha, op):
    student, teachers, labels = batch
    d = kd.EnsembleDistiller(WEIGHTS, T)
    single = kd.DistillationLoss(T, alpha)
    calls = {
        "distillation_loss": lambda: d.distillation_loss(student, teachers, labels, alpha),
        "loss_and_grad": lambda: d.loss_and_grad(student, teachers, labels, alpha),
        "forward": lambda: single.forward(student, teachers[0], labels),
        "single_loss_and_grad": lambda: single.loss_and_grad(student, teachers[0], labels),
    }
    got = calls[op]()
    expected = _expected(op, student, teachers, labels, alpha=alpha)
    _assert_matches(op, got, expected, np.float64, logit_scale(student, *teachers))


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("op", list(_ops(0, [0], 0)))
def test_empty_batch(op):
    """B = 0: the combines return an empty [0, C] array; every loss raises ValueError."""
    empty = np.empty((0, 4))
    call = _ops(empty, [empty] * 3, np.empty(0, dtype=np.int64))[op]
    if op.startswith("combine"):
        out = call()
        assert out.shape == (0, 4) and out.dtype == np.float64
    else:
        with pytest.raises(ValueError, match="at least one row"):
            call()


def test_no_classes_is_rejected():
    with pytest.raises(ValueError, match="at least one class"):
        kd.EnsembleDistiller([1.0], T).combine_teachers([np.empty((3, 0))])


@pytest.mark.parametrize("op", list(_ops(0, [0], 0)))
def test_one_class(rng, op):
    """C = 1: both distributions are [1]: no divergence, no cross-entropy, zero gradient."""
    student, teachers, _ = make_batch(rng, 3, 5, 1, np.float64)
    labels = np.zeros(5, dtype=np.int64)
    got = _ops(student, teachers, labels)[op]()
    _assert_matches(op, got, _expected(op, student, teachers, labels), np.float64, logit_scale(student))
    if op in ("loss_and_grad", "single_loss_and_grad"):
        assert abs(got[0]) <= 1e-15  # zero up to the rounding of lse(s) - s over one class
        assert np.abs(got[1]).max() <= 1e-15


@pytest.mark.parametrize("n_teachers", [1, 64])
@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
def test_one_and_many_teachers(rng, n_teachers, stacked):
    student, teachers, labels = make_batch(rng, n_teachers, 7, 9, np.float32)
    weights = np.linspace(1.0, 2.0, n_teachers)
    d = kd.EnsembleDistiller(weights, T)
    arg = np.stack(teachers) if stacked else teachers
    scale = logit_scale(student, *teachers)
    for combine in ("logits", "probs"):
        loss, grad = d.loss_and_grad(student, arg, labels, ALPHA, combine=combine)
        want = ref.general_loss(student, teachers, labels, d.weights, T, ALPHA, combine=combine)[0]
        want_grad = ref.general_grad(student, teachers, labels, d.weights, T, ALPHA, combine=combine)
        assert abs(loss - want) <= 1e-6 * (abs(want) + scale)
        assert_array_close(grad, want_grad.astype(np.float32), np.float32)
    assert_array_close(d.combine_teachers(arg), ref.combine_teachers(teachers, d.weights), np.float32)
    assert_array_close(
        d.combine_via_probabilities(arg), ref.combine_via_probabilities(teachers, d.weights, T), np.float32
    )


# ---------------------------------------------------------------- layouts and dtypes


def _layouts(x: np.ndarray, tmp_path, name: str) -> dict[str, np.ndarray]:
    """The same values in other memory layouts."""
    padded = np.zeros((x.shape[0], 2 * x.shape[1]), dtype=x.dtype)
    padded[:, ::2] = x
    flipped = np.ascontiguousarray(x[::-1, ::-1])[::-1, ::-1]
    read_only = x.copy()
    read_only.flags.writeable = False
    path = tmp_path / f"{name}.npy"
    np.save(path, x)
    return {
        "fortran": np.asfortranarray(x),
        "negative-strides": flipped,
        "strided": padded[:, ::2],
        "read-only": read_only,
        "memmap": np.load(path, mmap_mode="r"),
    }


@pytest.mark.parametrize("layout", ["fortran", "negative-strides", "strided", "read-only", "memmap"])
@pytest.mark.parametrize("name", list(registry.OPERATIONS))
def test_memory_layouts_give_the_same_results(tmp_path, layout, name):
    """Every registry row on inputs of another memory layout agrees with the reference.
    (Not bit for bit with C-ordered inputs: rows that are not contiguous are summed
    in another order.)"""
    op = registry.OPERATIONS[name]
    case = registry.Case(3, 11, 13, "float32", seed=9)
    student, teachers, labels, weights = case.arrays(ignored=op.ignored)
    s = _layouts(student, tmp_path, "s")[layout]
    t = [_layouts(x, tmp_path, f"t{k}")[layout] for k, x in enumerate(teachers)]
    got = op.numba_kd(s, t, labels, weights)
    assert np.shape(got) == np.shape(op.numba_kd(student, teachers, labels, weights))
    error = registry.relative_error(got, op.numpy(student, teachers, labels, weights))
    assert error <= registry.tolerance("float32").loss


def test_stacked_memmap_teachers(rng, tmp_path):
    student, teachers, labels = make_batch(rng, 3, 11, 13, np.float64)
    np.save(tmp_path / "t.npy", np.stack(teachers))
    stacked = np.load(tmp_path / "t.npy", mmap_mode="r")
    d = kd.EnsembleDistiller(WEIGHTS, T)
    assert d.distillation_loss(student, stacked, labels, ALPHA) == d.distillation_loss(
        student, np.stack(teachers), labels, ALPHA
    )


@pytest.mark.parametrize("op", list(_ops(0, [0], 0)))
def test_float16_computes_in_float32(rng, op):
    student, teachers, labels = make_batch(rng, 3, 6, 8, np.float16)
    got = _ops(student, teachers, labels)[op]()
    expected = _expected(op, student, teachers, labels)  # on the float16 values, upcast
    # Results of the arithmetic are stored in the inputs' dtype: gradients and combines.
    if isinstance(got, tuple):
        assert isinstance(got[0], float) and got[1].dtype == np.float16
    elif isinstance(got, np.ndarray):
        assert got.dtype == np.float16
    else:
        assert isinstance(got, float)
    _assert_matches(op, got, expected, np.float32 if isinstance(got, float) else np.float16,
                    logit_scale(student, *teachers))  # fmt: skip


# ---------------------------------------------------------------- out=


def _out_calls(d, student, teachers, labels):
    return {
        "combine_teachers": (lambda out: d.combine_teachers(teachers, out=out), student.shape),
        "combine_via_probabilities": (
            lambda out: d.combine_via_probabilities(teachers, out=out),
            student.shape,
        ),
        "loss_and_grad": (
            lambda out: d.loss_and_grad(student, teachers, labels, ALPHA, out=out)[1],
            student.shape,
        ),
    }


@pytest.mark.parametrize("op", ["combine_teachers", "combine_via_probabilities", "loss_and_grad"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_out_receives_the_result(rng, op, dtype):
    student, teachers, labels = make_batch(rng, 3, 10, 7, dtype)
    d = kd.EnsembleDistiller(WEIGHTS, T)
    call, shape = _out_calls(d, student, teachers, labels)[op]
    out = np.full(shape, np.nan, dtype=dtype)
    result = call(out)
    assert result is out
    np.testing.assert_array_equal(out, call(None))


def test_out_gradient_of_3d_inputs(rng):
    student, teachers, labels = make_batch(rng, 2, 12, 5, np.float64)
    s3, t3, y3 = student.reshape(3, 4, 5), [t.reshape(3, 4, 5) for t in teachers], labels.reshape(3, 4)
    d = kd.EnsembleDistiller([1.0, 1.0], T)
    out = np.empty((3, 4, 5))
    loss, grad = d.loss_and_grad(s3, t3, y3, ALPHA, out=out)
    assert grad is out
    expected_loss, expected_grad = d.loss_and_grad(s3, t3, y3, ALPHA)
    assert loss == expected_loss
    np.testing.assert_array_equal(out, expected_grad)
    single = kd.DistillationLoss(T, ALPHA)
    out2 = np.empty((3, 4, 5))
    assert single.loss_and_grad(s3, t3[0], y3, out=out2)[1] is out2


@pytest.mark.parametrize("op", ["combine_teachers", "combine_via_probabilities", "loss_and_grad"])
def test_bad_out_is_rejected(rng, op):
    student, teachers, labels = make_batch(rng, 3, 10, 7, np.float64)
    d = kd.EnsembleDistiller(WEIGHTS, T)
    call, shape = _out_calls(d, student, teachers, labels)[op]
    read_only = np.empty(shape)
    read_only.flags.writeable = False
    cases = [
        (np.empty((10, 6)), ValueError, "out has shape"),
        (np.empty(shape, dtype=np.float32), TypeError, "out has dtype"),
        (np.empty(shape).tolist(), TypeError, "out must be a NumPy array"),
        (np.empty((7, 10)).T, ValueError, "C-contiguous"),
        (read_only, ValueError, "writable"),
        (teachers[1], ValueError, "share memory"),
    ]
    if op == "loss_and_grad":
        cases.append((student, ValueError, "share memory"))
    for out, error, words in cases:
        with pytest.raises(error, match=words):
            call(out)


def test_out_is_only_for_array_results(batch):
    student, teachers, labels = batch
    with pytest.raises(TypeError):
        kd.EnsembleDistiller(WEIGHTS, T).distillation_loss(student, teachers, labels, ALPHA, out=np.empty(1))

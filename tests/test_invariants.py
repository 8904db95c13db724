"""Properties that hold whatever the reference says, and torch as a second oracle."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from helpers import LOSS_RTOL, assert_loss_close, logit_scale, make_batch

import numba_kd as kd

DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_kl_loss_is_non_negative(rng, dtype):
    d = kd.EnsembleDistiller([1.0, 2.0, 0.5], temperature=3.0)
    for _ in range(20):
        student, teachers, labels = make_batch(rng, 3, 16, 50, dtype, spread=rng.uniform(0.1, 10))
        assert d.distillation_loss(student, teachers, labels, 1.0) >= 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_identical_teachers_and_student_give_zero_kl(rng, dtype):
    student, _, labels = make_batch(rng, 1, 32, 100, dtype)
    d = kd.EnsembleDistiller([1.0, 3.0, 2.0], temperature=2.0)
    kl_only = d.distillation_loss(student, [student, student, student], labels, 1.0)
    assert abs(kl_only) <= LOSS_RTOL[np.dtype(dtype)] * logit_scale(student)
    single = kd.DistillationLoss(temperature=2.0, alpha=1.0)(student, student, labels)
    assert abs(single) <= LOSS_RTOL[np.dtype(dtype)] * logit_scale(student)


def test_row_shift_changes_nothing(rng):
    """Softmax is shift-invariant per row: adding c_i to every logit of row i (student
    and teachers each by their own constants) leaves the KL part unchanged; CE too."""
    student, teachers, labels = make_batch(rng, 2, 16, 40, np.float64)
    d = kd.EnsembleDistiller([1.0, 1.0], temperature=2.0)
    base = d.distillation_loss(student, teachers, labels, 0.6)
    shift_s = rng.normal(scale=50.0, size=(16, 1))
    shift_t = rng.normal(scale=50.0, size=(16, 1))
    shifted = d.distillation_loss(student + shift_s, [t + shift_t for t in teachers], labels, 0.6)
    assert shifted == pytest.approx(base, rel=1e-12, abs=1e-12 * 100)
    combined = d.combine_teachers([t + shift_t for t in teachers])
    np.testing.assert_allclose(combined, d.combine_teachers(teachers) + shift_t, rtol=0, atol=1e-12 * 100)
    probs = d.combine_via_probabilities([t + shift_t for t in teachers], eps=0.0)
    # The log-mixture is normalized, so a shift of the teachers disappears from it.
    np.testing.assert_allclose(probs, d.combine_via_probabilities(teachers, eps=0.0), rtol=0, atol=1e-11)


def test_alpha_interpolates_between_soft_and_hard(rng):
    student, teachers, labels = make_batch(rng, 2, 16, 40, np.float64)
    d = kd.EnsembleDistiller([1.0, 1.0], temperature=2.0)
    soft = d.distillation_loss(student, teachers, labels, 1.0)
    hard = d.distillation_loss(student, teachers, labels, 0.0)
    for alpha in (0.25, 0.5, 0.9):
        mixed = d.distillation_loss(student, teachers, labels, alpha)
        assert mixed == pytest.approx(alpha * soft + (1 - alpha) * hard, rel=1e-13)


def test_ensemble_of_one_equals_distillation_loss(rng):
    student, (teacher,), labels = make_batch(rng, 1, 16, 40, np.float32)
    ensemble = kd.EnsembleDistiller([5.0], temperature=3.0)
    single = kd.DistillationLoss(temperature=3.0, alpha=0.4)
    assert ensemble.distillation_loss(student, [teacher], labels, 0.4) == single(student, teacher, labels)


def test_exact_log_mixture_normalizes(rng):
    _, teachers, _ = make_batch(rng, 3, 8, 30, np.float64)
    d = kd.EnsembleDistiller([1.0, 2.0, 3.0], temperature=2.5)
    mixture = d.combine_via_probabilities(teachers, eps=0.0)
    np.testing.assert_allclose(np.exp(mixture / 2.5).sum(axis=1), 1.0, rtol=1e-13)


def test_results_do_not_depend_on_thread_count(rng):
    import numba

    student, teachers, labels = make_batch(rng, 3, 300, 200, np.float32)
    d = kd.EnsembleDistiller([1.0, 2.0, 3.0], temperature=2.0)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = d.distillation_loss(student, teachers, labels, 0.5)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = d.distillation_loss(student, teachers, labels, 0.5)
    finally:
        numba.set_num_threads(before)
    assert one == many


@pytest.mark.skipif(ref.torch is None, reason="torch is not installed")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(1, 2), (5, 10), (64, 1000), (3, 32000)], ids=str)
@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (2.0, 0.7), (4.0, 1.0), (0.5, 0.0)])
def test_against_torch(rng, dtype, shape, temperature, alpha):
    student, teachers, labels = make_batch(rng, 3, *shape, dtype)
    weights = [0.2, 0.3, 0.5]
    d = kd.EnsembleDistiller(weights, temperature=temperature)
    expected = ref.torch_distillation_loss(student, teachers, labels, weights, temperature, alpha)
    scale = logit_scale(student, *teachers) / min(temperature, 1.0)
    assert_loss_close(d.distillation_loss(student, teachers, labels, alpha), expected, dtype, scale)


OPTIONS = [
    {},
    {"divergence": "reverse_kl"},
    {"divergence": "jsd", "beta": 0.3},
    {"combine": "probs"},
    {"teacher_weighting": "confidence"},
    {"teacher_weighting": "entropy"},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())) or "default")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_huge_common_offset_changes_nothing(rng, dtype, options):
    """Every teacher logit shifted by 1e15 (float64) or 1e6 (float32), or every student
    logit: the soft term stays that of the unshifted logits (it is computed relative
    to each row's maximum, and the teacher average relative to one teacher logit)."""
    student, teachers, labels = make_batch(rng, 3, 8, 40, np.float64)
    offset = 1e15 if dtype == np.float64 else 1e6
    # Logits on the grid of the shifted values, so that the shift itself is exact.
    grid = np.spacing(np.asarray(offset, dtype=dtype)) * 4
    student, teachers = np.round(student / grid) * grid, [np.round(t / grid) * grid for t in teachers]
    d = kd.EnsembleDistiller([1.0, 2.0, 3.0], temperature=2.0)
    kwargs = dict(return_components=True, **options)
    base = d.distillation_loss(
        student.astype(dtype), [t.astype(dtype) for t in teachers], labels, 1.0, **kwargs
    )
    shifted_t = [(t + offset).astype(dtype) for t in teachers]
    moved = d.distillation_loss(student.astype(dtype), shifted_t, labels, 1.0, **kwargs)
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    assert moved.soft == pytest.approx(base.soft, rel=rtol, abs=rtol)
    moved = d.distillation_loss(
        (student + offset).astype(dtype), [t.astype(dtype) for t in teachers], labels, 1.0, **kwargs
    )
    assert moved.soft == pytest.approx(base.soft, rel=rtol, abs=rtol)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())) or "default")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_divergence_rows_are_never_negative(rng, dtype, options):
    """C = 1 (every divergence is exactly 0) and near-identical rows: rounding never
    makes a row's divergence negative."""
    d = kd.EnsembleDistiller([1.0, 2.0], temperature=3.0)
    for classes in (1, 2, 50):
        student = rng.normal(size=(64, classes)).astype(dtype)
        teachers = [student + (rng.normal(size=student.shape) * 1e-7).astype(dtype) for _ in range(2)]
        labels = np.zeros(64, dtype=np.int64)
        soft = d.distillation_loss(student, teachers, labels, 1.0, reduction="none", **options)
        assert (soft >= 0).all(), soft.min()


def test_exactly_zero_probabilities_stay_zero():
    """A teacher class 200 logits below the others has probability exactly 0 in float32
    (exp(-200) underflows): the forward KL gets no term from it, and the student's
    gradient entry there is q exactly (no 1e-38 floor from a clamped exp)."""
    student = np.zeros((1, 3), dtype=np.float32)
    teacher = np.array([[0.0, 0.0, -200.0]], dtype=np.float32)
    loss, grad = kd.DistillationLoss(1.0, 1.0).loss_and_grad(student, teacher, np.array([0]))
    assert loss == pytest.approx(np.log(1.5), rel=1e-6)
    assert grad[0, 2] == pytest.approx(1.0 / 3.0, rel=1e-6)
    from numba_kd._math import exp_f32

    assert exp_f32(np.float32(-88.0)) == 0.0 and exp_f32(np.float32(-87.0)) > 0.0

"""loss_and_grad and the loss options, against the float64 reference, central finite
differences and torch autograd."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import reference as ref
from helpers import central_differences, logit_scale, make_batch

import numba_kd as kd
from numba_kd import registry

COMBINES = ["logits", "probs"]
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
WEIGHTINGS = ["static", "confidence", "entropy"]
REDUCTIONS = ["mean", "sum", "none"]
OPTION_GRID = list(itertools.product(COMBINES, DIVERGENCES, WEIGHTINGS, REDUCTIONS))
IGNORE = -100
WEIGHTS = [1.0, 2.0, 3.0]
# registry.TOLERANCES: float64 rtol 1e-12 on losses and 1e-12 absolute on gradients
# (entries of size <= 1); float32 (exponentials in float32, about 1e-7 relative
# each) rtol 1e-6 on losses and 1e-6 absolute on gradients.
LOSS_RTOL = {dtype: registry.tolerance(dtype).loss for dtype in (np.float32, np.float64)}
GRAD_ATOL = {dtype: registry.tolerance(dtype).grad for dtype in (np.float32, np.float64)}


def _batch(rng, dtype, three_d=False, rows=6, classes=11):
    student, teachers, labels = make_batch(rng, len(WEIGHTS), rows, classes, dtype)
    labels[1] = IGNORE
    if three_d:
        shape = (2, rows // 2, classes)
        return student.reshape(shape), [t.reshape(shape) for t in teachers], labels.reshape(shape[:2])
    return student, teachers, labels


def _rows(student, teachers, labels):
    c = student.shape[-1]
    return student.reshape(-1, c), [t.reshape(-1, c) for t in teachers], labels.reshape(-1)


def _opts(combine, divergence, weighting):
    return dict(
        combine=combine, divergence=divergence, beta=0.3, teacher_weighting=weighting, ignore_index=IGNORE
    )


def _assert_loss(actual, expected, dtype, scale):
    rtol = LOSS_RTOL[dtype]
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("combine, divergence, weighting, reduction", OPTION_GRID)
def test_against_reference(rng, combine, divergence, weighting, reduction, three_d, dtype):
    student, teachers, labels = _batch(rng, dtype, three_d)
    opts = _opts(combine, divergence, weighting)
    d = kd.EnsembleDistiller(WEIGHTS, temperature=2.0)
    (loss, soft, hard), grad = d.loss_and_grad(
        student, teachers, labels, 0.6, reduction=reduction, return_components=True, **opts
    )
    rows = _rows(student, teachers, labels)
    expected = ref.general_loss(*rows, WEIGHTS, 2.0, 0.6, reduction, **opts)
    scale = logit_scale(student, *teachers)
    for got, want in zip((loss, soft, hard), expected, strict=True):
        if reduction == "none":
            assert got.shape == labels.shape and got.dtype == np.dtype(dtype)
            got = got.reshape(-1)
        else:
            assert isinstance(got, float)
        _assert_loss(got, want, dtype, scale)
    assert grad.shape == student.shape and grad.dtype == np.dtype(dtype)
    expected_grad = ref.general_grad(*rows, WEIGHTS, 2.0, 0.6, reduction, **opts)
    np.testing.assert_allclose(
        grad.reshape(expected_grad.shape), expected_grad, rtol=0, atol=GRAD_ATOL[dtype]
    )
    assert not grad.reshape(-1, student.shape[-1])[1].any(), "ignored row must have a zero gradient"
    # distillation_loss gives the same value, to the last bit.
    again = d.distillation_loss(student, teachers, labels, 0.6, reduction=reduction, **opts)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(loss))


@pytest.mark.parametrize(
    "combine, divergence, weighting", list(itertools.product(COMBINES, DIVERGENCES, WEIGHTINGS))
)
def test_gradient_matches_finite_differences(rng, combine, divergence, weighting):
    student, teachers, labels = _batch(rng, np.float64, rows=4, classes=5)
    opts = _opts(combine, divergence, weighting)
    d = kd.EnsembleDistiller(WEIGHTS, temperature=1.5)
    _, grad = d.loss_and_grad(student, teachers, labels, 0.4, **opts)
    numeric = central_differences(lambda s: d.distillation_loss(s, teachers, labels, 0.4, **opts), student)
    # Central differences of a float64 loss: error ~ h^2 + eps / h ~ 1e-9.
    np.testing.assert_allclose(grad, numeric, rtol=0, atol=1e-8)


@pytest.mark.skipif(ref.torch is None, reason="torch is not installed")
@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("combine, divergence, weighting, reduction", OPTION_GRID)
def test_against_torch_autograd(rng, combine, divergence, weighting, reduction, three_d):
    student, teachers, labels = _batch(rng, np.float64, three_d)
    opts = _opts(combine, divergence, weighting)
    d = kd.EnsembleDistiller(WEIGHTS, temperature=2.0)
    loss, grad = d.loss_and_grad(student, teachers, labels, 0.6, reduction=reduction, **opts)
    rows = _rows(student, teachers, labels)
    torch_loss, torch_grad = ref.torch_general_loss_and_grad(*rows, WEIGHTS, 2.0, 0.6, reduction, **opts)
    np.testing.assert_allclose(np.reshape(loss, -1), np.reshape(torch_loss, -1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad.reshape(torch_grad.shape), torch_grad, rtol=0, atol=1e-12)


def test_default_options_are_entrenars_loss(rng):
    student, teachers, labels = make_batch(rng, 3, 8, 20, np.float32)
    d = kd.EnsembleDistiller(WEIGHTS, temperature=2.0)
    loss, grad = d.loss_and_grad(student, teachers, labels, 0.7)
    assert loss == d.distillation_loss(student, teachers, labels, 0.7)
    assert loss == d.distillation_loss(
        student, teachers, labels, 0.7, reduction="mean", combine="logits", divergence="forward_kl",
        teacher_weighting="static",
    )  # fmt: skip
    # DESIGN: dL/ds = (alpha T (q - p) + (1 - alpha)(r - onehot)) / N
    z = ref.combine_teachers(teachers, WEIGHTS)
    p = np.exp(ref.log_softmax(z / 2.0))
    q = np.exp(ref.log_softmax(student.astype(np.float64) / 2.0))
    r = np.exp(ref.log_softmax(student.astype(np.float64)))
    onehot = np.eye(20)[labels]
    expected = (0.7 * 2.0 * (q - p) + 0.3 * (r - onehot)) / 8
    np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
def test_temperature_and_alpha_edges(rng, divergence, temperature, alpha):
    student, teachers, labels = _batch(rng, np.float64)
    opts = _opts("logits", divergence, "static")
    d = kd.EnsembleDistiller(WEIGHTS, temperature=temperature)
    loss, grad = d.loss_and_grad(student, teachers, labels, alpha, **opts)
    expected = ref.general_loss(student, teachers, labels, WEIGHTS, temperature, alpha, **opts)[0]
    _assert_loss(loss, expected, np.float64, logit_scale(student, *teachers) / min(temperature, 1.0))
    expected_grad = ref.general_grad(student, teachers, labels, WEIGHTS, temperature, alpha, **opts)
    np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("beta", [1e-6, 0.01, 0.5, 0.99, 1 - 1e-6])
def test_jsd_beta_near_the_ends(rng, beta):
    student, teachers, labels = _batch(rng, np.float64)
    opts = dict(divergence="jsd", beta=beta, ignore_index=IGNORE)
    d = kd.EnsembleDistiller(WEIGHTS, temperature=2.0)
    loss, grad = d.loss_and_grad(student, teachers, labels, 1.0, **opts)
    expected = ref.general_loss(student, teachers, labels, WEIGHTS, 2.0, 1.0, **opts)[0]
    _assert_loss(loss, expected, np.float64, 1.0)
    np.testing.assert_allclose(
        grad, ref.general_grad(student, teachers, labels, WEIGHTS, 2.0, 1.0, **opts), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("combine", COMBINES)
def test_one_teacher_weightings_reduce_to_the_teacher(rng, weighting, combine):
    student, (teacher,), labels = make_batch(rng, 1, 6, 9, np.float64)
    d = kd.EnsembleDistiller([2.0], temperature=2.0)
    base, base_grad = kd.DistillationLoss(2.0, 0.5).loss_and_grad(student, teacher, labels)
    loss, grad = d.loss_and_grad(
        student, [teacher], labels, 0.5, combine=combine, teacher_weighting=weighting
    )
    assert loss == pytest.approx(base, rel=1e-13)
    np.testing.assert_allclose(grad, base_grad, rtol=0, atol=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(rng, reduction):
    student, teachers, labels = make_batch(rng, 3, 5, 7, np.float32)
    labels[:] = IGNORE
    d = kd.EnsembleDistiller(WEIGHTS, temperature=2.0)
    for divergence in DIVERGENCES:
        loss, grad = d.loss_and_grad(
            student, teachers, labels, 0.5, reduction=reduction, ignore_index=IGNORE, divergence=divergence
        )
        assert np.all(np.asarray(loss) == 0.0)
        assert not grad.any()


def test_single_class(rng):
    student, teachers, labels = make_batch(rng, 3, 4, 1, np.float64)
    d = kd.EnsembleDistiller(WEIGHTS, temperature=2.0)
    for divergence in DIVERGENCES:
        loss, grad = d.loss_and_grad(student, teachers, labels, 0.5, divergence=divergence)
        assert abs(loss) < 1e-15
        assert np.all(np.abs(grad) < 1e-15)


def test_mean_divides_by_valid_rows(rng):
    student, teachers, labels = make_batch(rng, 3, 6, 9, np.float64)
    d = kd.EnsembleDistiller(WEIGHTS, temperature=2.0)
    masked = labels.copy()
    masked[[0, 3]] = IGNORE
    loss = d.distillation_loss(student, teachers, masked, 0.5, ignore_index=IGNORE)
    keep = [1, 2, 4, 5]
    kept = d.distillation_loss(student[keep], [t[keep] for t in teachers], labels[keep], 0.5)
    assert loss == pytest.approx(kept, rel=1e-13)
    total = d.distillation_loss(student, teachers, masked, 0.5, ignore_index=IGNORE, reduction="sum")
    assert total == pytest.approx(4 * loss, rel=1e-13)
    per_row = d.distillation_loss(student, teachers, masked, 0.5, ignore_index=IGNORE, reduction="none")
    assert per_row[[0, 3]].tolist() == [0.0, 0.0]
    assert per_row.sum() == pytest.approx(total, rel=1e-13)


def test_single_teacher_class_has_every_option(rng):
    student, (teacher,), labels = make_batch(rng, 1, 6, 9, np.float64)
    labels[2] = IGNORE
    loss_fn = kd.DistillationLoss(temperature=3.0, alpha=0.25)
    for divergence in DIVERGENCES:
        opts = dict(divergence=divergence, beta=0.4, ignore_index=IGNORE)
        (loss, soft, hard), grad = loss_fn.loss_and_grad(
            student, teacher, labels, reduction="sum", return_components=True, **opts
        )
        expected = ref.general_loss(student, [teacher], labels, [1.0], 3.0, 0.25, "sum", **opts)
        np.testing.assert_allclose([loss, soft, hard], expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(
            grad, ref.general_grad(student, [teacher], labels, [1.0], 3.0, 0.25, "sum", **opts), atol=1e-12
        )
        assert loss_fn(student, teacher, labels, reduction="sum", **opts) == loss


def test_option_validation(rng):
    student, teachers, labels = make_batch(rng, 3, 4, 5, np.float64)
    d = kd.EnsembleDistiller(WEIGHTS, temperature=2.0)
    bad = [
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(combine="mean"), ValueError, "combine must be one of"),
        (dict(divergence="kl"), ValueError, "divergence must be one of"),
        (dict(teacher_weighting="trust"), ValueError, "teacher_weighting must be one of"),
        (dict(divergence="jsd", beta=0.0), ValueError, r"beta must be in \(0, 1\)"),
        (dict(divergence="jsd", beta=1.0), ValueError, r"beta must be in \(0, 1\)"),
        (dict(beta="half"), TypeError, "beta must be a real number"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an integer"),
    ]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            d.loss_and_grad(student, teachers, labels, 0.5, **kwargs)
    labels_bad = labels.copy()
    labels_bad[0] = -3
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        d.distillation_loss(student, teachers, labels_bad, 0.5, ignore_index=IGNORE)
    with pytest.raises(ValueError, match="labels must have shape"):
        d.distillation_loss(student.reshape(2, 2, 5), [t.reshape(2, 2, 5) for t in teachers], labels, 0.5)

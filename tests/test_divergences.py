"""The total variation distance and the skew KLs: against the float64 reference,
central finite differences and torch autograd, their limits and argument checks.
(Large temperatures against mpmath: tests/test_hostile.py.)"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import reference as ref
from helpers import central_differences, logit_scale, make_batch

import numba_kd as kd
from numba_kd import registry

DIVERGENCES = ["tvd", "skew_forward_kl", "skew_reverse_kl"]
COMBINES = ["logits", "probs"]
WEIGHTINGS = ["static", "confidence", "entropy"]
OPTION_GRID = list(itertools.product(COMBINES, DIVERGENCES, WEIGHTINGS))
IGNORE = -100
WEIGHTS = [1.0, 2.0, 3.0]
# registry.TOLERANCES: float64 rtol 1e-12 on losses and 1e-12 absolute on gradients,
# float32 1e-6 and 1e-6.
LOSS_RTOL = {dtype: registry.tolerance(dtype).loss for dtype in (np.float32, np.float64)}
GRAD_ATOL = {dtype: registry.tolerance(dtype).grad for dtype in (np.float32, np.float64)}


def _batch(rng, dtype, rows=6, classes=11):
    student, teachers, labels = make_batch(rng, len(WEIGHTS), rows, classes, dtype)
    labels[1] = IGNORE
    return student, teachers, labels


def _opts(combine, divergence, weighting, skew=0.3):
    return dict(
        combine=combine, divergence=divergence, skew=skew, teacher_weighting=weighting, ignore_index=IGNORE
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("combine, divergence, weighting", OPTION_GRID)
def test_against_reference(rng, combine, divergence, weighting, dtype):
    student, teachers, labels = _batch(rng, dtype)
    opts = _opts(combine, divergence, weighting)
    d = kd.EnsembleDistiller(WEIGHTS, temperature=2.0)
    (loss, soft, hard), grad = d.loss_and_grad(
        student, teachers, labels, 0.6, reduction="none", return_components=True, **opts
    )
    expected = ref.general_loss(student, teachers, labels, WEIGHTS, 2.0, 0.6, reduction="none", **opts)
    scale = logit_scale(student, *teachers)
    rtol = LOSS_RTOL[dtype]
    for actual, wanted in zip((loss, soft, hard), expected, strict=True):
        np.testing.assert_allclose(actual, wanted, rtol=rtol, atol=rtol * scale)
    expected_grad = ref.general_grad(student, teachers, labels, WEIGHTS, 2.0, 0.6, reduction="none", **opts)
    assert grad.dtype == dtype
    np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=GRAD_ATOL[dtype])
    assert not grad[1].any(), "an ignored row has a zero gradient"


@pytest.mark.parametrize("combine, divergence", list(itertools.product(COMBINES, DIVERGENCES)))
def test_gradient_matches_finite_differences(rng, combine, divergence):
    student, teachers, labels = _batch(rng, np.float64, rows=4, classes=5)
    opts = _opts(combine, divergence, "static")
    d = kd.EnsembleDistiller(WEIGHTS, temperature=1.5)
    _, grad = d.loss_and_grad(student, teachers, labels, 0.4, **opts)
    numeric = central_differences(lambda s: d.distillation_loss(s, teachers, labels, 0.4, **opts), student)
    # Central differences of a float64 loss: error ~ h^2 + eps / h ~ 1e-9.  The TVD
    # is differentiable here: no class has p = q exactly.
    np.testing.assert_allclose(grad, numeric, rtol=0, atol=1e-8)


@pytest.mark.skipif(ref.torch is None, reason="torch is not installed")
@pytest.mark.parametrize("combine, divergence, weighting", OPTION_GRID)
def test_against_torch_autograd(rng, combine, divergence, weighting):
    student, teachers, labels = _batch(rng, np.float64)
    opts = _opts(combine, divergence, weighting)
    d = kd.EnsembleDistiller(WEIGHTS, temperature=2.0)
    loss, grad = d.loss_and_grad(student, teachers, labels, 0.6, **opts)
    torch_loss, torch_grad = ref.torch_general_loss_and_grad(
        student, teachers, labels, WEIGHTS, 2.0, 0.6, **opts
    )
    np.testing.assert_allclose(loss, torch_loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad, torch_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("divergence", ["skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("skew", [1e-9, 1e-3, 0.5, 1 - 1e-9])
def test_skew_across_its_range(rng, divergence, skew):
    student, teachers, labels = _batch(rng, np.float64)
    opts = _opts("probs", divergence, "static", skew)
    d = kd.EnsembleDistiller(WEIGHTS, temperature=2.0)
    loss, grad = d.loss_and_grad(student, teachers, labels, 1.0, **opts)
    expected = ref.general_loss(student, teachers, labels, WEIGHTS, 2.0, 1.0, **opts)[0]
    assert loss == pytest.approx(expected, rel=1e-12)
    expected_grad = ref.general_grad(student, teachers, labels, WEIGHTS, 2.0, 1.0, **opts)
    np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=1e-12)


def test_skew_kls_limits(rng):
    """lambda = 1 makes the mixture the measured distribution itself: zero; lambda ->
    0 gives the plain KLs."""
    student, teachers, labels = _batch(rng, np.float64)
    d = kd.EnsembleDistiller(WEIGHTS, temperature=2.0)
    for skewed, plain in (("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")):
        opts = dict(ignore_index=IGNORE, divergence=skewed)
        soft, grad = d.loss_and_grad(student, teachers, labels, 1.0, skew=1.0, **opts)
        assert soft == 0.0
        # q (dD/dq - sum q dD/dq) with dD/dq = -1 + 1: q (sum q - 1), rounding only.
        assert np.all(np.abs(grad) < 1e-15)
        near, near_grad = d.loss_and_grad(student, teachers, labels, 1.0, skew=1e-12, **opts)
        exact, exact_grad = d.loss_and_grad(
            student, teachers, labels, 1.0, divergence=plain, ignore_index=IGNORE
        )
        assert near == pytest.approx(exact, rel=1e-10)
        np.testing.assert_allclose(near_grad, exact_grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_tvd_subgradient_and_bounds(rng, dtype):
    """Where the computed p and q are equal the subgradient is 0 (flat rows give
    exactly equal ones); the TVD never exceeds 1, which disjoint distributions reach."""
    d = kd.EnsembleDistiller([1.0], temperature=1.0)
    student, (teacher,), labels = make_batch(rng, 1, 5, 8, dtype)
    flat = np.full((5, 8), 3.0, dtype)
    loss, grad = d.loss_and_grad(flat, [flat - 7.0], labels % 8, 1.0, divergence="tvd")
    # p and q are 1/8 up to the rounding of each row's normalizer.
    assert 0.0 <= loss <= 1e-15
    assert not grad.any()
    far = np.full((2, 4), -1e4, dtype)
    far[:, 0] = 0.0
    near = np.full((2, 4), -1e4, dtype)
    near[:, 1] = 0.0
    loss = d.distillation_loss(far, [near], np.array([0, 1]), 1.0, divergence="tvd")
    assert loss == pytest.approx(1.0, rel=LOSS_RTOL[dtype])
    loss = d.distillation_loss(student, [teacher], labels, 1.0, divergence="tvd", reduction="none")
    assert np.all((loss > 0) & (loss <= 1.0))


def test_options_are_checked(rng):
    student, teachers, labels = _batch(rng, np.float32)
    d = kd.EnsembleDistiller(WEIGHTS, temperature=2.0)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="skew must be in"):
            d.distillation_loss(student, teachers, labels, 0.5, divergence="skew_reverse_kl", skew=bad)
    with pytest.raises(TypeError, match="skew must be a real number"):
        d.distillation_loss(student, teachers, labels, 0.5, divergence="skew_forward_kl", skew="0.1")
    with pytest.raises(ValueError, match="divergence must be one of"):
        d.distillation_loss(student, teachers, labels, 0.5, divergence="tv")
    # skew is read by the skew divergences only, as beta by the JSD.
    plain = d.distillation_loss(student, teachers, labels, 0.5, ignore_index=IGNORE)
    assert d.distillation_loss(student, teachers, labels, 0.5, ignore_index=IGNORE, skew=5.0) == plain


def test_topk_teachers_refuse_the_new_divergences(rng):
    from numba_kd.sparse import TopK

    student, _, labels = _batch(rng, np.float32, classes=20)
    top = TopK(np.array([[[0, 1]] * 6]), np.log(np.full((1, 6, 2), 0.4, np.float32)), tail="bucket")
    loss = kd.DistillationLoss(2.0, 0.5)
    for divergence in DIVERGENCES:
        with pytest.raises(ValueError, match="not available with TopK teachers"):
            loss.forward(student, top, labels, divergence=divergence)

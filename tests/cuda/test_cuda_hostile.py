"""Unusual and hostile inputs on the CUDA target (simulator or GPU): the same
guarantees as tests/test_hostile.py, on a lean matrix (the simulator is slow)."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import reference as ref
from helpers import make_batch
from numba import cuda

import numba_kd as kd
from numba_kd import registry

if not (numba.config.ENABLE_CUDASIM or cuda.is_available()):
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 or a CUDA GPU", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

T = 2.0
ALPHA = 0.4


def _device(student, teachers, labels):
    return cuda.to_device(student), [cuda.to_device(t) for t in teachers], cuda.to_device(labels)


@pytest.mark.parametrize("value", [np.nan, -np.inf])
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("options", [{}, {"reduction": "none"}, {"divergence": "jsd", "reduction": "none"}])
def test_non_finite_rows_give_nan(rng, value, where, options):
    student, teachers, labels = make_batch(rng, 2, 3, 5, np.float64)
    (student if where == "student" else teachers[1])[1, 2] = value
    d = kd.EnsembleDistiller([1.0, 3.0], T)
    s, t, y = _device(student, teachers, labels)
    loss = d.distillation_loss(s, t, y, ALPHA, **options)
    if options.get("reduction") == "none":
        loss = loss.copy_to_host()
        expected = ref.general_loss(student, teachers, labels, d.weights, T, ALPHA, **options)[0]
        assert np.isnan(loss[1]) and np.isnan(expected[1])
        np.testing.assert_allclose(np.delete(loss, 1), np.delete(expected, 1), rtol=1e-12)
    else:
        assert np.isnan(loss)
    _, grad = d.loss_and_grad(s, t, y, ALPHA, **options)
    grad = grad.copy_to_host()
    assert np.isnan(grad[1]).all() and np.isfinite(np.delete(grad, 1, axis=0)).all()


@pytest.mark.parametrize("eps", [1e-10, 0.0])
def test_non_finite_teacher_rows_give_nan_combine_rows(rng, eps):
    _, teachers, _ = make_batch(rng, 2, 3, 4, np.float64)
    teachers[1][2, 0] = np.inf
    d = kd.EnsembleDistiller([1.0, 0.0], T)  # even a teacher of weight zero
    got = d.combine_via_probabilities([cuda.to_device(t) for t in teachers], eps=eps).copy_to_host()
    expected = ref.combine_via_probabilities(teachers, d.weights, T, eps)
    assert np.isnan(got[2]).all() and np.isnan(expected[2]).all()
    np.testing.assert_allclose(got[:2], expected[:2], rtol=1e-12)


def test_check_finite_raises_naming_the_argument(rng):
    student, teachers, labels = make_batch(rng, 2, 3, 4, np.float32)
    teachers[1][0, 3] = np.nan
    s, t, y = _device(student, teachers, labels)
    d = kd.EnsembleDistiller([1.0, 1.0], T)
    with pytest.raises(ValueError, match=r"^teachers\[1\] holds NaN"):
        d.distillation_loss(s, t, y, ALPHA, check_finite=True)
    with pytest.raises(ValueError, match=r"^teachers holds NaN"):
        d.combine_teachers(cuda.to_device(np.stack(teachers)), check_finite=True)
    student[2, 1] = -np.inf
    with pytest.raises(ValueError, match=r"^student holds NaN"):
        kd.DistillationLoss(T, ALPHA).forward(cuda.to_device(student), t[0], y, check_finite=True)
    assert d.distillation_loss(s, [t[0], t[0]], y, ALPHA, check_finite=True) > 0


def test_check_finite_skips_ignored_rows(rng):
    """Rows that ignore_index excludes are never read, so their NaN is not refused."""
    student, teachers, labels = make_batch(rng, 2, 3, 4, np.float64)
    labels[0] = -100
    teachers[1][0, 3] = np.nan
    student[0, 1] = np.inf
    s, t, y = _device(student, teachers, labels)
    d = kd.EnsembleDistiller([1.0, 1.0], T)
    got = d.distillation_loss(s, t, y, ALPHA, ignore_index=-100, check_finite=True)
    expected = d.distillation_loss(student, teachers, labels, ALPHA, ignore_index=-100, check_finite=True)
    assert np.isfinite(got) and abs(got - expected) <= 1e-12 * abs(expected)
    labels[0] = 1  # the row is read now
    with pytest.raises(ValueError, match=r"^student holds NaN"):
        d.distillation_loss(*_device(student, teachers, labels), ALPHA, ignore_index=-100, check_finite=True)


@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_confidence_weights_that_all_underflow(combine):
    """Logits of scale 1e4 (every confidence underflows float64): the device computes
    the weights as logarithms, like the host, and agrees with it."""
    rng = np.random.default_rng(3)
    student, teachers, _ = registry.synthetic_batch(rng, 3, 4, 6, np.float64, spread=1e4, independent=True)
    labels = np.argmin(sum(teachers), axis=1)
    d = kd.EnsembleDistiller([1.0, 2.0, 3.0], T)
    opts = {"teacher_weighting": "confidence", "combine": combine}
    host = d.distillation_loss(student, teachers, labels, ALPHA, **opts)
    device = d.distillation_loss(*_device(student, teachers, labels), ALPHA, **opts)
    assert abs(device - host) <= 1e-11 * abs(host), (device, host)


def test_bad_labels_are_rejected(rng):
    student, teachers, labels = make_batch(rng, 1, 3, 4, np.float64)
    s, t, _ = _device(student, teachers, labels)
    d = kd.EnsembleDistiller([1.0], T)
    with pytest.raises(ValueError, match="labels must be in"):
        d.distillation_loss(s, t, cuda.to_device(np.array([0, 4, 1])), ALPHA)
    with pytest.raises(ValueError, match="labels must be in"):
        d.loss_and_grad(s, t, cuda.to_device(np.array([0, -1, 1])), ALPHA, ignore_index=-100)
    with pytest.raises(TypeError, match="labels must be integer"):
        d.distillation_loss(s, t, cuda.to_device(np.array([0.0, 1.0, 1.0])), ALPHA)
    with pytest.raises(ValueError, match="labels has 2 entries"):
        d.distillation_loss(s, t, cuda.to_device(np.array([0, 1])), ALPHA)


def test_sizes_and_bounds(rng):
    """B = 0, C = 1, alpha at 0 and 1, huge logits."""
    d = kd.EnsembleDistiller([1.0, 2.0], T)
    empty = cuda.to_device(np.empty((0, 3)))
    assert d.combine_teachers([empty, empty]).shape == (0, 3)
    with pytest.raises(ValueError, match="at least one row"):
        d.distillation_loss(empty, [empty, empty], cuda.to_device(np.empty(0, dtype=np.int64)), ALPHA)
    student, teachers, _ = make_batch(rng, 2, 3, 1, np.float64)
    zeros = np.zeros(3, dtype=np.int64)
    loss, grad = d.loss_and_grad(*_device(student, teachers, zeros), ALPHA)
    assert abs(loss) <= 1e-15 and np.abs(grad.copy_to_host()).max() <= 1e-15
    student, teachers, labels = make_batch(rng, 2, 3, 6, np.float64)
    for alpha in (0.0, 1.0):
        got = d.distillation_loss(*_device(student, teachers, labels), alpha)
        expected = ref.general_loss(student, teachers, labels, d.weights, T, alpha)[0]
        assert abs(got - expected) <= 1e-12 * (abs(expected) + 10.0)
    student, teachers = student * 1e29, [x * 1e29 for x in teachers]
    for options in ({}, {"combine": "probs"}):
        got = d.distillation_loss(*_device(student, teachers, labels), ALPHA, **options)
        expected = ref.general_loss(student, teachers, labels, d.weights, T, ALPHA, **options)[0]
        assert np.isfinite(got) and abs(got - expected) <= 1e-6 * abs(expected), options


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_large_temperatures_keep_their_digits(rng, divergence):
    """Above T = 16 the KL of a logit-combine row comes from sums of expm1 of the
    log-ratios, as on the CPU, whose error against 50-digit mpmath is about 1e-16 T
    (tests/test_hostile.py): the difference of log-sums it replaces lost about
    1e-16 T^2 (5e-8 relative at T = 1e5)."""
    student, teachers, labels = make_batch(rng, 3, 4, 37, np.float64)
    for temperature in (1e3, 1e5, 1e6):
        d = kd.EnsembleDistiller([1.0, 2.0, 0.5], temperature)
        cpu_loss, cpu_grad = d.loss_and_grad(student, teachers, labels, ALPHA, divergence=divergence)
        loss, grad = d.loss_and_grad(*_device(student, teachers, labels), ALPHA, divergence=divergence)
        bound = 4e-16 * temperature
        assert abs(loss - cpu_loss) <= bound * abs(cpu_loss), (temperature, loss, cpu_loss)
        np.testing.assert_allclose(grad.copy_to_host(), cpu_grad, rtol=0, atol=bound * np.abs(cpu_grad).max())


@pytest.mark.parametrize("temperature, scale", [(100.0, 1.0), (1e5, 1.0), (1e-7, 1e32)])
def test_float32_logits_outside_float32_temperatures(rng, temperature, scale):
    """Outside [1e-6, 16] float32 logits run the float64 kernels (float32 arithmetic
    would lose a soft term that is 1/T^2 of its log-sums, or overflow at z / T),
    as on the CPU: every result is the float64 kernels' result on the same values,
    bit for bit (per-row results and the gradient rounded once to float32)."""
    student, teachers, labels = make_batch(rng, 2, 3, 5, np.float64)
    student, teachers = (
        (student * scale).astype(np.float32),
        [(t * scale).astype(np.float32) for t in teachers],
    )
    wide_student, wide_teachers = student.astype(np.float64), [t.astype(np.float64) for t in teachers]
    d = kd.EnsembleDistiller([1.0, 2.0], temperature)
    narrow = _device(student, teachers, labels)
    wide = _device(wide_student, wide_teachers, labels)
    for options in ({}, {"divergence": "jsd"}, {"combine": "probs", "reduction": "none"}):
        if options.get("reduction") == "none":
            got = [
                x.copy_to_host()
                for x in d.distillation_loss(*narrow, ALPHA, return_components=True, **options)
            ]
            expected = [
                x.copy_to_host() for x in d.distillation_loss(*wide, ALPHA, return_components=True, **options)
            ]
            assert all(
                x.dtype == np.float32 for x in got
            )  # per-row results keep the logits' arithmetic dtype
            np.testing.assert_array_equal(got[1], expected[1].astype(np.float32))  # soft
            np.testing.assert_array_equal(got[2], expected[2].astype(np.float32))  # hard
            np.testing.assert_array_equal(got[0], got[1] + got[2])  # loss = soft + hard, as stored
            continue
        got = d.distillation_loss(*narrow, ALPHA, **options)
        expected = d.distillation_loss(*wide, ALPHA, **options)
        assert got == expected, options
        # The float64 CUDA kernels' own error at large T is about 1e-16 T^2 relative
        # (docs/reliability.md).
        oracle = ref.general_loss(
            wide_student, wide_teachers, labels, d.weights, temperature, ALPHA, **options
        )[0]
        assert abs(got - oracle) <= (1e-12 + 4e-16 * temperature**2) * abs(oracle), (options, got, oracle)
    _, grad = d.loss_and_grad(*narrow, ALPHA, divergence="reverse_kl")
    _, grad64 = d.loss_and_grad(*wide, ALPHA, divergence="reverse_kl")
    host = grad.copy_to_host()
    assert host.dtype == np.float32
    np.testing.assert_array_equal(host, grad64.copy_to_host().astype(np.float32))


@pytest.mark.parametrize("op", ["combine_teachers", "combine_via_probabilities", "loss_and_grad"])
def test_out(rng, op):
    student, teachers, labels = make_batch(rng, 2, 3, 4, np.float64)
    s, t, y = _device(student, teachers, labels)
    d = kd.EnsembleDistiller([1.0, 2.0], T)
    calls = {
        "combine_teachers": lambda out: d.combine_teachers(t, out=out),
        "combine_via_probabilities": lambda out: d.combine_via_probabilities(t, out=out),
        "loss_and_grad": lambda out: d.loss_and_grad(s, t, y, ALPHA, out=out)[1],
    }
    call = calls[op]
    out = cuda.to_device(np.full((3, 4), np.nan))
    assert call(out) is out
    np.testing.assert_array_equal(out.copy_to_host(), call(None).copy_to_host())
    with pytest.raises(ValueError, match="out has shape"):
        call(cuda.to_device(np.empty((3, 5))))
    with pytest.raises(TypeError, match="out has dtype"):
        call(cuda.to_device(np.empty((3, 4), dtype=np.float32)))
    with pytest.raises(TypeError, match="out must be a CUDA device array"):
        call(np.empty((3, 4)))
    with pytest.raises(ValueError, match="share memory"):
        call(t[1])


def test_huge_logits_keep_distributions_normalized():
    """Ties at |x / T| = 1e17: log S must not be rounded into the maximum."""
    m = 1e17
    t = np.array([[m, m, 0.0, -m]])
    s = np.array([[0.0, m / 2, m, 0.0]])
    y = np.array([0])
    f = kd.DistillationLoss(1.0, 1.0)
    args = (cuda.to_device(s), cuda.to_device(t), cuda.to_device(y))
    exact = 7.5e16  # KL(p || q): p = (1/2, 1/2, 0, 0), log q = (-m, -m / 2, 0, -m)
    assert abs(f(*args) - exact) <= 1e-12 * exact
    assert abs(f(*args, combine="probs") - exact) <= 1e-12 * exact
    assert f(*args, divergence="jsd") <= np.log(2) + 1e-12
    # CE of a tied maximum: log(number of ties).
    ce = kd.DistillationLoss(1.0, 0.0)(cuda.to_device(t), cuda.to_device(t), cuda.to_device(y))
    assert abs(ce - np.log(2)) <= 1e-12

"""Bad input raises TypeError/ValueError naming the argument; nothing is read out of bounds."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import reference as ref
from helpers import make_batch

import numba_kd as kd


@pytest.fixture
def d():
    return kd.EnsembleDistiller([1.0, 2.0], temperature=2.0)


@pytest.fixture
def batch():
    student, teachers, _ = make_batch(np.random.default_rng(0), 2, 4, 5, np.float64)
    return student, teachers, np.array([0, 1, 4, 2])


@pytest.mark.parametrize(
    "weights, error, match",
    [
        ([], ValueError, "Must have at least one teacher"),
        ([0.0, 0.0], ValueError, "Teacher weights must sum to positive value"),
        ([1.0, -0.5], ValueError, "finite and non-negative"),
        ([1.0, np.nan], ValueError, "finite and non-negative"),
        ([1.0, np.inf], ValueError, "finite and non-negative"),
        ([[1.0, 2.0]], ValueError, "weights must be a 1-D"),
        (["a", "b"], TypeError, "weights must be a sequence of real numbers"),
        # Like temperatures, weights are numbers: NumPy would parse "1" and make None NaN.
        (["1", 2, 1], TypeError, r"weights must be a sequence of real numbers, got '1' \(str\)"),
        ([None, 1.0], TypeError, r"got None \(NoneType\)"),
        ([1.0, 2j], TypeError, "got dtype complex128"),
        ([True, False], TypeError, "got dtype bool"),
    ],
)
def test_bad_weights(weights, error, match):
    with pytest.raises(error, match=match):
        kd.EnsembleDistiller(weights, temperature=1.0)


def test_weights_cannot_be_changed_from_outside():
    d = kd.EnsembleDistiller([1.0, 3.0], temperature=2.0)
    w = d.weights
    assert not w.flags.writeable
    w.flags.writeable = True  # allowed on the copy, which the distiller does not use
    w[:] = 0.0
    np.testing.assert_array_equal(d.weights, [0.25, 0.75])


@pytest.mark.parametrize("teachers", [None, {"a": 1}, (np.zeros((2, 3)) for _ in range(2)), {1, 2}])
def test_teachers_of_the_wrong_kind(d, teachers):
    with pytest.raises(TypeError, match="teachers must be a list or tuple of arrays, or one array"):
        d.combine_teachers(teachers)


@pytest.mark.parametrize("t", [np.nan, np.inf])
def test_non_finite_temperature(t):
    with pytest.raises(ValueError, match="Temperature must be"):
        kd.EnsembleDistiller([1.0], temperature=t)


@pytest.mark.parametrize("value", ["2", None, True, 1j])
def test_temperature_and_alpha_types(value):
    with pytest.raises(TypeError, match="temperature must be a real number"):
        kd.EnsembleDistiller([1.0], temperature=value)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        kd.DistillationLoss(temperature=1.0, alpha=value)


def test_alpha_validated_per_call(d, batch):
    student, teachers, labels = batch
    for a in (-1e-9, 1.0 + 1e-9, np.nan):
        with pytest.raises(ValueError, match=r"Alpha must be in \[0, 1\]"):
            d.distillation_loss(student, teachers, labels, a)


def test_uniform_arguments():
    with pytest.raises(ValueError, match="Must have at least one teacher"):
        kd.EnsembleDistiller.uniform(0, temperature=1.0)
    with pytest.raises(TypeError, match="num_teachers must be an integer"):
        kd.EnsembleDistiller.uniform(2.0, temperature=1.0)


def test_no_teachers(d, batch):
    student, _, labels = batch
    with pytest.raises(ValueError, match="Must have at least one teacher"):
        d.combine_teachers([])
    with pytest.raises(ValueError, match="Must have at least one teacher"):
        d.distillation_loss(student, np.zeros((0, 4, 5)), labels, 0.5)


def test_teacher_count(d, batch):
    student, teachers, labels = batch
    with pytest.raises(ValueError, match="Number of teachers must match number of weights"):
        d.distillation_loss(student, teachers * 2, labels, 0.5)
    with pytest.raises(ValueError, match="Number of teachers must match number of weights"):
        d.combine_via_probabilities(np.stack(teachers * 2))


def test_teacher_shapes(d, batch):
    student, teachers, labels = batch
    with pytest.raises(ValueError, match="All teacher logits must have the same shape"):
        d.distillation_loss(student, [teachers[0], teachers[1][:3]], labels, 0.5)
    with pytest.raises(ValueError, match=r"teachers\[1\] must be a 2-D"):
        d.combine_teachers([teachers[0], teachers[1][0]])
    with pytest.raises(ValueError, match="teachers must be a list of"):
        d.combine_teachers(teachers[0])


def test_student_shape(d, batch):
    student, teachers, labels = batch
    with pytest.raises(ValueError, match=r"student logits shape .* does not match teacher"):
        d.distillation_loss(student[:, :4], teachers, labels, 0.5)
    with pytest.raises(ValueError, match="student must be a 2-D"):
        d.distillation_loss(student[0], teachers, labels, 0.5)
    loss_fn = kd.DistillationLoss(temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match="does not match teacher"):
        loss_fn(student, teachers[0][:2], labels)
    with pytest.raises(ValueError, match="teacher must be a 2-D"):
        loss_fn(student, np.stack(teachers), labels)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, bool, np.complex128, object])
def test_non_float_logits(d, batch, dtype):
    student, teachers, labels = batch
    with pytest.raises(TypeError, match="student must hold floating-point logits"):
        d.distillation_loss(student.astype(dtype), teachers, labels, 0.5)
    with pytest.raises(TypeError, match=r"teachers\[0\] must hold floating-point logits"):
        d.combine_teachers([teachers[0].astype(dtype), teachers[1]])
    with pytest.raises(TypeError, match="teachers must hold floating-point logits"):
        d.combine_teachers(np.stack(teachers).astype(dtype))


def test_label_count(d, batch):
    student, teachers, labels = batch
    with pytest.raises(ValueError, match="labels has 3 entries but the logits have 4 rows"):
        d.distillation_loss(student, teachers, labels[:3], 0.5)
    with pytest.raises(ValueError, match="labels must be a 1-D"):
        d.distillation_loss(student, teachers, labels[:, None], 0.5)


@pytest.mark.parametrize("bad", [-1, 5, 10**6, np.iinfo(np.int64).min])
def test_label_range(d, batch, bad):
    student, teachers, labels = batch
    labels = labels.copy()
    labels[2] = bad
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\): labels\[2\]"):
        d.distillation_loss(student, teachers, labels, 0.5)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        kd.DistillationLoss(2.0, 0.5)(student, teachers[0], labels)


def test_huge_unsigned_label(d, batch):
    student, teachers, _ = batch
    labels = np.array([0, 1, np.iinfo(np.uint64).max, 2], dtype=np.uint64)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        d.distillation_loss(student, teachers, labels, 0.5)


@pytest.mark.parametrize("labels", [[0.0, 1.0, 2.0, 3.0], [True, False, True, False], ["0", "1", "2", "3"]])
def test_label_dtype(d, batch, labels):
    student, teachers, _ = batch
    with pytest.raises(TypeError, match="labels must be integer class indices"):
        d.distillation_loss(student, teachers, labels, 0.5)


def test_empty_shapes(d):
    empty_rows = np.zeros((0, 5))
    with pytest.raises(ValueError, match="student logits must have at least one row"):
        d.distillation_loss(empty_rows, [empty_rows, empty_rows], np.zeros(0, dtype=int), 0.5)
    # Array results of zero rows are empty arrays, as in NumPy.
    assert d.combine_teachers([empty_rows, empty_rows]).shape == (0, 5)
    assert d.combine_via_probabilities([empty_rows, empty_rows]).shape == (0, 5)
    no_classes = np.zeros((3, 0))
    with pytest.raises(ValueError, match="must have at least one class"):
        d.combine_teachers([no_classes, no_classes])


def test_eps(d, batch):
    _, teachers, _ = batch
    for eps in (-1e-3, np.nan, np.inf):
        with pytest.raises(ValueError, match="eps must be finite and non-negative"):
            d.combine_via_probabilities(teachers, eps=eps)
    with pytest.raises(TypeError, match="eps must be a real number"):
        d.combine_via_probabilities(teachers, eps="0")


def test_unsupported_float_width(d, batch):
    _, teachers, _ = batch
    if np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("longdouble is float64 on this platform")
    with pytest.raises(TypeError, match="floating-point logits"):
        d.combine_teachers([t.astype(np.longdouble) for t in teachers])


def test_non_native_byte_order(d, batch):
    student, teachers, labels = batch
    swapped = [t.astype(t.dtype.newbyteorder(">")) for t in teachers]
    np.testing.assert_array_equal(d.combine_teachers(swapped), d.combine_teachers(teachers))
    assert d.distillation_loss(student, swapped, labels, 0.5) == d.distillation_loss(
        student, teachers, labels, 0.5
    )


def test_huge_weights_normalize_without_overflow():
    d = kd.EnsembleDistiller([1e308, 1e308, 0.0], temperature=1.0)
    np.testing.assert_allclose(d.weights, [0.5, 0.5, 0.0])


@pytest.mark.parametrize("t", [1e6 * (1 + 1e-15), 1e8, 1e155, 1e300])
def test_temperature_above_the_float64_limit(t):
    with pytest.raises(ValueError, match="Temperature must be at most 1e"):
        kd.EnsembleDistiller([1.0], temperature=t)
    with pytest.raises(ValueError, match="Temperature must be at most 1e"):
        kd.DistillationLoss(t, 0.5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("t", [1e-300, 1e-39, 1e-6, 1e6])
@pytest.mark.parametrize(
    "options", [{}, {"divergence": "jsd"}, {"combine": "probs", "divergence": "reverse_kl"}]
)
def test_extreme_accepted_temperatures_are_correct(t, dtype, options):
    """Every accepted temperature gives the reference's loss: float32 outside
    1e-6 <= T <= 16 computes in float64; at T = 1e6 the float64 soft term itself has an
    error of about 1e-16 T^2 log C (the reference's too), so it gets that tolerance."""
    rng = np.random.default_rng(3)
    student, teachers, labels = make_batch(rng, 2, 4, 50, dtype)
    d = kd.EnsembleDistiller([1.0, 1.0], temperature=t)
    (loss, soft, hard), grad = d.loss_and_grad(
        student, teachers, labels, 0.5, return_components=True, **options
    )
    expected = ref.general_loss(student, teachers, labels, [1.0, 1.0], t, 0.5, **options)
    rtol = max(1e-16 * t * t * math.log(50), 1e-6 if dtype == np.float32 and 1e-6 <= t <= 16 else 1e-12)
    np.testing.assert_allclose([loss, soft, hard], expected, rtol=rtol, atol=1e-300)
    assert np.isfinite(grad).all()


def test_temperature_whose_inverse_overflows():
    with pytest.raises(ValueError, match="Temperature must be finite"):
        kd.EnsembleDistiller([1.0], temperature=1e-310)


def test_ignore_index_must_fit_int64(d, batch):
    student, teachers, labels = batch
    for bad in (2**63, -(2**63)):
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            d.distillation_loss(student, teachers, labels, 0.5, ignore_index=bad)


class _TensorRequiringGrad:
    """Stands in for a torch tensor with requires_grad=True (host or device)."""

    requires_grad = True

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("a tensor that requires grad must be refused before it is read")


@pytest.mark.parametrize("argument", ["student", "teachers[1]"])
def test_tensor_requiring_grad_is_refused_by_name(d, batch, argument):
    student, teachers, labels = batch
    if argument == "student":
        student = _TensorRequiringGrad()
    else:
        teachers = [teachers[0], _TensorRequiringGrad()]
    pattern = "^" + re.escape(argument) + " is a tensor that requires grad.*detach"
    with pytest.raises(TypeError, match=pattern):
        d.distillation_loss(student, teachers, labels, 0.5)
    with pytest.raises(TypeError, match="requires grad"):
        d.loss_and_grad(student, teachers, labels, 0.5)


def test_torch_tensor_requiring_grad_is_refused():
    torch = pytest.importorskip("torch")
    d = kd.EnsembleDistiller([1.0], temperature=2.0)
    student = torch.zeros(3, 4, requires_grad=True)
    teacher = torch.zeros(3, 4)
    with pytest.raises(TypeError, match="student is a tensor that requires grad"):
        d.distillation_loss(student, [teacher], np.zeros(3, dtype=np.int64), 0.5)
    loss = d.distillation_loss(student.detach(), [teacher], np.zeros(3, dtype=np.int64), 0.5)
    assert math.isclose(loss, 0.5 * math.log(4.0), rel_tol=1e-6)


def test_validated_options_are_reused_by_type_not_by_value(d, batch):
    """Options are validated once per distinct call; 1, 1.0 and True stay distinct."""
    student, teachers, labels = batch
    d.distillation_loss(student, teachers, labels, 0.5, ignore_index=1)
    with pytest.raises(TypeError, match="ignore_index must be an integer or None"):
        d.distillation_loss(student, teachers, labels, 0.5, ignore_index=True)
    with pytest.raises(TypeError, match="ignore_index must be an integer or None"):
        d.distillation_loss(student, teachers, labels, 0.5, ignore_index=1.0)
    with pytest.raises(TypeError, match="beta"):
        d.distillation_loss(student, teachers, labels, 0.5, divergence="jsd", beta=[0.5])

"""Every CUDA kernel through the public API, on the simulator or a real GPU.

CI runs this under NUMBA_ENABLE_CUDASIM=1 through tests/test_cuda_simulator.py
(the variable must be set before numba is imported); scripts/gpu_check.sh runs it
on a real device.  The simulator runs each CUDA thread as a Python thread, so
the matrix is lean: every C in {1, 7, 33, 300}, B in {1, 5} and K in {1, 3}
appears, for both dtypes and both teacher layouts.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
import reference as ref
from helpers import ARRAY_ATOL, logit_scale, make_batch
from numba import cuda

import numba_kd as kd
from numba_kd import _signatures, registry

if not (numba.config.ENABLE_CUDASIM or cuda.is_available()):
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 or a CUDA GPU", allow_module_level=True)

# float32 kernels accumulate in float32 on a real GPU (a fixed tree of float32
# partial sums), so the float32 loss tolerance on the CUDA target is 1e-5
# (registry.TOLERANCES).
CUDA_LOSS_RTOL = {np.dtype(d): registry.tolerance(d, "cuda").loss for d in ("float32", "float64")}
CASES = [(1, 1, 1), (5, 7, 3), (1, 33, 3), (5, 300, 1)]  # (B, C, K)
DTYPES = [np.float32, np.float64]


def to_device_teachers(teachers, stacked):
    if stacked:
        return cuda.to_device(np.stack(teachers))
    return [cuda.to_device(t) for t in teachers]


def assert_cuda_loss(actual, expected, dtype, scale):
    rtol = CUDA_LOSS_RTOL[np.dtype(dtype)]
    assert isinstance(actual, float)
    assert abs(actual - expected) <= rtol * (abs(expected) + scale), (actual, expected)


def assert_device_array(actual, expected, dtype):
    assert hasattr(actual, "copy_to_host"), type(actual)
    host = actual.copy_to_host()
    assert host.dtype == np.dtype(dtype)
    np.testing.assert_allclose(
        host, expected, rtol=0, atol=ARRAY_ATOL[np.dtype(dtype)] * logit_scale(expected)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-C{c[1]}-K{c[2]}")
def test_operations_match_reference(rng, case, stacked, dtype):
    rows, classes, n_teachers = case
    student, teachers, labels = make_batch(rng, n_teachers, rows, classes, dtype)
    weights = np.arange(1.0, n_teachers + 1.0)
    d = kd.EnsembleDistiller(weights, temperature=2.0)
    dev_teachers = to_device_teachers(teachers, stacked)

    loss = d.distillation_loss(cuda.to_device(student), dev_teachers, cuda.to_device(labels), 0.7)
    expected = ref.distillation_loss(student, teachers, labels, weights, 2.0, 0.7)
    assert_cuda_loss(loss, expected, dtype, logit_scale(student, *teachers))

    assert_device_array(d.combine_teachers(dev_teachers), ref.combine_teachers(teachers, weights), dtype)
    for eps in (1e-10, 0.0):
        expected_probs = ref.combine_via_probabilities(teachers, weights, 2.0, eps)
        assert_device_array(d.combine_via_probabilities(dev_teachers, eps=eps), expected_probs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_single_teacher_forward(rng, dtype):
    student, (teacher,), labels = make_batch(rng, 1, 5, 33, dtype)
    loss_fn = kd.DistillationLoss(temperature=3.0, alpha=0.4)
    loss = loss_fn(cuda.to_device(student), cuda.to_device(teacher), cuda.to_device(labels))
    expected = ref.distillation_loss_single(student, teacher, labels, 3.0, 0.4)
    assert_cuda_loss(loss, expected, dtype, logit_scale(student, teacher))


def test_device_scalar_does_not_leave_the_device(rng):
    student, teachers, labels = make_batch(rng, 3, 5, 7, np.float32)
    d = kd.EnsembleDistiller.uniform(3, temperature=2.0)
    args = (cuda.to_device(student), to_device_teachers(teachers, False), cuda.to_device(labels), 0.5)
    scalar = d.distillation_loss(*args, return_device_scalar=True)
    assert hasattr(scalar, "copy_to_host") and scalar.shape == (1,)
    assert scalar.copy_to_host()[0] == np.float32(d.distillation_loss(*args))


def test_non_contiguous_device_inputs(rng):
    student, teachers, labels = make_batch(rng, 3, 5, 33, np.float64)
    d = kd.EnsembleDistiller([1.0, 2.0, 3.0], temperature=1.5)
    padded = np.zeros((5, 40))
    padded[:, 2:35] = teachers[2]
    given = [
        cuda.to_device(teachers[0]),
        cuda.to_device(np.asfortranarray(teachers[1])),
        cuda.to_device(padded)[:, 2:35],
    ]
    loss = d.distillation_loss(cuda.to_device(np.asfortranarray(student)), given, cuda.to_device(labels), 0.3)
    expected = ref.distillation_loss(student, teachers, labels, d.weights, 1.5, 0.3)
    assert_cuda_loss(loss, expected, np.float64, logit_scale(student, *teachers))
    assert_device_array(d.combine_teachers(given), ref.combine_teachers(teachers, d.weights), np.float64)


def test_int32_labels(rng):
    student, teachers, labels = make_batch(rng, 2, 5, 7, np.float32)
    d = kd.EnsembleDistiller.uniform(2, temperature=2.0)
    dev = (cuda.to_device(student), to_device_teachers(teachers, True))
    as64 = d.distillation_loss(*dev, cuda.to_device(labels.astype(np.int64)), 0.5)
    as32 = d.distillation_loss(*dev, cuda.to_device(labels.astype(np.int32)), 0.5)
    assert as32 == as64


def test_labels_out_of_range_never_read(rng):
    student, teachers, labels = make_batch(rng, 2, 5, 7, np.float32)
    labels[3] = 7
    d = kd.EnsembleDistiller.uniform(2, temperature=2.0)
    args = (cuda.to_device(student), to_device_teachers(teachers, False), cuda.to_device(labels), 0.5)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\)"):
        d.distillation_loss(*args)
    # Without synchronizing there is no exception to raise: the loss is NaN.
    assert math.isnan(d.distillation_loss(*args, return_device_scalar=True).copy_to_host()[0])


def test_device_argument_overrides(rng):
    student, teachers, labels = make_batch(rng, 2, 5, 7, np.float64)
    d = kd.EnsembleDistiller.uniform(2, temperature=2.0)
    on_host = d.distillation_loss(student, teachers, labels, 0.5)
    # NumPy inputs, explicitly sent to the CUDA kernels.
    on_cuda = d.distillation_loss(student, teachers, labels, 0.5, device="cuda")
    assert on_cuda == pytest.approx(on_host, rel=1e-12)
    combined = d.combine_teachers(teachers, device="cuda")
    assert hasattr(combined, "copy_to_host")
    # Device inputs, explicitly brought back to the CPU kernels.
    dev = (cuda.to_device(student), to_device_teachers(teachers, False), cuda.to_device(labels))
    assert d.distillation_loss(*dev, 0.5, device="cpu") == on_host
    assert isinstance(d.combine_teachers(dev[1], device="cpu"), np.ndarray)


def test_mixed_host_and_device_inputs_raise(rng):
    student, teachers, labels = make_batch(rng, 2, 5, 7, np.float32)
    d = kd.EnsembleDistiller.uniform(2, temperature=2.0)
    with pytest.raises(ValueError, match="inputs mix host"):
        d.distillation_loss(cuda.to_device(student), teachers, labels, 0.5)
    with pytest.raises(ValueError, match="inputs mix host"):
        d.combine_teachers([cuda.to_device(teachers[0]), teachers[1]])


def test_mixed_dtypes_on_device_raise(rng):
    student, teachers, labels = make_batch(rng, 2, 5, 7, np.float32)
    d = kd.EnsembleDistiller.uniform(2, temperature=2.0)
    with pytest.raises(TypeError, match="CUDA inputs share one dtype"):
        d.distillation_loss(
            cuda.to_device(student.astype(np.float64)),
            to_device_teachers(teachers, False),
            cuda.to_device(labels),
            0.5,
        )
    with pytest.raises(TypeError, match="CUDA labels must be int32 or int64"):
        d.distillation_loss(
            cuda.to_device(student),
            to_device_teachers(teachers, False),
            cuda.to_device(labels.astype(np.int16)),
            0.5,
        )


def test_repeated_calls_compile_nothing(rng):
    d = kd.EnsembleDistiller.uniform(2, temperature=2.0)

    def run(rows, classes):
        student, teachers, labels = make_batch(rng, 2, rows, classes, np.float32)
        dev = (cuda.to_device(student), to_device_teachers(teachers, False), cuda.to_device(labels))
        d.distillation_loss(*dev, 0.5)
        d.combine_teachers(dev[1])
        d.combine_via_probabilities(dev[1])

    run(2, 7)
    count = _signatures.compiled_signature_count()
    run(3, 9)
    run(1, 40)
    assert _signatures.compiled_signature_count() == count


# Every combination of the loss options on one small float64 batch with a masked
# row, then a cover of float32 and 3-D inputs.
ALL_OPTIONS = [
    (c, d, w, r, np.float64, False)
    for c in ("logits", "probs")
    for d in ("forward_kl", "reverse_kl", "jsd")
    for w in ("static", "confidence", "entropy")
    for r in ("mean", "sum", "none")
]
OPTION_CASES = [
    *ALL_OPTIONS,
    ("logits", "forward_kl", "static", "mean", np.float64, False),
    ("logits", "forward_kl", "static", "none", np.float32, True),
    ("probs", "forward_kl", "confidence", "sum", np.float64, False),
    ("logits", "reverse_kl", "entropy", "mean", np.float32, False),
    ("probs", "reverse_kl", "static", "none", np.float64, False),
    ("logits", "jsd", "confidence", "sum", np.float64, True),
    ("probs", "jsd", "entropy", "mean", np.float64, False),
]
IGNORE = -100


@pytest.mark.parametrize("combine, divergence, weighting, reduction, dtype, three_d", OPTION_CASES)
def test_loss_and_grad_options(rng, combine, divergence, weighting, reduction, dtype, three_d):
    student, teachers, labels = make_batch(rng, 3, 4, 9, dtype)
    labels[1] = IGNORE
    opts = dict(
        combine=combine, divergence=divergence, beta=0.3, teacher_weighting=weighting, ignore_index=IGNORE
    )
    weights = [1.0, 2.0, 3.0]
    d = kd.EnsembleDistiller(weights, temperature=2.0)
    shape = (2, 2, 9) if three_d else (4, 9)
    dev = (
        cuda.to_device(student.reshape(shape)),
        [cuda.to_device(t.reshape(shape)) for t in teachers],
        cuda.to_device(labels.reshape(shape[:-1])),
    )
    (loss, soft, hard), grad = d.loss_and_grad(*dev, 0.6, reduction=reduction, return_components=True, **opts)
    expected = ref.general_loss(student, teachers, labels, weights, 2.0, 0.6, reduction, **opts)
    expected_grad = ref.general_grad(student, teachers, labels, weights, 2.0, 0.6, reduction, **opts)
    rtol = CUDA_LOSS_RTOL[np.dtype(dtype)]
    for got, want in zip((loss, soft, hard), expected, strict=True):
        got = got.copy_to_host().reshape(-1) if reduction == "none" else got
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * logit_scale(student, *teachers))
    assert grad.shape == shape
    grad_atol = registry.tolerance(dtype, "cuda").grad
    np.testing.assert_allclose(grad.copy_to_host().reshape(4, 9), expected_grad, rtol=0, atol=grad_atol)
    value = d.distillation_loss(*dev, 0.6, reduction=reduction, **opts)
    if reduction != "none":
        assert value == loss


def test_general_kernel_flags_bad_labels(rng):
    student, teachers, labels = make_batch(rng, 2, 5, 7, np.float64)
    labels[2] = 9
    d = kd.EnsembleDistiller.uniform(2, temperature=2.0)
    dev = (cuda.to_device(student), [cuda.to_device(t) for t in teachers], cuda.to_device(labels))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\)"):
        d.loss_and_grad(*dev, 0.5)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_edge_cases_on_the_device(rng, divergence):
    d = kd.EnsembleDistiller([1.0, 2.0], temperature=20.0)
    # All rows ignored: loss 0, zero gradient.
    student, teachers, labels = make_batch(rng, 2, 3, 5, np.float64)
    labels[:] = IGNORE
    dev = (cuda.to_device(student), [cuda.to_device(t) for t in teachers], cuda.to_device(labels))
    loss, grad = d.loss_and_grad(*dev, 0.5, ignore_index=IGNORE, divergence=divergence, beta=1e-6)
    assert loss == 0.0 and not grad.copy_to_host().any()
    # One class: nothing to distill, nothing to classify (zero up to rounding times T^2).
    student, teachers, labels = make_batch(rng, 2, 3, 1, np.float64)
    dev = (cuda.to_device(student), [cuda.to_device(t) for t in teachers], cuda.to_device(labels))
    loss, grad = d.loss_and_grad(*dev, 1.0, divergence=divergence, beta=1 - 1e-6)
    assert abs(loss) < 1e-15 * 20.0**2 and np.all(np.abs(grad.copy_to_host()) < 1e-15 * 20.0)


def test_general_kernel_bad_label_poisons_the_device_scalar(rng):
    student, teachers, labels = make_batch(rng, 1, 3, 5, np.float64)
    labels[1] = 99
    loss_fn = kd.DistillationLoss(2.0, 0.5)
    dev = (cuda.to_device(student), cuda.to_device(teachers[0]), cuda.to_device(labels))
    for options in ({"ignore_index": IGNORE}, {"divergence": "jsd"}):
        scalar = loss_fn.forward(*dev, return_device_scalar=True, **options)
        assert math.isnan(scalar.copy_to_host()[0])
    scalar, grad = loss_fn.loss_and_grad(*dev, return_device_scalar=True)
    assert math.isnan(scalar.copy_to_host()[0])
    assert np.isnan(grad.copy_to_host()[1]).all()


def test_3d_device_inputs_must_be_c_contiguous(rng):
    student, teachers, labels = make_batch(rng, 1, 4, 5, np.float64)
    shape = (2, 2, 5)
    s = np.asfortranarray(student.reshape(shape))
    dev = (
        cuda.to_device(s),
        [cuda.to_device(teachers[0].reshape(shape))],
        cuda.to_device(labels.reshape(2, 2)),
    )
    d = kd.EnsembleDistiller([1.0], temperature=2.0)
    with pytest.raises(ValueError, match="must be C-contiguous"):
        d.loss_and_grad(*dev, 0.5)

"""16-bit logits (float16, and bfloat16 from ml_dtypes) on the CPU.

The kernels read the 16-bit values themselves (widened to float32 row by row) and
compute exactly as for float32 inputs, so every result is checked bit for bit
against the float32 path on the widened values: losses equal, gradients and
combines equal to the float32 results rounded to the input dtype (to nearest,
ties to even).  The conversions are checked over every 16-bit pattern and a few
million float32 values against NumPy's and ml_dtypes' casts, and the accuracy
against the float64 reference is stated in the terms of the dtypes' rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_batch, option_ids
from numba import njit

import numba_kd as kd
from numba_kd import reference
from numba_kd._arrays import bits_view
from numba_kd._math import bf16_from_f32, f16_from_f32, f32_from_bf16, f32_from_f16
from numba_kd.sparse import TopK

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
SIXTEEN_BIT = [F16, BF16]
# Unit roundoff of the stored results: 2^-11 (float16), 2^-8 (bfloat16).
STORE_ROUNDOFF = {F16: 2.0**-11, BF16: 2.0**-8}


# ------------------------------------------------------------------ conversions


def _elementwise(convert):
    """A compiled loop out[j] = convert(x[j]) around one of _math's scalar conversions."""

    @njit
    def apply(x, out):
        for j in range(x.shape[0]):
            out[j] = convert(x[j])

    return apply


WIDEN = {BF16: _elementwise(f32_from_bf16), F16: _elementwise(f32_from_f16)}
ROUND = {BF16: _elementwise(bf16_from_f32), F16: _elementwise(f16_from_f32)}


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_widening_is_exact_for_every_pattern(dtype):
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = np.empty(patterns.size, np.float32)
    WIDEN[dtype](bits_view(patterns.view(dtype)), got)
    expected = patterns.view(dtype).astype(np.float32)
    nan = np.isnan(expected)
    assert np.isnan(got[nan]).all()
    np.testing.assert_array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))


def _float32_probe() -> np.ndarray:
    """Random float32 bit patterns, every pattern near the 16-bit types' roundings
    (exact values, halfway points and their neighbours, subnormals) and the edges."""
    rng = np.random.default_rng(7)
    upper = np.arange(1 << 16, dtype=np.uint32) << 16
    edges = np.array(
        [65504, 65519.996, 65520, 65536, 1e9, 2.0**-25, 2.0**-24, 3 * 2.0**-25, 2.0**-14, 6e-8, np.inf, 3e38],
        np.float32,
    )
    return np.concatenate(
        [
            rng.integers(0, 1 << 32, 2_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
            np.arange(1 << 16, dtype=np.uint32).view(np.float32),  # float32 subnormals
            (upper | 0x8000).view(np.float32),  # bfloat16 halfway points
            (upper | 0x7FFF).view(np.float32),
            (upper | 0x8001).view(np.float32),
            np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32),
            (np.arange(1 << 16, dtype=np.uint32) << 13 | 0x1000).view(np.float32),  # float16 halfway
            edges,
            -edges,
        ]
    )


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_rounding_matches_numpy_casts(dtype):
    x = _float32_probe()
    got = bits_view(np.empty(x.size, dtype))
    ROUND[dtype](x, got)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = x.astype(dtype).view(got.dtype)
    nan = np.isnan(x)
    assert np.isnan(got[nan].view(dtype).astype(np.float32)).all()
    np.testing.assert_array_equal(got[~nan], expected[~nan])


# ------------------------------------------------------------------ the float32 path, bit for bit


def _batch(rng, dtype, rows=6, classes=40, n_teachers=3, scale=4.0):
    student, teachers, labels = make_batch(rng, n_teachers, rows, classes, np.float64, spread=scale)
    return student.astype(dtype), [t.astype(dtype) for t in teachers], labels


def _widened(x):
    return [t.astype(np.float32) for t in x] if isinstance(x, list) else x.astype(np.float32)


def _rounded(x: np.ndarray, dtype) -> np.ndarray:
    return x.astype(dtype).view(np.uint16)


OPTIONS = [
    {},
    {"divergence": "reverse_kl", "reduction": "sum"},
    {"divergence": "jsd", "beta": 0.3, "ignore_index": -100},
    {"combine": "probs", "teacher_weighting": "entropy", "divergence": "tvd"},
    {"teacher_weighting": "confidence", "divergence": "skew_forward_kl", "reduction": "none"},
]


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=option_ids)
def test_losses_compute_as_float32(rng, dtype, options):
    student, teachers, labels = _batch(rng, dtype)
    if options.get("ignore_index") is not None:
        labels[::3] = options["ignore_index"]
    d = kd.EnsembleDistiller([1.0, 2.0, 0.5], temperature=2.0)
    loss, grad = d.loss_and_grad(student, teachers, labels, 0.4, **options)
    loss32, grad32 = d.loss_and_grad(_widened(student), _widened(teachers), labels, 0.4, **options)
    assert grad.dtype == dtype and grad.shape == student.shape
    np.testing.assert_array_equal(_rounded(grad32, dtype), grad.view(np.uint16))
    if options.get("reduction") == "none":
        assert loss.dtype == np.float32  # per-row losses keep the arithmetic's dtype
        np.testing.assert_array_equal(loss, loss32)
    else:
        assert isinstance(loss, float) and loss == loss32
    np.testing.assert_array_equal(d.distillation_loss(student, teachers, labels, 0.4, **options), loss32)
    out = np.empty(student.shape, np.float32)
    assert d.loss_and_grad(student, teachers, labels, 0.4, out=out, **options)[1] is out
    np.testing.assert_array_equal(out, grad32)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_stacked_three_d_and_parallel_inputs_compute_as_float32(rng, dtype):
    """[K, B, S, C] stacked teachers with [B, S, C] students, large enough for the
    parallel kernels; one teacher through DistillationLoss."""
    student, teachers, labels = _batch(rng, dtype, rows=48, classes=500, n_teachers=2)
    student3, stacked = student.reshape(6, 8, 500), np.stack(teachers).reshape(2, 6, 8, 500)
    labels3 = labels.reshape(6, 8)
    d = kd.EnsembleDistiller([1.0, 1.0], temperature=3.0)
    loss, grad = d.loss_and_grad(student3, stacked, labels3, 0.5)
    loss32, grad32 = d.loss_and_grad(_widened(student3), _widened(stacked), labels3, 0.5)
    assert loss == loss32
    np.testing.assert_array_equal(_rounded(grad32, dtype), grad.view(np.uint16))
    single = kd.DistillationLoss(3.0, 0.5)
    assert single.forward(student, teachers[0], labels) == single.forward(
        _widened(student), _widened(teachers[0]), labels
    )


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_combines_compute_as_float32(rng, dtype):
    _, teachers, _ = _batch(rng, dtype, rows=20, classes=1000)
    d = kd.EnsembleDistiller([1.0, 2.0, 0.5], temperature=2.0)
    wide = _widened(teachers)
    calls = [
        lambda t, **kw: d.combine_teachers(t, **kw),
        lambda t, **kw: d.combine_via_probabilities(t, **kw),
        lambda t, **kw: d.combine_via_probabilities(t, 0.0, **kw),
    ]
    for call in calls:
        got, expected = call(teachers), call(wide)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got.view(np.uint16), _rounded(expected, dtype))
        out = np.empty(expected.shape, np.float32)
        assert call(teachers, out=out) is out
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_topk_teachers_with_a_sixteen_bit_student(rng, dtype):
    student, teachers, labels = _batch(rng, dtype, rows=5, classes=30, n_teachers=2)
    stacked = np.stack([t.astype(np.float64) / 2.0 for t in teachers])
    indices = np.argsort(-stacked, axis=-1)[..., :6]
    log_p = stacked - np.log(np.exp(stacked).sum(axis=-1, keepdims=True))
    top = TopK(indices, np.take_along_axis(log_p, indices, -1).astype(np.float32), temperature=2.0)
    d = kd.EnsembleDistiller([1.0, 1.0], temperature=2.0)
    loss, grad = d.loss_and_grad(student, top, labels, 0.5, combine="probs")
    loss32, grad32 = d.loss_and_grad(_widened(student), top, labels, 0.5, combine="probs")
    assert loss == loss32 and grad.dtype == dtype
    np.testing.assert_array_equal(grad.view(np.uint16), _rounded(grad32, dtype))


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_nonfinite_values_give_nan_rows_or_a_clear_error(rng, dtype):
    student, teachers, labels = _batch(rng, dtype)
    student[1, 3] = np.inf
    teachers[2][4, 0] = np.nan
    d = kd.EnsembleDistiller([1.0, 1.0, 1.0], temperature=2.0)
    rows, grad = d.loss_and_grad(student, teachers, labels, 0.5, reduction="none")
    assert np.isnan(rows[[1, 4]]).all() and np.isfinite(np.delete(rows, [1, 4])).all()
    assert np.isnan(grad[[1, 4]].astype(np.float32)).all()
    assert np.isfinite(np.delete(grad, [1, 4], axis=0).astype(np.float32)).all()
    with pytest.raises(ValueError, match=r"student holds NaN or infinite values"):
        d.distillation_loss(student, teachers, labels, 0.5, check_finite=True)


# ------------------------------------------------------------------ dtypes of mixed inputs and out=


def test_mixed_dtypes_promote_like_numpy(rng):
    student, teachers, labels = _batch(rng, BF16)
    d = kd.EnsembleDistiller([1.0, 1.0, 1.0], temperature=2.0)
    for other, expected in [(np.float32, np.float32), (np.float64, np.float64), (np.float16, np.float32)]:
        mixed = [teachers[0].astype(other), *teachers[1:]]
        _, grad = d.loss_and_grad(student, mixed, labels, 0.5)
        assert grad.dtype == expected
        assert d.combine_teachers(mixed).dtype == expected


def test_out_of_another_dtype_is_refused(rng):
    student, teachers, labels = _batch(rng, BF16)
    d = kd.EnsembleDistiller([1.0, 1.0, 1.0], temperature=2.0)
    with pytest.raises(
        TypeError, match=r"out has dtype float64, the result has dtype bfloat16 \(or float32\)"
    ):
        d.loss_and_grad(student, teachers, labels, 0.5, out=np.empty(student.shape))
    with pytest.raises(TypeError, match=r"out has dtype float16, the result has dtype bfloat16"):
        d.combine_teachers(teachers, out=np.empty(student.shape, np.float16))


def test_other_small_floats_are_refused(rng):
    student, teachers, labels = _batch(rng, np.float32)
    d = kd.EnsembleDistiller([1.0, 1.0, 1.0], temperature=2.0)
    fp8 = np.dtype(ml_dtypes.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"student must hold floating-point logits \(float16, bfloat16"):
        d.distillation_loss(student.astype(fp8), teachers, labels, 0.5)


# ------------------------------------------------------------------ accuracy against float64


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_accuracy_against_the_float64_reference(rng, dtype):
    """On the 16-bit values: the loss within float32 arithmetic of the float64
    reference; each gradient entry within the rounding to the input dtype (u |g|,
    or half float16's subnormal spacing, 2^-25, for entries below its smallest
    normal 6.1e-5, where a mean over many rows puts them) plus the float32
    arithmetic (1e-6 of the row's largest entry)."""
    student, teachers, labels = _batch(rng, dtype, rows=64, classes=300)
    s64, t64 = student.astype(np.float64), [t.astype(np.float64) for t in teachers]
    d = kd.EnsembleDistiller([1.0, 2.0, 0.5], temperature=2.0)
    for options in ({}, {"divergence": "jsd"}, {"combine": "probs"}):
        loss, grad = d.loss_and_grad(student, teachers, labels, 0.5, **options)
        parts = reference.general_loss(s64, t64, labels, d.weights, 2.0, 0.5, "mean", **options)
        expected_grad = reference.general_grad(s64, t64, labels, d.weights, 2.0, 0.5, "mean", **options)
        assert abs(loss - parts[0]) <= 1e-6 * abs(parts[0])
        g = grad.astype(np.float64)
        row_scale = np.abs(expected_grad).max(axis=1, keepdims=True)
        subnormal = float(np.finfo(dtype).smallest_subnormal) / 2 if dtype == F16 else 0.0
        bound = STORE_ROUNDOFF[dtype] * np.abs(expected_grad) + subnormal + 1e-6 * row_scale
        assert (np.abs(g - expected_grad) <= bound).all()

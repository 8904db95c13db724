"""Every public operation against the float64 reference, over shapes, dtypes,
teacher counts, teacher layouts and memory layouts."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from helpers import assert_array_close, assert_loss_close, logit_scale, make_batch

import numba_kd as kd
from numba_kd import registry

ROWS = [1, 3, 64, 1000]
CLASSES = [1, 2, 10, 1000, 32000]
MAX_LOGITS_PER_ARRAY = 2_000_000
SHAPES = [(b, c) for b in ROWS for c in CLASSES if b * c <= MAX_LOGITS_PER_ARRAY]
DTYPES = [np.float32, np.float64]
TEACHER_COUNTS = [1, 2, 5]


# The registry's rows with default options: every public operation.  (Each loss
# option's row is checked against the reference, torch and jax at one shape in
# tests/test_registry.py, and over random shapes by the fuzz test.)
DEFAULT_ROWS = [name for name in registry.OPERATIONS if "[" not in name]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n_teachers", TEACHER_COUNTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}xC{s[1]}")
@pytest.mark.parametrize("name", DEFAULT_ROWS)
def test_against_reference(name, shape, n_teachers, dtype):
    op = registry.OPERATIONS[name]
    case = registry.Case(
        n_teachers, *shape, np.dtype(dtype).name, seed=shape[0] * 100_003 + shape[1] + n_teachers
    )
    student, teachers, labels, weights = case.arrays()
    got = op.numba_kd(student, teachers, labels, weights)
    expected = op.numpy(student, teachers, labels, weights)
    if op.scalar:
        assert_loss_close(got, expected, dtype, logit_scale(student, *teachers))
    elif name.startswith("loss_and_grad"):
        assert got.dtype == np.dtype(dtype) and got.shape == expected.shape
        allowed = registry.tolerance(dtype).grad * max(1.0, float(np.max(np.abs(expected))))
        np.testing.assert_allclose(got, expected, rtol=0, atol=allowed)
    else:
        assert_array_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(1, 7), (64, 10), (64, 1000)], ids=lambda s: f"B{s[0]}xC{s[1]}")
def test_single_teacher_forward(rng, shape, dtype):
    student, (teacher,), labels = make_batch(rng, 1, *shape, dtype)
    for temperature, alpha in [(1.0, 0.0), (2.0, 0.7), (4.0, 1.0), (0.5, 0.3)]:
        loss_fn = kd.DistillationLoss(temperature=temperature, alpha=alpha)
        expected = ref.distillation_loss_single(student, teacher, labels, temperature, alpha)
        scale = logit_scale(student, teacher) / temperature
        assert_loss_close(loss_fn.forward(student, teacher, labels), expected, dtype, scale)
        assert loss_fn(student, teacher, labels) == loss_fn.forward(student, teacher, labels)


def _layout(x: np.ndarray, layout: str) -> np.ndarray:
    """The same values as ``x`` in another memory layout."""
    if layout == "C":
        return np.ascontiguousarray(x)
    if layout == "F":
        return np.asfortranarray(x)
    if layout == "sliced":  # rows with a gap between them and an offset start
        padded = np.zeros((*x.shape[:-1], x.shape[-1] + 3), dtype=x.dtype)
        padded[..., 1 : x.shape[-1] + 1] = x
        return padded[..., 1 : x.shape[-1] + 1]
    if layout == "every-other-row":
        doubled = np.repeat(x, 2, axis=-2)
        return doubled[..., ::2, :]
    if layout == "negative-strides":
        flipped = np.ascontiguousarray(x[..., ::-1, ::-1])
        return flipped[..., ::-1, ::-1]
    raise AssertionError(layout)


LAYOUTS = ["C", "F", "sliced", "every-other-row", "negative-strides"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(rng, layout, stacked, dtype):
    """Any strides, list or [K, B, C]: same answers, inputs untouched."""
    student, teachers, labels = make_batch(rng, 3, 37, 129, dtype)
    d = kd.EnsembleDistiller([0.2, 0.5, 0.3], temperature=1.5)
    if stacked:
        given = _layout(np.stack(teachers), layout)
    else:
        given = [_layout(t, layout) for t in teachers]
    s = _layout(student, layout)
    before = [np.array(t, copy=True) for t in given]

    assert_array_close(d.combine_teachers(given), ref.combine_teachers(teachers, d.weights), dtype)
    for eps in (1e-10, 0.0):
        expected = ref.combine_via_probabilities(teachers, d.weights, 1.5, eps)
        assert_array_close(d.combine_via_probabilities(given, eps=eps), expected, dtype)
    expected_loss = ref.distillation_loss(student, teachers, labels, d.weights, 1.5, 0.4)
    scale = logit_scale(student, *teachers)
    assert_loss_close(d.distillation_loss(s, given, labels, 0.4), expected_loss, dtype, scale)
    for b, t in zip(before, given, strict=True):
        np.testing.assert_array_equal(b, t)


def test_mixed_layouts_in_one_list(rng):
    student, teachers, labels = make_batch(rng, 3, 20, 50, np.float32)
    given = [teachers[0], np.asfortranarray(teachers[1]), _layout(teachers[2], "sliced")]
    d = kd.EnsembleDistiller.uniform(3, temperature=2.0)
    expected = ref.distillation_loss(student, teachers, labels, d.weights, 2.0, 0.5)
    assert_loss_close(
        d.distillation_loss(student, given, labels, 0.5), expected, np.float32, logit_scale(student)
    )
    assert_array_close(d.combine_teachers(given), ref.combine_teachers(teachers, d.weights), np.float32)


def test_mixed_precision_promotes_like_numpy(rng):
    student, teachers, labels = make_batch(rng, 2, 8, 30, np.float32)
    teachers64 = [teachers[0].astype(np.float64), teachers[1]]
    d = kd.EnsembleDistiller([1.0, 1.0], temperature=2.0)
    assert d.combine_teachers(teachers64).dtype == np.float64
    assert d.combine_via_probabilities(teachers64).dtype == np.float64
    expected = ref.distillation_loss(student, teachers64, labels, d.weights, 2.0, 0.5)
    loss = d.distillation_loss(student, teachers64, labels, 0.5)
    assert_loss_close(loss, expected, np.float64, logit_scale(student, *teachers))


def test_float16_computes_in_float32(rng):
    student, teachers, labels = make_batch(rng, 2, 8, 30, np.float16)
    d = kd.EnsembleDistiller([1.0, 3.0], temperature=2.0)
    out = d.combine_teachers(teachers)
    assert out.dtype == np.float16  # computed in float32, stored in the teachers' dtype
    assert_array_close(out, ref.combine_teachers(teachers, d.weights), np.float16)
    expected = ref.distillation_loss(student, teachers, labels, d.weights, 2.0, 0.5)
    loss = d.distillation_loss(student, teachers, labels, 0.5)
    assert_loss_close(loss, expected, np.float32, logit_scale(student, *teachers))


def test_nested_lists_convert_like_numpy():
    d = kd.EnsembleDistiller([1.0, 1.0], temperature=1.0)
    student = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]
    teachers = [[[1.0, 2.0, 2.5], [0.5, 0.0, 1.0]], [[2.0, 1.0, 3.0], [0.0, 1.0, 0.0]]]
    labels = [2, 0]
    expected = ref.distillation_loss(student, teachers, labels, d.weights, 1.0, 0.5)
    loss = d.distillation_loss(student, teachers, labels, 0.5)
    assert_loss_close(loss, expected, np.float64, 4.0)
    assert d.combine_teachers(teachers).dtype == np.float64


def test_zero_weight_teacher_is_ignored(rng):
    """A weight of 0 removes the teacher, also from the exact log-mixture."""
    _, teachers, _ = make_batch(rng, 3, 16, 40, np.float64)
    d = kd.EnsembleDistiller([1.0, 0.0, 2.0], temperature=3.0)
    d2 = kd.EnsembleDistiller([1.0, 2.0], temperature=3.0)
    kept = [teachers[0], teachers[2]]
    for eps in (1e-10, 0.0):
        np.testing.assert_allclose(
            d.combine_via_probabilities(teachers, eps=eps),
            d2.combine_via_probabilities(kept, eps=eps),
            rtol=1e-13,
            atol=1e-13,
        )
    expected = ref.combine_via_probabilities(teachers, d.weights, 3.0, 0.0)
    assert_array_close(d.combine_via_probabilities(teachers, eps=0.0), expected, np.float64)


def test_labels_of_any_integer_dtype(rng):
    student, teachers, labels = make_batch(rng, 2, 10, 20, np.float64)
    d = kd.EnsembleDistiller.uniform(2, temperature=2.0)
    expected = d.distillation_loss(student, teachers, labels, 0.5)
    for dt in (np.int8, np.uint8, np.int16, np.int32, np.uint32, np.int64, np.uint64):
        assert d.distillation_loss(student, teachers, labels.astype(dt), 0.5) == expected
    assert d.distillation_loss(student, teachers, labels.tolist(), 0.5) == expected


@pytest.mark.parametrize("eps", [1e-44, 1e-300, 1e-10])
def test_probability_combine_with_underflowing_mixture(rng, eps):
    """Far-apart float32 logits: mixtures underflow float32 and are recomputed exactly."""
    teachers = [(rng.normal(size=(6, 50)) * 40).astype(np.float32) for _ in range(3)]
    d = kd.EnsembleDistiller([1.0, 0.0, 2.0], temperature=1.0)
    expected = ref.combine_via_probabilities(teachers, d.weights, 1.0, eps)
    assert_array_close(d.combine_via_probabilities(teachers, eps=eps), expected, np.float32)

"""entrenar's own unit tests of distill::EnsembleDistiller and DistillationLoss, ported."""

from __future__ import annotations

import math

import numpy as np
import pytest

import numba_kd as kd


def test_uniform_ensemble():
    d = kd.EnsembleDistiller.uniform(3, temperature=2.0)
    assert d.weights.shape == (3,)
    assert d.weights.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(d.weights, 1.0 / 3.0, rtol=1e-15)
    assert d.temperature == 2.0


def test_weighted_ensemble():
    d = kd.EnsembleDistiller([1.0, 2.0, 3.0], temperature=2.0)
    assert d.weights.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(d.weights, [1 / 6, 2 / 6, 3 / 6], rtol=1e-15)


def test_weights_are_read_only():
    d = kd.EnsembleDistiller([1.0, 3.0], temperature=2.0)
    assert d.weights.dtype == np.float64
    with pytest.raises(ValueError):
        d.weights[0] = 5.0


def test_combine_teachers_average():
    d = kd.EnsembleDistiller.uniform(2, temperature=2.0)
    t1 = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    t2 = np.array([[3.0, 2.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(d.combine_teachers([t1, t2]), [[2.0, 2.0, 2.0]], atol=1e-6)


def test_weighted_combine():
    d = kd.EnsembleDistiller([1.0, 3.0], temperature=2.0)
    t1 = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    t2 = np.array([[3.0, 2.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(d.combine_teachers([t1, t2]), [[2.5, 2.0, 1.5]], atol=1e-6)


def test_combine_via_probabilities_is_finite():
    d = kd.EnsembleDistiller.uniform(2, temperature=2.0)
    t1 = np.array([[2.0, 1.0, 0.5]], dtype=np.float32)
    t2 = np.array([[1.5, 1.2, 0.8]], dtype=np.float32)
    out = d.combine_via_probabilities([t1, t2])
    assert out.shape == (1, 3)
    assert np.all(np.isfinite(out))


def test_distillation_loss_positive_and_finite():
    d = kd.EnsembleDistiller.uniform(2, temperature=2.0)
    student = np.array([[2.0, 1.0, 0.5]], dtype=np.float32)
    t1 = np.array([[1.8, 1.1, 0.6]], dtype=np.float32)
    t2 = np.array([[1.9, 0.9, 0.7]], dtype=np.float32)
    loss = d.distillation_loss(student, [t1, t2], [0], 0.7)
    assert loss > 0.0
    assert math.isfinite(loss)


def test_empty_weights_panics():
    with pytest.raises(ValueError, match="Must have at least one teacher"):
        kd.EnsembleDistiller([], temperature=2.0)


def test_zero_weights_panics():
    with pytest.raises(ValueError, match="Teacher weights must sum to positive"):
        kd.EnsembleDistiller([0.0, 0.0], temperature=2.0)


def test_mismatched_teachers_panics():
    d = kd.EnsembleDistiller.uniform(2, temperature=2.0)
    with pytest.raises(ValueError, match="Number of teachers must match"):
        d.combine_teachers([np.array([[1.0, 2.0]])])


def test_non_positive_temperature_panics():
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="Temperature must be positive"):
            kd.EnsembleDistiller([1.0], temperature=t)
        with pytest.raises(ValueError, match="Temperature must be positive"):
            kd.DistillationLoss(temperature=t, alpha=0.5)


def test_alpha_out_of_range_panics():
    for a in (-0.1, 1.1):
        with pytest.raises(ValueError, match=r"Alpha must be in \[0, 1\]"):
            kd.DistillationLoss(temperature=2.0, alpha=a)


def test_teacher_shapes_must_match():
    d = kd.EnsembleDistiller.uniform(2, temperature=2.0)
    with pytest.raises(ValueError, match="All teacher logits must have the same shape"):
        d.combine_teachers([np.zeros((2, 3)), np.zeros((2, 4))])

"""Shared test helpers: tolerances, comparisons and synthetic batches."""

from __future__ import annotations

import numpy as np

# Tolerances, stated once.  float64: rtol 1e-12; float32: loss rtol 1e-6 against the
# float64 reference evaluated on the same (float32) inputs; arrays atol 1e-5 times
# the logit scale.  Losses also get an absolute floor of rtol times the logit scale,
# because a loss is a difference of log-sum-exps of that size and can be ~0.
LOSS_RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-6}
ARRAY_ATOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}


def logit_scale(*arrays) -> float:
    return 1.0 + max(float(np.max(np.abs(np.asarray(a, dtype=np.float64)))) for a in arrays)


def assert_loss_close(actual: float, expected: float, dtype, scale: float) -> None:
    rtol = LOSS_RTOL[np.dtype(dtype)]
    assert isinstance(actual, float)
    assert abs(actual - expected) <= rtol * abs(expected) + rtol * scale, (actual, expected)


def assert_array_close(actual: np.ndarray, expected: np.ndarray, dtype) -> None:
    dtype = np.dtype(dtype)
    assert actual.dtype == dtype
    assert actual.shape == expected.shape
    scale = logit_scale(expected) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ARRAY_ATOL[dtype] * scale)


def make_batch(rng, n_teachers: int, rows: int, classes: int, dtype, spread: float = 3.0):
    """Student, teacher list and labels with teachers that broadly agree."""
    signal = rng.normal(scale=spread, size=(rows, classes))
    teachers = [(signal + rng.normal(size=(rows, classes))).astype(dtype) for _ in range(n_teachers)]
    student = (0.5 * signal + rng.normal(scale=2.0, size=(rows, classes))).astype(dtype)
    labels = rng.integers(0, classes, size=rows)
    return student, teachers, labels

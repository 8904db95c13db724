"""Float64 NumPy reference implementations: the readable statement of every formula.

These are the oracle of the test suite and the NumPy peer of the benchmarks and
the demo.  They favour clarity over speed and materialize whatever they need.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def normalized_weights(weights: ArrayLike) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def stack_teachers(teachers: Sequence[ArrayLike] | ArrayLike) -> np.ndarray:
    """[K, B, C] float64 from a list of [B, C] arrays or one [K, B, C] array."""
    if isinstance(teachers, (list, tuple)):
        return np.stack([np.asarray(t, dtype=np.float64) for t in teachers])
    return np.asarray(teachers, dtype=np.float64)


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def log_softmax(x: np.ndarray) -> np.ndarray:
    return x - logsumexp(x)[..., None]


def combine_teachers(teachers, weights) -> np.ndarray:
    """z = sum_k w_k t_k."""
    t = stack_teachers(teachers)
    w = normalized_weights(weights)
    return np.einsum("k,kbc->bc", w, t)


def combine_via_probabilities(teachers, weights, temperature: float, eps: float = 1e-10) -> np.ndarray:
    """T * log(sum_k w_k softmax(t_k / T) + eps); eps = 0 gives the exact log-mixture."""
    t = stack_teachers(teachers) / temperature
    w = normalized_weights(weights)
    log_p = log_softmax(t)  # [K, B, C]
    if eps > 0:
        p = np.einsum("k,kbc->bc", w, np.exp(log_p))
        return temperature * np.log(p + eps)
    with np.errstate(divide="ignore"):
        log_w = np.log(w)
    terms = log_w[:, None, None] + log_p
    keep = w > 0
    return temperature * logsumexp(terms[keep], axis=0)


def kl_rows(target_logits: np.ndarray, student_logits: np.ndarray, temperature: float) -> np.ndarray:
    """Per-row KL(softmax(z / T) || softmax(s / T))."""
    log_p = log_softmax(np.asarray(target_logits, dtype=np.float64) / temperature)
    log_q = log_softmax(np.asarray(student_logits, dtype=np.float64) / temperature)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def cross_entropy_rows(student_logits: np.ndarray, labels: ArrayLike) -> np.ndarray:
    s = np.asarray(student_logits, dtype=np.float64)
    y = np.asarray(labels)
    return logsumexp(s) - np.take_along_axis(s, y[:, None], axis=-1)[:, 0]


def distillation_loss_single(student, teacher, labels, temperature: float, alpha: float) -> float:
    """entrenar's DistillationLoss.forward."""
    kl = kl_rows(teacher, student, temperature).mean()
    ce = cross_entropy_rows(student, labels).mean()
    return float(alpha * temperature**2 * kl + (1.0 - alpha) * ce)


def distillation_loss(student, teachers, labels, weights, temperature: float, alpha: float) -> float:
    """entrenar's EnsembleDistiller.distillation_loss: the teachers' logit average as target."""
    z = combine_teachers(teachers, weights)
    return distillation_loss_single(student, z, labels, temperature, alpha)

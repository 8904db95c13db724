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
    """(x - max) - log(sum exp(x - max)): the max is subtracted first, so that log S
    survives even where max + log S would round it away."""
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def nonfinite_rows(teachers, student=None) -> np.ndarray:
    """Rows where any teacher (or the student, when given) holds a NaN or an infinity.

    The non-finite policy: such rows give NaN (loss, its parts and its gradient
    row, or the row of a probability combine); ignored rows stay ignored."""
    bad = ~np.isfinite(stack_teachers(teachers)).all(axis=(0, -1))
    if student is not None:
        bad |= ~np.isfinite(np.asarray(student, dtype=np.float64)).all(axis=-1)
    return bad


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
        out = temperature * np.log(p + eps)
        out[nonfinite_rows(teachers)] = np.nan
        return out
    with np.errstate(divide="ignore"):
        log_w = np.log(w)
    terms = log_w[:, None, None] + log_p
    keep = w > 0
    out = temperature * logsumexp(terms[keep], axis=0)
    out[nonfinite_rows(teachers)] = np.nan
    return out


def kl_rows(target_logits: np.ndarray, student_logits: np.ndarray, temperature: float) -> np.ndarray:
    """Per-row KL(softmax(z / T) || softmax(s / T))."""
    log_p = log_softmax(np.asarray(target_logits, dtype=np.float64) / temperature)
    log_q = log_softmax(np.asarray(student_logits, dtype=np.float64) / temperature)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def cross_entropy_rows(student_logits: np.ndarray, labels: ArrayLike) -> np.ndarray:
    s = np.asarray(student_logits, dtype=np.float64)
    y = np.asarray(labels)
    return -np.take_along_axis(log_softmax(s), y[:, None], axis=-1)[:, 0]


def distillation_loss_single(student, teacher, labels, temperature: float, alpha: float) -> float:
    """entrenar's DistillationLoss.forward."""
    bad = nonfinite_rows([teacher], student)
    kl = np.where(bad, np.nan, kl_rows(teacher, student, temperature)).mean()
    ce = np.where(bad, np.nan, cross_entropy_rows(student, labels)).mean()
    return float(alpha * temperature**2 * kl + (1.0 - alpha) * ce)


def distillation_loss(student, teachers, labels, weights, temperature: float, alpha: float) -> float:
    """entrenar's EnsembleDistiller.distillation_loss: the teachers' logit average as target."""
    z = combine_teachers(teachers, weights)
    return distillation_loss_single(student, z, labels, temperature, alpha)


# ---------------------------------------------------------------------------
# Generalized losses: masks, reductions, combine modes, divergences, per-row
# teacher weights.  Rows are [N, C] here; 3-D inputs are reshaped by the caller.


def row_teacher_weights(
    teachers, weights, labels, temperature: float, weighting: str, ignore_index: int | None = None
) -> np.ndarray:
    """[N, K] per-row teacher weights, each row summing to 1.

    static: w_k.  confidence: w_k * softmax(t_k)[y] (rows with an ignored label,
    or whose confidences all underflow, keep w_k).  entropy: w_k * exp(-H(softmax(t_k / T))).
    """
    t = stack_teachers(teachers)  # [K, N, C]
    w = normalized_weights(weights)
    n_rows = t.shape[1]
    if weighting == "static":
        raw = np.broadcast_to(w, (n_rows, w.size)).copy()
    elif weighting == "confidence":
        y = np.asarray(labels)
        valid = _valid_rows(y, ignore_index)
        safe_y = np.where(valid, y, 0)
        log_conf = np.take_along_axis(log_softmax(t), safe_y[None, :, None], axis=-1)[..., 0]  # [K, N]
        raw = w[None, :] * np.exp(log_conf.T)
        fallback = ~valid | (raw.sum(axis=1) <= 0)
        raw[fallback] = w
    elif weighting == "entropy":
        log_p = log_softmax(t / temperature)
        entropy = -np.sum(np.exp(log_p) * log_p, axis=-1)  # [K, N]
        raw = w[None, :] * np.exp(-entropy.T)
    else:
        raise ValueError(weighting)
    return raw / raw.sum(axis=1, keepdims=True)


def target_log_probs(teachers, row_weights: np.ndarray, temperature: float, combine: str) -> np.ndarray:
    """log p, [N, C]: softmax of the weighted logit average, or log of the weighted
    probability average (in log space)."""
    t = stack_teachers(teachers)
    if combine == "logits":
        z = np.einsum("nk,knc->nc", row_weights, t)
        return log_softmax(z / temperature)
    if combine == "probs":
        with np.errstate(divide="ignore"):
            log_w = np.log(row_weights.T)[:, :, None]  # [K, N, 1]
        return logsumexp(log_w + log_softmax(t / temperature), axis=0)
    raise ValueError(combine)


def divergence_rows(log_p: np.ndarray, log_q: np.ndarray, divergence: str, beta: float = 0.5) -> np.ndarray:
    p, q = np.exp(log_p), np.exp(log_q)
    if divergence == "forward_kl":
        return np.sum(p * (log_p - log_q), axis=-1)
    if divergence == "reverse_kl":
        return np.sum(q * (log_q - log_p), axis=-1)
    if divergence == "jsd":
        log_m = np.logaddexp(np.log(beta) + log_p, np.log1p(-beta) + log_q)
        return beta * np.sum(p * (log_p - log_m), axis=-1) + (1 - beta) * np.sum(q * (log_q - log_m), axis=-1)
    raise ValueError(divergence)


def _valid_rows(labels: np.ndarray, ignore_index: int | None) -> np.ndarray:
    labels = np.asarray(labels)
    if ignore_index is None:
        return np.ones(labels.shape, dtype=bool)
    return labels != ignore_index


def general_rows(
    student,
    teachers,
    labels,
    weights,
    temperature: float,
    combine: str = "logits",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    teacher_weighting: str = "static",
    ignore_index: int | None = None,
):
    """(divergence per row, CE per row, valid mask), float64, rows [N, C]."""
    s = np.asarray(student, dtype=np.float64)
    y = np.asarray(labels)
    valid = _valid_rows(y, ignore_index)
    row_w = row_teacher_weights(teachers, weights, y, temperature, teacher_weighting, ignore_index)
    log_p = target_log_probs(teachers, row_w, temperature, combine)
    log_q = log_softmax(s / temperature)
    d = divergence_rows(log_p, log_q, divergence, beta)
    safe_y = np.where(valid, y, 0)
    ce = -np.take_along_axis(log_softmax(s), safe_y[:, None], axis=-1)[:, 0]
    bad = nonfinite_rows(teachers, s)
    d, ce = np.where(bad, np.nan, d), np.where(bad, np.nan, ce)
    return np.where(valid, d, 0.0), np.where(valid, ce, 0.0), valid


def general_loss(
    student, teachers, labels, weights, temperature: float, alpha: float, reduction: str = "mean", **options
):
    """(loss, soft, hard): the soft part alpha*T^2*D and the hard part (1-alpha)*CE,
    reduced over rows ("mean" over valid rows, at least 1; "sum"; "none": per row)."""
    d, ce, valid = general_rows(student, teachers, labels, weights, temperature, **options)
    soft = alpha * temperature**2 * d
    hard = (1.0 - alpha) * ce
    if reduction == "none":
        return soft + hard, soft, hard
    n = max(int(valid.sum()), 1) if reduction == "mean" else 1
    soft_total, hard_total = soft.sum() / n, hard.sum() / n
    return soft_total + hard_total, soft_total, hard_total


def general_grad(
    student, teachers, labels, weights, temperature: float, alpha: float, reduction: str = "mean", **options
) -> np.ndarray:
    """Gradient of the reduced loss with respect to the student logits (for "none",
    of the sum of the per-row losses).

    With q = softmax(s / T) and g = dD/dq:  dD/ds = q * (g - sum(q * g)) / T, where
    g = -p/q (forward KL), log(q/p) + 1 (reverse KL), (1 - beta) log(q/m) (JSD).
    """
    s = np.asarray(student, dtype=np.float64)
    y = np.asarray(labels)
    ignore_index = options.get("ignore_index")
    valid = _valid_rows(y, ignore_index)
    row_w = row_teacher_weights(
        teachers, weights, y, temperature, options.get("teacher_weighting", "static"), ignore_index
    )
    log_p = target_log_probs(teachers, row_w, temperature, options.get("combine", "logits"))
    log_q = log_softmax(s / temperature)
    p, q = np.exp(log_p), np.exp(log_q)
    divergence = options.get("divergence", "forward_kl")
    if divergence == "forward_kl":
        dd_ds = (q - p) / temperature
    else:
        if divergence == "reverse_kl":
            g = log_q - log_p + 1.0
        elif divergence == "jsd":
            beta = options.get("beta", 0.5)
            log_m = np.logaddexp(np.log(beta) + log_p, np.log1p(-beta) + log_q)
            g = (1.0 - beta) * (log_q - log_m)
        else:
            raise ValueError(divergence)
        dd_ds = q * (g - np.sum(q * g, axis=-1, keepdims=True)) / temperature
    r = np.exp(log_softmax(s))
    onehot = np.zeros_like(s)
    safe_y = np.where(valid, y, 0)
    np.put_along_axis(onehot, safe_y[:, None], 1.0, axis=-1)
    grad = alpha * temperature**2 * dd_ds + (1.0 - alpha) * (r - onehot)
    grad[nonfinite_rows(teachers, s)] = np.nan
    grad[~valid] = 0.0
    if reduction == "mean":
        grad /= max(int(valid.sum()), 1)
    return grad

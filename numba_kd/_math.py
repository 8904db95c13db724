"""Scalar math shared by the CPU and CUDA kernels.

Every helper here is an ``@njit(inline="always")`` function of scalars, so the
same source compiles inside ``@njit`` CPU kernels and inside ``@cuda.jit``
kernels (numba-cuda compiles ``@njit`` callees for the device).  Keeping the
formulas in one place is what makes the two targets agree.

Row statistics follow the "online softmax" convention: a pair ``(m, s)`` holds a
running maximum ``m`` and ``s = sum_j exp(x_j - m)``; the KL term also carries
``w = sum_j exp(a_j - m_a) * (a_j - b_j)``, which rescales exactly like ``s``.
"""

import math

from numba import njit

NEG_INF = -math.inf


@njit(inline="always")
def merge_lse(m1, s1, m2, s2):
    """Merge two (max, sum-of-exp) states into one.

    The empty state is (-inf, 0); two empty states merge to an empty state
    rather than to the NaN that exp(-inf - -inf) would give.
    """
    m = max(m1, m2)
    if m == NEG_INF:
        return m, s1 + s2
    return m, s1 * math.exp(m1 - m) + s2 * math.exp(m2 - m)


@njit(inline="always")
def merge_weighted_lse(m1, s1, w1, m2, s2, w2):
    """Merge two (max, sum-of-exp, weighted-sum-of-exp) states into one."""
    m = max(m1, m2)
    if m == NEG_INF:
        return m, s1 + s2, w1 + w2
    f1 = math.exp(m1 - m)
    f2 = math.exp(m2 - m)
    return m, s1 * f1 + s2 * f2, w1 * f1 + w2 * f2


@njit(inline="always")
def online_lse_step(m, s, x, one):
    """Fold one value ``x`` into a (max, sum-of-exp) state.

    ``one`` is 1 in the accumulation type, so that float32 states stay float32.
    """
    if x > m:
        return x, s * math.exp(m - x) + one
    if m == NEG_INF:
        # x and m are both -inf: exp(x - m) would be NaN, the true term is 0.
        return m, s
    return m, s + math.exp(x - m)


@njit(inline="always")
def online_weighted_step(m, s, w, x, v, one):
    """Fold ``x`` into (max, sum exp(x - max), sum exp(x - max) * v)."""
    if x > m:
        f = math.exp(m - x)
        return x, s * f + one, w * f + v
    if m == NEG_INF:
        return m, s, w
    e = math.exp(x - m)
    return m, s + e, w + e * v


@njit(inline="always")
def lse_from_stats(m, s):
    """log(sum_j exp(x_j)) from a (max, sum-of-exp) state."""
    return m + math.log(s)


@njit(inline="always")
def kl_from_stats(s_a, w_a, lse_a, lse_b):
    """KL(softmax(a) || softmax(b)) = W / S_a - lse(a) + lse(b).

    ``s_a`` and ``w_a`` are taken relative to the same maximum; ``lse_a`` and
    ``lse_b`` are the log-sum-exps of the two rows.
    """
    return w_a / s_a - lse_a + lse_b


@njit(inline="always")
def distillation_terms(kl_sum, ce_sum, n_rows, alpha, temperature):
    """(alpha * T^2 * mean KL, (1 - alpha) * mean CE); the loss is their sum."""
    soft = alpha * temperature * temperature * (kl_sum / n_rows)
    hard = (1.0 - alpha) * (ce_sum / n_rows)
    return soft, hard


@njit(inline="always")
def log_mixture_term(log_weight, scaled_logit, teacher_lse):
    """log(w_k) + t_kj / T - lse(t_k / T): one teacher's log-probability, weighted."""
    return log_weight + scaled_logit - teacher_lse


@njit(inline="always")
def tempered_log(p, eps, temperature):
    """T * log(p + eps): entrenar's way back from a probability to a logit."""
    return temperature * math.log(p + eps)


@njit(inline="always")
def ensemble_logit(teachers, weights, i, j):
    """z_ij = sum_k w_k t_k[i, j], accumulated in the type of ``weights``.

    ``teachers`` is either a homogeneous tuple of 2-D arrays or one 3-D array;
    ``teachers[k]`` is a 2-D array in both cases, so one source serves both.
    """
    # Starting from the first product (not 0.0) keeps z in the weights' type.
    z = weights[0] * teachers[0][i, j]
    for k in range(1, weights.shape[0]):
        z += weights[k] * teachers[k][i, j]
    return z

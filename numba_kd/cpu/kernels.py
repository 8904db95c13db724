"""Fused CPU kernels.

Each kernel is a ``prange`` over blocks of rows; every row is handled by two
sweeps over data that is still in cache (a max sweep, then an exp-sum sweep),
so each input element comes from memory once.  Per-row partial results are
float64 and are reduced over rows in a fixed order after the parallel loop, so
the result does not depend on the number of threads.

``teachers`` is either a homogeneous tuple of 2-D arrays (a list read in place)
or one ``[K, B, C]`` array; numba compiles one specialization for each.
"""

import math

import numpy as np
from numba import njit, prange

from numba_kd._math import (
    NEG_INF,
    distillation_terms,
    ensemble_logit,
    kl_from_stats,
    log_mixture_term,
    tempered_log,
)

# Rows per parallel work item: enough to amortize scratch allocation, small
# enough to balance the load when B is small.
ROWS_PER_BLOCK = 16


@njit(inline="always")
def _n_blocks(n_rows):
    return (n_rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK


@njit(parallel=True, cache=True)
def combine_logits(teachers, weights, out):
    n_rows, n_classes = out.shape
    for block in prange(_n_blocks(n_rows)):
        for i in range(block * ROWS_PER_BLOCK, min(n_rows, (block + 1) * ROWS_PER_BLOCK)):
            for j in range(n_classes):
                out[i, j] = ensemble_logit(teachers, weights, i, j)


@njit(inline="always")
def _teacher_lse(teacher, i, n_classes, inv_t):
    """lse(t[i] / T) by a max sweep then an exp-sum sweep."""
    m = NEG_INF
    for j in range(n_classes):
        m = max(m, teacher[i, j] * inv_t)
    s = 0.0
    for j in range(n_classes):
        s += math.exp(teacher[i, j] * inv_t - m)
    return m + math.log(s)


@njit(parallel=True, cache=True)
def combine_probabilities(teachers, weights, temperature, eps, out):
    n_rows, n_classes = out.shape
    n_teachers = weights.shape[0]
    inv_t = 1.0 / temperature
    log_weights = np.log(weights)
    for block in prange(_n_blocks(n_rows)):
        lse = np.empty(n_teachers)
        for i in range(block * ROWS_PER_BLOCK, min(n_rows, (block + 1) * ROWS_PER_BLOCK)):
            for k in range(n_teachers):
                lse[k] = _teacher_lse(teachers[k], i, n_classes, inv_t)
            if eps > 0.0:
                for j in range(n_classes):
                    p = 0.0
                    for k in range(n_teachers):
                        p += weights[k] * math.exp(teachers[k][i, j] * inv_t - lse[k])
                    out[i, j] = tempered_log(p, eps, temperature)
            else:
                # Exact log-mixture: logsumexp over teachers, in log space.
                for j in range(n_classes):
                    m = NEG_INF
                    for k in range(n_teachers):
                        if weights[k] > 0.0:
                            term = log_mixture_term(log_weights[k], teachers[k][i, j] * inv_t, lse[k])
                            m = max(m, term)
                    s = 0.0
                    for k in range(n_teachers):
                        if weights[k] > 0.0:
                            term = log_mixture_term(log_weights[k], teachers[k][i, j] * inv_t, lse[k])
                            s += math.exp(term - m)
                    out[i, j] = temperature * (m + math.log(s))


@njit(parallel=True, cache=True)
def distillation_loss_terms(student, teachers, weights, labels, temperature, alpha):
    """(soft, hard): alpha * T^2 * mean KL(p || q) and (1 - alpha) * mean CE."""
    n_rows, n_classes = student.shape
    inv_t = 1.0 / temperature
    kl_rows = np.empty(n_rows)
    ce_rows = np.empty(n_rows)
    for block in prange(_n_blocks(n_rows)):
        for i in range(block * ROWS_PER_BLOCK, min(n_rows, (block + 1) * ROWS_PER_BLOCK)):
            # Sweep 1: row maxima of z = sum_k w_k t_k and of s.
            m_z = NEG_INF
            m_s = NEG_INF
            for j in range(n_classes):
                m_z = max(m_z, ensemble_logit(teachers, weights, i, j))
                m_s = max(m_s, student[i, j])
            # Sweep 2: sums of exponentials relative to those maxima.
            m_a = m_z * inv_t
            m_b = m_s * inv_t
            s_a = 0.0
            w_a = 0.0
            s_b = 0.0
            s_s = 0.0
            for j in range(n_classes):
                a = ensemble_logit(teachers, weights, i, j) * inv_t
                x = student[i, j]
                b = x * inv_t
                e_a = math.exp(a - m_a)
                s_a += e_a
                w_a += e_a * (a - b)
                s_b += math.exp(b - m_b)
                s_s += math.exp(x - m_s)
            lse_a = m_a + math.log(s_a)
            lse_b = m_b + math.log(s_b)
            kl_rows[i] = kl_from_stats(s_a, w_a, lse_a, lse_b)
            ce_rows[i] = m_s + math.log(s_s) - student[i, labels[i]]
    kl_sum = 0.0
    ce_sum = 0.0
    for i in range(n_rows):
        kl_sum += kl_rows[i]
        ce_sum += ce_rows[i]
    return distillation_terms(kl_sum, ce_sum, n_rows, alpha, temperature)

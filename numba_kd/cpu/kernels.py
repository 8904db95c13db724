"""Fused CPU kernels.

Each kernel is a ``prange`` over blocks of rows.  A row is handled in sweeps
over data that is still in cache (the ensemble row ``z``, a max sweep, then one
exp-sum sweep), so each input element comes from memory once.  Inner loops run
over contiguous columns without branches, so LLVM vectorizes them; for float32
inputs the exponentials and logarithms are the vectorizable polynomials of
``_math`` (``exp_like``/``log_like``), for float64 libm.

Per-row partial results are float64 and are reduced over rows in a fixed order
after the parallel loop, so the result does not depend on the number of
threads.  ``fastmath`` allows reassociation (so that sums vectorize) and
FMA contraction, never "no NaNs" or "no infinities": NaN inputs still give NaN.

``teachers`` is either a homogeneous tuple of 2-D arrays (a list read in place)
or one ``[K, B, C]`` array; numba compiles one specialization for each.
"""

import numpy as np
from numba import njit, prange

from numba_kd._math import (
    NEG_INF,
    as_type_of,
    distillation_terms,
    exp_like,
    kl_from_stats,
    log_like,
    log_mixture_term,
    lse_from_stats,
)

# Rows per parallel work item: amortizes the scratch rows, balances small B.
ROWS_PER_BLOCK = 16
FASTMATH = {"reassoc", "contract"}


@njit(inline="always")
def _n_blocks(n_rows):
    return (n_rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK


@njit(inline="always")
def _block_rows(block, n_rows):
    return range(block * ROWS_PER_BLOCK, min(n_rows, (block + 1) * ROWS_PER_BLOCK))


@njit(inline="always")
def _ensemble_row(teachers, weights, i, z):
    """z[j] = sum_k w_k t_k[i, j] in z's precision, teacher by teacher (contiguous loops)."""
    first = teachers[0]
    w = as_type_of(weights[0], z[0])
    for j in range(z.shape[0]):
        z[j] = w * first[i, j]
    for k in range(1, weights.shape[0]):
        t = teachers[k]
        w = as_type_of(weights[k], z[0])
        for j in range(z.shape[0]):
            z[j] += w * t[i, j]


@njit(inline="always")
def _max(row):
    """Maximum of a 1-D row with eight independent running maxima.

    LLVM does not vectorize a max reduction without function-wide no-NaN
    assumptions, which numba does not set; eight chains hide the latency instead
    (about 4x faster than one).  A NaN in the row may be skipped here: it still
    reaches the result through exp(x - max) in the next sweep.
    """
    n = row.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
    j = 0
    while j + 8 <= n:
        m0 = max(m0, row[j])
        m1 = max(m1, row[j + 1])
        m2 = max(m2, row[j + 2])
        m3 = max(m3, row[j + 3])
        m4 = max(m4, row[j + 4])
        m5 = max(m5, row[j + 5])
        m6 = max(m6, row[j + 6])
        m7 = max(m7, row[j + 7])
        j += 8
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    while j < n:
        m = max(m, row[j])
        j += 1
    return m


# Columns summed in the row's precision before the partial sum joins its float64
# total: float32 partials keep the exp sweep 8 lanes wide, and a partial of at
# most 256 terms (32 per lane) adds well under 1e-6 relative error.
CHUNK = 256


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def combine_logits(teachers, weights, out):
    n_rows, n_classes = out.shape
    for block in prange(_n_blocks(n_rows)):
        z = np.empty(n_classes)
        for i in _block_rows(block, n_rows):
            _ensemble_row(teachers, weights, i, z)
            for j in range(n_classes):
                out[i, j] = z[j]


@njit(inline="always")
def _teacher_lse(t, i, n_classes, inv_t):
    """lse(t[i] / T): a max sweep, then an exp-sum sweep."""
    m = _max(t[i])
    like = t[i, 0]
    s = 0.0
    for j in range(n_classes):
        s += exp_like((t[i, j] - m) * inv_t, like)
    return lse_from_stats(m * inv_t, s)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def combine_probabilities(teachers, weights, temperature, eps, out):
    n_rows, n_classes = out.shape
    n_teachers = weights.shape[0]
    inv_t = 1.0 / temperature
    log_weights = np.log(weights)
    for block in prange(_n_blocks(n_rows)):
        lse = np.empty(n_teachers)
        acc = np.empty(n_classes)
        top = np.empty(n_classes)
        for i in _block_rows(block, n_rows):
            like = out[i, 0]
            for k in range(n_teachers):
                lse[k] = _teacher_lse(teachers[k], i, n_classes, inv_t)
            if eps > 0.0:
                # p_j = sum_k w_k softmax(t_k / T)_j, then T * log(p_j + eps).
                acc[:] = 0.0
                for k in range(n_teachers):
                    t = teachers[k]
                    w = weights[k]
                    for j in range(n_classes):
                        acc[j] += w * exp_like(t[i, j] * inv_t - lse[k], like)
                for j in range(n_classes):
                    out[i, j] = temperature * log_like(acc[j] + eps, like)
            else:
                # Exact log-mixture: logsumexp over teachers (positive weights only).
                top[:] = NEG_INF
                for k in range(n_teachers):
                    if weights[k] > 0.0:
                        t = teachers[k]
                        for j in range(n_classes):
                            term = log_mixture_term(log_weights[k], t[i, j] * inv_t, lse[k])
                            top[j] = term if term > top[j] else top[j]
                acc[:] = 0.0
                for k in range(n_teachers):
                    if weights[k] > 0.0:
                        t = teachers[k]
                        for j in range(n_classes):
                            term = log_mixture_term(log_weights[k], t[i, j] * inv_t, lse[k])
                            acc[j] += exp_like(term - top[j], like)
                for j in range(n_classes):
                    out[i, j] = temperature * (top[j] + log_like(acc[j], like))


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def distillation_loss_terms(student, teachers, weights, labels, temperature, alpha):
    """(soft, hard): alpha * T^2 * mean KL(p || q) and (1 - alpha) * mean CE."""
    n_rows, n_classes = student.shape
    inv_t = 1.0 / temperature
    kl_rows = np.empty(n_rows)
    ce_rows = np.empty(n_rows)
    for block in prange(_n_blocks(n_rows)):
        # The ensemble row in the input precision: float32 rows keep the exp
        # sweep in float32 (8 lanes); the sums below are float64.
        z = np.empty(n_classes, student.dtype)
        for i in _block_rows(block, n_rows):
            # Sweep 1: the ensemble row and the two row maxima.
            _ensemble_row(teachers, weights, i, z)
            m_z = _max(z)
            m_s = _max(student[i])
            # Sweep 2, over data in cache: with a = z / T and b = s / T,
            # S_a = sum exp(a - max a), W = sum exp(a - max a) (a - b),
            # S_b = sum exp(b - max b), S_s = sum exp(s - max s).
            like = z[0]
            scale = as_type_of(inv_t, like)
            zero = as_type_of(0.0, like)
            s_a = 0.0
            w_a = 0.0
            s_b = 0.0
            s_s = 0.0
            for start in range(0, n_classes, CHUNK):
                p_a = zero
                p_w = zero
                p_b = zero
                p_s = zero
                for j in range(start, min(start + CHUNK, n_classes)):
                    zj = z[j]
                    sj = student[i, j]
                    e_a = exp_like((zj - m_z) * scale, like)
                    p_a += e_a
                    p_w += e_a * (zj - sj)
                    d_s = sj - m_s
                    p_b += exp_like(d_s * scale, like)
                    p_s += exp_like(d_s, like)
                s_a += p_a
                w_a += p_w
                s_b += p_b
                s_s += p_s
            lse_a = lse_from_stats(m_z * inv_t, s_a)
            lse_b = lse_from_stats(m_s * inv_t, s_b)
            kl_rows[i] = kl_from_stats(s_a, w_a * inv_t, lse_a, lse_b)
            ce_rows[i] = lse_from_stats(np.float64(m_s), s_s) - student[i, labels[i]]
    kl_sum = 0.0
    ce_sum = 0.0
    for i in range(n_rows):
        kl_sum += kl_rows[i]
        ce_sum += ce_rows[i]
    return distillation_terms(kl_sum, ce_sum, n_rows, alpha, temperature)

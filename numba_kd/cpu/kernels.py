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

import math

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
def _exp_row(row, shift, scale, out):
    """out[j] = exp((row[j] - shift) * scale); returns sum_j out[j] (float32 partials of
    CHUNK terms, float64 total)."""
    n = row.shape[0]
    like = out[0]
    zero = as_type_of(0.0, like)
    total = 0.0
    for start in range(0, n, CHUNK):
        partial = zero
        for j in range(start, min(start + CHUNK, n)):
            e = exp_like((row[j] - shift) * scale, like)
            out[j] = e
            partial += e
        total += partial
    return total


# Below this a float32 mixture has lost digits to underflow: the exact
# log-mixture recomputes such entries in log space.
_TINY_MIXTURE = 1e-30


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def combine_probabilities(teachers, weights, temperature, eps, out):
    """T * log(sum_k w_k softmax(t_k / T) + eps); eps = 0: the exact log-mixture.

    Per row: one sweep per teacher computes e_kj = exp((t_kj - max_k) / T) into a
    scratch row and their sum S_k; the mixture is sum_k (w_k / S_k) e_kj, so each
    exponential is computed once.  Entries whose mixture underflows (possible
    only for extreme logits) are recomputed in log space when eps = 0.
    """
    n_rows, n_classes = out.shape
    n_teachers = weights.shape[0]
    inv_t = 1.0 / temperature
    for block in prange(_n_blocks(n_rows)):
        # float32 rows stay in float32 per element (8 lanes); a mixture of K
        # terms each <= 1 loses nothing measurable to it.
        exps = np.empty((n_teachers, n_classes), out.dtype)
        coeff = np.empty(n_teachers, out.dtype)
        lse = np.empty(n_teachers)
        acc = np.empty(n_classes, out.dtype)
        like = acc[0]
        scale = as_type_of(inv_t, like)
        t_out = as_type_of(temperature, like)
        eps_c = as_type_of(eps, like)
        for i in _block_rows(block, n_rows):
            for k in range(n_teachers):
                row = teachers[k][i]
                m = _max(row)
                total = _exp_row(row, m, scale, exps[k])
                coeff[k] = as_type_of(weights[k] / total, like)
                lse[k] = m * inv_t + math.log(total)
            acc[:] = 0.0
            for k in range(n_teachers):
                c = coeff[k]
                e = exps[k]
                for j in range(n_classes):
                    acc[j] += c * e[j]
            if eps > 0.0:
                for j in range(n_classes):
                    out[i, j] = t_out * log_like(acc[j] + eps_c, like)
            else:
                for j in range(n_classes):
                    out[i, j] = t_out * log_like(acc[j], like)
                for j in range(n_classes):
                    if acc[j] < _TINY_MIXTURE:
                        out[i, j] = temperature * _log_mixture_entry(teachers, weights, lse, i, j, inv_t)


@njit(inline="always")
def _log_mixture_entry(teachers, weights, lse, i, j, inv_t):
    """logsumexp_k(log w_k + t_kj / T - lse_k) in float64, teachers with w_k > 0."""
    m = NEG_INF
    for k in range(weights.shape[0]):
        if weights[k] > 0.0:
            m = max(m, log_mixture_term(math.log(weights[k]), teachers[k][i, j] * inv_t, lse[k]))
    s = 0.0
    for k in range(weights.shape[0]):
        if weights[k] > 0.0:
            s += math.exp(log_mixture_term(math.log(weights[k]), teachers[k][i, j] * inv_t, lse[k]) - m)
    return m + math.log(s)


@njit(inline="always")
def _kl_and_lse(z, s, inv_t):
    """(KL(softmax(z / T) || softmax(s / T)), lse(s)) of one row.

    Sweep 1 takes the two row maxima; sweep 2, over data still in cache, sums
    with a = z / T and b = s / T: S_a = sum exp(a - max a),
    W = sum exp(a - max a) (a - b), S_b = sum exp(b - max b), S_s = sum exp(s - max s).
    """
    n_classes = s.shape[0]
    m_z = _max(z)
    m_s = _max(s)
    like = s[0]
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
            sj = s[j]
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
    return kl_from_stats(s_a, w_a * inv_t, lse_a, lse_b), lse_from_stats(np.float64(m_s), s_s)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def distillation_loss_terms(student, teachers, weights, labels, temperature, alpha):
    """(soft, hard): alpha * T^2 * mean KL(p || q) and (1 - alpha) * mean CE."""
    n_rows, n_classes = student.shape
    inv_t = 1.0 / temperature
    kl_rows = np.empty(n_rows)
    ce_rows = np.empty(n_rows)
    for block in prange(_n_blocks(n_rows)):
        # The ensemble row in the input precision: float32 rows keep the exp
        # sweep in float32 (8 lanes); the sums are float64.
        z = np.empty(n_classes, student.dtype)
        for i in _block_rows(block, n_rows):
            if weights.shape[0] == 1:
                # One teacher (weight exactly 1): the ensemble row is the teacher's.
                kl, lse_s = _kl_and_lse(teachers[0][i], student[i], inv_t)
            else:
                _ensemble_row(teachers, weights, i, z)
                kl, lse_s = _kl_and_lse(z, student[i], inv_t)
            kl_rows[i] = kl
            ce_rows[i] = lse_s - student[i, labels[i]]
    kl_sum = 0.0
    ce_sum = 0.0
    for i in range(n_rows):
        kl_sum += kl_rows[i]
        ce_sum += ce_rows[i]
    return distillation_terms(kl_sum, ce_sum, n_rows, alpha, temperature)

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
    log_mix,
    log_mixture_term,
    weighted_log_prob,
)
from numba_kd._runtime import DISK_CACHE

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


@njit(parallel=True, nogil=True, cache=DISK_CACHE, fastmath=FASTMATH)
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
    CHUNK terms, float64 total), NaN if the row holds a NaN or an infinity."""
    n = row.shape[0]
    like = out[0]
    zero = as_type_of(0.0, like)
    total = 0.0
    for start in range(0, n, CHUNK):
        partial = zero
        for j in range(start, min(start + CHUNK, n)):
            e = exp_like((row[j] - shift) * scale, like)
            out[j] = e
            partial += e + row[j] * zero
        total += partial
    return total


# Below this a float32 mixture has lost digits to underflow: such entries are
# recomputed in float64 log space.
_TINY_MIXTURE = 1e-30


@njit(parallel=True, nogil=True, cache=DISK_CACHE, fastmath=FASTMATH)
def combine_probabilities(teachers, weights, temperature, eps, out):
    """T * log(sum_k w_k softmax(t_k / T) + eps); eps = 0: the exact log-mixture.

    Per row: one sweep per teacher computes e_kj = exp((t_kj - max_k) / T) into a
    scratch row and their sum S_k; the mixture is sum_k (w_k / S_k) e_kj, so each
    exponential is computed once.  Entries whose mixture underflows (possible
    only for extreme logits) are recomputed in float64 log space.
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
                for j in range(n_classes):
                    if acc[j] < _TINY_MIXTURE:
                        # Underflowed (or eps itself below float32): log(p + eps) in float64.
                        log_p = _log_mixture_entry(teachers, weights, lse, i, j, inv_t)
                        out[i, j] = temperature * log_mix(log_p, math.log(eps), 0.0, 0.0)
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
def _kl_stats(z, s, inv_t):
    """Row statistics of KL(softmax(z / T) || softmax(s / T)) and of lse(s).

    Sweep 1 takes the two row maxima; sweep 2, over data still in cache, sums
    with a = z / T and b = s / T: S_a = sum exp(a - max a),
    W = sum exp(a - max a) (a - b), S_b = sum exp(b - max b), S_s = sum exp(s - max s).
    Returns (KL, max z, log S_a, max s, log S_b, log S_s).

    A NaN or an infinity in z or s makes S_a and S_s, and so every result and
    the gradient row, NaN (``x * 0`` is NaN exactly for those ``x``).
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
            nonfinite = zj * zero + sj * zero
            e_a = exp_like((zj - m_z) * scale, like)
            p_a += e_a + nonfinite
            p_w += e_a * (zj - sj)
            d_s = sj - m_s
            p_b += exp_like(d_s * scale, like)
            p_s += exp_like(d_s, like) + nonfinite
        s_a += p_a
        w_a += p_w
        s_b += p_b
        s_s += p_s
    log_sa = math.log(s_a)
    log_sb = math.log(s_b)
    log_ss = math.log(s_s)
    kl = kl_from_stats(s_a, w_a * inv_t, m_z * inv_t + log_sa, m_s * inv_t + log_sb)
    return kl, m_z, log_sa, m_s, log_sb, log_ss


@njit(inline="always")
def _kl_grad_row(z, s, y, inv_t, m_z, log_sa, m_s, log_sb, log_ss, c_soft, c_hard, out):
    """out = c_soft * (q - p) / T + c_hard * (r - onehot(y)): the gradient sweep of the
    forward-KL loss, p = softmax(z / T), q = softmax(s / T), r = softmax(s)."""
    like = s[0]
    scale = as_type_of(inv_t, like)
    soft = as_type_of(c_soft * inv_t, like)
    hard = as_type_of(c_hard, like)
    shift_a = as_type_of(log_sa, like)
    shift_b = as_type_of(log_sb, like)
    shift_s = as_type_of(log_ss, like)
    for j in range(s.shape[0]):
        d_s = s[j] - m_s
        p = exp_like((z[j] - m_z) * scale - shift_a, like)
        q = exp_like(d_s * scale - shift_b, like)
        r = exp_like(d_s - shift_s, like)
        out[j] = soft * (q - p) + hard * r
    out[y] -= hard


@njit(parallel=True, nogil=True, cache=DISK_CACHE, fastmath=FASTMATH)
def distillation_rows(
    student,
    teachers,
    weights,
    labels,
    ignore_index,
    temperature,
    c_soft,
    c_hard,
    want_grad,
    grad,
    d_rows,
    ce_rows,
):
    """Per row: KL(p || q) into d_rows and CE into ce_rows, p = softmax(sum_k w_k t_k / T);
    rows whose label is ignore_index get 0 (and a zero gradient row).

    With want_grad, one more sweep per row writes c_soft * dKL/ds + c_hard * dCE/ds
    into grad; the row values are computed exactly as without it.
    """
    n_rows, n_classes = student.shape
    inv_t = 1.0 / temperature
    for block in prange(_n_blocks(n_rows)):
        # The ensemble row in the input precision: float32 rows keep the exp
        # sweeps in float32 (8 lanes); the sums are float64.
        z = np.empty(n_classes, student.dtype)
        for i in _block_rows(block, n_rows):
            y = labels[i]
            if y == ignore_index:
                d_rows[i] = 0.0
                ce_rows[i] = 0.0
                if want_grad:
                    grad[i, :] = 0.0
                continue
            if weights.shape[0] == 1:
                # One teacher (weight exactly 1): the ensemble row is the teacher's.
                d_rows[i], ce_rows[i] = _loss_row(
                    teachers[0][i], student, i, y, inv_t, c_soft, c_hard, want_grad, grad
                )
            else:
                _ensemble_row(teachers, weights, i, z)
                d_rows[i], ce_rows[i] = _loss_row(z, student, i, y, inv_t, c_soft, c_hard, want_grad, grad)


@njit(inline="always")
def _loss_row(z, student, i, y, inv_t, c_soft, c_hard, want_grad, grad):
    kl, m_z, log_sa, m_s, log_sb, log_ss = _kl_stats(z, student[i], inv_t)
    if want_grad:
        _kl_grad_row(z, student[i], y, inv_t, m_z, log_sa, m_s, log_sb, log_ss, c_soft, c_hard, grad[i])
    # (max - s_y) + log S: lse(s) - s_y without rounding log S into a huge max.
    return kl, (m_s - student[i, y]) + log_ss


@njit(nogil=True, cache=DISK_CACHE)
def reduce_rows(d_rows, ce_rows, divisor, alpha, temperature):
    """(soft, hard) = (alpha T^2 sum(d) / divisor, (1 - alpha) sum(ce) / divisor), summed
    in row order so that the result does not depend on the thread count."""
    d_sum = 0.0
    ce_sum = 0.0
    for i in range(d_rows.shape[0]):
        d_sum += d_rows[i]
        ce_sum += ce_rows[i]
    return distillation_terms(d_sum, ce_sum, divisor, alpha, temperature)


# Option codes shared with the dispatcher.
COMBINE_LOGITS, COMBINE_PROBS = 0, 1
FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
STATIC, CONFIDENCE, ENTROPY = 0, 1, 2


@njit(inline="always")
def _row_lse(x, scale):
    """(m, log S) with lse(x * scale) = m + log S over a 1-D row (scale > 0), float64.

    The two parts stay apart: a log-probability is (x_j * scale - m) - log S,
    which keeps log S even where m is so large that m + log S would round it away.
    """
    m = _max(x) * scale
    s = 0.0
    for j in range(x.shape[0]):
        s += math.exp(x[j] * scale - m)
    return m, math.log(s)


@njit(inline="always")
def _finite_row(student, teachers, i):
    """Whether row i of the student and of every teacher is free of NaN and infinities."""
    nonfinite = 0.0
    for j in range(student.shape[1]):
        nonfinite += student[i, j] * 0.0
    for k in range(len(teachers)):
        t = teachers[k]
        for j in range(t.shape[1]):
            nonfinite += t[i, j] * 0.0
    return nonfinite == 0.0


@njit(inline="always")
def _row_weights(teachers, weights, i, y, valid, temperature, weighting, out):
    """Per-row teacher weights into out (summing to 1): the statistics sweep."""
    n_teachers = weights.shape[0]
    inv_t = 1.0 / temperature
    total = 0.0
    for k in range(n_teachers):
        out[k] = weights[k]
        if weighting == CONFIDENCE and valid:
            row = teachers[k][i]
            m1, log_s1 = _row_lse(row, 1.0)
            out[k] = weights[k] * math.exp((row[y] - m1) - log_s1)
        elif weighting == ENTROPY:
            row = teachers[k][i]
            m, log_s = _row_lse(row, inv_t)
            # H = log S - sum_j softmax(u)_j (u_j - m) with u = t / T: every term is
            # relative to the row maximum, so H keeps its digits for huge logits.
            su = 0.0
            for j in range(row.shape[0]):
                d = row[j] * inv_t - m
                su += math.exp(d - log_s) * d
            out[k] = weights[k] * math.exp(-(log_s - su))
        total += out[k]
    if not total > 0.0:
        # Every confidence underflowed: fall back to the static weights.
        for k in range(n_teachers):
            out[k] = weights[k]
        total = 1.0
    for k in range(n_teachers):
        out[k] /= total


@njit(inline="always")
def _target_log_probs(teachers, row_w, m_t, log_st, i, inv_t, combine, log_p):
    """log p into log_p: log softmax of sum_k w_k t_k / T, or the log of sum_k w_k softmax(t_k / T)."""
    n_teachers = row_w.shape[0]
    n_classes = log_p.shape[0]
    if combine == COMBINE_LOGITS:
        for j in range(n_classes):
            z = 0.0
            for k in range(n_teachers):
                z += row_w[k] * teachers[k][i, j]
            log_p[j] = z * inv_t
        m, log_s = _row_lse(log_p, 1.0)
        for j in range(n_classes):
            log_p[j] = (log_p[j] - m) - log_s
    else:
        for k in range(n_teachers):
            m_t[k], log_st[k] = _row_lse(teachers[k][i], inv_t)
        for j in range(n_classes):
            m = NEG_INF
            for k in range(n_teachers):
                if row_w[k] > 0.0:
                    m = max(
                        m, weighted_log_prob(math.log(row_w[k]), teachers[k][i, j] * inv_t, m_t[k], log_st[k])
                    )
            s = 0.0
            for k in range(n_teachers):
                if row_w[k] > 0.0:
                    s += math.exp(
                        weighted_log_prob(math.log(row_w[k]), teachers[k][i, j] * inv_t, m_t[k], log_st[k])
                        - m
                    )
            log_p[j] = m + math.log(s)


@njit(parallel=True, nogil=True, cache=DISK_CACHE)
def general_rows(
    student,
    teachers,
    weights,
    labels,
    ignore_index,
    temperature,
    beta,
    combine,
    divergence,
    weighting,
    c_soft,
    c_hard,
    want_grad,
    grad,
    d_rows,
    ce_rows,
):
    """Every option: combine (logits/probs), divergence (forward KL, reverse KL, JSD),
    per-row teacher weights (static/confidence/entropy), masks; float64 per element.

    Per row: a statistics sweep for the teacher weights, the target log p into a
    scratch row, one sweep for the divergence and CE, and with want_grad one
    sweep that writes c_soft * dD/ds + c_hard * dCE/ds.
    """
    n_rows, n_classes = student.shape
    n_teachers = weights.shape[0]
    inv_t = 1.0 / temperature
    log_beta = math.log(beta)
    log_1m_beta = math.log1p(-beta)
    for block in prange(_n_blocks(n_rows)):
        row_w = np.empty(n_teachers)
        m_t = np.empty(n_teachers)
        log_st = np.empty(n_teachers)
        log_p = np.empty(n_classes)
        for i in _block_rows(block, n_rows):
            y = labels[i]
            valid = y != ignore_index
            if not valid:
                d_rows[i] = 0.0
                ce_rows[i] = 0.0
                if want_grad:
                    grad[i, :] = 0.0
                continue
            if not _finite_row(student, teachers, i):
                d_rows[i] = math.nan
                ce_rows[i] = math.nan
                if want_grad:
                    grad[i, :] = math.nan
                continue
            _row_weights(teachers, weights, i, y, valid, temperature, weighting, row_w)
            _target_log_probs(teachers, row_w, m_t, log_st, i, inv_t, combine, log_p)
            s = student[i]
            m_b, log_sb = _row_lse(s, inv_t)
            m_s, log_ss = _row_lse(s, 1.0)
            # The divergence, and sum_j q_j g_j (g = dD/dq) for its gradient.
            d = 0.0
            qg = 0.0
            for j in range(n_classes):
                lp = log_p[j]
                lq = (s[j] * inv_t - m_b) - log_sb
                p = math.exp(lp)
                q = math.exp(lq)
                if divergence == FORWARD_KL:
                    d += p * (lp - lq) if p > 0.0 else 0.0
                elif divergence == REVERSE_KL:
                    d += q * (lq - lp) if q > 0.0 else 0.0
                    qg += q * (lq - lp + 1.0)
                else:
                    lm = log_mix(lp, lq, log_beta, log_1m_beta)
                    d += (beta * p * (lp - lm) if p > 0.0 else 0.0) + (
                        (1.0 - beta) * q * (lq - lm) if q > 0.0 else 0.0
                    )
                    qg += q * (1.0 - beta) * (lq - lm)
            d_rows[i] = d
            ce_rows[i] = (m_s - s[y]) + log_ss
            if want_grad:
                g_row = grad[i]
                for j in range(n_classes):
                    lp = log_p[j]
                    lq = (s[j] * inv_t - m_b) - log_sb
                    q = math.exp(lq)
                    if divergence == FORWARD_KL:
                        dd = q - math.exp(lp)
                    elif divergence == REVERSE_KL:
                        dd = q * (lq - lp + 1.0 - qg)
                    else:
                        dd = q * ((1.0 - beta) * (lq - log_mix(lp, lq, log_beta, log_1m_beta)) - qg)
                    g_row[j] = c_soft * dd * inv_t + c_hard * math.exp((s[j] - m_s) - log_ss)
                g_row[y] -= c_hard

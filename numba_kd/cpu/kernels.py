"""Fused CPU kernels: loops around the formulas of ``numba_kd._math``.

Each kernel is a ``prange`` over blocks of rows.  A row is handled in sweeps
over data that is still in cache (statistics sweeps per teacher where an option
needs them, the target sweep, the student sweep, the gradient sweep), so each
input element comes from memory once.  Inner loops run over contiguous slices
without branches, so LLVM vectorizes them; the scratch rows have the dtype of
the per-element arithmetic (the ``compute`` argument): for float32 the
exponentials and logarithms are the vectorizable polynomials of ``_math``
(``exp_like``/``log_like``), for float64 libm.

Per-row partial results are float64 and are reduced over rows in a fixed order
after the parallel loop, so the result does not depend on the number of
threads.  ``fastmath`` allows reassociation (so that sums vectorize) and
FMA contraction, never "no NaNs" or "no infinities": NaN inputs still give NaN.

``teachers`` is either a homogeneous tuple of 2-D arrays (a list read in place)
or one ``[K, B, C]`` array; numba compiles one specialization for each.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from numba_kd._math import (
    COMBINE_LOGITS,
    COMBINE_PROBS,
    CONFIDENCE,
    ENTROPY,
    FLAT_TEMPERATURE,
    FORWARD_KL,
    JSD,
    NEG_INF,
    REVERSE_KL,
    SKEW_FORWARD_KL,
    STATIC,
    TVD,
    UNIFORM,
    as_type_of,
    bf16_from_f32,
    confidence_log_weight,
    cross_entropy,
    distillation_terms,
    entropy_log_weight,
    exp_like,
    f16_from_f32,
    forward_kl_grad,
    jsd_grad,
    jsd_log_ratios,
    jsd_mixture_ratio,
    jsd_term,
    jsd_term_near,
    kl_from_stats,
    kl_from_sums,
    log_like,
    log_or_minus_inf,
    logaddexp,
    lse_from_stats,
    mixture_grad,
    mixture_weights,
    nonfinite_probe,
    nonnegative,
    online_lse_step,
    reverse_kl_grad,
    row_weight,
    skew_class,
    skew_class_near,
    tiny_like,
    topk_class_grad,
    topk_class_terms,
    topk_entry_target,
    topk_grad_constants,
    topk_outside_terms,
    topk_soft_grad,
    topk_tail_shares,
    topk_teacher_log_weight,
    topk_teacher_norm,
    tvd_class,
    uniform_jsd_class,
    weighted_log_prob,
    widen,
)
from numba_kd._runtime import DISK_CACHE
from numba_kd._signatures import reads

# Most rows per parallel work item: a block allocates its scratch rows once.
ROWS_PER_BLOCK = 16
FASTMATH = {"reassoc", "contract"}
# error_model="numpy": a float division by zero gives inf or NaN as in NumPy instead
# of raising, so divisions need no branch and the loops around them vectorize.

# The sweeps over one row are functions of their own, not inlined into the
# kernels: each compiles (and vectorizes) once per signature, and the parallel
# kernels that call them stay small, which keeps compilation short.
row_function = njit(nogil=True, cache=DISK_CACHE, fastmath=FASTMATH, error_model="numpy")


def rows_per_block(n_rows: int, n_threads: int) -> int:
    """Up to ROWS_PER_BLOCK rows per work item, but at least four items per thread
    while there are rows for them, so that small batches use every thread."""
    return max(1, min(ROWS_PER_BLOCK, n_rows // (4 * n_threads)))


@njit(inline="always")
def _n_blocks(n_rows, per_block):
    return (n_rows + per_block - 1) // per_block


@njit(inline="always")
def _block_rows(block, n_rows, per_block):
    return range(block * per_block, min(n_rows, (block + 1) * per_block))


@intrinsic
def _max_no_nan(typingctx, a, b):
    """llvm.maxnum(a, b) flagged nnan: the form of max whose reductions LLVM vectorizes."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        function_type = ir.FunctionType(args[0].type, [args[0].type, args[1].type])
        name = "llvm.maxnum.f32" if a == types.float32 else "llvm.maxnum.f64"
        maxnum = cgutils.get_or_insert_function(builder.module, function_type, name)
        return builder.call(maxnum, args, fastmath=("nnan",))

    return a(a, b), codegen


@njit(inline="always")
def _max(row):
    """Maximum of a 1-D row, vectorized.

    The kernels call it on input rows that passed the finiteness probe and on
    the target row computed from them, which can hold a NaN only where the
    weighted teacher sum overflowed.  Such a NaN, which the no-NaN flag lets
    the reduction skip, still reaches the result through exp(x - max) in the
    next sweep.
    """
    m = row[0]
    for j in range(row.shape[0]):
        m = _max_no_nan(m, row[j])
    return m


# Scratch rows share one allocation, SCRATCH_GAP elements after its start and apart.
# A vectorized loop that stores into one array while reading others first checks at
# run time that no store lands within a few vectors after a load; where one might
# (a scratch row allocated just after an input row), it runs the scalar loop, which
# sums in another order.  The gap makes the check pass wherever the allocator puts
# the scratch, so a row's result does not depend on the thread that computed it.
SCRATCH_GAP = 256


@njit(inline="always")
def _scratch_size(n_rows, n_classes):
    return SCRATCH_GAP + n_rows * (n_classes + SCRATCH_GAP)


@njit(inline="always")
def _scratch_buffer(n_rows, n_classes, dtype):
    return np.empty(_scratch_size(n_rows, n_classes), dtype)


@njit(inline="always")
def _scratch_row(buffer, row, n_classes, length):
    """Scratch row ``row`` of _scratch_buffer(..., n_classes, ...): its first ``length`` entries."""
    start = SCRATCH_GAP + row * (n_classes + SCRATCH_GAP)
    return buffer[start : start + length]


# ---------------------------------------------------------------------------
# 16-bit inputs and outputs.  bfloat16 and float16 arrays arrive as their bits
# (uint16 and int16, _math.f32_from_bf16 / f32_from_f16).  A kernel widens each
# row it reads into a float32 row of its own (the row's sweeps then run as for
# float32 inputs, reading the widened row from cache), and rounds the rows it
# writes from a row of the arithmetic's dtype.  For float arrays these helpers
# compile to nothing: the rows are read and written in place.


def _holds_bits(arrays) -> bool:
    """Whether the numba type ``arrays`` (an array or a tuple of arrays) holds 16-bit patterns."""
    dtype = arrays.dtype if isinstance(arrays, types.Array) else arrays[0].dtype
    return dtype in (types.uint16, types.int16)


def _put(row, j, value):
    """row[j] = value, rounded to the row's 16-bit type where it holds bits."""


@overload(_put)
def _put_overload(row, j, value):
    if row.dtype == types.uint16:

        def put_bf16(row, j, value):
            row[j] = bf16_from_f32(value)

        return put_bf16
    if row.dtype == types.int16:

        def put_f16(row, j, value):
            row[j] = f16_from_f32(value)

        return put_f16

    def put(row, j, value):
        row[j] = value

    return put


def _wide_columns(arrays, n_classes):
    """The width of the widened rows a kernel needs for ``arrays``: n_classes for 16-bit bits, else 0."""


@overload(_wide_columns)
def _wide_columns_overload(arrays, n_classes):
    if _holds_bits(arrays):
        return lambda arrays, n_classes: n_classes
    return lambda arrays, n_classes: 0


def _widened(arrays, i, wide):
    """(source, row) with source[row] (for teachers source[k][row]) the values of row i
    of ``arrays``: the arrays and i themselves for floats; for 16-bit bits ``wide``
    ([1, C] for a 2-D array, [K, 1, C] for teachers; float32), filled, and 0."""


@njit(inline="always")
def _widen_into(row, out):
    for j in range(row.shape[0]):
        out[j] = widen(row[j])


@overload(_widened)
def _widened_overload(arrays, i, wide):
    if not _holds_bits(arrays):
        return lambda arrays, i, wide: (arrays, i)
    if isinstance(arrays, types.Array) and arrays.ndim == 2:

        def widen_row(arrays, i, wide):
            _widen_into(arrays[i], wide[0])
            return wide, 0

        return widen_row

    def widen_teachers(arrays, i, wide):
        for k in range(len(arrays)):
            _widen_into(arrays[k][i], wide[k, 0])
        return wide, 0

    return widen_teachers


def _grad_row(grad, i, wide):
    """Where a kernel writes row i of ``grad``: the row itself, or for 16-bit bits
    ``wide`` (a row of the arithmetic's dtype, rounded into the row by _store_row)."""


@overload(_grad_row)
def _grad_row_overload(grad, i, wide):
    if _holds_bits(grad):
        return lambda grad, i, wide: wide
    return lambda grad, i, wide: grad[i]


def _store_row(out, i, row):
    """Round ``row`` into row i of 16-bit ``out``; nothing for float arrays (written in place)."""


@overload(_store_row)
def _store_row_overload(out, i, row):
    if not _holds_bits(out):
        return lambda out, i, row: None

    def store(out, i, row):
        target = out[i]
        for j in range(row.shape[0]):
            _put(target, j, row[j])

    return store


def _fill_row(out, i, value):
    """out[i, :] = value, in the 16-bit type of ``out`` where it holds bits."""


@overload(_fill_row)
def _fill_row_overload(out, i, value):
    def fill(out, i, value):
        target = out[i]
        for j in range(target.shape[0]):
            _put(target, j, value)

    return fill


def _arithmetic_buffer(out, n):
    """An empty array of n elements in the dtype of the values stored into ``out``:
    float32 for 16-bit bits, else out's dtype."""


@overload(_arithmetic_buffer)
def _arithmetic_buffer_overload(out, n):
    if _holds_bits(out):
        return lambda out, n: np.empty(n, np.float32)
    return lambda out, n: np.empty(n, out.dtype)


# Typed (not literal) constants for arguments of row functions, so that those
# compile once instead of once per literal value.
_STATIC_CODE = np.int64(STATIC)
_NO_LABEL = np.int64(0)

# Columns summed in the row's precision before the partial sum joins its float64
# total: float32 partials keep the exp sweep 8 lanes wide, and a partial of at
# most 256 terms (32 per lane) adds well under 1e-6 relative error.
CHUNK = 256


@njit(parallel=True, nogil=True, cache=DISK_CACHE, fastmath=FASTMATH, error_model="numpy")
@reads("teachers", "weights")
def combine_logits(teachers, weights, per_block, out):
    """out = sum_k w_k t_k, CHUNK columns at a time (the partial sums stay in L1).

    The sums run in the output's precision, unless a positive weight is below the
    smallest normal float32: rounded to 0 it would turn inf * w into NaN, so then
    they run in float64.
    """
    n_rows, n_classes = out.shape
    wide = False
    for k in range(weights.shape[0]):
        wide = wide or 0.0 < weights[k] < _F32_TINY
    for block in prange(_n_blocks(n_rows, per_block)):
        z = _arithmetic_buffer(out, CHUNK)
        z64 = np.empty(CHUNK if wide else 0)
        for i in _block_rows(block, n_rows, per_block):
            for start in range(0, n_classes, CHUNK):
                stop = min(start + CHUNK, n_classes)
                if wide:
                    _ensemble_chunk(teachers, weights, i, start, stop, z64, out[i, start:stop])
                else:
                    _ensemble_chunk(teachers, weights, i, start, stop, z, out[i, start:stop])


_F32_TINY = float(np.finfo(np.float32).tiny)


@njit(inline="always")
def _ensemble_chunk(teachers, weights, i, start, stop, z, out):
    """out = sum_k w_k t_k[i, start:stop], summed in z's precision."""
    acc = z[: stop - start]
    like = z[0]
    first = teachers[0][i, start:stop]
    w = as_type_of(weights[0], like)
    for j in range(acc.shape[0]):
        acc[j] = w * widen(first[j])
    for k in range(1, weights.shape[0]):
        t = teachers[k][i, start:stop]
        w = as_type_of(weights[k], like)
        for j in range(acc.shape[0]):
            acc[j] += w * widen(t[j])
    for j in range(acc.shape[0]):
        _put(out, j, acc[j])


@njit(nogil=True, cache=DISK_CACHE)
def reduce_rows(d_rows, ce_rows, divisor, alpha, soft_factor):
    """(soft, hard) = (alpha soft_factor sum(d) / divisor, (1 - alpha) sum(ce) / divisor)
    (soft_factor: T^2, or 1 without scale_by_t2), summed in row order so that the
    result does not depend on the thread count."""
    d_sum = 0.0
    ce_sum = 0.0
    for i in range(d_rows.shape[0]):
        d_sum += d_rows[i]
        ce_sum += ce_rows[i]
    return distillation_terms(d_sum, ce_sum, divisor, alpha, soft_factor)


@njit(nogil=True, cache=DISK_CACHE)
def first_bad_label(labels, n_classes, ignore_index):
    """Index of the first label outside [0, n_classes) that is not ignore_index; -1 if none."""
    for i in range(labels.shape[0]):
        y = labels[i]
        if (y < 0 or y >= n_classes) and y != ignore_index:
            return i
    return -1


@row_function
def _finite_teachers(teachers, i):
    """Whether row i of every teacher is free of NaN and infinities."""
    finite = True
    for k in range(len(teachers)):
        finite = finite and nonfinite_probe(teachers[k][i]) == 0.0
    return finite


@row_function
def _finite_row(student, teachers, i, k):
    """Whether row i of the student and row k of every teacher are free of NaN and infinities."""
    return nonfinite_probe(student[i]) == 0.0 and _finite_teachers(teachers, k)


@row_function
def _teacher_stats(row, inv_t, scaled, unit, like, e):
    """One teacher row's statistics sweep; returns (m, log S, moment, log S1).

    m = max(row).  With ``scaled``: e_j = exp((row_j - m) / T) into e, S = sum e,
    moment = sum_j e_j (row_j - m) / T / S (for the probability combine and the
    entropy).  With ``unit``: S1 = sum_j exp(row_j - m) (the confidence's softmax
    at T = 1).  What is not asked for is 0.
    """
    n = row.shape[0]
    m = _max(row)
    shift = as_type_of(m, like)
    scale = as_type_of(inv_t, like)
    zero = as_type_of(0.0, like)
    total = 0.0
    moment = 0.0
    s1 = 0.0
    # Loops run over slices: indices from 0 let LLVM drop negative-index handling
    # and vectorize.
    for start in range(0, n, CHUNK):
        x = row[start : start + CHUNK]
        out = e[start : start + CHUNK]
        if scaled:
            p_total = zero
            p_moment = zero
            for j in range(x.shape[0]):
                d = (x[j] - shift) * scale
                v = exp_like(d, like)
                out[j] = v
                p_total += v
                p_moment += v * d
            total += p_total
            moment += p_moment
        if unit:
            p_s1 = zero
            for j in range(x.shape[0]):
                p_s1 += exp_like(x[j] - shift, like)
            s1 += p_s1
    log_s = math.log(total) if scaled else 0.0
    return m, log_s, moment / total if scaled else 0.0, math.log(s1) if unit else 0.0


@row_function
def _teacher_weights(teachers, weights, i, y, params, weighting, m_t, log_st, row_w, e, pt):
    """Per-row teacher weights w_k (not normalized) into row_w; returns their sum.

    For the probability combine or a data-dependent weighting each teacher row
    gets a statistics sweep (lse(t_k / T) = m_t[k] + log_st[k]); for the
    probability combine its exponentials, still in cache, are then added into
    pt: pt_j = sum_k w_k exp(t_kj / T - lse_k), the mixture times sum_k w_k.

    Data-dependent weights are computed as logarithms and scaled by the largest
    (top): confidences or entropies that would all underflow (logits of 1e3 and
    up) still weigh the teachers by their ratios.  pt is rescaled when top grows.
    """
    inv_t = 1.0 / params.temperature
    like = e[0]
    mix = params.combine == COMBINE_PROBS
    linear = weighting == STATIC
    if mix:
        pt[:] = 0.0
    top = NEG_INF
    for k in range(weights.shape[0]):
        # The weight; for a data-dependent weighting its logarithm.
        w = weights[k] if linear else log_or_minus_inf(weights[k], NEG_INF)
        if mix or not linear:
            row = teachers[k][i]
            scaled = mix or weighting == ENTROPY
            unit = weighting == CONFIDENCE
            m, log_s, moment, log_s1 = _teacher_stats(row, inv_t, scaled, unit, like, e)
            m_t[k] = m * inv_t
            log_st[k] = log_s
            if weighting == CONFIDENCE:
                w = confidence_log_weight(w, np.float64(row[y]) - np.float64(m), log_s1)
            elif weighting == ENTROPY:
                w = entropy_log_weight(w, moment, log_s)
            if not linear and w > top:
                if mix and top > NEG_INF:
                    rescale = as_type_of(math.exp(top - w), like)
                    for j in range(pt.shape[0]):
                        pt[j] *= rescale
                top = w
            factor = w if linear else (math.exp(w - top) if w > NEG_INF else 0.0)
            if mix and factor > 0.0:
                c = as_type_of(factor * math.exp(-log_s), like)
                for j in range(pt.shape[0]):
                    pt[j] += c * e[j]
        row_w[k] = w
    if not linear and not top > NEG_INF:
        return 0.0  # no finite log weight: the caller falls back to the static weights
    total = 0.0
    for k in range(weights.shape[0]):
        row_w[k] = row_weight(linear, row_w[k], row_w[k], top)
        total += row_w[k]
    return total


@row_function
def _logit_target(teachers, row_w, i, inv_t, ell, pt):
    """Logit combine: ell_j = (z_j - max z) / T with z = sum_k w_k (t_kj - anchor) and
    pt_j = exp(ell_j); returns log sum_j pt_j.  The anchor (the row's first teacher
    logit) takes an offset common to the teachers out of the sum exactly."""
    like = ell[0]
    anchor = as_type_of(teachers[0][i, 0], like)
    n = ell.shape[0]
    w = as_type_of(row_w[0], like)
    first = teachers[0][i]
    for j in range(n):
        ell[j] = w * (first[j] - anchor)
    for k in range(1, row_w.shape[0]):
        t = teachers[k][i]
        w = as_type_of(row_w[k], like)
        for j in range(n):
            ell[j] += w * (t[j] - anchor)
    m = _max(ell)
    scale = as_type_of(inv_t, like)
    zero = as_type_of(0.0, like)
    total = 0.0
    for start in range(0, n, CHUNK):
        a = ell[start : start + CHUNK]
        p = pt[start : start + CHUNK]
        partial = zero
        for j in range(a.shape[0]):
            x = (a[j] - m) * scale
            v = exp_like(x, like)
            a[j] = x
            p[j] = v
            partial += v
        total += partial
    return math.log(total)


@row_function
def _mixture_target(teachers, row_w, m_t, log_st, i, inv_t, inv_total, ell, pt):
    """Probability combine, after _teacher_weights: pt scaled to the mixture and
    ell_j = log pt_j; returns log sum pt.  Entries whose mixture underflowed are
    recomputed in float64 log space."""
    like = ell[0]
    n = ell.shape[0]
    zero = as_type_of(0.0, like)
    scale = as_type_of(inv_total, like)
    tiny = tiny_like(like)
    total = 0.0
    n_tiny = 0.0
    one = as_type_of(1.0, like)
    for start in range(0, n, CHUNK):
        p = pt[start : start + CHUNK]
        a = ell[start : start + CHUNK]
        partial = zero
        small = zero
        for j in range(p.shape[0]):
            x = p[j] * scale
            p[j] = x
            a[j] = log_like(x, like)
            partial += x
            # A float count (a select) keeps the loop vectorized.
            small += one if x < tiny else zero
        total += partial
        n_tiny += small
    if n_tiny > 0.0:
        for j in range(n):
            if pt[j] < tiny:
                ell[j] = _mixture_log_entry(teachers, row_w, m_t, log_st, i, j, inv_t)
    return math.log(total)


@njit(inline="always")
def _mixture_log_entry(teachers, row_w, m_t, log_st, i, j, inv_t):
    """log sum_k w_k softmax(t_k / T)_j in float64 over the teachers with w_k > 0, from
    each teacher's lse(t_k / T) = m_t[k] + log_st[k]."""
    m = NEG_INF
    s = 0.0
    for k in range(row_w.shape[0]):
        if row_w[k] > 0.0:
            term = weighted_log_prob(math.log(row_w[k]), teachers[k][i, j] * inv_t, m_t[k], log_st[k])
            m, s = online_lse_step(m, s, term, 1.0)
    return lse_from_stats(m, s)


@row_function
def _student_stats(s, rows, inv_t, divergence, flat):
    """The student's sweep: qt_j = exp((s_j - max s) / T) and the sums of the forward
    or reverse KL, relative to both maxima.

    Returns (max s, log S_b, log S_s, S_b, W, U): S_b = sum qt, S_s = sum exp(s - max s),
    W = sum pt (ell - b) for forward KL, sum qt (b - ell) for reverse KL (b the
    student's shifted logits over T), else 0.  With ``flat`` (large T, where both
    rows are nearly uniform) also U = sum pt expm1(b - ell) for reverse KL and
    sum qt expm1(ell - b) otherwise (kl_from_sums; log S_a - log S_b =
    log1p(U / S_b)), else 0.
    """
    ell, pt, qt, _ = rows
    like = ell[0]
    n = s.shape[0]
    m_s = _max(s)
    shift = as_type_of(m_s, like)
    scale = as_type_of(inv_t, like)
    zero = as_type_of(0.0, like)
    s_b = 0.0
    s_s = 0.0
    w = 0.0
    for start in range(0, n, CHUNK):
        x = s[start : start + CHUNK]
        a = ell[start : start + CHUNK]
        p = pt[start : start + CHUNK]
        q_out = qt[start : start + CHUNK]
        p_b = zero
        p_s = zero
        p_w = zero
        if divergence == FORWARD_KL:
            for j in range(x.shape[0]):
                d = x[j] - shift
                b = d * scale
                q = exp_like(b, like)
                q_out[j] = q
                p_b += q
                p_s += exp_like(d, like)
                p_w += p[j] * (a[j] - b)
        elif divergence == REVERSE_KL:
            for j in range(x.shape[0]):
                d = x[j] - shift
                b = d * scale
                q = exp_like(b, like)
                q_out[j] = q
                p_b += q
                p_s += exp_like(d, like)
                p_w += q * (b - a[j])
        else:
            for j in range(x.shape[0]):
                d = x[j] - shift
                q = exp_like(d * scale, like)
                q_out[j] = q
                p_b += q
                p_s += exp_like(d, like)
        s_b += p_b
        s_s += p_s
        w += p_w
    u = 0.0
    if flat:
        # A sweep of its own, at large T only: expm1 does not vectorize, and the
        # loops above keep doing so.
        reverse = divergence == REVERSE_KL
        for j in range(n):
            b = (s[j] - shift) * scale
            u += pt[j] * math.expm1(b - ell[j]) if reverse else qt[j] * math.expm1(ell[j] - b)
    return np.float64(m_s), math.log(s_b), math.log(s_s), s_b, w, u


@row_function
def _mixture_sweep(s, rows, stats, params):
    """The JSD, the TVD or a skew KL of the row, per class over the target p and the
    student q; g_j = q_j dD/dq_j into aux for the gradient sweep.  Returns (D, sum_j g_j)."""
    ell, pt, qt, aux = rows
    m_s, _, _, _, s_a, s_b, log_ratio = stats
    like = ell[0]
    n = s.shape[0]
    divergence = params.divergence
    shift = as_type_of(m_s, like)
    scale = as_type_of(1.0 / params.temperature, like)
    offset = as_type_of(log_ratio, like)
    inv_sa = as_type_of(1.0 / s_a, like)
    inv_sb = as_type_of(1.0 / s_b, like)
    w_p, w_q, log_w_p, log_w_q = mixture_weights(divergence, params.beta, 1.0, NEG_INF)
    mix = (
        as_type_of(w_p, like), as_type_of(w_q, like), as_type_of(log_w_p, like), as_type_of(log_w_q, like)
    )  # fmt: skip
    b_c, b1_c, lb, l1b = mix
    half = as_type_of(0.5, like)
    zero = as_type_of(0.0, like)
    flat = params.temperature > FLAT_TEMPERATURE
    forward = divergence == SKEW_FORWARD_KL
    d_sum = 0.0
    g_sum = 0.0
    for start in range(0, n, CHUNK):
        x = s[start : start + CHUNK]
        a = ell[start : start + CHUNK]
        p = pt[start : start + CHUNK]
        q_row = qt[start : start + CHUNK]
        g_out = aux[start : start + CHUNK]
        p_d = zero
        p_g = zero
        # The loops that vectorize are free of branches (LLVM does not unswitch a loop
        # on the divergence code): the skew KLs' loop computes both and selects one.
        # At large T (float64 only) one loop of per-class branches serves all three.
        if divergence == TVD:
            for j in range(x.shape[0]):
                term, g = tvd_class(p[j] * inv_sa, q_row[j] * inv_sb, half)
                g_out[j] = g
                p_d += term
                p_g += g
        elif flat:
            for j in range(x.shape[0]):
                lq_lp = ((x[j] - shift) * scale - a[j]) - offset
                p_j = p[j] * inv_sa
                q = q_row[j] * inv_sb
                near = abs(lq_lp) < 1.0
                if divergence == JSD:
                    if near:
                        term, lq_lm = jsd_term_near(p_j, q, lq_lp, b_c, b1_c)
                    else:
                        ratio = jsd_mixture_ratio(b_c * p_j, b1_c * q)
                        lp_lm, lq_lm = jsd_log_ratios(lq_lp, lb, l1b, ratio, like)
                        term = jsd_term(p_j, q, lp_lm, lq_lm, b_c, b1_c)
                    g = b1_c * q * lq_lm
                elif near:
                    term, g = skew_class_near(divergence, p_j, q, lq_lp, mix)
                else:
                    term, g = skew_class(p_j, q, lq_lp, mix, forward, like)
                g_out[j] = g
                p_d += term
                p_g += g
        elif divergence == JSD:
            for j in range(x.shape[0]):
                lq_lp = ((x[j] - shift) * scale - a[j]) - offset
                p_j = p[j] * inv_sa
                q = q_row[j] * inv_sb
                ratio = jsd_mixture_ratio(b_c * p_j, b1_c * q)
                lp_lm, lq_lm = jsd_log_ratios(lq_lp, lb, l1b, ratio, like)
                g = b1_c * q * lq_lm
                g_out[j] = g
                p_d += jsd_term(p_j, q, lp_lm, lq_lm, b_c, b1_c)
                p_g += g
        else:
            for j in range(x.shape[0]):
                lq_lp = ((x[j] - shift) * scale - a[j]) - offset
                term, g = skew_class(p[j] * inv_sa, q_row[j] * inv_sb, lq_lp, mix, forward, like)
                g_out[j] = g
                p_d += term
                p_g += g
        d_sum += p_d
        g_sum += p_g
    return nonnegative(d_sum), g_sum


@row_function
def _grad_sweep(s, y, rows, stats, d, qg, params, out):
    """out = c_soft dD/ds + c_hard dCE/ds for one row (D the divergence, value d)."""
    ell, pt, qt, aux = rows
    m_s, _, _, log_ss, s_a, s_b, log_ratio = stats
    like = ell[0]
    n = s.shape[0]
    inv_t = 1.0 / params.temperature
    shift = as_type_of(m_s, like)
    scale = as_type_of(inv_t, like)
    soft = as_type_of(params.c_soft * inv_t, like)
    hard = as_type_of(params.c_hard, like)
    inv_sa = as_type_of(1.0 / s_a, like)
    inv_sb = as_type_of(1.0 / s_b, like)
    shift_s = as_type_of(log_ss, like)
    if params.divergence == FORWARD_KL:
        for j in range(n):
            dd = forward_kl_grad(pt[j] * inv_sa, qt[j] * inv_sb)
            out[j] = soft * dd + hard * exp_like((s[j] - shift) - shift_s, like)
    elif params.divergence == REVERSE_KL:
        offset = as_type_of(log_ratio, like)
        d_c = as_type_of(d, like)
        for j in range(n):
            lq_lp = ((s[j] - shift) * scale - ell[j]) - offset
            dd = reverse_kl_grad(qt[j] * inv_sb, lq_lp, d_c)
            out[j] = soft * dd + hard * exp_like((s[j] - shift) - shift_s, like)
    else:
        g_c = as_type_of(qg, like)
        for j in range(n):
            dd = mixture_grad(qt[j] * inv_sb, aux[j], g_c)
            out[j] = soft * dd + hard * exp_like((s[j] - shift) - shift_s, like)
    out[y] -= hard


@njit(parallel=True, nogil=True, cache=DISK_CACHE, fastmath=FASTMATH, error_model="numpy")
@reads("student", "teachers", "weights", "labels")
def general_rows(student, teachers, weights, labels, params, per_block, compute, grad, d_rows, ce_rows):
    """Every loss option, per row: the divergence into d_rows, CE into ce_rows and, with
    params.want_grad, c_soft dD/ds + c_hard dCE/ds into grad.

    ``compute`` is an empty array whose dtype is the per-element arithmetic's
    (float32 sweeps use the vectorized exp and log); sums are float64.  Per row: a
    finiteness probe, the teachers' statistics sweeps (probability combine or
    data-dependent weights), the target sweep (ell = the target's log-probabilities
    up to the constant log S_a, pt = exp(ell)), the student's sweep, a per-class
    sweep for the JSD, the TVD and the skew KLs, and the gradient sweep.  Ignored
    rows get 0 (and a zero gradient row); rows with a NaN or an infinity get NaN.
    """
    n_rows, n_classes = student.shape
    n_teachers = weights.shape[0]
    inv_t = 1.0 / params.temperature
    need_stats = params.combine == COMBINE_PROBS or params.weighting != STATIC
    # Above FLAT_TEMPERATURE log S_a and log S_b agree to many digits: the KL comes
    # from kl_from_sums instead of their difference.
    flat = params.temperature > FLAT_TEMPERATURE
    for block in prange(_n_blocks(n_rows, per_block)):
        row_w = np.empty(n_teachers)
        m_t = np.empty(n_teachers)
        log_st = np.empty(n_teachers)
        scratch = _scratch_buffer(5, n_classes, compute.dtype)
        e = _scratch_row(scratch, 0, n_classes, n_classes if need_stats else 1)
        rows = (
            _scratch_row(scratch, 1, n_classes, n_classes),  # ell: log target + const
            _scratch_row(scratch, 2, n_classes, n_classes),  # pt: exp(ell)
            _scratch_row(scratch, 3, n_classes, n_classes),  # qt: exp((s - max s) / T)
            # q dD/dq (JSD, TVD, skew KLs)
            _scratch_row(scratch, 4, n_classes, n_classes if params.divergence >= JSD else 1),
        )
        ell, pt = rows[0], rows[1]
        wide_s = np.empty((1, _wide_columns(student, n_classes)), np.float32)
        wide_t = np.empty((n_teachers, 1, _wide_columns(teachers, n_classes)), np.float32)
        wide_g = np.empty(_wide_columns(grad, n_classes), compute.dtype)
        for i in _block_rows(block, n_rows, per_block):
            y = labels[i]
            if y == params.ignore_index:
                d_rows[i] = 0.0
                ce_rows[i] = 0.0
                if params.want_grad:
                    _fill_row(grad, i, 0.0)
                continue
            s_source, s_row = _widened(student, i, wide_s)
            t_source, t_row = _widened(teachers, i, wide_t)
            if not _finite_row(s_source, t_source, s_row, t_row):
                d_rows[i] = math.nan
                ce_rows[i] = math.nan
                if params.want_grad:
                    _fill_row(grad, i, math.nan)
                continue
            total = _teacher_weights(
                t_source, weights, t_row, y, params, params.weighting, m_t, log_st, row_w, e, pt
            )
            if not total > 0.0:
                # No teacher's log weight is finite (a label logit so far below its
                # row's maximum that the difference overflows): the static weights.
                total = _teacher_weights(
                    t_source, weights, t_row, y, params, _STATIC_CODE, m_t, log_st, row_w, e, pt
                )
            for k in range(n_teachers):
                row_w[k] /= total
            if params.combine == COMBINE_LOGITS:
                log_sa = _logit_target(t_source, row_w, t_row, inv_t, ell, pt)
            else:
                log_sa = _mixture_target(t_source, row_w, m_t, log_st, t_row, inv_t, 1.0 / total, ell, pt)
            s = s_source[s_row]
            m_s, log_sb, log_ss, s_b, w, u = _student_stats(s, rows, inv_t, params.divergence, flat)
            s_a = math.exp(log_sa)
            # A row whose log-ratios reach the exponent range (huge logits) overflows U:
            # it is far from flat, and the difference of log-sums keeps its digits.
            sums = flat and math.isfinite(u)
            # log S_b - log S_a, which the reverse KL's and the JSD's log-ratios use.
            if not sums:
                offset = log_sb - log_sa
            elif params.divergence == REVERSE_KL:
                offset = math.log1p(u / s_a)
            else:
                offset = -math.log1p(u / s_b)
            stats = (m_s, log_sa, log_sb, log_ss, s_a, s_b, offset)
            qg = 0.0
            if params.divergence == FORWARD_KL:
                d = kl_from_sums(s_a, w, s_b, u) if sums else kl_from_stats(s_a, w, log_sa, log_sb)
            elif params.divergence == REVERSE_KL:
                d = kl_from_sums(s_b, w, s_a, u) if sums else kl_from_stats(s_b, w, log_sb, log_sa)
            else:
                d, qg = _mixture_sweep(s, rows, stats, params)
            d_rows[i] = d
            ce_rows[i] = cross_entropy(m_s, np.float64(s[y]), log_ss)
            if params.want_grad:
                g_row = _grad_row(grad, i, wide_g)
                _grad_sweep(s, y, rows, stats, d, qg, params, g_row)
                _store_row(grad, i, g_row)


@njit(parallel=True, nogil=True, cache=DISK_CACHE, fastmath=FASTMATH, error_model="numpy")
@reads("teachers", "weights")
def combine_probabilities(teachers, weights, params, eps, per_block, out):
    """T * log(sum_k w_k softmax(t_k / T) + eps); eps = 0: the exact log-mixture.

    Per row the statistics and mixing sweeps of the probability-combine loss
    (params: temperature, combine = probs, static weights); entries whose
    mixture underflowed come from float64 log space.  A row in which a teacher
    holds a NaN or an infinity is NaN.
    """
    n_rows, n_classes = out.shape
    n_teachers = weights.shape[0]
    temperature = params.temperature
    inv_t = 1.0 / temperature
    for block in prange(_n_blocks(n_rows, per_block)):
        row_w = np.empty(n_teachers)
        m_t = np.empty(n_teachers)
        log_st = np.empty(n_teachers)
        scratch = _arithmetic_buffer(out, _scratch_size(3, n_classes))
        e = _scratch_row(scratch, 0, n_classes, n_classes)
        ell = _scratch_row(scratch, 1, n_classes, n_classes)
        pt = _scratch_row(scratch, 2, n_classes, n_classes)
        wide_t = np.empty((n_teachers, 1, _wide_columns(teachers, n_classes)), np.float32)
        like = ell[0]
        t_out = as_type_of(temperature, like)
        eps_c = as_type_of(eps, like)
        tiny = tiny_like(like)
        log_eps = math.log(eps) if eps > 0.0 else NEG_INF
        for i in _block_rows(block, n_rows, per_block):
            t_source, t_row = _widened(teachers, i, wide_t)
            if not _finite_teachers(t_source, t_row):
                _fill_row(out, i, math.nan)
                continue
            total = _teacher_weights(
                t_source, weights, t_row, _NO_LABEL, params, _STATIC_CODE, m_t, log_st, row_w, e, pt
            )
            for k in range(n_teachers):
                row_w[k] /= total
            _mixture_target(t_source, row_w, m_t, log_st, t_row, inv_t, 1.0 / total, ell, pt)
            row = out[i]
            if eps > 0.0:
                for j in range(n_classes):
                    _put(row, j, t_out * log_like(pt[j] + eps_c, like))
                for j in range(n_classes):
                    if pt[j] < tiny or eps_c < tiny:
                        # log(p + eps) from log p and log eps, in float64.
                        _put(row, j, temperature * logaddexp(np.float64(ell[j]), log_eps))
            else:
                for j in range(n_classes):
                    _put(row, j, t_out * ell[j])


# ---------------------------------------------------------------------------
# Sparse top-k teachers: each row's K k stored entries are merged into the
# target on the union U of the supports (a few hundred classes at most), so no
# dense teacher row exists.  The student row is swept for its statistics, and
# once more where the gradient is written.


@row_function
def _topk_target(top, weights, i, y, params, sparse, teacher_state, acc, outside, touched):
    """Merge row i's top-k entries into acc (the target on U, minus p_out for
    "uniform"), set outside[j] = 0 for j in U and list U in touched.

    First each teacher's normalizer and (for a data-dependent weighting) its row
    weight, kept as logarithms and normalized from the largest; a row where no
    teacher's weight is positive keeps the static weights.  Then the entries of
    the teachers with positive row weight.  ``teacher_state`` holds four [K]
    float64 rows, filled by the first pass: log Z, log t, C - n, row weights.
    Returns (n_u, p_tail, p_out, bad): the size of U, the bucket's target mass,
    the "uniform" mass of each class outside U, and whether a stored
    log-probability is NaN (the row is then NaN).
    """
    indices, logprobs = top
    log_norms, log_tails, n_outs, row_w = teacher_state
    n_classes = outside.shape[0]
    taus = (sparse.retemper, sparse.retemper * params.temperature)
    n_teachers = weights.shape[0]
    bad = False
    top_w = NEG_INF
    for k in range(n_teachers):
        row_w[k] = NEG_INF
        if not weights[k] > 0.0:
            continue
        idx = indices[k, i]
        lp = logprobs[k, i]
        log_norm, log_tail, n_out, nan_seen = topk_teacher_norm(idx, lp, taus[0], n_classes, sparse.tail)
        bad = bad or nan_seen
        log_norms[k] = log_norm
        log_tails[k] = log_tail
        n_outs[k] = n_out
        lw = math.log(weights[k])
        if params.weighting != STATIC:
            norm = (log_norm, log_tail, n_out)
            lw += topk_teacher_log_weight(idx, lp, y, params.weighting, taus, sparse.tail, n_classes, norm)
        row_w[k] = lw
        top_w = max(top_w, lw)
    static = not top_w > NEG_INF
    total = 0.0
    for k in range(n_teachers):
        row_w[k] = row_weight(static, weights[k], row_w[k], top_w)
        total += row_w[k]
    n_u = 0
    p_tail = 0.0
    p_out = 0.0
    for k in range(n_teachers):
        w = row_w[k] / total
        if not w > 0.0:
            continue
        idx = indices[k, i]
        lp = logprobs[k, i]
        log_norm = log_norms[k]
        bucket_mass, per_class = topk_tail_shares(sparse.tail, w, log_norm, log_tails[k], n_outs[k])
        p_tail += bucket_mass
        p_out += w * per_class
        for e in range(idx.shape[0]):
            j = idx[e]
            if j < 0:
                continue
            if outside[j] != 0.0:
                outside[j] = 0.0
                touched[n_u] = j
                n_u += 1
            acc[j] += topk_entry_target(w, taus[0] * np.float64(lp[e]), log_norm, per_class)
    return n_u, p_tail, p_out, bad


@row_function
def _topk_student_stats(s, inv_t, outside, qt, logit_sums):
    """The student's sweep: qt_j = exp(b_j), b = (s - max s) / T; returns
    (max s, S_b, S_s, Q_out, B_out, E_out): S_b = sum exp(b), S_s = sum exp(s - max s),
    and over the classes outside U (outside_j = 1) Q_out = sum exp(b) and, with
    ``logit_sums`` ("uniform"), B_out = sum b and E_out = sum exp(b) b (else 0).
    At T = 1, S_s is S_b, and at T = 2 exp(s - max s) is exp(b)^2: the loops then
    compute one exponential per class."""
    like = qt[0]
    n = s.shape[0]
    m_s = _max(s)
    shift = as_type_of(m_s, like)
    scale = as_type_of(inv_t, like)
    zero = as_type_of(0.0, like)
    unit = inv_t == 1.0
    half = inv_t == 0.5
    s_b = 0.0
    s_s = 0.0
    q_out = 0.0
    b_out = 0.0
    e_out = 0.0
    # Separate loops for each case, so that none computes what is not asked for.
    for start in range(0, n, CHUNK):
        x = s[start : start + CHUNK]
        o = outside[start : start + CHUNK]
        q_row = qt[start : start + CHUNK]
        p_b = zero
        p_s = zero
        p_q = zero
        p_bo = zero
        p_e = zero
        if logit_sums and unit:
            for j in range(x.shape[0]):
                b = x[j] - shift
                q = exp_like(b, like)
                q_row[j] = q
                p_b += q
                ob = o[j] * b
                p_q += o[j] * q
                p_bo += ob
                p_e += q * ob
            p_s = p_b
        elif logit_sums and half:
            for j in range(x.shape[0]):
                b = (x[j] - shift) * scale
                q = exp_like(b, like)
                q_row[j] = q
                p_b += q
                p_s += q * q
                ob = o[j] * b
                p_q += o[j] * q
                p_bo += ob
                p_e += q * ob
        elif logit_sums:
            for j in range(x.shape[0]):
                d = x[j] - shift
                b = d * scale
                q = exp_like(b, like)
                q_row[j] = q
                p_b += q
                p_s += exp_like(d, like)
                ob = o[j] * b
                p_q += o[j] * q
                p_bo += ob
                p_e += q * ob
        elif unit:
            for j in range(x.shape[0]):
                q = exp_like(x[j] - shift, like)
                q_row[j] = q
                p_b += q
                p_q += o[j] * q
            p_s = p_b
        elif half:
            for j in range(x.shape[0]):
                q = exp_like((x[j] - shift) * scale, like)
                q_row[j] = q
                p_b += q
                p_s += q * q
                p_q += o[j] * q
        else:
            for j in range(x.shape[0]):
                d = x[j] - shift
                q = exp_like(d * scale, like)
                q_row[j] = q
                p_b += q
                p_s += exp_like(d, like)
                p_q += o[j] * q
        s_b += p_b
        s_s += p_s
        q_out += p_q
        b_out += p_bo
        e_out += p_e
    return np.float64(m_s), s_b, s_s, q_out, b_out, e_out


@row_function
def _topk_jsd_outside(qt, outside, inv_sb, p_out, beta, aux):
    """The "uniform" JSD over the classes outside U, where the target is p_out:
    returns (sum of the class terms, sum of q_j (1 - beta) log(q_j / m_j)), with
    (1 - beta) log(q_j / m_j) into aux for the gradient sweep."""
    like = qt[0]
    n = qt.shape[0]
    b1_c = as_type_of(1.0 - beta, like)
    bp = as_type_of(beta * p_out, like)
    lp = as_type_of(math.log(p_out) if p_out > 0.0 else NEG_INF, like)
    inv = as_type_of(inv_sb, like)
    zero = as_type_of(0.0, like)
    d_sum = 0.0
    qh_sum = 0.0
    for start in range(0, n, CHUNK):
        q_row = qt[start : start + CHUNK]
        o = outside[start : start + CHUNK]
        h_row = aux[start : start + CHUNK]
        p_d = zero
        p_qh = zero
        for j in range(q_row.shape[0]):
            q = q_row[j] * inv
            term, h = uniform_jsd_class(q, bp, b1_c, lp, zero)
            h_row[j] = h
            p_d += o[j] * term
            p_qh += o[j] * (q * h)
        d_sum += p_d
        qh_sum += p_qh
    return d_sum, qh_sum


def _q_row(grad, i, scratch_row, want_grad, wide):
    """Where the student's sweep stores its exp(b_j): the row the gradient is written
    to (_grad_row: row i of the gradient, or ``wide`` for 16-bit bits) when it is
    wanted and has the arithmetic's dtype (the gradient sweep then rewrites it in
    place, so the row is not swept through a scratch row as well), else the
    scratch row."""


@overload(_q_row)
def _q_row_overload(grad, i, scratch_row, want_grad, wide):
    if _holds_bits(grad):
        return lambda grad, i, scratch_row, want_grad, wide: wide if want_grad else scratch_row
    if grad.dtype == scratch_row.dtype:
        return lambda grad, i, scratch_row, want_grad, wide: grad[i] if want_grad else scratch_row
    return lambda grad, i, scratch_row, want_grad, wide: scratch_row


def _q_source(qt, out):
    """What the gradient sweep reads exp(b_j) from: None when qt is the gradient row
    itself (_q_row), read as ``out``, else qt."""


@overload(_q_source)
def _q_source_overload(qt, out):
    if qt.dtype == out.dtype:
        return lambda qt, out: None
    return lambda qt, out: qt


def _q_at(source, out, j):
    """exp(b_j) for the gradient sweep: out[j] in place (source None), else source[j]."""


@overload(_q_at)
def _q_at_overload(source, out, j):
    if isinstance(source, types.NoneType):
        return lambda source, out, j: out[j]
    return lambda source, out, j: source[j]


@row_function
def _topk_grad_sweep(s, y, rows, stats, constants, params, out):
    """out = c_soft dD/ds + c_hard dCE/ds outside U: soft (q_j (a + c b_j) + e) with
    the constants (a, c, e) of the tail rule, or for the "uniform" JSD the per-class
    q_j (h_j - qh) with h_j = (1 - beta) log(q_j / m_j) from aux (rows = (source,
    aux), source as in _q_source: exp(b_j) is read from out itself when None); the
    caller then writes the entries in U."""
    qt, aux = rows
    m_s, s_b, log_ss, qh = stats
    a, c, e, per_class_jsd = constants
    like = _q_at(qt, out, 0)  # the arithmetic's type
    n = s.shape[0]
    inv_t = 1.0 / params.temperature
    shift = as_type_of(m_s, like)
    scale = as_type_of(inv_t, like)
    soft = as_type_of(params.c_soft * inv_t, like)
    hard = as_type_of(params.c_hard, like)
    inv_sb = as_type_of(1.0 / s_b, like)
    shift_s = as_type_of(log_ss, like)
    if per_class_jsd:
        one = as_type_of(1.0, like)
        qh_c = as_type_of(qh, like)
        for j in range(n):
            q = _q_at(qt, out, j) * inv_sb
            out[j] = soft * jsd_grad(q, aux[j], one, qh_c) + hard * exp_like((s[j] - shift) - shift_s, like)
    else:
        zero = as_type_of(0.0, like)
        a_c = as_type_of(a, like)
        c_c = as_type_of(c, like)
        e_c = as_type_of(e, like)
        if c != 0.0:
            for j in range(n):
                b = (s[j] - shift) * scale
                q = _q_at(qt, out, j) * inv_sb
                g = topk_soft_grad(q, b, a_c, c_c, e_c)
                out[j] = soft * g + hard * exp_like((s[j] - shift) - shift_s, like)
        elif inv_t == 1.0:
            # At T = 1 softmax(s) is q: the row needs no exponential and no s.
            for j in range(n):
                q = _q_at(qt, out, j) * inv_sb
                out[j] = soft * topk_soft_grad(q, zero, a_c, zero, e_c) + hard * q
        elif inv_t == 0.5:
            # At T = 2 softmax(s)_j is exp(b_j)^2 / S_s (_topk_student_stats).
            hard_ss = as_type_of(params.c_hard * math.exp(-log_ss), like)
            for j in range(n):
                e_b = _q_at(qt, out, j)
                out[j] = soft * topk_soft_grad(e_b * inv_sb, zero, a_c, zero, e_c) + hard_ss * (e_b * e_b)
        else:
            for j in range(n):
                q = _q_at(qt, out, j) * inv_sb
                g = topk_soft_grad(q, zero, a_c, zero, e_c)
                out[j] = soft * g + hard * exp_like((s[j] - shift) - shift_s, like)
    out[y] -= hard


@njit(parallel=True, nogil=True, cache=DISK_CACHE, fastmath=FASTMATH, error_model="numpy")
@reads("student", "top", "weights", "labels")
def topk_rows(student, top, weights, labels, params, sparse, per_block, compute, grad, d_rows, ce_rows):
    """The loss against sparse top-k teachers, per row: the divergence into d_rows,
    CE into ce_rows and, with params.want_grad, c_soft dD/ds + c_hard dCE/ds into grad.

    ``top`` is (indices [K, N, k] int64, -1 for no entry; logprobs [K, N, k]);
    ``weights`` are normalized.  Per row: the entries are merged into the target
    on U (float64, libm); the student's sweep (in ``compute``'s precision) gives
    its statistics, over all classes and over those outside U; the terms of the
    classes in U are float64; a "uniform" JSD sweeps the classes outside U; the
    gradient sweep writes the row.  Ignored rows get 0, rows with a NaN get NaN.
    """
    n_rows, n_classes = student.shape
    n_entries = top[0].shape[0] * top[0].shape[2]
    inv_t = 1.0 / params.temperature
    divergence = params.divergence
    tail = sparse.tail
    beta = params.beta
    for block in prange(_n_blocks(n_rows, per_block)):
        acc = np.zeros(n_classes)
        scratch = _scratch_buffer(3, n_classes, compute.dtype)
        outside = _scratch_row(scratch, 0, n_classes, n_classes)
        scratch_q = _scratch_row(scratch, 1, n_classes, n_classes)
        per_class_jsd = tail == UNIFORM and divergence == JSD
        aux = _scratch_row(scratch, 2, n_classes, n_classes if per_class_jsd else 1)  # JSD's h outside U
        outside[:] = 1.0
        touched = np.empty(n_entries, np.int64)
        # Per teacher: log Z, log t, C - n (as a float), the row weight.
        state = np.empty((4, top[0].shape[0]))
        teacher_state = (state[0], state[1], state[2], state[3])
        wide_s = np.empty((1, _wide_columns(student, n_classes)), np.float32)
        wide_g = np.empty(_wide_columns(grad, n_classes), compute.dtype)
        for i in _block_rows(block, n_rows, per_block):
            y = labels[i]
            if y == params.ignore_index:
                d_rows[i] = 0.0
                ce_rows[i] = 0.0
                if params.want_grad:
                    _fill_row(grad, i, 0.0)
                continue
            s_source, s_row = _widened(student, i, wide_s)
            s = s_source[s_row]
            n_u, p_tail, p_out, bad = _topk_target(
                top, weights, i, y, params, sparse, teacher_state, acc, outside, touched
            )
            if bad or nonfinite_probe(s) != 0.0:
                for u in range(n_u):
                    acc[touched[u]] = 0.0
                    outside[touched[u]] = 1.0
                d_rows[i] = math.nan
                ce_rows[i] = math.nan
                if params.want_grad:
                    _fill_row(grad, i, math.nan)
                continue
            qt = _q_row(grad, i, scratch_q, params.want_grad, wide_g)
            m_s, s_b, s_s, q_sum_out, b_out, e_out = _topk_student_stats(
                s, inv_t, outside, qt, tail == UNIFORM
            )
            log_sb = math.log(s_b)
            n_out = n_classes - n_u
            q_out = q_sum_out / s_b
            # The classes of U, in float64.
            d = 0.0
            qh = 0.0
            for u in range(n_u):
                j = touched[u]
                log_q = (np.float64(s[j]) - m_s) * inv_t - log_sb
                term, q_h = topk_class_terms(divergence, acc[j] + p_out, log_q, beta)
                d += term
                qh += q_h
            # The classes outside U, and the gradient's constants there: there
            # dD/db_j = q_j (a + c b_j) + e, or the "uniform" JSD's per-class form.
            targets = (p_tail, p_out)
            if per_class_jsd:
                d_o, qh_o = _topk_jsd_outside(qt, outside, 1.0 / s_b, p_out, beta, aux)
                h_out = 0.0
            else:
                sums = (q_out, float(n_out), b_out, e_out, s_b, log_sb)
                d_o, qh_o, h_out = topk_outside_terms(tail, divergence, targets, sums, beta)
            d = nonnegative(d + d_o)
            qh += qh_o
            a, c, e = topk_grad_constants(tail, divergence, targets, q_out, log_sb, h_out, d, qh)
            log_ss = math.log(s_s)
            ce_rows[i] = cross_entropy(m_s, np.float64(s[y]), log_ss)
            # A float32 row whose gradient constants leave the float32 range (a tail
            # below about 1e-38 of the row) is marked for the float64 kernel.
            like = qt[0]
            wide = (
                np.float64(as_type_of(a, like))
                + np.float64(as_type_of(c, like))
                + np.float64(as_type_of(e, like))
            )
            d_rows[i] = d if math.isfinite(wide) or not math.isfinite(a + c + e) else math.nan
            if params.want_grad:
                row = _grad_row(grad, i, wide_g)
                stats = (m_s, s_b, log_ss, qh)
                source = _q_source(qt, row)
                _topk_grad_sweep(s, y, (source, aux), stats, (a, c, e, per_class_jsd), params, row)
                soft = params.c_soft * inv_t
                for u in range(n_u):
                    j = touched[u]
                    log_q = (np.float64(s[j]) - m_s) * inv_t - log_sb
                    g = topk_class_grad(divergence, acc[j] + p_out, log_q, beta, d, qh)
                    r = math.exp((np.float64(s[j]) - m_s) - log_ss)
                    row[j] = soft * g + params.c_hard * (r - (1.0 if j == y else 0.0))
                _store_row(grad, i, row)
            for u in range(n_u):
                j = touched[u]
                acc[j] = 0.0
                outside[j] = 1.0


@njit(nogil=True, cache=DISK_CACHE)
def topk_first_problem(indices, logprobs, labels, checks):
    """The first invalid entry of sparse teachers, as (code, teacher, row, value);
    code 0: none.  1: an index outside [0, C) other than -1; 2: a class stored
    twice in a row; 3: a log-probability above the tolerance u; 4: a row's
    probabilities summing above 1 + u (1 + sum p_j |l_j|), which allows each
    stored l_j a relative rounding of u; 5 (with check_finite): a NaN; 6 (with
    needs_mass): a row that stores no probability.  Rows whose label is
    ignore_index are not read.  checks = (C, u, check_finite, needs_mass,
    ignore_index)."""
    n_classes, tolerance, check_finite, needs_mass, ignore_index = checks
    seen = np.full(n_classes, -1, np.int64)
    n_teachers, n_rows, k = indices.shape
    for t in range(n_teachers):
        for i in range(n_rows):
            if labels[i] == ignore_index:
                continue
            stamp = t * n_rows + i
            mass = 0.0
            rounding = 1.0
            for e in range(k):
                j = indices[t, i, e]
                if j == -1:
                    continue
                if j < 0 or j >= n_classes:
                    return 1, t, i, float(j)
                if seen[j] == stamp:
                    return 2, t, i, float(j)
                seen[j] = stamp
                x = np.float64(logprobs[t, i, e])
                if x != x:
                    if check_finite:
                        return 5, t, i, x
                    continue
                if x > tolerance:
                    return 3, t, i, x
                p = math.exp(x)
                mass += p
                rounding += p * abs(x) if p > 0.0 else 0.0
            if mass > 1.0 + tolerance * rounding:
                return 4, t, i, mass
            if needs_mass and not mass > 0.0:
                return 6, t, i, mass
    return 0, 0, 0, 0.0

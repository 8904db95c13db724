"""Scalar math shared by the CPU and CUDA kernels.

Every helper here is an ``@njit(inline="always")`` function of scalars (the
sparse teachers' helpers also of one teacher row's k stored entries), so the
same source compiles inside ``@njit`` CPU kernels and inside ``@cuda.jit``
kernels (numba-cuda compiles ``@njit`` callees for the device).  Keeping the
formulas in one place is what makes the two targets agree.

Row statistics follow the "online softmax" convention: a pair ``(m, s)`` holds a
running maximum ``m`` and ``s = sum_j exp(x_j - m)``; the KL term also carries
``w = sum_j exp(a_j - m_a) * (a_j - b_j)``, which rescales exactly like ``s``.
"""

import math
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

NEG_INF = -math.inf

# ---------------------------------------------------------------------------
# Loss options: a name's code is its index in these tuples, on both targets.

COMBINES = ("logits", "probs")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
WEIGHTINGS = ("static", "confidence", "entropy")
COMBINE_LOGITS, COMBINE_PROBS = 0, 1
FORWARD_KL, REVERSE_KL, JSD, TVD, SKEW_FORWARD_KL, SKEW_REVERSE_KL = 0, 1, 2, 3, 4, 5
STATIC, CONFIDENCE, ENTROPY = 0, 1, 2
# Above this temperature a row's forward or reverse KL is taken from kl_from_sums (one
# expm1 per element more), which keeps its digits where the rows are nearly uniform;
# float32 arithmetic (T <= 16) never takes it.
FLAT_TEMPERATURE = 16.0
# Tail rules of sparse top-k teachers (numba_kd.sparse.TopK).
TAILS = ("renormalize", "bucket", "uniform")
RENORMALIZE, BUCKET, UNIFORM = 0, 1, 2


class LossParams(NamedTuple):
    """The scalars and option codes of one loss call, as the row kernels take them.

    ``c_soft`` and ``c_hard`` scale the gradient: ``alpha T^2 / divisor`` and
    ``(1 - alpha) / divisor``.
    """

    ignore_index: int
    temperature: float
    #: The mixture weight: the JSD's beta or the skew KLs' lambda (mixture_weights).
    beta: float
    combine: int
    divergence: int
    weighting: int
    c_soft: float
    c_hard: float
    want_grad: bool


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
def nonnegative(d):
    """A divergence that rounding pushed below zero, clamped to 0 (NaN stays NaN)."""
    return d - d if d < 0 else d


@njit(inline="always")
def kl_from_stats(s_a, w_a, log_s_a, log_s_b):
    """KL(softmax(a) || softmax(b)) = W / S_a - log S_a + log S_b.

    Every term is relative to the row maxima: ``S_a = sum_j exp(a_j - max a)``,
    ``W = sum_j exp(a_j - max a) ((a_j - max a) - (b_j - max b))`` and ``log S_b``
    of ``b - max b``, so adding a constant to either row changes nothing.
    """
    return nonnegative(w_a / s_a - log_s_a + log_s_b)


@njit(inline="always")
def kl_from_sums(s_a, w_a, s_b, u_b):
    """KL(softmax(a) || softmax(b)) = W / S_a - log1p(U / S_b), for nearly flat rows.

    ``S_a``, ``W`` and ``S_b`` as in kl_from_stats, and ``U = sum_j exp(b_j - max b)
    expm1(d_j)`` with ``d = (a - max a) - (b - max b)``, so that ``log1p(U / S_b)
    = log S_a - log S_b``.  Both terms are of the size of d: at large T, where
    log S_a and log S_b agree to many digits and kl_from_stats keeps only about
    1e-16 T^2 relative precision, this form keeps about 1e-16 T.
    """
    return nonnegative(w_a / s_a - math.log1p(u_b / s_b))


@njit(inline="always")
def kl_from_online_stats(m_a, s_a, w_a, m_b, s_b):
    """KL(softmax(a) || softmax(b)) from online states: (m_a, s_a, w_a) of
    online_weighted_step over x = a, v = a - b, and (m_b, s_b) of online_lse_step
    over b.  w_a sums e_a (a - b) relative to m_a alone; relative to both maxima
    it is w_a - s_a (m_a - m_b)."""
    return kl_from_stats(s_a, w_a - s_a * (m_a - m_b), math.log(s_a), math.log(s_b))


@njit(inline="always")
def cross_entropy(row_max, label_logit, log_sum):
    """lse(s) - s_y from the row's (max, log sum exp(s - max)): log S is kept apart
    from a huge maximum, which would round it away."""
    return (row_max - label_logit) + log_sum


@njit(inline="always")
def jsd_mixture_ratio(beta_p, rest_q):
    """exp(-|h|) with h = log(beta p) - log((1 - beta) q): the smaller of the two
    mixture parts over the larger (0 when both are 0)."""
    small = min(beta_p, rest_q)
    large = max(beta_p, rest_q)
    # Divide unconditionally and select: a branch around the division would keep
    # the CPU loops from vectorizing.
    ratio = small / large
    return ratio if large > small - small else small - small


@njit(inline="always")
def jsd_log_ratios(lq_lp, log_beta, log_1m_beta, ratio, like):
    """(log p - log m, log q - log m) with m = beta p + (1 - beta) q, from
    lq_lp = log q - log p and ratio = jsd_mixture_ratio(beta p, (1 - beta) q).

    log m is the larger part's log plus log1p(ratio), so neither log-ratio
    overflows when p or q underflows (lq_lp = +-inf gives the finite limit of the
    other one) and neither cancels when p and q differ by orders of magnitude.
    """
    soft = log1p_like(ratio, like)
    lp_lm = min(-log_beta, -log_1m_beta - lq_lp) - soft
    lq_lm = min(lq_lp - log_beta, -log_1m_beta) - soft
    return lp_lm, lq_lm


@njit(inline="always")
def jsd_term(p, q, lp_lm, lq_lm, beta, one_m_beta):
    """beta p log(p / m) + (1 - beta) q log(q / m); a zero probability adds nothing."""
    zero = p - p
    a = beta * p * lp_lm if p > zero else zero
    b = one_m_beta * q * lq_lm if q > zero else zero
    return a + b


@njit(inline="always")
def _x_plus_expm1_neg(x):
    """x + expm1(-x) = x^2/2 - x^3/6 + ... >= 0: its Taylor series for |x| < 0.1
    (where the sum would cancel; the terms left out are below 1e-16 relative)."""
    if abs(x) >= 0.1:
        return x + math.expm1(-x)
    # Horner form of sum_{n=2}^{10} (-x)^n / n!, divided by x^2.
    series = 1.0 / 3628800.0
    series = 1.0 / 362880.0 - x * series
    series = 1.0 / 40320.0 - x * series
    series = 1.0 / 5040.0 - x * series
    series = 1.0 / 720.0 - x * series
    series = 1.0 / 120.0 - x * series
    series = 1.0 / 24.0 - x * series
    series = 1.0 / 6.0 - x * series
    series = 0.5 - x * series
    return x * x * series


@njit(inline="always")
def mixture_log_ratios_near(lq_lp, w_p, w_q):
    """(log p - log m, log q - log m) with m = w_p p + w_q q (w_p + w_q = 1), for p and
    q within a factor e of each other (|lq_lp| < 1): m / p = 1 + w_q expm1(lq_lp)
    and m / q = 1 + w_p expm1(-lq_lp) keep their digits where m would not."""
    return -math.log1p(w_q * math.expm1(lq_lp)), -math.log1p(w_p * math.expm1(-lq_lp))


@njit(inline="always")
def jsd_term_near(p, q, lq_lp, beta, one_m_beta):
    """(the JSD term of one class, log q - log m) for p and q within a factor e of each
    other (|lq_lp| < 1), where jsd_term would cancel.

    The term is beta p phi(log p/m) + (1 - beta) q phi(log q/m) with phi(x) = x +
    expm1(-x) >= 0: it differs from jsd_term's by beta (m - p) + (1 - beta) (m - q),
    which is 0 for every class.  Each part is of second order in lq_lp, so the sum
    over classes does not cancel when both rows are nearly uniform (large T); the
    log-ratios come from expm1(lq_lp), not from m.
    """
    lp_lm, lq_lm = mixture_log_ratios_near(lq_lp, beta, one_m_beta)
    term = beta * p * _x_plus_expm1_neg(lp_lm) + one_m_beta * q * _x_plus_expm1_neg(lq_lm)
    return term, lq_lm


@njit(inline="always")
def mixture_weights(divergence, beta, one, neg_inf):
    """(w_p, w_q, log w_p, log w_q) of the mixture m = w_p p + w_q q that the JSD and
    the skew KLs measure against, from the mixture weight ``beta`` (in the type of
    ``one``): the JSD's beta and the skew forward KL's lambda weigh the target p, the
    skew reverse KL's lambda weighs the student q.  log 0 is ``neg_inf``."""
    rest = one - beta
    log_beta = math.log(beta)
    log_rest = math.log1p(-beta) if rest > one - one else neg_inf
    if divergence == SKEW_REVERSE_KL:
        return rest, beta, log_rest, log_beta
    return beta, rest, log_beta, log_rest


@njit(inline="always")
def tvd_class(p, q, half):
    """(|p - q| / 2, q dD/dq) of one class of the total variation distance, with the
    subgradient sign(q - p) / 2 of |p - q| / 2, which is 0 where p = q.
    ``half`` is 0.5 in the arithmetic's type."""
    diff = q - p
    zero = diff - diff
    slope = half if diff > zero else zero
    slope = -half if diff < zero else slope
    return half * abs(diff), q * slope


@njit(inline="always")
def skew_class(p, q, lq_lp, mix, forward, like):
    """(term, q dD/dq) of one class of a skew KL, in the type of ``like``; mix =
    mixture_weights(divergence, lambda), ``forward`` for the skew forward KL.

    Forward: KL(p || m), m = lambda p + (1 - lambda) q; the term p log(p / m), and
    q dD/dq = -p (1 - lambda) q / m.  Reverse: KL(q || m), m = (1 - lambda) p +
    lambda q; the term q log(q / m), and dD/dq = log(q / m) + 1 - lambda q / m less
    its constant 1, which the softmax's gradient cancels (as for the reverse KL).
    Both use exp(log(w_q q / m)) with an argument at most 0, so they stay finite
    however small lambda is.  Both are computed and one is selected, so that one
    vectorized loop serves both."""
    w_p, w_q, log_w_p, log_w_q = mix
    lp_lm, lq_lm = jsd_log_ratios(lq_lp, log_w_p, log_w_q, jsd_mixture_ratio(w_p * p, w_q * q), like)
    zero = p - p
    tail = exp_like(log_w_q + lq_lm, like)
    term = kl_term(p, lp_lm) if forward else kl_term(q, lq_lm)
    slope = -p * tail if forward else q * (lq_lm - tail)
    measured = p if forward else q
    return term, slope if measured > zero else zero


@njit(inline="always")
def skew_class_near(divergence, p, q, lq_lp, mix):
    """skew_class for |lq_lp| < 1 (large T), with the
    log-ratios of mixture_log_ratios_near: of the size of lq_lp and exact to its
    relative precision, where jsd_log_ratios would keep only its absolute one.
    (Unlike the JSD's, these terms are not rewritten as p phi(log p/m): the
    difference, m - p, sums to 0 only for exactly normalized rows.)"""
    w_p, w_q, _, log_w_q = mix
    lp_lm, lq_lm = mixture_log_ratios_near(lq_lp, w_p, w_q)
    if divergence == SKEW_FORWARD_KL:
        return p * lp_lm, -p * math.exp(log_w_q + lq_lm)
    return q * lq_lm, q * (lq_lm - math.exp(log_w_q + lq_lm))


@njit(inline="always")
def mixture_class(divergence, p, q, lq_lp, mix, half):
    """(term, q dD/dq) of one class for the TVD or a skew KL (mix = mixture_weights),
    in the type of ``half`` (0.5); a class where p and q are both 0 adds nothing."""
    if divergence == TVD:
        return tvd_class(p, q, half)
    return skew_class(p, q, lq_lp, mix, divergence == SKEW_FORWARD_KL, half)


@njit(inline="always")
def mixture_grad(q, q_slope, slope_sum):
    """dD/d(s / T) = q (dD/dq - sum_k q_k dD/dq_k) from q_slope = q dD/dq."""
    return q_slope - q * slope_sum


@njit(inline="always")
def kl_term(p, lp_lq):
    """p log(p / q), 0 where p = 0 (forward KL; reverse KL with p and q swapped)."""
    return p * lp_lq if p > p - p else p - p


@njit(inline="always")
def forward_kl_grad(p, q):
    """d KL(p || q) / d(s / T)."""
    return q - p


@njit(inline="always")
def reverse_kl_grad(q, lq_lp, divergence):
    """d KL(q || p) / d(s / T) = q (log q - log p - KL)."""
    return q * (lq_lp - divergence)


@njit(inline="always")
def jsd_grad(q, lq_lm, one_m_beta, q_g):
    """d JSD / d(s / T) = q (g - sum_k q_k g_k), g = (1 - beta) log(q / m)."""
    return q * (one_m_beta * lq_lm - q_g)


@njit(inline="always")
def confidence_log_weight(log_weight, shifted_label_logit, log_sum):
    """log(w_k softmax(t_k)_y) from the label's logit minus the row max and log sum
    exp(t_k - max).  Kept as a logarithm: the confidence underflows for large logits."""
    return log_weight + (shifted_label_logit - log_sum)


@njit(inline="always")
def entropy_log_weight(log_weight, mean_shifted, log_sum):
    """log(w_k exp(-H(softmax(u)))), u = t_k / T, with H = log S - sum_j softmax(u)_j
    (u_j - max u) (``mean_shifted`` is that sum): every term relative to the row maximum."""
    return log_weight + (mean_shifted - log_sum)


@njit(inline="always")
def log_or_minus_inf(x, neg_inf):
    """log x, and ``neg_inf`` (-inf in the caller's float type) for x = 0, stated
    rather than left to the error model."""
    return math.log(x) if x > x - x else neg_inf


@njit(inline="always")
def distillation_terms(kl_sum, ce_sum, n_rows, alpha, soft_factor):
    """(alpha * soft_factor * mean D, (1 - alpha) * mean CE); the loss is their sum.
    soft_factor is T^2 (or 1 without scale_by_t2)."""
    soft = alpha * soft_factor * (kl_sum / n_rows)
    hard = (1.0 - alpha) * (ce_sum / n_rows)
    return soft, hard


@njit(inline="always")
def weighted_log_prob(log_weight, scaled_logit, row_max, log_sum):
    """log(w_k) + log softmax(t_k / T)_j from the row's lse(t_k / T) = row_max + log_sum.

    (x - max) - log S keeps log S even where max + log S would round it away."""
    return log_weight + ((scaled_logit - row_max) - log_sum)


@njit(inline="always")
def tempered_log(p, eps, temperature):
    """T * log(p + eps): entrenar's way back from a probability to a logit."""
    return temperature * math.log(p + eps)


@njit(inline="always")
def logaddexp(a, b):
    """log(exp(a) + exp(b)) without overflow (-inf when both are -inf)."""
    top = max(a, b)
    if top == NEG_INF:
        return top
    return top + math.log1p(math.exp(-abs(a - b)))


@njit(inline="always")
def nonfinite_probe(row):
    """sum_j row_j * 0: 0 for a finite row, NaN if it holds a NaN or an infinity."""
    zero = row[0] - row[0]
    probe = zero
    for j in range(row.shape[0]):
        probe += row[j] * zero
    return probe


@njit(inline="always")
def anchored_ensemble_logit(teachers, weights, i, j, anchor):
    """sum_k w_k (t_k[i, j] - anchor), weights summing to 1: z_ij - anchor, with an offset
    common to the teachers (and to the anchor) removed before it can round."""
    z = weights[0] * (logit_at(teachers[0], i, j) - anchor)
    for k in range(1, weights.shape[0]):
        z += weights[k] * (logit_at(teachers[k], i, j) - anchor)
    return z


@njit(inline="always")
def ensemble_logit(teachers, weights, i, j):
    """z_ij = sum_k w_k t_k[i, j], accumulated in the type of ``weights``.

    ``teachers`` is either a homogeneous tuple of 2-D arrays or one 3-D array;
    ``teachers[k]`` is a 2-D array in both cases, so one source serves both.
    """
    # Starting from the first product (not 0.0) keeps z in the weights' type.
    z = weights[0] * logit_at(teachers[0], i, j)
    for k in range(1, weights.shape[0]):
        z += weights[k] * logit_at(teachers[k], i, j)
    return z


# ---------------------------------------------------------------------------
# Vectorizable float32 exp and log for the CPU kernels.
#
# numba has no SVML: math.exp in a loop is a scalar libm call.  These are
# branch-free (selects only) and stay in float32, so LLVM vectorizes loops that
# call them 8 wide with AVX2.  Relative error against float64: about 1e-7.


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _bits_from_f32(typingctx, value):
    """Reinterpret the bits of a float32 as an int32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2_F32 = np.float32(0.6931471805599453)
# Below log(smallest normal float32) exp_f32 returns an exact 0; the reduction is
# computed on the clamped argument so that the exponent bits stay valid.
_EXP_LOWEST = np.float32(-87.33654)
_F32_ZERO = np.float32(0.0)
# 1/k! for the Taylor polynomial of exp on |r| <= ln(2)/2 (truncation error ~5e-9).
_E2, _E3, _E4, _E5, _E6, _E7 = (np.float32(1.0 / math.factorial(k)) for k in range(2, 8))
_F32_ONE = np.float32(1.0)
_F32_HALF = np.float32(0.5)


@njit(inline="always")
def exp_f32(x):
    """exp(x) for a float32 x <= 0 (0 below the normal range), all in float32 so that loops vectorize 8 wide.

    x = n ln2 + r with integer n and |r| <= ln(2)/2; exp(r) by its Taylor
    polynomial, 2^n from the exponent bits.  The reduction x - n ln2 is one FMA
    under contraction; its error grows with |n|, but the terms with large |n|
    are below 2^-|n| of the row's largest term, so sums stay within ~1e-7.
    """
    # NaN fails both comparisons and stays NaN.
    clamped = _EXP_LOWEST if x < _EXP_LOWEST else x
    n = np.floor(clamped * _LOG2E + _F32_HALF)
    r = clamped - n * _LN2_F32
    p = _F32_ONE + r * (_F32_ONE + r * (_E2 + r * (_E3 + r * (_E4 + r * (_E5 + r * (_E6 + r * _E7))))))
    scale = _f32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
    return _F32_ZERO if x < _EXP_LOWEST else p * scale


_LN2 = 0.6931471805599453
_F32_SQRT2 = np.float32(math.sqrt(2.0))
_F32_TWO = np.float32(2.0)
_L3, _L5, _L7, _L9 = (np.float32(2.0 / k) for k in (3, 5, 7, 9))


@njit(inline="always")
def log_f32(x):
    """log(x) as float64 of a positive float32 x (normal numbers; 0 gives -inf)."""
    bits = _bits_from_f32(x)
    exponent = ((bits >> np.int32(23)) & np.int32(0xFF)) - np.int32(127)
    mantissa = _f32_from_bits((bits & np.int32(0x7FFFFF)) | np.int32(0x3F800000))  # in [1, 2)
    big = mantissa > _F32_SQRT2
    mantissa = mantissa * _F32_HALF if big else mantissa
    exponent = exponent + np.int32(1) if big else exponent
    f = mantissa - _F32_ONE  # in [sqrt(1/2) - 1, sqrt(2) - 1]
    s = f / (_F32_TWO + f)  # log(1 + f) = 2 atanh(s)
    s2 = s * s
    log1p_f = s * (_F32_TWO + s2 * (_L3 + s2 * (_L5 + s2 * (_L7 + s2 * _L9))))
    result = exponent * _LN2 + log1p_f
    # Selects, not branches, so that loops calling this still vectorize.
    result = -math.inf if x == 0 else result
    return result if x >= 0 else math.nan


def exp_like(x, like):
    """exp(x) in the precision of ``like``'s type: float32 -> exp_f32, float64 -> libm."""
    return math.exp(x)


@overload(exp_like)
def _exp_like(x, like):
    if like == types.float32:
        return lambda x, like: exp_f32(np.float32(x))
    return lambda x, like: math.exp(x)


def log_like(x, like):
    """log(x) in the precision of ``like``'s type: float32 -> log_f32, float64 -> libm."""
    return math.log(x)


@overload(log_like)
def _log_like(x, like):
    if like == types.float32:
        return lambda x, like: log_f32(np.float32(x))
    return lambda x, like: math.log(x)


def as_type_of(x, like):
    """``x`` converted to the type of ``like`` (float32 or float64)."""
    return x


@overload(as_type_of)
def _as_type_of(x, like):
    if like == types.float32:
        return lambda x, like: np.float32(x)
    return lambda x, like: np.float64(x)


def log1p_like(x, like):
    """log(1 + x) for x >= 0 in the precision of ``like``'s type."""
    return math.log1p(x)


@overload(log1p_like)
def _log1p_like(x, like):
    if like == types.float32:

        def log1p_f32(x, like):
            # log(u) * x / (u - 1) with u = 1 + x rounded corrects the rounding of u.
            u = np.float32(x) + _F32_ONE
            d = u - _F32_ONE
            corrected = np.float32(log_f32(u)) * (np.float32(x) / d)
            return np.float32(x) if d == _F32_ZERO else corrected

        return log1p_f32
    return lambda x, like: math.log1p(x)


def tiny_like(like):
    """Below this a probability of ``like``'s type has lost digits to underflow."""
    return 1e-300


@overload(tiny_like)
def _tiny_like(like):
    if like == types.float32:
        return lambda like: np.float32(1e-30)
    return lambda like: 1e-300


# ---------------------------------------------------------------------------
# 16-bit floats.  numba has no 16-bit float type on the CPU, so 16-bit logits reach
# the CPU kernels as their bit patterns, uint16 for bfloat16 and int16 for IEEE
# float16; these widen them to float32 (exactly) and round float32 results back to
# nearest, ties to even.  Integer operations and selects only: loops stay vectorized.

_BF16_SHIFT = np.int64(16)
# 2^112: the float16 exponent bias (15) put in place of float32's (127).
_F16_REBIAS = np.float32(2.0**112)
_F32_EXPONENT = np.int64(0x7F800000)
_F16_EXPONENT = np.int64(0x7C00)
# Infinity is the all-ones exponent with a zero mantissa; a quiet NaN sets the mantissa's top bit.
_F16_INF = _F16_EXPONENT
_F16_NAN = np.int64(0x7E00)
# |x| at and above which a float32 rounds to float16 infinity (65520 rounds up to
# it; 65536 is the first power of two beyond the range), and below which it rounds
# to a subnormal float16 (2^-14, float16's smallest normal).
_F16_OVERFLOW_BITS = np.int64(0x47800000)
_F16_NORMAL_BITS = np.int64(0x38800000)
_F32_HALF_BITS = np.int64(0x3F000000)
_LOW_32 = np.int64(0xFFFFFFFF)


@njit(inline="always")
def f32_from_bf16(bits):
    """The float32 value of bfloat16 bits (uint16): they are a float32's upper half."""
    return _f32_from_bits(np.int64(bits) << _BF16_SHIFT)


@njit(inline="always")
def f32_from_f16(bits):
    """The float32 value of IEEE float16 bits (int16), subnormals, infinities and NaN included.

    Exponent and mantissa moved into a float32's place read as the value times
    2^-112 (a float32 subnormal for a float16 subnormal); one multiplication by a
    power of two makes it exact.  An all-ones exponent (infinity, NaN) maps to
    float32's all-ones exponent with the mantissa kept.
    """
    h = np.int64(bits) & np.int64(0xFFFF)
    magnitude = (h & np.int64(0x7FFF)) << np.int64(13)
    scaled = _f32_from_bits(magnitude) * _F16_REBIAS
    special = _f32_from_bits(magnitude | _F32_EXPONENT)
    value = special if (h & _F16_EXPONENT) == _F16_EXPONENT else scaled
    return _f32_from_bits(np.int64(_bits_from_f32(value)) | ((h & np.int64(0x8000)) << _BF16_SHIFT))


@njit(inline="always")
def bf16_from_f32(x):
    """bfloat16 bits (uint16) of ``x`` (a float, rounded to float32 first), to nearest even."""
    bits = np.int64(_bits_from_f32(np.float32(x))) & _LOW_32
    rounded = (bits + np.int64(0x7FFF) + ((bits >> _BF16_SHIFT) & np.int64(1))) >> _BF16_SHIFT
    quiet_nan = (bits >> _BF16_SHIFT) | np.int64(0x40)
    return np.uint16(quiet_nan if x != x else rounded)


@njit(inline="always")
def f16_from_f32(x):
    """IEEE float16 bits (int16) of ``x`` (a float, rounded to float32 first), to nearest even.

    Normal results drop 13 mantissa bits with rounding and rebias the exponent;
    subnormal ones come from adding 0.5 in float32, whose rounding lines the
    result's mantissa up with float16's subnormal spacing (2^-24).
    """
    bits = np.int64(_bits_from_f32(np.float32(x))) & _LOW_32
    sign = (bits >> _BF16_SHIFT) & np.int64(0x8000)
    a = bits & np.int64(0x7FFFFFFF)
    normal = (a - np.int64(0x38000000) + np.int64(0xFFF) + ((a >> np.int64(13)) & np.int64(1))) >> np.int64(
        13
    )
    small = np.int64(_bits_from_f32(_f32_from_bits(a) + _F32_HALF)) - _F32_HALF_BITS
    special = _F16_NAN if a > _F32_EXPONENT else _F16_INF
    result = special if a >= _F16_OVERFLOW_BITS else (small if a < _F16_NORMAL_BITS else normal)
    return np.int16(result | sign)


def widen(x):
    """The float value of one logit: a float as it is; 16-bit bits widened to float32
    (uint16 holds bfloat16, int16 float16).  Typed by the CPU overload below; the CUDA
    kernels put the device's version in its place (numba_kd.cuda.kernels)."""


@overload(widen)
def _widen_cpu(x):
    if x == types.uint16:
        return lambda x: f32_from_bf16(x)
    if x == types.int16:
        return lambda x: f32_from_f16(x)
    return lambda x: x


@njit(inline="always")
def logit_at(logits, i, j):
    """``logits[i, j]`` as a float (see widen): how the kernels read a logit."""
    return widen(logits[i, j])


# ---------------------------------------------------------------------------
# Sparse top-k teachers.  A teacher row stores n of the C classes with their
# log-probabilities l at temperature T_g; tau = T_g / T re-tempers them.  The
# missing mass m = 1 - sum exp(l) is a pseudo-class ("bucket"), C - n equal
# classes ("uniform") or dropped ("renormalize").


class TopKParams(NamedTuple):
    """The sparse teachers' scalars, as the top-k row kernels take them."""

    tail: int
    #: tau = T_g / T: stored log-probabilities are multiplied by it.
    retemper: float


@njit(inline="always")
def topk_missing_mass(mass, n_stored, n_classes):
    """m = 1 - sum exp(l), clamped at 0; 0 where the support holds every class."""
    if n_stored >= n_classes:
        return 0.0
    return max(0.0, 1.0 - mass)


@njit(inline="always")
def topk_tail_log(tail, missing, n_out, tau):
    """log of the re-tempered missing mass, before normalization: tau log m for
    "bucket", log((C - n) (m / (C - n))^tau) for "uniform" (n_out = C - n), -inf
    for "renormalize" or where nothing is missing."""
    if tail == RENORMALIZE or not missing > 0.0 or n_out == 0:
        return NEG_INF
    log_m = math.log(missing)
    if tail == BUCKET:
        return tau * log_m
    log_n = math.log(n_out)
    return tau * (log_m - log_n) + log_n


@njit(inline="always")
def class_divergence(divergence, p, q, log_p, log_q, beta):
    """One class's term of the divergence between target p and student q, and
    dD/dq - 1 for reverse KL or dD/dq for the JSD (log q - log p, or (1 - beta)
    log(q / m)); 0 for forward KL, whose gradient needs no such factor.  A class
    where both are 0 adds nothing."""
    if not (p > 0.0 or q > 0.0):
        return 0.0, 0.0
    if divergence == FORWARD_KL:
        return kl_term(p, log_p - log_q), 0.0
    if divergence == REVERSE_KL:
        return kl_term(q, log_q - log_p), log_q - log_p
    beta_p = beta * p
    rest_q = (1.0 - beta) * q
    lp_lm, lq_lm = jsd_log_ratios(
        log_q - log_p, math.log(beta), math.log1p(-beta), jsd_mixture_ratio(beta_p, rest_q), 1.0
    )
    return jsd_term(p, q, lp_lm, lq_lm, beta, 1.0 - beta), (1.0 - beta) * lq_lm


@njit(inline="always")
def uniform_forward_kl_outside(p_out, n_out, b_out, log_sb):
    """sum over the n_out classes outside U of p_out (log p_out - log q_j), with
    log q_j = b_j - log S_b and b_out = sum of those b_j."""
    if not p_out > 0.0:
        return 0.0
    return p_out * (n_out * (math.log(p_out) + log_sb) - b_out)


@njit(inline="always")
def uniform_reverse_kl_outside(q_out, e_out, s_b, log_sb, p_out):
    """sum over the classes outside U of q_j (log q_j - log p_out), with q_out =
    sum q_j and e_out = sum exp(b_j) b_j (b relative to the row max, S_b its sum)."""
    if not q_out > 0.0:
        return 0.0
    return e_out / s_b - q_out * (log_sb + math.log(p_out))


@njit(inline="always")
def topk_log_norm(tail, lse_stored, missing, n_out, tau):
    """(log Z, log t) of a teacher row re-tempered by tau: t the tail's re-tempered
    mass (topk_tail_log) and Z = sum of the stored entries' exp(tau l) plus t."""
    log_tail = topk_tail_log(tail, missing, n_out, tau)
    return logaddexp(lse_stored, log_tail), log_tail


@njit(inline="always")
def topk_label_log_prob(tail, label_entry, log_norm, log_tail, n_out):
    """log of a teacher's probability of the label: of its stored entry
    (``label_entry`` = tau l_y, or NaN if the label is not stored), else of one
    spread tail class ("uniform"), else -inf ("renormalize")."""
    if label_entry == label_entry:
        return label_entry - log_norm
    if tail == UNIFORM and log_tail > NEG_INF:
        return log_tail - math.log(n_out) - log_norm
    return NEG_INF


@njit(inline="always")
def topk_entropy(tail, stored_sum, stored_moment, log_norm, log_tail, n_out):
    """H of a teacher's re-tempered distribution: stored_sum = sum exp(x - log Z) and
    stored_moment = sum exp(x - log Z) x over its stored entries (x = tau l), plus
    the tail class ("bucket") or the n_out spread classes ("uniform")."""
    h = log_norm * stored_sum - stored_moment
    if log_tail > NEG_INF:
        b = math.exp(log_tail - log_norm)
        if tail == BUCKET:
            h -= b * (log_tail - log_norm)
        else:
            h -= b * (log_tail - log_norm - math.log(n_out))
    return h


@njit(inline="always")
def topk_teacher_norm(idx, lp, tau, n_classes, tail):
    """One teacher row's stored entries (``idx``, -1 for none; ``lp``) re-tempered by
    tau: (log Z, log t, n_out, NaN seen), with t the tail's mass (topk_log_norm),
    n_out = C - n the number of classes it did not store (a float)."""
    m = NEG_INF
    s = 0.0
    mass = 0.0
    n_stored = 0
    bad = False
    for e in range(idx.shape[0]):
        if idx[e] < 0:
            continue
        x = np.float64(lp[e])
        bad = bad or x != x
        mass += math.exp(x)
        m, s = online_lse_step(m, s, tau * x, 1.0)
        n_stored += 1
    n_out = n_classes - n_stored
    missing = topk_missing_mass(mass, n_stored, n_classes)
    log_norm, log_tail = topk_log_norm(
        tail, lse_from_stats(m, s) if n_stored > 0 else NEG_INF, missing, n_out, tau
    )
    return log_norm, log_tail, float(n_out), bad


@njit(inline="always")
def topk_teacher_log_weight(idx, lp, y, weighting, taus, tail, n_classes, norm):
    """log of a teacher's data-dependent weight factor: its probability of the label
    y at temperature 1 (confidence) or exp(-H) of its distribution at T (entropy).
    taus = (tau, tau_1), the re-temperings to T and to 1; norm = its (log Z, log t,
    n_out) at tau (topk_teacher_norm)."""
    tau, tau_1 = taus
    log_norm, log_tail, n_out = norm
    if weighting == CONFIDENCE:
        log_norm_1, log_tail_1, _, _ = topk_teacher_norm(idx, lp, tau_1, n_classes, tail)
        label_entry = math.nan
        for e in range(idx.shape[0]):
            if idx[e] == y:
                label_entry = tau_1 * np.float64(lp[e])
        return topk_label_log_prob(tail, label_entry, log_norm_1, log_tail_1, n_out)
    stored_sum = 0.0
    stored_moment = 0.0
    for e in range(idx.shape[0]):
        if idx[e] < 0:
            continue
        x = tau * np.float64(lp[e])
        p = math.exp(x - log_norm)
        if p > 0.0:
            stored_sum += p
            stored_moment += p * x
    return -topk_entropy(tail, stored_sum, stored_moment, log_norm, log_tail, n_out)


@njit(inline="always")
def row_weight(static, weight, log_weight, top):
    """A teacher's unnormalized weight in one row: its static weight where no
    teacher has a positive data-dependent one (``static``), else exp(log_weight -
    top), ``top`` the largest log weight of the row."""
    if static:
        return weight
    return math.exp(log_weight - top) if log_weight > NEG_INF else 0.0


@njit(inline="always")
def topk_tail_shares(tail, w, log_norm, log_tail, n_out):
    """(the bucket's target mass, the mass of each class outside the support) that a
    teacher of row weight w gives its tail: (w t / Z, 0) for "bucket", (0, t / (Z
    n_out)) for "uniform" (unweighted: its stored entries subtract it, see
    topk_entry_target), (0, 0) for "renormalize"."""
    share = math.exp(log_tail - log_norm) if log_tail > NEG_INF else 0.0
    if tail == BUCKET:
        return w * share, 0.0
    if tail == UNIFORM and n_out > 0:
        return 0.0, share / n_out
    return 0.0, 0.0


@njit(inline="always")
def topk_entry_target(w, x, log_norm, per_class):
    """A stored entry's share of the target at its class, x = tau l, less the
    "uniform" share per_class that every class outside U also receives."""
    return w * (math.exp(x - log_norm) - per_class)


@njit(inline="always")
def topk_class_terms(divergence, p, log_q, beta):
    """(divergence term, q dD/dq) of one class of U, target p, log q the student's."""
    q = math.exp(log_q)
    term, h = class_divergence(divergence, p, q, log_or_minus_inf(p, NEG_INF), log_q, beta)
    return term, q * h


@njit(inline="always")
def topk_class_grad(divergence, p, log_q, beta, d, qh):
    """dD/db of one class of U (b = s / T): d the row's divergence, qh = sum_j q_j h_j."""
    q = math.exp(log_q)
    if divergence == FORWARD_KL:
        return forward_kl_grad(p, q)
    _, h = class_divergence(divergence, p, q, log_or_minus_inf(p, NEG_INF), log_q, beta)
    return q * (h - (d if divergence == REVERSE_KL else qh))


@njit(inline="always")
def topk_outside_terms(tail, divergence, targets, sums, beta):
    """(divergence, q dD/dq summed, h_out) of the classes outside U, for every rule but
    the "uniform" JSD (which sweeps them).  targets = (p_tail, p_out); sums = (q_out,
    n_out, b_out, e_out, s_b, log S_b): the student's mass outside U, their number,
    and sum b_j, sum exp(b_j) b_j over them.  h_out is the tail's dD/dq (- 1)."""
    p_tail, p_out = targets
    q_out, n_out, b_out, e_out, s_b, log_sb = sums
    if tail == BUCKET:
        log_qo = log_or_minus_inf(q_out, NEG_INF)
        term, h_out = class_divergence(
            divergence, p_tail, q_out, log_or_minus_inf(p_tail, NEG_INF), log_qo, beta
        )
        # A bucket the student gives nothing (U holds every class, or the rest
        # underflowed) has no gradient of its own: q_j = 0 there.
        h_out = h_out if q_out > 0.0 else 0.0
        return term, q_out * h_out, h_out
    if tail == UNIFORM and divergence == FORWARD_KL:
        return uniform_forward_kl_outside(p_out, n_out, b_out, log_sb), 0.0, 0.0
    if tail == UNIFORM and divergence == REVERSE_KL:
        return uniform_reverse_kl_outside(q_out, e_out, s_b, log_sb, p_out), 0.0, 0.0
    if tail == RENORMALIZE and divergence == JSD:
        # p = 0 outside U, so there log(q / m) = -log(1 - beta).
        h_out = -(1.0 - beta) * math.log1p(-beta)
        return q_out * h_out, q_out * h_out, h_out
    return 0.0, 0.0, 0.0


@njit(inline="always")
def topk_grad_constants(tail, divergence, targets, q_out, log_sb, h_out, d, qh):
    """(a, c, e) with dD/db_j = q_j (a + c b_j) + e outside U (topk_soft_grad), for
    every rule but the "uniform" JSD; targets = (p_tail, p_out)."""
    p_tail, p_out = targets
    if divergence == FORWARD_KL:
        if tail == BUCKET:
            return (1.0 - p_tail / q_out if q_out > 0.0 else 1.0), 0.0, 0.0
        if tail == UNIFORM:
            return 1.0, 0.0, -p_out
        return 1.0, 0.0, 0.0
    if divergence == REVERSE_KL:
        if tail == BUCKET:
            return h_out - d, 0.0, 0.0
        # "uniform": q_j (b_j - log S_b - log p_out - D)
        return -log_sb - log_or_minus_inf(p_out, NEG_INF) - d, 1.0, 0.0
    return h_out - qh, 0.0, 0.0


@njit(inline="always")
def topk_soft_grad(q, b, a, c, e):
    """dD/db_j outside U from the constants of topk_grad_constants."""
    return q * (a + c * b) + e


@njit(inline="always")
def uniform_jsd_class(q, beta_p, one_m_beta, log_p, zero):
    """(JSD term, h = (1 - beta) log(q / m)) of a class outside U under the "uniform"
    tail: target p (beta_p = beta p, log_p = log p), m = beta p + (1 - beta) q.
    ``zero`` carries the arithmetic's type."""
    m = beta_p + one_m_beta * q
    log_m = log_like(m, zero)
    a = beta_p * (log_p - log_m) if beta_p > zero else zero
    h = one_m_beta * (log_like(q, zero) - log_m) if q > zero else zero
    return a + q * h, h

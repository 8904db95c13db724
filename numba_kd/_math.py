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

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

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
    """log(w_k) + t_kj / T - lse(t_k / T): one teacher's log-probability, weighted.

    The logit and its lse are subtracted first: for huge logits their sum with
    log(w_k) would round log(w_k) away."""
    return log_weight + (scaled_logit - teacher_lse)


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
def log_mix(log_p, log_q, log_beta, log_1m_beta):
    """log(beta p + (1 - beta) q) from log p and log q, without overflow."""
    a = log_beta + log_p
    b = log_1m_beta + log_q
    top = max(a, b)
    return top + math.log(math.exp(a - top) + math.exp(b - top))


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
# exp(x) underflows below -87.33 in float32; clamp there (result ~1e-38, not 0).
_EXP_LOWEST = np.float32(-87.0)
# 1/k! for the Taylor polynomial of exp on |r| <= ln(2)/2 (truncation error ~5e-9).
_E2, _E3, _E4, _E5, _E6, _E7 = (np.float32(1.0 / math.factorial(k)) for k in range(2, 8))
_F32_ONE = np.float32(1.0)
_F32_HALF = np.float32(0.5)


@njit(inline="always")
def exp_f32(x):
    """exp(x) for a float32 x <= 0, all in float32 so that loops vectorize 8 wide.

    x = n ln2 + r with integer n and |r| <= ln(2)/2; exp(r) by its Taylor
    polynomial, 2^n from the exponent bits.  The reduction x - n ln2 is one FMA
    under contraction; its error grows with |n|, but the terms with large |n|
    are below 2^-|n| of the row's largest term, so sums stay within ~1e-7.
    """
    # NaN fails the comparison and stays NaN.
    x = _EXP_LOWEST if x < _EXP_LOWEST else x
    n = np.floor(x * _LOG2E + _F32_HALF)
    r = x - n * _LN2_F32
    p = _F32_ONE + r * (_F32_ONE + r * (_E2 + r * (_E3 + r * (_E4 + r * (_E5 + r * (_E6 + r * _E7))))))
    scale = _f32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
    return p * scale


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

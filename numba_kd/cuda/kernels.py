"""Fused ``@cuda.jit`` kernels, one set per accumulation type.

Layout: a block of ``BLOCK_THREADS`` threads is a ``(threads_per_row,
rows_per_block)`` grid; the ``threads_per_row`` threads of one row stride over
its columns keeping online-softmax states, then merge them with a fixed
shared-memory tree (``_tree_merge*``).  ``threads_per_row`` is chosen per call
from C (``launch.row_config``), so C = 10 packs many rows into a block and
C = 128000 gives a row a whole block.  The tree uses only shared memory and
``syncthreads``, so the same code runs under the CUDA simulator.

float32 inputs accumulate in float32, float64 in float64: the kernels close over
the accumulation type ``acc`` and build every constant and shared array from it.
The scalar math is ``numba_kd._math``, shared with the CPU kernels.
"""

from __future__ import annotations

import math
import types
from types import SimpleNamespace
from typing import NamedTuple

import numba
import numpy as np
from numba import cuda, njit
from numba.extending import intrinsic

from numba_kd import _math
from numba_kd._runtime import DISK_CACHE

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)


def device_helper(fn):
    """A helper inlined into the kernels (plain Python under the simulator, which
    runs kernels as Python threads and hands them arrays @njit cannot take)."""
    return fn if SIMULATOR else njit(inline="always")(fn)


def _device_exp(x, like):
    return math.exp(x)


def _device_log(x, like):
    return math.log(x)


def _device_log1p(x, like):
    return math.log1p(x)


def _widen_simulated(x):
    """_math.widen under the simulator, whose array elements are NumPy scalars."""
    if isinstance(x, np.uint16):
        return _m.f32_from_bf16(x)
    if isinstance(x, np.int16):
        return _m.f32_from_f16(x)
    return x


def _narrow_simulated(value, like):
    """``value`` rounded to the 16-bit type whose bits the array ``like`` holds (uint16:
    bfloat16, int16: float16); as it is for float arrays (the store converts)."""
    if like.dtype == np.uint16:
        return _m.bf16_from_f32(value)
    if like.dtype == np.int16:
        return _m.f16_from_f32(value)
    return value


# Compiled kernels dispatch on the numba type instead.  CUDA-target overloads would
# need a GPU to compile (their implementations are device functions compiled for the
# current device); intrinsics compile anywhere, so the PTX tests cover them.
_WIDEN_FORMULAS = {numba.types.uint16: _math.f32_from_bf16, numba.types.int16: _math.f32_from_f16}
_NARROW_FORMULAS = {numba.types.uint16: _math.bf16_from_f32, numba.types.int16: _math.f16_from_f32}


def _as_it_is(context, builder, signature, args):
    return args[0]


@intrinsic
def _widen_compiled(typingctx, x):
    formula = _WIDEN_FORMULAS.get(x)
    if formula is None:
        return x(x), _as_it_is

    def codegen(context, builder, signature, args):
        return context.compile_internal(builder, formula.py_func, signature, args)

    return numba.types.float32(x), codegen


@intrinsic
def _narrow_compiled(typingctx, value, like):
    formula = _NARROW_FORMULAS.get(getattr(like, "dtype", None))
    if formula is None:
        return value(value, like), _as_it_is

    def codegen(context, builder, signature, args):
        rounding = signature.return_type(signature.args[0])
        return context.compile_internal(builder, formula.py_func, rounding, args[:1])

    return like.dtype(value, like), codegen


_widen = _widen_simulated if SIMULATOR else _widen_compiled
_narrow = _narrow_simulated if SIMULATOR else _narrow_compiled


@device_helper
def _store(logits, i, j, value):
    """logits[i, j] = value, rounded to nearest even where ``logits`` holds 16-bit bits."""
    logits[i, j] = _narrow(value, logits)


def _f32_from_bits_simulated(bits):
    return np.uint32(int(bits) & 0xFFFFFFFF).view(np.float32)


def _bits_from_f32_simulated(value):
    return np.float32(value).view(np.int32)


# The CPU's vectorizable float32 exp and log are CPU overloads; on the device the
# formulas call the libdevice functions (float32 for float32 arguments) instead.
# 16-bit logits are widened by the device's dispatch on their type; the simulator,
# which cannot run numba intrinsics, reinterprets bits with NumPy.
_DEVICE_PRIMITIVES = {"exp_like": _device_exp, "log_like": _device_log, "log1p_like": _device_log1p}
_DEVICE_DISPATCH = {"widen": _widen}
_SIMULATED_INTRINSICS = {
    "_f32_from_bits": _f32_from_bits_simulated,
    "_bits_from_f32": _bits_from_f32_simulated,
}


def _device_math(module) -> types.ModuleType:
    """The @njit formulas of ``module``, compiled from the same source for the device:
    each function is rebuilt over globals in which the CPU-only primitives are
    replaced and every other formula is its device version.  (A module object,
    because numba resolves attributes of modules in kernels.)"""
    namespace = dict(vars(module))
    for name, fn in _DEVICE_PRIMITIVES.items():
        namespace[name] = device_helper(fn)
    namespace.update(_DEVICE_DISPATCH)
    if SIMULATOR:
        namespace.update(_SIMULATED_INTRINSICS)
    for name, obj in vars(module).items():
        py_func = getattr(obj, "py_func", None)
        if py_func is not None and py_func.__module__ == module.__name__:
            rebuilt = types.FunctionType(py_func.__code__, namespace, name, py_func.__defaults__)
            namespace[name] = device_helper(rebuilt)
    device_module = types.ModuleType(f"{module.__name__}_device")
    vars(device_module).update(namespace)
    return device_module


_m = _device_math(_math)


# Threads per block; the shared arrays of the row reductions have this size.
BLOCK_THREADS = 256


class DeviceLossParams(NamedTuple):
    """The scalars and option codes of general_rows, floats in the accumulation type
    (so that float32 kernels stay free of double precision)."""

    ignore_index: int
    inv_t: float
    beta: float
    combine: int
    divergence: int
    weighting: int
    alpha_t2: float  # alpha T^2 (alpha without scale_by_t2), before the division by the row count
    one_m_alpha: float
    want_grad: bool


class DeviceTopKParams(NamedTuple):
    """The sparse teachers' scalars of topk_rows, in float64: the merged target of
    the K k stored entries per row is float64 on both targets (numba_kd._math)."""

    tail: int
    retemper: float  # tau = T_g / T
    label_retemper: float  # T_g / 1, for confidence weighting
    beta: float
    inv_t: float


# Bytes of the [slots, C] int32 class map of topk_rows: the grid is cut down so
# that one slot per row group fits (rows beyond are grid-strided).
TOPK_MAP_BYTES = 64 * 2**20


@device_helper
def _tree_merge_lse(sm_m, sm_s, base, tx, threads_per_row):
    """Merge the states of one row's threads into slot ``base``, fixed tree order."""
    stride = threads_per_row // 2
    while stride > 0:
        cuda.syncthreads()
        if tx < stride:
            i = base + tx
            sm_m[i], sm_s[i] = _m.merge_lse(sm_m[i], sm_s[i], sm_m[i + stride], sm_s[i + stride])
        stride //= 2
    cuda.syncthreads()


@device_helper
def _tree_merge_weighted(sm_m, sm_s, sm_w, base, tx, threads_per_row):
    stride = threads_per_row // 2
    while stride > 0:
        cuda.syncthreads()
        if tx < stride:
            i = base + tx
            j = i + stride
            sm_m[i], sm_s[i], sm_w[i] = _m.merge_weighted_lse(
                sm_m[i], sm_s[i], sm_w[i], sm_m[j], sm_s[j], sm_w[j]
            )
        stride //= 2
    cuda.syncthreads()


@device_helper
def _tree_reduce(sm, base, tx, width, take_max):
    """sm[base] = the sum (take_max: the maximum) of sm[base : base + width], fixed tree order."""
    stride = width // 2
    while stride > 0:
        cuda.syncthreads()
        if tx < stride:
            i = base + tx
            sm[i] = max(sm[i], sm[i + stride]) if take_max else sm[i] + sm[i + stride]
        stride //= 2
    cuda.syncthreads()


@device_helper
def _group_row(labels, i_raw, n_classes, ignore_index):
    """(i_raw, i, y, in_range, valid) of a row group's row i_raw: i a row that is safe
    to read (groups past the end read the last row), y its label, whether y is in
    [0, C), and whether the row counts (i_raw exists and y is not ignore_index)."""
    i = min(i_raw, labels.shape[0] - 1)
    y = labels[i]
    return i_raw, i, y, y >= 0 and y < n_classes, i_raw < labels.shape[0] and y != ignore_index


@device_helper
def _row_ensemble_logit(teachers, row_w, r, i, j, total):
    """z_ij = sum_k w_k t_k[i, j] with row r of the per-row teacher weights (over their
    sum ``total``), in the weights' type."""
    z = row_w[r, 0] / total * _m.logit_at(teachers[0], i, j)
    for k in range(1, row_w.shape[1]):
        z += row_w[r, k] / total * _m.logit_at(teachers[k], i, j)
    return z


@device_helper
def _target_log_prob(teachers, scratch, r, i, j, total, inv_t, combine, target_stats, neg_inf, one):
    """log p_j of row i: logit combine (lse(z / T) = m_a + ls_a, ``target_stats``) or
    the log-mixture of the teachers (lse(t_k / T) = m_t + ls_t; ``scratch`` holds the
    rows of weights, m_t and ls_t).  Each (max, log S) pair stays apart, so that
    log S survives a huge max.

    ``neg_inf`` and ``one`` carry the accumulation type (float32 stays float32)."""
    row_w, m_t, ls_t = scratch
    m_a, ls_a = target_stats
    n_teachers = row_w.shape[1]
    if combine == 0:
        return (_row_ensemble_logit(teachers, row_w, r, i, j, total) * inv_t - m_a) - ls_a
    m = neg_inf
    s = one - one
    for k in range(n_teachers):
        w = row_w[r, k] / total
        if w > 0:
            a = _m.logit_at(teachers[k], i, j) * inv_t
            term = _m.weighted_log_prob(math.log(w), a, m_t[r, k], ls_t[r, k])
            m, s = _m.online_lse_step(m, s, term, one)
    return _m.lse_from_stats(m, s)


def make_kernels(acc) -> SimpleNamespace:
    """The kernels for accumulation type ``acc`` (numba.float32 or numba.float64)."""

    @device_helper
    def logit(logits, i, j):
        """logits[i, j] in the accumulation type: 16-bit bits widened, and float32 logits
        read by the float64 kernels (temperatures outside float32's range) as float64,
        so that no arithmetic between two logits rounds to float32."""
        return acc(_m.logit_at(logits, i, j))

    @cuda.jit(cache=DISK_CACHE)
    def combine_logits(teachers, weights, out):
        n_rows, n_classes = out.shape
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for flat in range(start, n_rows * n_classes, step):
            i = flat // n_classes
            j = flat - i * n_classes
            _store(out, i, j, _m.ensemble_logit(teachers, weights, i, j))

    @cuda.jit(cache=DISK_CACHE)
    def teacher_lse(teachers, inv_t, lse):
        """lse[k, i] = logsumexp(t_k[i] / T): one row-group per (teacher, row)."""
        n_teachers, n_rows = lse.shape
        n_classes = teachers[0].shape[1]
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        threads_per_row = cuda.blockDim.x
        rows_per_block = cuda.blockDim.y
        sm_m = cuda.shared.array(BLOCK_THREADS, acc)
        sm_s = cuda.shared.array(BLOCK_THREADS, acc)
        base = ty * threads_per_row
        one = acc(1.0)
        n_pairs = n_teachers * n_rows
        step = cuda.gridDim.x * rows_per_block
        for first in range(cuda.blockIdx.x * rows_per_block, n_pairs, step):
            pair = first + ty
            m = acc(_m.NEG_INF)
            s = acc(0.0)
            nonfinite = acc(0.0)
            if pair < n_pairs:
                k = pair // n_rows
                i = pair - k * n_rows
                t = teachers[k]
                for j in range(tx, n_classes, threads_per_row):
                    x = logit(t, i, j)
                    m, s = _m.online_lse_step(m, s, x * inv_t, one)
                    nonfinite += x * acc(0.0)
            sm_m[base + tx] = m
            # A NaN or an infinity in the row makes its lse, and so the output row, NaN.
            sm_s[base + tx] = s + nonfinite
            _tree_merge_lse(sm_m, sm_s, base, tx, threads_per_row)
            if tx == 0 and pair < n_pairs:
                lse[k, i] = _m.lse_from_stats(sm_m[base], sm_s[base])

    @cuda.jit(cache=DISK_CACHE)
    def mix_probabilities(teachers, weights, log_weights, lse, temperature, inv_t, eps, out):
        n_rows, n_classes = out.shape
        n_teachers = weights.shape[0]
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for flat in range(start, n_rows * n_classes, step):
            i = flat // n_classes
            j = flat - i * n_classes
            # NaN when a teacher's row (weighted or not) is not finite: see teacher_lse.
            nonfinite = acc(0.0)
            for k in range(n_teachers):
                nonfinite += lse[k, i] * acc(0.0)
            if eps > 0:
                p = acc(0.0)
                for k in range(n_teachers):
                    p += weights[k] * math.exp(logit(teachers[k], i, j) * inv_t - lse[k, i])
                _store(out, i, j, _m.tempered_log(p, eps, temperature) + nonfinite)
            else:
                # Exact log-mixture: logsumexp over the teachers with positive weight.
                zero = acc(0.0)
                m = acc(_m.NEG_INF)
                s = acc(0.0)
                for k in range(n_teachers):
                    if weights[k] > 0:
                        term = _m.weighted_log_prob(
                            log_weights[k], logit(teachers[k], i, j) * inv_t, lse[k, i], zero
                        )
                        m, s = _m.online_lse_step(m, s, term, acc(1.0))
                _store(out, i, j, temperature * _m.lse_from_stats(m, s) + nonfinite)

    @cuda.jit(cache=DISK_CACHE)
    def loss_rows(student, teachers, weights, labels, inv_t, kl_rows, ce_rows, bad_labels):
        """Per row: KL(softmax(z / T) || softmax(s / T)) and CE(s, y), one read of the row."""
        n_rows, n_classes = student.shape
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        threads_per_row = cuda.blockDim.x
        rows_per_block = cuda.blockDim.y
        sm_ma = cuda.shared.array(BLOCK_THREADS, acc)
        sm_sa = cuda.shared.array(BLOCK_THREADS, acc)
        sm_wa = cuda.shared.array(BLOCK_THREADS, acc)
        sm_mb = cuda.shared.array(BLOCK_THREADS, acc)
        sm_sb = cuda.shared.array(BLOCK_THREADS, acc)
        sm_ms = cuda.shared.array(BLOCK_THREADS, acc)
        sm_ss = cuda.shared.array(BLOCK_THREADS, acc)
        base = ty * threads_per_row
        slot = base + tx
        one = acc(1.0)
        for first in range(cuda.blockIdx.x * rows_per_block, n_rows, cuda.gridDim.x * rows_per_block):
            i = first + ty
            m_a = acc(_m.NEG_INF)
            s_a = acc(0.0)
            w_a = acc(0.0)
            m_b = acc(_m.NEG_INF)
            s_b = acc(0.0)
            m_s = acc(_m.NEG_INF)
            s_s = acc(0.0)
            nonfinite = acc(0.0)
            if i < n_rows:
                # Anchors (each row's first logit) take a constant shift of the
                # teachers or of the student out of every sum.
                anchor_t = logit(teachers[0], i, 0)
                anchor_s = logit(student, i, 0)
                for j in range(tx, n_classes, threads_per_row):
                    a = _m.anchored_ensemble_logit(teachers, weights, i, j, anchor_t) * inv_t
                    x = logit(student, i, j)
                    b = (x - anchor_s) * inv_t
                    m_a, s_a, w_a = _m.online_weighted_step(m_a, s_a, w_a, a, a - b, one)
                    m_b, s_b = _m.online_lse_step(m_b, s_b, b, one)
                    m_s, s_s = _m.online_lse_step(m_s, s_s, x, one)
                    nonfinite += (a + x) * acc(0.0)
            # A NaN or an infinity in the row (x * 0 is NaN exactly then) makes the
            # two sums, so the row's KL and CE, NaN.
            sm_ma[slot] = m_a
            sm_sa[slot] = s_a + nonfinite
            sm_wa[slot] = w_a
            sm_mb[slot] = m_b
            sm_sb[slot] = s_b
            sm_ms[slot] = m_s
            sm_ss[slot] = s_s + nonfinite
            _tree_merge_weighted(sm_ma, sm_sa, sm_wa, base, tx, threads_per_row)
            _tree_merge_lse(sm_mb, sm_sb, base, tx, threads_per_row)
            _tree_merge_lse(sm_ms, sm_ss, base, tx, threads_per_row)
            if tx == 0 and i < n_rows:
                kl_rows[i] = _m.kl_from_online_stats(
                    sm_ma[base], sm_sa[base], sm_wa[base], sm_mb[base], sm_sb[base]
                )
                y = labels[i]
                if y < 0 or y >= n_classes:
                    # Never read out of bounds: flag the row, poison the loss.
                    cuda.atomic.add(bad_labels, 0, 1)
                    ce_rows[i] = acc(math.nan)
                else:
                    x_y = logit(student, i, y)
                    ce_rows[i] = _m.cross_entropy(sm_ms[base], x_y, math.log(sm_ss[base]))

    @cuda.jit(cache=DISK_CACHE)
    def reduce_loss(kl_rows, ce_rows, soft_factor, alpha, divisor, results):
        """results = [loss, soft, hard]: one block, fixed-order sums, then a fixed tree;
        the sums are divided by divisor[0] (the number of rows to average over, or 1).
        soft_factor is T^2, or 1 without scale_by_t2."""
        n_rows = kl_rows.shape[0]
        tx = cuda.threadIdx.x
        width = cuda.blockDim.x
        sm_kl = cuda.shared.array(BLOCK_THREADS, acc)
        sm_ce = cuda.shared.array(BLOCK_THREADS, acc)
        kl = acc(0.0)
        ce = acc(0.0)
        for i in range(tx, n_rows, width):
            kl += kl_rows[i]
            ce += ce_rows[i]
        sm_kl[tx] = kl
        sm_ce[tx] = ce
        _tree_reduce(sm_kl, 0, tx, width, False)
        _tree_reduce(sm_ce, 0, tx, width, False)
        if tx == 0:
            soft, hard = _m.distillation_terms(sm_kl[0], sm_ce[0], divisor[0], alpha, soft_factor)
            results[0] = soft + hard
            results[1] = soft
            results[2] = hard

    @cuda.jit(cache=DISK_CACHE)
    def count_valid(labels, ignore_index, mean, divisor):
        """divisor[0] = max(number of labels != ignore_index, 1) for a mean, else 1."""
        tx = cuda.threadIdx.x
        width = cuda.blockDim.x
        sm = cuda.shared.array(BLOCK_THREADS, acc)
        n = acc(0.0)
        for i in range(tx, labels.shape[0], width):
            if labels[i] != ignore_index:
                n += acc(1.0)
        sm[tx] = n
        _tree_reduce(sm, 0, tx, width, False)
        if tx == 0:
            divisor[0] = max(sm[0], acc(1.0)) if mean else acc(1.0)

    @cuda.jit(cache=DISK_CACHE)
    def general_rows(
        student, teachers, weights, labels, params, divisor, grad, scratch, d_rows, ce_rows, bad_labels
    ):
        """Every loss option, one row per thread group (see the CPU general_rows).
        ``params`` is a DeviceLossParams, ``scratch`` the [B, K] rows of the per-row
        teacher weights and of each teacher's (max, log S).

        Every thread of a block runs the same sequence of tree reductions
        (syncthreads) whatever its row: ignored rows and rows past the end are
        computed on a safe row and discarded.
        """
        ignore_index, inv_t, beta, combine, divergence, weighting, alpha_t2, one_m_alpha, want_grad = params
        row_w, m_t, ls_t = scratch
        n_rows, n_classes = student.shape
        n_teachers = weights.shape[0]
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tpr = cuda.blockDim.x
        rows_per_block = cuda.blockDim.y
        sm_m = cuda.shared.array(BLOCK_THREADS, acc)
        sm_s = cuda.shared.array(BLOCK_THREADS, acc)
        sm_x = cuda.shared.array(BLOCK_THREADS, acc)
        base = ty * tpr
        slot = base + tx
        one = acc(1.0)
        zero = acc(0.0)
        neg_inf = acc(_m.NEG_INF)
        half = one / (one + one)
        flat_temperature = acc(_m.FLAT_TEMPERATURE)
        # The JSD's or a skew KL's mixture m = w_p p + w_q q (JSD: w_p = beta).
        mix = _m.mixture_weights(divergence, beta, one, neg_inf)
        _, one_m_beta, log_beta, log_1m_beta = mix
        for first in range(cuda.blockIdx.x * rows_per_block, n_rows, cuda.gridDim.x * rows_per_block):
            i_raw, i, y, in_range, valid = _group_row(labels, first + ty, n_classes, ignore_index)
            # Non-finite inputs in the row: its loss and gradient become NaN.
            nonfinite = zero
            for j in range(tx, n_classes, tpr):
                nonfinite += logit(student, i, j) * zero
                for k in range(n_teachers):
                    nonfinite += logit(teachers[k], i, j) * zero
            sm_x[slot] = nonfinite
            _tree_reduce(sm_x, base, tx, tpr, False)
            finite = sm_x[base] == zero
            cuda.syncthreads()
            # An out-of-range label is never read: its row (and so the loss) becomes NaN.
            bad = valid and not (in_range and finite)
            y_safe = y if in_range else 0
            # Teacher weights for this row (confidence and entropy need statistics sweeps).
            # Data-dependent weights as logarithms (confidences and entropies can all
            # underflow), scaled by the largest (top) once every teacher is known.
            total = zero
            top = neg_inf
            for k in range(n_teachers):
                t = teachers[k]
                w = weights[k]
                if weighting != 0:
                    w = _m.log_or_minus_inf(w, neg_inf)
                    scale = one if weighting == 1 else inv_t
                    m = acc(_m.NEG_INF)
                    s = zero
                    for j in range(tx, n_classes, tpr):
                        m, s = _m.online_lse_step(m, s, logit(t, i, j) * scale, one)
                    sm_m[slot] = m
                    sm_s[slot] = s
                    _tree_merge_lse(sm_m, sm_s, base, tx, tpr)
                    m = sm_m[base]
                    ls = math.log(sm_s[base])
                    if weighting == 1:
                        if valid and in_range:
                            w = _m.confidence_log_weight(w, logit(t, i, y_safe) - m, ls)
                    else:
                        su = zero
                        for j in range(tx, n_classes, tpr):
                            d = logit(t, i, j) * inv_t - m
                            su += math.exp(d - ls) * d
                        sm_x[slot] = su
                        _tree_reduce(sm_x, base, tx, tpr, False)
                        w = _m.entropy_log_weight(w, sm_x[base], ls)
                    top = max(top, w)
                    cuda.syncthreads()
                if tx == 0 and i_raw < n_rows:
                    row_w[i, k] = w
                total += w
            cuda.syncthreads()
            if weighting != 0:
                # Every thread reads the row's log weights before one thread replaces
                # them.  No finite log weight (a label logit so far below its row's
                # maximum that the difference overflows): the static weights.
                fallback = not top > neg_inf
                total = zero
                for k in range(n_teachers):
                    lw = row_w[i, k]
                    total += weights[k] if fallback else (math.exp(lw - top) if lw > neg_inf else zero)
                cuda.syncthreads()
                if tx == 0 and i_raw < n_rows:
                    for k in range(n_teachers):
                        lw = row_w[i, k]
                        row_w[i, k] = (
                            weights[k] if fallback else (math.exp(lw - top) if lw > neg_inf else zero)
                        )
                cuda.syncthreads()
            # Groups past the last row read row n_rows - 1's scratch; their results are dropped.
            r = i
            # Target statistics: lse(z / T) for the logit combine, lse(t_k / T) per teacher for probs.
            m_a = zero
            ls_a = zero
            s_a = one
            if combine == 0:
                m = acc(_m.NEG_INF)
                s = zero
                for j in range(tx, n_classes, tpr):
                    z = _row_ensemble_logit(teachers, row_w, r, i, j, total)
                    m, s = _m.online_lse_step(m, s, z * inv_t, one)
                sm_m[slot] = m
                sm_s[slot] = s
                _tree_merge_lse(sm_m, sm_s, base, tx, tpr)
                m_a = sm_m[base]
                s_a = sm_s[base]
                ls_a = math.log(s_a)
                cuda.syncthreads()
            else:
                for k in range(n_teachers):
                    m = acc(_m.NEG_INF)
                    s = zero
                    for j in range(tx, n_classes, tpr):
                        m, s = _m.online_lse_step(m, s, logit(teachers[k], i, j) * inv_t, one)
                    sm_m[slot] = m
                    sm_s[slot] = s
                    _tree_merge_lse(sm_m, sm_s, base, tx, tpr)
                    if tx == 0 and i_raw < n_rows:
                        m_t[r, k] = sm_m[base]
                        ls_t[r, k] = math.log(sm_s[base])
                    cuda.syncthreads()
            # Student statistics: lse(s / T) and lse(s).
            m_b = acc(_m.NEG_INF)
            s_b = zero
            m_s = acc(_m.NEG_INF)
            s_s = zero
            for j in range(tx, n_classes, tpr):
                x = logit(student, i, j)
                m_b, s_b = _m.online_lse_step(m_b, s_b, x * inv_t, one)
                m_s, s_s = _m.online_lse_step(m_s, s_s, x, one)
            sm_m[slot] = m_b
            sm_s[slot] = s_b
            _tree_merge_lse(sm_m, sm_s, base, tx, tpr)
            m_b = sm_m[base]
            s_b = sm_s[base]
            ls_b = math.log(s_b)
            cuda.syncthreads()
            sm_m[slot] = m_s
            sm_s[slot] = s_s
            _tree_merge_lse(sm_m, sm_s, base, tx, tpr)
            m_s = sm_m[base]
            ls_s = math.log(sm_s[base])
            cuda.syncthreads()
            # The divergence and sum_j q_j g_j (g = dD/dq).
            d = zero
            qg = zero
            for j in range(tx, n_classes, tpr):
                lp = _target_log_prob(
                    teachers, scratch, r, i, j, total, inv_t, combine, (m_a, ls_a), neg_inf, one
                )
                lq = (logit(student, i, j) * inv_t - m_b) - ls_b
                p = math.exp(lp)
                q = math.exp(lq)
                if divergence == 0:
                    d += _m.kl_term(p, lp - lq)
                elif divergence == 1:
                    d += _m.kl_term(q, lq - lp)
                elif divergence == 2:
                    ratio = _m.jsd_mixture_ratio(beta * p, one_m_beta * q)
                    lp_lm, lq_lm = _m.jsd_log_ratios(lq - lp, log_beta, log_1m_beta, ratio, one)
                    d += _m.jsd_term(p, q, lp_lm, lq_lm, beta, one_m_beta)
                    qg += q * lq_lm
                else:
                    term, q_slope = _m.mixture_class(divergence, p, q, lq - lp, mix, half)
                    d += term
                    qg += q_slope
            sm_s[slot] = d
            sm_x[slot] = qg
            _tree_reduce(sm_s, base, tx, tpr, False)
            _tree_reduce(sm_x, base, tx, tpr, False)
            d = _m.nonnegative(sm_s[base])
            # sum_j q_j dD/dq_j; the JSD's sweep summed q log(q / m).
            qg = one_m_beta * sm_x[base] if divergence == 2 else sm_x[base]
            cuda.syncthreads()
            if combine == 0 and divergence < 2 and inv_t * flat_temperature < one:
                # Large T: log S_a and log S_b agree to many digits, and the KL, about
                # 1/T^2 of them, is taken from sums of expm1 of the log-ratios instead
                # of their difference (_math.kl_from_sums, as on the CPU).
                w_sum = zero
                u_sum = zero
                for j in range(tx, n_classes, tpr):
                    ell = _row_ensemble_logit(teachers, row_w, r, i, j, total) * inv_t - m_a
                    b = logit(student, i, j) * inv_t - m_b
                    if divergence == 0:
                        w_sum += math.exp(ell) * (ell - b)
                        u_sum += math.exp(b) * math.expm1(ell - b)
                    else:
                        w_sum += math.exp(b) * (b - ell)
                        u_sum += math.exp(ell) * math.expm1(b - ell)
                sm_s[slot] = w_sum
                sm_x[slot] = u_sum
                _tree_reduce(sm_s, base, tx, tpr, False)
                _tree_reduce(sm_x, base, tx, tpr, False)
                w_sum = sm_s[base]
                u_sum = sm_x[base]
                cuda.syncthreads()
                if math.isfinite(u_sum):  # a row far from flat keeps the difference
                    if divergence == 0:
                        d = _m.kl_from_sums(s_a, w_sum, s_b, u_sum)
                    else:
                        d = _m.kl_from_sums(s_b, w_sum, s_a, u_sum)
            if tx == 0 and i_raw < n_rows:
                if not in_range and y != ignore_index:
                    cuda.atomic.add(bad_labels, 0, 1)
                d_rows[i] = d if valid else zero
                ce_rows[i] = _m.cross_entropy(m_s, logit(student, i, y_safe), ls_s) if valid else zero
                if bad:
                    d_rows[i] = acc(math.nan)
                    ce_rows[i] = acc(math.nan)
            if want_grad and i_raw < n_rows:
                c_soft = alpha_t2 / divisor[0]
                c_hard = one_m_alpha / divisor[0]
                for j in range(tx, n_classes, tpr):
                    if bad:
                        _store(grad, i, j, acc(math.nan))
                        continue
                    if not valid:
                        _store(grad, i, j, zero)
                        continue
                    lp = _target_log_prob(
                        teachers, scratch, r, i, j, total, inv_t, combine, (m_a, ls_a), neg_inf, one
                    )
                    lq = (logit(student, i, j) * inv_t - m_b) - ls_b
                    q = math.exp(lq)
                    if divergence == 0:
                        dd = _m.forward_kl_grad(math.exp(lp), q)
                    elif divergence == 1:
                        dd = _m.reverse_kl_grad(q, lq - lp, d)
                    elif divergence == 2:
                        ratio = _m.jsd_mixture_ratio(beta * math.exp(lp), one_m_beta * q)
                        lp_lm, lq_lm = _m.jsd_log_ratios(lq - lp, log_beta, log_1m_beta, ratio, one)
                        dd = _m.jsd_grad(q, lq_lm, one_m_beta, qg)
                    else:
                        _, q_slope = _m.mixture_class(divergence, math.exp(lp), q, lq - lp, mix, half)
                        dd = _m.mixture_grad(q, q_slope, qg)
                    g = c_soft * dd * inv_t + c_hard * math.exp((logit(student, i, j) - m_s) - ls_s)
                    if j == y_safe:
                        g -= c_hard
                    _store(grad, i, j, g)

    @cuda.jit(cache=DISK_CACHE)
    def clear_map(class_map):
        """class_map[:] = -1 (topk_rows restores it after each row)."""
        n_slots, n_classes = class_map.shape
        for flat in range(cuda.grid(1), n_slots * n_classes, cuda.gridsize(1)):
            r = flat // n_classes
            class_map[r, flat - r * n_classes] = -1

    @cuda.jit(cache=DISK_CACHE)
    def topk_rows(student, top, teacher_weights, labels, params, sparse, divisor, grad, workspace, d_rows,
                  ce_rows, bad_labels):  # fmt: skip
        """The loss against sparse top-k teachers (see the CPU topk_rows), one row per
        thread group; ``top`` = (indices [K, N, k] int64, -1 for none; logprobs),
        ``teacher_weights`` float64 and normalized, ``sparse`` a DeviceTopKParams.

        The row group's slot s of ``workspace`` = (class_map [slots, C] int32, -1
        outside U; u_class [slots, K k], u_p [slots, K k] float64; state [slots, 5,
        K] float64) holds the target on U: entry e of teacher k at position k k + e
        owns its class when no earlier teacher stored it (u_class, and the summed
        target in u_p; -1 otherwise), and class_map points each class of U to its
        owner.  The merge runs teacher by teacher, so the sums keep a fixed order.
        The teacher side and the classes of U are float64; the student's sweeps
        are in the accumulation type, and a float32 row whose gradient constants
        leave the float32 range writes its gradient in float64.

        Every thread of a block runs the same sequence of syncthreads whatever its
        row; ignored rows and rows past the end do not read the teachers.
        """
        ignore_index, inv_t, _beta, _combine, divergence, weighting, alpha_t2, one_m_alpha, want_grad = params
        tail, tau, tau_1, beta, inv_t64 = sparse
        indices, logprobs = top
        class_map, u_class, u_p, state = workspace
        n_rows, n_classes = student.shape
        n_teachers = indices.shape[0]
        per_teacher = indices.shape[2]
        n_entries = n_teachers * per_teacher
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tpr = cuda.blockDim.x
        rows_per_block = cuda.blockDim.y
        slot = cuda.blockIdx.x * rows_per_block + ty
        sm_0 = cuda.shared.array(BLOCK_THREADS, acc)
        sm_1 = cuda.shared.array(BLOCK_THREADS, acc)
        sm_2 = cuda.shared.array(BLOCK_THREADS, acc)
        sm_3 = cuda.shared.array(BLOCK_THREADS, acc)
        sm_4 = cuda.shared.array(BLOCK_THREADS, acc)
        sm_d = cuda.shared.array(BLOCK_THREADS, numba.float64)
        sm_q = cuda.shared.array(BLOCK_THREADS, numba.float64)
        sm_n = cuda.shared.array(BLOCK_THREADS, numba.float64)
        base = ty * tpr
        me = base + tx
        zero = acc(0.0)
        one = acc(1.0)
        unit = inv_t64 == 1.0
        per_class_jsd = tail == _m.UNIFORM and divergence == _m.JSD
        for first in range(cuda.blockIdx.x * rows_per_block, n_rows, cuda.gridDim.x * rows_per_block):
            i_raw, i, y, in_range, valid = _group_row(labels, first + ty, n_classes, ignore_index)
            y_safe = y if in_range else 0
            # Each teacher's (log Z, log t, C - n), log row weight and NaN flag, a thread each.
            for k in range(tx, n_teachers, tpr):
                log_w = _m.NEG_INF
                nan_seen = False
                if valid and teacher_weights[k] > 0.0:
                    idx = indices[k, i]
                    lp = logprobs[k, i]
                    log_norm, log_tail, n_out, nan_seen = _m.topk_teacher_norm(idx, lp, tau, n_classes, tail)
                    state[slot, 0, k] = log_norm
                    state[slot, 1, k] = log_tail
                    state[slot, 2, k] = n_out
                    log_w = math.log(teacher_weights[k])
                    if weighting != _m.STATIC:
                        norm = (log_norm, log_tail, n_out)
                        log_w += _m.topk_teacher_log_weight(
                            idx, lp, y, weighting, (tau, tau_1), tail, n_classes, norm
                        )
                state[slot, 3, k] = log_w
                state[slot, 4, k] = 1.0 if nan_seen else 0.0
            cuda.syncthreads()
            top_w = _m.NEG_INF
            teacher_nan = False
            for k in range(n_teachers):
                top_w = max(top_w, state[slot, 3, k])
                teacher_nan = teacher_nan or state[slot, 4, k] != 0.0
            static = not top_w > _m.NEG_INF
            total = 0.0
            for k in range(n_teachers):
                total += _m.row_weight(static, teacher_weights[k], state[slot, 3, k], top_w)
            # The target on U, teacher by teacher: within a teacher the classes are distinct.
            p_tail = 0.0
            p_out = 0.0
            for k in range(n_teachers):
                w = _m.row_weight(static, teacher_weights[k], state[slot, 3, k], top_w) / total
                live = valid and w > 0.0
                log_norm = 0.0
                per_class = 0.0
                if live:
                    log_norm = state[slot, 0, k]
                    bucket_mass, per_class = _m.topk_tail_shares(
                        tail, w, log_norm, state[slot, 1, k], state[slot, 2, k]
                    )
                    p_tail += bucket_mass
                    p_out += w * per_class
                for e in range(tx, per_teacher, tpr):
                    position = k * per_teacher + e
                    u_class[slot, position] = -1
                    j = indices[k, i, e]
                    if live and j >= 0:
                        x = tau * numba.float64(logprobs[k, i, e])
                        value = _m.topk_entry_target(w, x, log_norm, per_class)
                        owner = class_map[slot, j]
                        if owner < 0:
                            class_map[slot, j] = position
                            u_class[slot, position] = j
                            u_p[slot, position] = value
                        else:
                            u_p[slot, owner] += value
                cuda.syncthreads()
            # The student: its maximum and a non-finite probe, then its sums.
            n_read = n_classes if valid else 0
            m = acc(_m.NEG_INF)
            probe = zero
            for j in range(tx, n_read, tpr):
                x = logit(student, i, j)
                m = max(m, x)
                probe += x * zero
            sm_0[me] = m
            sm_1[me] = probe
            _tree_reduce(sm_0, base, tx, tpr, True)
            _tree_reduce(sm_1, base, tx, tpr, False)
            m_s = sm_0[base]
            finite = sm_1[base] == zero
            cuda.syncthreads()
            s_b = zero
            s_s = zero
            q_o = zero
            b_o = zero
            e_o = zero
            for j in range(tx, n_read, tpr):
                dx = logit(student, i, j) - m_s
                b = dx * inv_t
                q = math.exp(b)
                s_b += q
                s_s += q if unit else math.exp(dx)
                if class_map[slot, j] < 0:
                    q_o += q
                    b_o += b
                    e_o += q * b
            sm_0[me] = s_b
            sm_1[me] = s_s
            sm_2[me] = q_o
            sm_3[me] = b_o
            sm_4[me] = e_o
            _tree_reduce(sm_0, base, tx, tpr, False)
            _tree_reduce(sm_1, base, tx, tpr, False)
            _tree_reduce(sm_2, base, tx, tpr, False)
            _tree_reduce(sm_3, base, tx, tpr, False)
            _tree_reduce(sm_4, base, tx, tpr, False)
            # Rows that are not read keep sums that are safe to take the logarithm of.
            m_s64 = numba.float64(m_s)
            s_b64 = numba.float64(sm_0[base]) if valid else 1.0
            log_sb = math.log(s_b64)
            log_ss = math.log(numba.float64(sm_1[base]) if valid else 1.0)
            q_out = numba.float64(sm_2[base]) / s_b64
            b_out = numba.float64(sm_3[base])
            e_out = numba.float64(sm_4[base])
            cuda.syncthreads()
            # The classes of U, in float64.
            d_u = 0.0
            qh_u = 0.0
            n_u = 0.0
            for position in range(tx, n_entries, tpr):
                j = u_class[slot, position]
                if j >= 0:
                    log_q = (numba.float64(logit(student, i, j)) - m_s64) * inv_t64 - log_sb
                    term, q_h = _m.topk_class_terms(divergence, u_p[slot, position] + p_out, log_q, beta)
                    d_u += term
                    qh_u += q_h
                    n_u += 1.0
            sm_d[me] = d_u
            sm_q[me] = qh_u
            sm_n[me] = n_u
            _tree_reduce(sm_d, base, tx, tpr, False)
            _tree_reduce(sm_q, base, tx, tpr, False)
            _tree_reduce(sm_n, base, tx, tpr, False)
            d_u = sm_d[base]
            qh_u = sm_q[base]
            n_out = n_classes - sm_n[base]
            cuda.syncthreads()
            # The classes outside U.
            targets = (p_tail, p_out)
            h_out = 0.0
            beta_p = acc(beta * p_out)
            one_m_beta = acc(1.0 - beta)
            log_p_out = acc(_m.log_or_minus_inf(p_out, _m.NEG_INF))
            inv_sb = acc(1.0 / s_b64)
            if per_class_jsd:
                d_o = zero
                qh_o = zero
                for j in range(tx, n_read, tpr):
                    if class_map[slot, j] < 0:
                        q = math.exp((logit(student, i, j) - m_s) * inv_t) * inv_sb
                        term, h = _m.uniform_jsd_class(q, beta_p, one_m_beta, log_p_out, zero)
                        d_o += term
                        qh_o += q * h
                sm_0[me] = d_o
                sm_1[me] = qh_o
                _tree_reduce(sm_0, base, tx, tpr, False)
                _tree_reduce(sm_1, base, tx, tpr, False)
                d_o = numba.float64(sm_0[base])
                qh_o = numba.float64(sm_1[base])
                cuda.syncthreads()
            else:
                sums = (q_out, n_out, b_out, e_out, s_b64, log_sb)
                d_o, qh_o, h_out = _m.topk_outside_terms(tail, divergence, targets, sums, beta)
            d = _m.nonnegative(d_u + d_o)
            qh = qh_u + qh_o
            a, c, e = _m.topk_grad_constants(tail, divergence, targets, q_out, log_sb, h_out, d, qh)
            bad = valid and not (in_range and finite and not teacher_nan)
            if tx == 0 and i_raw < n_rows:
                if not in_range and y != ignore_index:
                    cuda.atomic.add(bad_labels, 0, 1)
                if bad:
                    d_rows[i] = acc(math.nan)
                    ce_rows[i] = acc(math.nan)
                elif valid:
                    d_rows[i] = d
                    x_y = numba.float64(logit(student, i, y_safe))
                    ce_rows[i] = _m.cross_entropy(m_s64, x_y, log_ss)
                else:
                    d_rows[i] = zero
                    ce_rows[i] = zero
            if want_grad and i_raw < n_rows:
                c_soft = alpha_t2 / divisor[0]
                c_hard = one_m_alpha / divisor[0]
                soft = c_soft * inv_t
                a_c = acc(a)
                c_c = acc(c)
                e_c = acc(e)
                qh_c = acc(qh)
                # A float32 row whose constants leave the float32 range: float64 there.
                wide = math.isfinite(a + c + e) and not math.isfinite(a_c + c_c + e_c)
                for j in range(tx, n_classes, tpr):
                    if bad:
                        _store(grad, i, j, acc(math.nan))
                    elif not valid:
                        _store(grad, i, j, zero)
                    elif class_map[slot, j] < 0:
                        dx = logit(student, i, j) - m_s
                        q = math.exp(dx * inv_t) * inv_sb
                        r = q if unit else math.exp(dx - acc(log_ss))
                        if per_class_jsd:
                            _, h = _m.uniform_jsd_class(q, beta_p, one_m_beta, log_p_out, zero)
                            g = _m.jsd_grad(q, h, one, qh_c)
                        elif wide:
                            b64 = numba.float64(dx) * inv_t64
                            g = acc(_m.topk_soft_grad(math.exp(b64 - log_sb), b64, a, c, e))
                        else:
                            g = _m.topk_soft_grad(q, dx * inv_t, a_c, c_c, e_c)
                        _store(grad, i, j, soft * g + c_hard * r - (c_hard if j == y_safe else zero))
                if valid and not bad:
                    for position in range(tx, n_entries, tpr):
                        j = u_class[slot, position]
                        if j >= 0:
                            x64 = numba.float64(logit(student, i, j)) - m_s64
                            g64 = _m.topk_class_grad(
                                divergence, u_p[slot, position] + p_out, x64 * inv_t64 - log_sb, beta, d, qh
                            )
                            r64 = math.exp(x64 - log_ss) - (1.0 if j == y_safe else 0.0)
                            _store(grad, i, j, numba.float64(soft) * g64 + numba.float64(c_hard) * r64)
            cuda.syncthreads()
            for position in range(tx, n_entries, tpr):
                j = u_class[slot, position]
                if j >= 0:
                    class_map[slot, j] = -1
            cuda.syncthreads()

    @cuda.jit(cache=DISK_CACHE)
    def count_nonfinite(x, counter):
        """counter[0] += the number of NaN and infinite entries of the 2-D array x."""
        n_rows, n_classes = x.shape
        for flat in range(cuda.grid(1), n_rows * n_classes, cuda.gridsize(1)):
            i = flat // n_classes
            if not logit(x, i, flat - i * n_classes) * acc(0.0) == acc(0.0):
                cuda.atomic.add(counter, 0, 1)

    @cuda.jit(cache=DISK_CACHE)
    def scale_rows(d_rows, ce_rows, alpha_t2, one_m_alpha, loss, soft, hard):
        """Per-row results of reduction="none"."""
        for i in range(cuda.grid(1), d_rows.shape[0], cuda.gridsize(1)):
            soft[i] = alpha_t2 * d_rows[i]
            hard[i] = one_m_alpha * ce_rows[i]
            loss[i] = soft[i] + hard[i]

    return SimpleNamespace(
        count_valid=count_valid,
        count_nonfinite=count_nonfinite,
        general_rows=general_rows,
        clear_map=clear_map,
        topk_rows=topk_rows,
        scale_rows=scale_rows,
        combine_logits=combine_logits,
        teacher_lse=teacher_lse,
        mix_probabilities=mix_probabilities,
        loss_rows=loss_rows,
        reduce_loss=reduce_loss,
    )

"""Float64 NumPy reference implementations: the readable statement of every formula.

These are the oracle of the test suite and the NumPy peer of the benchmarks and
the demo.  They favour clarity over speed and materialize whatever they need.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def normalized_weights(weights: ArrayLike) -> np.ndarray:
    """The teacher weights as float64, divided by their sum.

    Nothing is checked: weights summing to 0 give infinities or NaN.

    Parameters
    ----------
    weights : array_like of float, shape [K]
        One weight per teacher.

    Returns
    -------
    numpy.ndarray of float64, shape [K]
        The weights scaled to sum 1.

    Examples
    --------
    >>> from numba_kd import reference
    >>> reference.normalized_weights([1, 3])
    array([0.25, 0.75])
    """
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def stack_teachers(teachers: Sequence[ArrayLike] | ArrayLike) -> np.ndarray:
    """The teachers' logits as one float64 array, teachers along the first axis.

    Parameters
    ----------
    teachers : list or tuple of K arrays [B, C], or one array [K, B, C]
        Teacher logits; a list or tuple is stacked, anything else is read as
        one array (other shapes pass through unchanged).

    Returns
    -------
    numpy.ndarray of float64, shape [K, B, C]
        A new array for a list or tuple; the input itself when it already is a
        float64 ndarray.

    Raises
    ------
    ValueError
        List entries whose shapes differ.
    """
    if isinstance(teachers, (list, tuple)):
        return np.stack([np.asarray(t, dtype=np.float64) for t in teachers])
    return np.asarray(teachers, dtype=np.float64)


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``log(sum(exp(x)))`` along one axis, with the maximum subtracted first.

    Parameters
    ----------
    x : numpy.ndarray of float
        Any shape.
    axis : int, default -1
        The axis summed over.

    Returns
    -------
    numpy.ndarray
        The shape of x without ``axis``. A slice that is all -inf gives NaN
        (the shift by its maximum is -inf - -inf).
    """
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def log_softmax(x: np.ndarray) -> np.ndarray:
    """The log-softmax over the last axis, ``(x - max) - log(sum(exp(x - max)))``.

    The maximum is subtracted first, so that log S survives even where
    ``max + log S`` would round it away.

    Parameters
    ----------
    x : numpy.ndarray of float, shape [..., C]
        Logits, classes along the last axis.

    Returns
    -------
    numpy.ndarray, shape [..., C]
        Log-probabilities in x's dtype; each row's exponentials sum to 1.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import reference
    >>> np.exp(reference.log_softmax(np.array([0.0, np.log(3.0)]))).round(6)
    array([0.25, 0.75])
    """
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def nonfinite_rows(teachers, student=None) -> np.ndarray:
    """The rows where any teacher (or the student, when given) holds a NaN or an infinity.

    This is the non-finite policy of every formula: such a row gives NaN (the
    loss, its soft and hard parts and its gradient row, or the row of a
    probability combine), while a row whose label is ignored stays ignored.

    Parameters
    ----------
    teachers : list of K arrays [B, C], or one array [K, B, C]
        Teacher logits.
    student : array_like, shape [B, C], optional
        Student logits, checked too when given.

    Returns
    -------
    numpy.ndarray of bool, shape [B]
        True for the rows holding a non-finite value.
    """
    bad = ~np.isfinite(stack_teachers(teachers)).all(axis=(0, -1))
    if student is not None:
        bad |= ~np.isfinite(np.asarray(student, dtype=np.float64)).all(axis=-1)
    return bad


def combine_teachers(teachers, weights) -> np.ndarray:
    """The weighted average of the teacher logits, ``z = sum_k w_k t_k``.

    Parameters
    ----------
    teachers : list of K arrays [B, C], or one array [K, B, C]
        Teacher logits.
    weights : array_like of float, shape [K]
        One weight per teacher, normalized here to sum 1.

    Returns
    -------
    numpy.ndarray of float64, shape [B, C]
        The combined logits z. Non-finite logits follow IEEE arithmetic
        element by element.

    Raises
    ------
    ValueError
        Teachers of different shapes, not three-dimensional once stacked, or
        a number of weights other than K.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import reference
    >>> teachers = [np.array([[0.0, 4.0]]), np.array([[4.0, 0.0]])]
    >>> reference.combine_teachers(teachers, [1.0, 3.0])
    array([[3., 1.]])
    """
    t = stack_teachers(teachers)
    w = normalized_weights(weights)
    return np.einsum("k,kbc->bc", w, t)


def combine_via_probabilities(teachers, weights, temperature: float, eps: float = 1e-10) -> np.ndarray:
    """Soft labels from the probability mixture, ``T log(sum_k w_k softmax(t_k / T) + eps)``.

    With ``eps=0`` the result is the exact log-mixture, computed in log space
    (a log-sum-exp over the teachers with non-zero weight), so that no
    probability underflows to log(0).

    Parameters
    ----------
    teachers : list of K arrays [B, C], or one array [K, B, C]
        Teacher logits.
    weights : array_like of float, shape [K]
        One weight per teacher, normalized here to sum 1.
    temperature : float
        The softmax temperature T > 0.
    eps : float, default 1e-10
        Added to the mixture before the log (entrenar's form). Any value that
        is not positive selects the exact log-mixture.

    Returns
    -------
    numpy.ndarray of float64, shape [B, C]
        The combined logits; NaN in every row where a teacher holds a NaN or
        an infinity.

    Raises
    ------
    ValueError
        Teachers of different shapes, not three-dimensional once stacked, or
        a number of weights other than K.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import reference
    >>> teachers = [np.array([[0.0, 0.0]]), np.array([[np.log(3.0), 0.0]])]
    >>> z = reference.combine_via_probabilities(teachers, [1.0, 1.0], temperature=1.0, eps=0.0)
    >>> np.exp(z).round(6)
    array([[0.625, 0.375]])
    """
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
    """The per-row divergence ``KL(softmax(z / T) || softmax(s / T))``.

    Parameters
    ----------
    target_logits : array_like of float, shape [N, C]
        The target's logits z (a teacher, or the combined teachers).
    student_logits : array_like of float, shape [N, C]
        The student's logits s.
    temperature : float
        The softmax temperature T > 0.

    Returns
    -------
    numpy.ndarray of float64, shape [N]
        One KL divergence per row (non-finite logits propagate as NaN or inf).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import reference
    >>> reference.kl_rows(np.array([[0.0, np.log(3.0)]]), np.zeros((1, 2)), 1.0).round(6)
    array([0.130812])
    """
    log_p = log_softmax(np.asarray(target_logits, dtype=np.float64) / temperature)
    log_q = log_softmax(np.asarray(student_logits, dtype=np.float64) / temperature)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def cross_entropy_rows(student_logits: np.ndarray, labels: ArrayLike) -> np.ndarray:
    """The per-row cross-entropy ``-log softmax(s)[y]`` of the student against the labels.

    There is no ignore_index here: every label must index a class (a negative
    label counts from the end, as NumPy indexing does).

    Parameters
    ----------
    student_logits : array_like of float, shape [N, C]
        The student's logits s.
    labels : array_like of int, shape [N]
        Class indices in [0, C).

    Returns
    -------
    numpy.ndarray of float64, shape [N]
        One cross-entropy per row, at temperature 1.

    Raises
    ------
    IndexError
        A label outside [-C, C).
    """
    s = np.asarray(student_logits, dtype=np.float64)
    y = np.asarray(labels)
    return -np.take_along_axis(log_softmax(s), y[:, None], axis=-1)[:, 0]


def distillation_loss_single(student, teacher, labels, temperature: float, alpha: float) -> float:
    """The single-teacher loss, entrenar's ``DistillationLoss.forward``.

    ``alpha T^2 mean KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) mean CE(s, y)``.

    Parameters
    ----------
    student : array_like of float, shape [B, C]
        The student's logits s.
    teacher : array_like of float, shape [B, C]
        The teacher's logits t.
    labels : array_like of int, shape [B]
        Class indices in [0, C).
    temperature : float
        The softmax temperature T > 0.
    alpha : float
        Weight of the soft (distillation) term, in [0, 1]; the hard
        (cross-entropy) term gets 1 - alpha.

    Returns
    -------
    float
        The loss, a mean over the rows; NaN when any row's logits hold a NaN
        or an infinity.

    Raises
    ------
    IndexError
        A label outside [-C, C).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import reference
    >>> loss = reference.distillation_loss_single(
    ...     np.zeros((1, 3)), np.zeros((1, 3)), np.array([0]), temperature=2.0, alpha=0.5
    ... )
    >>> print(f"{loss:.6f}")
    0.549306
    """
    bad = nonfinite_rows([teacher], student)
    kl = np.where(bad, np.nan, kl_rows(teacher, student, temperature)).mean()
    ce = np.where(bad, np.nan, cross_entropy_rows(student, labels)).mean()
    return float(alpha * temperature**2 * kl + (1.0 - alpha) * ce)


def distillation_loss(student, teachers, labels, weights, temperature: float, alpha: float) -> float:
    """The ensemble loss, entrenar's ``EnsembleDistiller.distillation_loss``.

    The target is the weighted logit average of the teachers
    (``combine_teachers``); the loss is that of ``distillation_loss_single``
    against it.

    Parameters
    ----------
    student : array_like of float, shape [B, C]
        The student's logits.
    teachers : list of K arrays [B, C], or one array [K, B, C]
        Teacher logits.
    labels : array_like of int, shape [B]
        Class indices in [0, C).
    weights : array_like of float, shape [K]
        One weight per teacher, normalized here to sum 1.
    temperature : float
        The softmax temperature T > 0.
    alpha : float
        Weight of the soft term, in [0, 1].

    Returns
    -------
    float
        The loss, a mean over the rows; NaN when any row's logits hold a NaN
        or an infinity.

    Raises
    ------
    ValueError
        Teachers of different shapes, or a number of weights other than K.
    IndexError
        A label outside [-C, C).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import reference
    >>> student = np.array([[1.0, 0.0, 0.0]])
    >>> teachers = [np.array([[2.0, 0.0, 0.0]]), np.zeros((1, 3))]
    >>> loss = reference.distillation_loss(student, teachers, np.array([0]), [1.0, 1.0], 2.0, 0.5)
    >>> print(f"{loss:.6f}")
    0.275722
    """
    z = combine_teachers(teachers, weights)
    return distillation_loss_single(student, z, labels, temperature, alpha)


# ---------------------------------------------------------------------------
# Generalized losses: masks, reductions, combine modes, divergences, per-row
# teacher weights.  Rows are [N, C] here; 3-D inputs are reshaped by the caller.


def row_teacher_weights(
    teachers, weights, labels, temperature: float, weighting: str, ignore_index: int | None = None
) -> np.ndarray:
    """Per-row teacher weights, each row normalized to sum 1.

    "static" keeps w_k in every row. "confidence" takes
    ``w_k * softmax(t_k)[y]`` (at temperature 1); rows whose label is ignored
    keep w_k. "entropy" takes ``w_k * exp(-H(softmax(t_k / T)))``. Both are
    computed as logarithms and scaled by the row's largest, so that weights
    whose exponentials would all underflow keep their ratios.

    Parameters
    ----------
    teachers : list of K arrays [N, C], or one array [K, N, C]
        Teacher logits.
    weights : array_like of float, shape [K]
        One weight per teacher, normalized here to sum 1.
    labels : array_like of int, shape [N]
        Class indices in [0, C), or ignore_index; read by "confidence" only.
    temperature : float
        The softmax temperature T > 0; read by "entropy" only.
    weighting : str, one of {"static", "confidence", "entropy"}
        How the weights vary by row.
    ignore_index : int or None, default None
        The label of ignored rows, or None when no row is ignored.

    Returns
    -------
    numpy.ndarray of float64, shape [N, K]
        The weights of each row.

    Raises
    ------
    ValueError
        An unknown ``weighting``.
    IndexError
        With "confidence", a label (other than ignore_index) outside [-C, C).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import reference
    >>> teachers = [np.array([[2.0, 0.0, 0.0]]), np.zeros((1, 3))]
    >>> reference.row_teacher_weights(teachers, [1.0, 1.0], np.array([0]), 2.0, "confidence").round(6)
    array([[0.702466, 0.297534]])
    """
    t = stack_teachers(teachers)  # [K, N, C]
    w = normalized_weights(weights)
    with np.errstate(divide="ignore"):
        log_w = np.log(w)  # -inf for a zero weight
    n_rows = t.shape[1]
    if weighting == "static":
        raw = np.broadcast_to(w, (n_rows, w.size)).copy()
    elif weighting == "confidence":
        y = np.asarray(labels)
        valid = _valid_rows(y, ignore_index)
        safe_y = np.where(valid, y, 0)
        log_conf = np.take_along_axis(log_softmax(t), safe_y[None, :, None], axis=-1)[..., 0]  # [K, N]
        raw = _from_log_weights(log_w[None, :] + log_conf.T)
        # Ignored rows, and rows where no log weight is finite (a label logit so far
        # below the maximum that the difference overflows), keep the static weights.
        raw[~valid | ~np.isfinite(raw).all(axis=1)] = w
    elif weighting == "entropy":
        log_p = log_softmax(t / temperature)
        entropy = -np.sum(np.exp(log_p) * log_p, axis=-1)  # [K, N]
        raw = _from_log_weights(log_w[None, :] - entropy.T)
    else:
        raise ValueError(weighting)
    return raw / raw.sum(axis=1, keepdims=True)


def _from_log_weights(log_raw: np.ndarray) -> np.ndarray:
    """exp(log_raw) scaled so that each row's largest entry is 1: weights whose
    exponentials would all underflow keep their ratios.  A row with no finite entry
    is NaN (its caller gives it the static weights)."""
    top = np.max(log_raw, axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        return np.exp(log_raw - top)


def target_log_probs(teachers, row_weights: np.ndarray, temperature: float, combine: str) -> np.ndarray:
    """The target's log-probabilities log p, from per-row teacher weights.

    "logits": ``log_softmax(z / T)`` of the weighted logit average
    ``z = sum_k w_nk t_k``. "probs": the log of the weighted average of the
    teachers' ``softmax(t_k / T)``, computed in log space.

    Parameters
    ----------
    teachers : list of K arrays [N, C], or one array [K, N, C]
        Teacher logits.
    row_weights : numpy.ndarray of float, shape [N, K]
        Per-row teacher weights, as ``row_teacher_weights`` returns them.
    temperature : float
        The softmax temperature T > 0.
    combine : str, one of {"logits", "probs"}
        How the teachers are combined.

    Returns
    -------
    numpy.ndarray of float64, shape [N, C]
        log p.

    Raises
    ------
    ValueError
        An unknown ``combine``.
    """
    t = stack_teachers(teachers)
    if combine == "logits":
        z = np.einsum("nk,knc->nc", row_weights, t)
        return log_softmax(z / temperature)
    if combine == "probs":
        with np.errstate(divide="ignore"):
            log_w = np.log(row_weights.T)[:, :, None]  # [K, N, 1]
        return logsumexp(log_w + log_softmax(t / temperature), axis=0)
    raise ValueError(combine)


def divergence_rows(
    log_p: np.ndarray, log_q: np.ndarray, divergence: str, beta: float = 0.5, skew: float = 0.1
) -> np.ndarray:
    """The per-row divergence D(p, q) between the target p and the student q.

    "forward_kl": KL(p || q). "reverse_kl": KL(q || p). "jsd": the generalized
    Jensen-Shannon divergence ``beta KL(p || m) + (1 - beta) KL(q || m)`` with
    ``m = beta p + (1 - beta) q``. "tvd": the total variation distance
    ``sum |p - q| / 2``. "skew_forward_kl": ``KL(p || skew p + (1 - skew) q)``.
    "skew_reverse_kl": ``KL(q || skew q + (1 - skew) p)``.

    Parameters
    ----------
    log_p : numpy.ndarray of float, shape [N, C]
        The target's log-probabilities.
    log_q : numpy.ndarray of float, shape [N, C]
        The student's log-probabilities.
    divergence : str, one of {"forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"}
        Which divergence.
    beta : float, default 0.5
        The JSD weight, in (0, 1); read with divergence="jsd" only.
    skew : float, default 0.1
        The skew KLs' lambda, in (0, 1]; read with the skew divergences only.

    Returns
    -------
    numpy.ndarray of float64, shape [N]
        One divergence per row.

    Raises
    ------
    ValueError
        An unknown ``divergence``.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import reference
    >>> log_p, log_q = np.log([[0.25, 0.75]]), np.log([[0.5, 0.5]])
    >>> reference.divergence_rows(log_p, log_q, "jsd").round(6)
    array([0.033822])
    """
    p, q = np.exp(log_p), np.exp(log_q)
    if divergence == "forward_kl":
        return np.sum(p * (log_p - log_q), axis=-1)
    if divergence == "reverse_kl":
        return np.sum(q * (log_q - log_p), axis=-1)
    if divergence == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        return beta * np.sum(p * (log_p - log_m), axis=-1) + (1 - beta) * np.sum(q * (log_q - log_m), axis=-1)
    if divergence == "tvd":
        return 0.5 * np.sum(np.abs(p - q), axis=-1)
    if divergence in ("skew_forward_kl", "skew_reverse_kl"):
        log_m = _skew_log_mixture(log_p, log_q, divergence, skew)
        with np.errstate(invalid="ignore"):
            if divergence == "skew_forward_kl":
                return np.sum(np.where(p > 0, p * (log_p - log_m), 0.0), axis=-1)
            return np.sum(np.where(q > 0, q * (log_q - log_m), 0.0), axis=-1)
    raise ValueError(divergence)


def divergence_slopes(
    log_p: np.ndarray, log_q: np.ndarray, divergence: str, beta: float = 0.5, skew: float = 0.1
) -> np.ndarray:
    """g = dD/dq per class, of the divergence D(p, q) of ``divergence_rows``.

    -p/q (forward KL), log(q/p) + 1 (reverse KL), (1 - beta) log(q/m) (JSD),
    sign(q - p) / 2 (TVD, the subgradient 0 where p = q), -(1 - skew) p/m (skew
    forward KL) and log(q/m) + 1 - skew q/m (skew reverse KL, 0 where q = 0), with
    each divergence's mixture m. The gradient with respect to the student's
    tempered logits is q (g - sum_j q_j g_j).

    Parameters
    ----------
    log_p : numpy.ndarray of float, shape [N, C]
        The target's log-probabilities.
    log_q : numpy.ndarray of float, shape [N, C]
        The student's log-probabilities.
    divergence : str, one of {"forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"}
        Which divergence.
    beta : float, default 0.5
        The JSD weight, in (0, 1); read with divergence="jsd" only.
    skew : float, default 0.1
        The skew KLs' lambda, in (0, 1]; read with the skew divergences only.

    Returns
    -------
    numpy.ndarray of float64, shape [N, C]
        dD/dq.

    Raises
    ------
    ValueError
        An unknown ``divergence``.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import reference
    >>> log_p, log_q = np.log([[0.25, 0.75]]), np.log([[0.5, 0.5]])
    >>> reference.divergence_slopes(log_p, log_q, "tvd")
    array([[ 0.5, -0.5]])
    """
    p, q = np.exp(log_p), np.exp(log_q)
    if divergence == "forward_kl":
        return -np.exp(log_p - log_q)
    if divergence == "reverse_kl":
        return log_q - log_p + 1.0
    if divergence == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        return (1.0 - beta) * (log_q - log_m)
    if divergence == "tvd":
        return 0.5 * np.sign(q - p)
    if divergence in ("skew_forward_kl", "skew_reverse_kl"):
        log_m = _skew_log_mixture(log_p, log_q, divergence, skew)
        with np.errstate(invalid="ignore"):
            if divergence == "skew_forward_kl":
                return -(1.0 - skew) * np.exp(log_p - log_m)
            return np.where(q > 0, log_q - log_m + 1.0 - skew * np.exp(log_q - log_m), 0.0)
    raise ValueError(divergence)


def _log_mixture(log_a, log_b, weight):
    """log(weight a + (1 - weight) b) from log a and log b (weight in (0, 1])."""
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log(weight) + log_a, np.log1p(-weight) + log_b)


def _skew_log_mixture(log_p, log_q, divergence, skew):
    """log m of the skew KLs: m = skew p + (1 - skew) q for the forward one, skew q +
    (1 - skew) p for the reverse one."""
    first, second = (log_p, log_q) if divergence == "skew_forward_kl" else (log_q, log_p)
    return _log_mixture(first, second, skew)


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
    skew: float = 0.1,
):
    """The per-row divergence and cross-entropy of the generalized loss, before weighting.

    Parameters
    ----------
    student : array_like of float, shape [N, C]
        The student's logits s.
    teachers : list of K arrays [N, C], or one array [K, N, C]
        Teacher logits.
    labels : array_like of int, shape [N]
        Class indices in [0, C), or ignore_index.
    weights : array_like of float, shape [K]
        One weight per teacher, normalized here to sum 1.
    temperature : float
        The softmax temperature T > 0.
    combine : {"logits", "probs"}, default "logits"
        The target, as in ``target_log_probs``.
    divergence : {"forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"}
        The divergence, as in ``divergence_rows``; default "forward_kl".
    beta : float, default 0.5
        The JSD weight, in (0, 1); read with divergence="jsd" only.
    teacher_weighting : {"static", "confidence", "entropy"}, default "static"
        The per-row teacher weights, as in ``row_teacher_weights``.
    ignore_index : int or None, default None
        The label of ignored rows, or None when no row is ignored.
    skew : float, default 0.1
        The skew KLs' lambda, in (0, 1]; read with the skew divergences only.

    Returns
    -------
    divergence : numpy.ndarray of float64, shape [N]
        D(p, softmax(s / T)) per row (not yet scaled by alpha T^2).
    cross_entropy : numpy.ndarray of float64, shape [N]
        CE(s, y) per row, at temperature 1.
    valid : numpy.ndarray of bool, shape [N]
        False for the ignored rows, whose divergence and cross-entropy are 0.
        Rows that are not ignored and hold a NaN or an infinity give NaN in
        both.

    Raises
    ------
    ValueError
        An unknown combine, divergence or teacher_weighting, or teachers of
        different shapes.
    IndexError
        A label (other than ignore_index) outside [-C, C).
    """
    s = np.asarray(student, dtype=np.float64)
    y = np.asarray(labels)
    valid = _valid_rows(y, ignore_index)
    row_w = row_teacher_weights(teachers, weights, y, temperature, teacher_weighting, ignore_index)
    log_p = target_log_probs(teachers, row_w, temperature, combine)
    log_q = log_softmax(s / temperature)
    d = divergence_rows(log_p, log_q, divergence, beta, skew)
    ce = cross_entropy_rows(s, np.where(valid, y, 0))
    bad = nonfinite_rows(teachers, s)
    d, ce = np.where(bad, np.nan, d), np.where(bad, np.nan, ce)
    return np.where(valid, d, 0.0), np.where(valid, ce, 0.0), valid


def general_loss(
    student, teachers, labels, weights, temperature: float, alpha: float, reduction: str = "mean", **options
):
    """The generalized distillation loss and its parts, ``alpha T^2 D + (1 - alpha) CE``.

    The soft part is ``alpha T^2 D`` and the hard part ``(1 - alpha) CE``,
    each reduced over rows: "mean" divides the sums by the number of rows not
    ignored (at least 1), "sum" sums them, "none" keeps one value per row.

    Parameters
    ----------
    student : array_like of float, shape [N, C]
        The student's logits.
    teachers : list of K arrays [N, C], or one array [K, N, C]
        Teacher logits.
    labels : array_like of int, shape [N]
        Class indices in [0, C), or ignore_index.
    weights : array_like of float, shape [K]
        One weight per teacher, normalized here to sum 1.
    temperature : float
        The softmax temperature T > 0.
    alpha : float
        Weight of the soft term, in [0, 1].
    reduction : {"mean", "sum", "none"}, default "mean"
        The reduction over rows; any other value sums, as "sum" does.
    **options
        The keyword options of ``general_rows``: combine, divergence, beta,
        skew, teacher_weighting and ignore_index.

    Returns
    -------
    loss : numpy.float64, or numpy.ndarray of float64 [N] with "none"
        soft + hard.
    soft : numpy.float64, or numpy.ndarray of float64 [N] with "none"
        The soft (distillation) part.
    hard : numpy.float64, or numpy.ndarray of float64 [N] with "none"
        The hard (cross-entropy) part. Ignored rows add 0 to all three.

    Raises
    ------
    TypeError
        An option that ``general_rows`` does not take.
    ValueError
        An unknown combine, divergence or teacher_weighting.
    IndexError
        A label (other than ignore_index) outside [-C, C).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import reference
    >>> student = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    >>> teachers = [np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), np.zeros((2, 3))]
    >>> labels = np.array([0, -100])
    >>> loss, soft, hard = reference.general_loss(
    ...     student, teachers, labels, [1.0, 1.0], 2.0, 0.5, ignore_index=-100
    ... )
    >>> print(f"{loss:.6f} {soft:.6f} {hard:.6f}")
    0.275722 0.000000 0.275722
    >>> rows, soft, hard = reference.general_loss(
    ...     student, teachers, np.array([0, 2]), [1.0, 1.0], 2.0, 0.5, reduction="none", divergence="jsd"
    ... )
    >>> rows.round(6)
    array([0.275722, 0.801302])
    """
    factor = _soft_factor(temperature, options)
    d, ce, valid = general_rows(student, teachers, labels, weights, temperature, **options)
    return _loss_parts(d, ce, valid, alpha, factor, reduction)


def _soft_factor(temperature, options):
    """T^2, or 1 with the option scale_by_t2=False (removed from ``options``)."""
    return temperature**2 if options.pop("scale_by_t2", True) else 1.0


def _loss_parts(d, ce, valid, alpha, soft_factor, reduction):
    """(loss, soft, hard) of per-row divergences and cross-entropies, reduced over rows;
    soft_factor is T^2 (or 1 without scale_by_t2)."""
    soft = alpha * soft_factor * d
    hard = (1.0 - alpha) * ce
    if reduction == "none":
        return soft + hard, soft, hard
    n = max(int(valid.sum()), 1) if reduction == "mean" else 1
    soft_total, hard_total = soft.sum() / n, hard.sum() / n
    return soft_total + hard_total, soft_total, hard_total


def general_grad(
    student, teachers, labels, weights, temperature: float, alpha: float, reduction: str = "mean", **options
) -> np.ndarray:
    """The gradient of ``general_loss`` with respect to the student logits.

    With reduction="none" it is the gradient of the sum of the per-row losses.
    With ``q = softmax(s / T)`` and ``g = dD/dq``, ``dD/ds = q (g - sum(q g)) / T``,
    where g is -p/q (forward KL), log(q/p) + 1 (reverse KL),
    (1 - beta) log(q/m) (JSD), sign(q - p) / 2 (TVD, a subgradient: 0 where
    p = q), -(1 - skew) p/m (skew forward KL) or log(q/m) + 1 - skew q/m (skew
    reverse KL); the forward KL case reduces to (q - p) / T. The
    hard part adds ``(1 - alpha) (softmax(s) - onehot(y))``.

    Parameters
    ----------
    student : array_like of float, shape [N, C]
        The student's logits.
    teachers : list of K arrays [N, C], or one array [K, N, C]
        Teacher logits.
    labels : array_like of int, shape [N]
        Class indices in [0, C), or ignore_index.
    weights : array_like of float, shape [K]
        One weight per teacher, normalized here to sum 1.
    temperature : float
        The softmax temperature T > 0.
    alpha : float
        Weight of the soft term, in [0, 1].
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" divides by the number of rows not ignored (at least 1); any
        other value leaves the per-row gradients as they are.
    **options
        combine, divergence, beta, skew, teacher_weighting and ignore_index, as for
        ``general_rows``; other keys are not read.

    Returns
    -------
    numpy.ndarray of float64, shape [N, C]
        d loss / d student. Ignored rows are 0; rows that are not ignored and
        hold a NaN or an infinity are NaN.

    Raises
    ------
    ValueError
        An unknown combine, divergence or teacher_weighting.
    IndexError
        A label (other than ignore_index) outside [-C, C).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import reference
    >>> student = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    >>> teachers = [np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), np.zeros((2, 3))]
    >>> grad = reference.general_grad(
    ...     student, teachers, np.array([0, -100]), [1.0, 1.0], 2.0, 0.5, ignore_index=-100
    ... )
    >>> grad.round(6)
    array([[-0.211942,  0.105971,  0.105971],
           [ 0.      ,  0.      ,  0.      ]])
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
        g = divergence_slopes(log_p, log_q, divergence, options.get("beta", 0.5), options.get("skew", 0.1))
        dd_ds = q * (g - np.sum(q * g, axis=-1, keepdims=True)) / temperature
    factor = _soft_factor(temperature, options)
    return _loss_gradient(dd_ds, s, y, valid, alpha, factor, reduction, nonfinite_rows(teachers, s))


def _loss_gradient(dd_ds, s, y, valid, alpha, soft_factor, reduction, bad=None):
    """alpha T^2 dD/ds + (1 - alpha) (softmax(s) - onehot(y)); NaN on ``bad`` rows, 0 on
    rows not ``valid``, divided by the valid rows (at least 1) for "mean"."""
    r = np.exp(log_softmax(s))
    onehot = np.zeros_like(s)
    np.put_along_axis(onehot, np.where(valid, y, 0)[:, None], 1.0, axis=-1)
    grad = alpha * soft_factor * dd_ds + (1.0 - alpha) * (r - onehot)
    if bad is not None:
        grad[bad] = np.nan
    grad[~valid] = 0.0
    if reduction == "mean":
        grad /= max(int(valid.sum()), 1)
    return grad


# ---------------------------------------------------------------------------
# Sparse top-k teachers (numba_kd.sparse.TopK).  Dense float64 statements of
# the tail rules: each teacher's distribution is materialized over all C classes.

TOPK_TAILS = ("renormalize", "bucket", "uniform")


def topk_teacher_distributions(
    indices, logprobs, n_classes: int, tail: str, topk_temperature: float, temperature: float
):
    """Each teacher's distribution over the C classes, from its stored top-k entries.

    The stored log-probabilities l (at temperature T_g) are re-tempered to the
    loss temperature T: teacher weights over the support are proportional to
    exp(l T_g / T).  The missing mass m = 1 - sum exp(l) (0 where the support
    holds every class, clamped at 0) is, under "bucket", one pseudo-class of
    log-probability log m and, under "uniform", C - n classes of log(m / (C - n))
    each (n the support's size); both are re-tempered like the stored entries.
    "renormalize" drops it.

    Parameters
    ----------
    indices : array_like of int, shape [K, N, k]
        Class indices; -1 marks an unused entry.
    logprobs : array_like of float, shape [K, N, k]
        The log-probabilities at the indices.
    n_classes : int
        C.
    tail : {"renormalize", "bucket", "uniform"}
        The tail rule.
    topk_temperature : float
        T_g, the temperature of the stored log-probabilities.
    temperature : float
        T, the loss temperature.

    Returns
    -------
    dense : numpy.ndarray of float64, shape [K, N, C]
        p_k over the classes ("uniform": including the spread missing mass).
    tail_mass : numpy.ndarray of float64, shape [K, N]
        "bucket": the probability of the tail pseudo-class; otherwise 0.
    support : numpy.ndarray of bool, shape [K, N, C]
        The classes each teacher stored.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import reference
    >>> idx, lp = np.array([[[0]]]), np.log([[[0.75]]])
    >>> dense, tail_mass, _ = reference.topk_teacher_distributions(idx, lp, 3, "uniform", 1.0, 1.0)
    >>> dense.round(6)
    array([[[0.75 , 0.125, 0.125]]])
    >>> reference.topk_teacher_distributions(idx, lp, 3, "bucket", 1.0, 1.0)[1]
    array([[0.25]])
    """
    if tail not in TOPK_TAILS:
        raise ValueError(tail)
    idx = np.asarray(indices)
    lp = np.asarray(logprobs, dtype=np.float64)
    n_teachers, n_rows, _ = idx.shape
    tau = topk_temperature / temperature
    valid = idx >= 0
    support = np.zeros((n_teachers, n_rows, n_classes), dtype=bool)
    t_i, r_i, e_i = np.nonzero(valid)
    support[t_i, r_i, idx[t_i, r_i, e_i]] = True
    n_stored = valid.sum(axis=-1)
    n_out = n_classes - n_stored
    mass = np.where(valid, np.exp(np.where(valid, lp, 0.0)), 0.0).sum(axis=-1)
    missing = np.where(n_out == 0, 0.0, np.clip(1.0 - mass, 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        log_missing = np.log(missing)
        if tail == "bucket":
            log_tail = tau * log_missing
        elif tail == "uniform":
            # C - n classes of (m / (C - n))^tau each.
            log_tail = np.where(n_out > 0, tau * (log_missing - np.log(n_out)) + np.log(n_out), -np.inf)
        else:
            log_tail = np.full(missing.shape, -np.inf)
    x = np.where(valid, tau * lp, -np.inf)
    # A row with no stored probability (all -inf, where logsumexp gives NaN) stores 0.
    stored = np.isfinite(np.max(x, axis=-1))
    lse_stored = np.where(stored, logsumexp(np.where(stored[..., None], x, 0.0)), -np.inf)
    log_norm = np.logaddexp(lse_stored, log_tail)
    dense = np.zeros((n_teachers, n_rows, n_classes))
    tail_mass = np.zeros((n_teachers, n_rows))
    if tail == "uniform":
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.where(n_out > 0, np.exp(log_tail - log_norm) / n_out, 0.0)
        dense += per_class[:, :, None]
    elif tail == "bucket":
        tail_mass = np.exp(log_tail - log_norm)
    dense[t_i, r_i, idx[t_i, r_i, e_i]] = np.exp(x - log_norm[:, :, None])[t_i, r_i, e_i]
    return dense, tail_mass, support


def topk_row_weights(
    indices,
    logprobs,
    labels,
    weights,
    n_classes: int,
    temperature: float,
    tail: str,
    topk_temperature: float = 1.0,
    teacher_weighting: str = "static",
    ignore_index: int | None = None,
) -> np.ndarray:
    """Per-row teacher weights of sparse top-k teachers, normalized to sum 1.

    "static": the weights. "confidence": w_k times teacher k's probability of
    the label at temperature 1 under the tail rule (its stored entry, re-tempered
    from T_g to 1; for a label it did not store, 0 under "renormalize" and its
    share of the spread tail under "uniform"; undefined under "bucket"). Ignored
    rows keep the static weights. "entropy": w_k exp(-H(p_k)) with p_k the
    teacher's distribution at the loss temperature under the tail rule (the tail
    class, or the spread classes, included). A row whose data-dependent weights
    are all 0 keeps the static weights.

    Parameters
    ----------
    indices : array_like of int, shape [K, N, k]
        The stored classes; -1 marks an unused entry.
    logprobs : array_like of float, shape [K, N, k]
        Their log-probabilities at ``topk_temperature``.
    labels : array_like of int, shape [N]
        Class indices, or ignore_index.
    weights : array_like of float, shape [K]
        The static weights.
    n_classes : int
        C.
    temperature : float
        The loss temperature T.
    tail : {"renormalize", "bucket", "uniform"}
        The tail rule.
    topk_temperature : float, default 1.0
        T_g.
    teacher_weighting : {"static", "confidence", "entropy"}, default "static"
        The weighting.
    ignore_index : int or None, default None
        The label of ignored rows.

    Returns
    -------
    numpy.ndarray of float64, shape [N, K]
        Each row's weights.

    Raises
    ------
    ValueError
        An unknown weighting, or "confidence" with "bucket".

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import reference
    >>> idx = np.array([[[0]], [[1]]])
    >>> lp = np.log([[[0.8]], [[0.5]]])
    >>> reference.topk_row_weights(idx, lp, [0], [1.0, 1.0], 3, 1.0, "uniform", 1.0, "confidence").round(6)
    array([[0.761905, 0.238095]])
    """
    w = normalized_weights(weights)
    idx = np.asarray(indices)
    n_rows = idx.shape[1]
    static = np.broadcast_to(w, (n_rows, len(w))).copy()
    if teacher_weighting == "static":
        return static
    if teacher_weighting == "confidence":
        if tail == "bucket":
            raise ValueError('teacher_weighting="confidence" is undefined for tail="bucket"')
        dense, _, _ = topk_teacher_distributions(indices, logprobs, n_classes, tail, topk_temperature, 1.0)
        y = np.asarray(labels)
        valid = _valid_rows(y, ignore_index)
        factor = np.take_along_axis(dense, np.where(valid, y, 0)[None, :, None], axis=-1)[..., 0].T
        factor = np.where(valid[:, None], factor, 1.0)
    elif teacher_weighting == "entropy":
        dense, tail_mass, _ = topk_teacher_distributions(
            indices, logprobs, n_classes, tail, topk_temperature, temperature
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(dense > 0, dense * np.log(dense), 0.0).sum(-1)
            entropy -= np.where(tail_mass > 0, tail_mass * np.log(tail_mass), 0.0)
        factor = np.exp(-entropy).T
    else:
        raise ValueError(teacher_weighting)
    raw = w * factor
    total = raw.sum(axis=1, keepdims=True)
    return np.where(total > 0, raw / np.where(total > 0, total, 1.0), static)


def _topk_collapsed(student, indices, logprobs, row_weights, temperature, tail, topk_temperature):
    """(P, log P, Q, log Q, in_union): target and student over the "collapsed" classes.

    Columns 0..C-1 are the classes, column C the tail bucket.  Under "bucket",
    classes outside the union U of the (positively weighted) teachers' supports
    are 0 in P and Q, and column C holds p_tail and q_tail = sum over them of q;
    otherwise column C is 0.  log Q of a class is the student's log-softmax, so
    that it stays finite where q underflows.  ``row_weights`` [N, K] sum to 1
    per row.
    """
    s = np.asarray(student, dtype=np.float64)
    n_rows, n_classes = s.shape
    dense, tail_mass, support = topk_teacher_distributions(
        indices, logprobs, n_classes, tail, topk_temperature, temperature
    )
    p = np.einsum("nk,knc->nc", row_weights, dense)
    p_tail = (row_weights.T * tail_mass).sum(0)
    union = np.any(support & (row_weights.T > 0)[:, :, None], axis=0)
    log_q = log_softmax(s / temperature)
    q = np.exp(log_q)
    P = np.zeros((n_rows, n_classes + 1))
    Q = np.zeros((n_rows, n_classes + 1))
    log_Q = np.full((n_rows, n_classes + 1), -np.inf)
    if tail == "bucket":
        P[:, :n_classes] = np.where(union, p, 0.0)
        P[:, n_classes] = p_tail
        Q[:, :n_classes] = np.where(union, q, 0.0)
        Q[:, n_classes] = np.where(union, 0.0, q).sum(axis=-1)
        log_Q[:, :n_classes] = np.where(union, log_q, -np.inf)
        with np.errstate(divide="ignore"):
            log_Q[:, n_classes] = np.log(Q[:, n_classes])
    else:
        P[:, :n_classes] = p
        Q[:, :n_classes] = q
        log_Q[:, :n_classes] = log_q
    with np.errstate(divide="ignore"):
        log_P = np.log(P)
    return P, log_P, Q, log_Q, union


def _topk_divergence_terms(P, log_P, Q, log_Q, divergence, beta):
    """(per-column terms of D, per-column Q dD/dQ): 0 log 0 = 0, and a column the
    student gives nothing has no gradient term."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if divergence == "forward_kl":
            terms = np.where(P > 0, P * (log_P - log_Q), 0.0)
            q_g = -P
        elif divergence == "reverse_kl":
            terms = np.where(Q > 0, Q * (log_Q - log_P), 0.0)
            q_g = np.where(Q > 0, Q * (log_Q - log_P + 1.0), 0.0)
        elif divergence == "jsd":
            log_M = _log_mixture(log_P, log_Q, beta)
            terms = beta * np.where(P > 0, P * (log_P - log_M), 0.0) + (1.0 - beta) * np.where(
                Q > 0, Q * (log_Q - log_M), 0.0
            )
            q_g = np.where(Q > 0, (1.0 - beta) * Q * (log_Q - log_M), 0.0)
        else:
            raise ValueError(divergence)
    return terms, q_g


def topk_rows(
    student,
    indices,
    logprobs,
    labels,
    weights,
    temperature: float,
    tail: str,
    topk_temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int | None = None,
    teacher_weighting: str = "static",
):
    """Per-row divergence and cross-entropy of the loss against sparse top-k teachers.

    The target is the mixture p = sum_k w_k p_k of ``topk_teacher_distributions``.
    "renormalize": p over the union U of the supports, against the student's
    full-vocabulary q = softmax(s / T). "bucket": p and q collapsed to U plus one
    tail class (p_tail, q_tail = the student's probability outside U).
    "uniform": both over all C classes. The divergences are those of
    ``divergence_rows`` over these classes; reverse KL is undefined for
    "renormalize" (p is 0 where q is not).

    Parameters
    ----------
    student : array_like of float, shape [N, C]
        The student's logits.
    indices : array_like of int, shape [K, N, k]
        The teachers' stored classes, as in ``topk_teacher_distributions``.
    logprobs : array_like of float, shape [K, N, k]
        Their log-probabilities.
    labels : array_like of int, shape [N]
        Class indices in [0, C), or ignore_index.
    weights : array_like of float, shape [K]
        One weight per teacher, normalized here to sum 1.
    temperature : float
        The loss temperature T.
    tail : {"renormalize", "bucket", "uniform"}
        The tail rule.
    topk_temperature : float, default 1.0
        T_g, the temperature of the stored log-probabilities.
    divergence : {"forward_kl", "reverse_kl", "jsd"}, default "forward_kl"
        The divergence.
    beta : float, default 0.5
        The JSD weight.
    ignore_index : int or None, default None
        The label of ignored rows.
    teacher_weighting : {"static", "confidence", "entropy"}, default "static"
        Per-row teacher weights, as in ``topk_row_weights``.

    Returns
    -------
    divergence, cross_entropy : numpy.ndarray of float64, shape [N]
        0 on ignored rows.
    valid : numpy.ndarray of bool, shape [N]
        False for the ignored rows.

    Raises
    ------
    ValueError
        An unknown tail or divergence, or reverse KL with "renormalize".

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import reference
    >>> s = np.array([[1.0, 0.0, 0.0]])
    >>> idx, lp = np.array([[[0]]]), np.log([[[0.75]]])
    >>> d, ce, _ = reference.topk_rows(s, idx, lp, [0], [1.0], 1.0, "bucket")
    >>> print(f"{d[0]:.6f} {ce[0]:.6f}")
    0.065823 0.551445
    """
    if divergence == "reverse_kl" and tail == "renormalize":
        raise ValueError("reverse_kl is undefined for tail='renormalize'")
    n_classes = np.shape(student)[-1]
    row_w = topk_row_weights(
        indices, logprobs, labels, weights, n_classes, temperature, tail, topk_temperature,
        teacher_weighting, ignore_index,
    )  # fmt: skip
    P, log_P, Q, log_Q, _ = _topk_collapsed(
        student, indices, logprobs, row_w, temperature, tail, topk_temperature
    )
    d = _topk_divergence_terms(P, log_P, Q, log_Q, divergence, beta)[0].sum(axis=-1)
    s = np.asarray(student, dtype=np.float64)
    y = np.asarray(labels)
    valid = _valid_rows(y, ignore_index)
    ce = cross_entropy_rows(s, np.where(valid, y, 0))
    return np.where(valid, d, 0.0), np.where(valid, ce, 0.0), valid


def topk_loss(
    student,
    indices,
    logprobs,
    labels,
    weights,
    temperature: float,
    alpha: float,
    reduction: str = "mean",
    **options,
):
    """``alpha T^2 D + (1 - alpha) CE`` against sparse top-k teachers, reduced as
    ``general_loss`` reduces.

    Parameters
    ----------
    student : array_like of float, shape [N, C]
        The student's logits.
    indices : array_like of int, shape [K, N, k]
        The teachers' stored classes; -1 marks an unused entry.
    logprobs : array_like of float, shape [K, N, k]
        Their log-probabilities.
    labels : array_like of int, shape [N]
        Class indices in [0, C), or ignore_index.
    weights : array_like of float, shape [K]
        One weight per teacher, normalized here to sum 1.
    temperature : float
        The loss temperature T.
    alpha : float
        Weight of the soft term, in [0, 1].
    reduction : {"mean", "sum", "none"}, default "mean"
        Over rows, as in ``general_loss``.
    **options
        tail (required), topk_temperature, divergence, beta, ignore_index and
        teacher_weighting, as for ``topk_rows``.

    Returns
    -------
    loss, soft, hard : numpy.float64, or numpy.ndarray of float64 [N] with "none"
        soft + hard, alpha T^2 D and (1 - alpha) CE.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import reference
    >>> s = np.array([[1.0, 0.0, 0.0]])
    >>> idx, lp = np.array([[[0]]]), np.log([[[0.75]]])
    >>> loss, soft, hard = reference.topk_loss(s, idx, lp, [0], [1.0], 1.0, 0.5, tail="bucket")
    >>> print(f"{loss:.6f}")
    0.308634
    """
    factor = _soft_factor(temperature, options)
    d, ce, valid = topk_rows(student, indices, logprobs, labels, weights, temperature, **options)
    return _loss_parts(d, ce, valid, alpha, factor, reduction)


def topk_grad(
    student,
    indices,
    logprobs,
    labels,
    weights,
    temperature: float,
    alpha: float,
    reduction: str = "mean",
    **options,
) -> np.ndarray:
    """The gradient of ``topk_loss`` with respect to the student logits.

    Over the collapsed classes c of ``topk_rows`` (a class, or the tail bucket
    that holds the classes outside U), with G_c = dD/dQ_c (-P/Q for forward KL,
    log(Q/P) + 1 for reverse KL, (1 - beta) log(Q/M) for the JSD):
    dD/ds_j = q_j (G_c(j) - sum_c Q_c G_c) / T, c(j) the class that holds j.

    Parameters
    ----------
    student : array_like of float, shape [N, C]
        The student's logits.
    indices : array_like of int, shape [K, N, k]
        The teachers' stored classes; -1 marks an unused entry.
    logprobs : array_like of float, shape [K, N, k]
        Their log-probabilities.
    labels : array_like of int, shape [N]
        Class indices in [0, C), or ignore_index.
    weights : array_like of float, shape [K]
        One weight per teacher, normalized here to sum 1.
    temperature : float
        The loss temperature T.
    alpha : float
        Weight of the soft term, in [0, 1].
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" divides by the rows not ignored (at least 1); any
        other value leaves the per-row gradients.
    **options
        tail (required), topk_temperature, divergence, beta, ignore_index and
        teacher_weighting, as for ``topk_rows``.

    Returns
    -------
    numpy.ndarray of float64, shape [N, C]
        d loss / d student; 0 on ignored rows.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import reference
    >>> s = np.array([[1.0, 0.0, 0.0]])
    >>> idx, lp = np.array([[[0]]]), np.log([[[0.75]]])
    >>> reference.topk_grad(s, idx, lp, [0], [1.0], 1.0, 1.0, tail="bucket").round(6)
    array([[-0.173883,  0.086942,  0.086942]])
    """
    tail = options["tail"]
    divergence = options.get("divergence", "forward_kl")
    beta = options.get("beta", 0.5)
    ignore_index = options.get("ignore_index")
    if divergence == "reverse_kl" and tail == "renormalize":
        raise ValueError("reverse_kl is undefined for tail='renormalize'")
    topk_temperature = options.get("topk_temperature", 1.0)
    row_w = topk_row_weights(
        indices, logprobs, labels, weights, np.shape(student)[-1], temperature, tail, topk_temperature,
        options.get("teacher_weighting", "static"), ignore_index,
    )  # fmt: skip
    P, log_P, Q, log_Q, union = _topk_collapsed(
        student, indices, logprobs, row_w, temperature, tail, topk_temperature
    )
    n_classes = P.shape[1] - 1
    _, q_g = _topk_divergence_terms(P, log_P, Q, log_Q, divergence, beta)
    q = np.exp(log_softmax(np.asarray(student, dtype=np.float64) / temperature))
    mean_g = q_g.sum(axis=-1, keepdims=True)  # sum_c Q_c G_c
    if tail == "bucket":
        # q_j G_c(j): the class's own term in U, q_j / q_tail of the bucket's outside U.
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(Q[:, n_classes : n_classes + 1] > 0, q / Q[:, n_classes : n_classes + 1], 0.0)
        own = np.where(union, q_g[:, :n_classes], share * q_g[:, n_classes : n_classes + 1])
    else:
        own = q_g[:, :n_classes]
    dd_ds = (own - q * mean_g) / temperature
    s = np.asarray(student, dtype=np.float64)
    y = np.asarray(labels)
    valid = _valid_rows(y, ignore_index)
    return _loss_gradient(dd_ds, s, y, valid, alpha, _soft_factor(temperature, options), reduction)

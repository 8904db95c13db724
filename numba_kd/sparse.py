"""Sparse top-k teachers: ``TopK``, the stored top-k log-probabilities of K teachers.

Large-vocabulary teachers are stored as their k most probable classes per row
with those classes' log-probabilities.  ``EnsembleDistiller`` and
``DistillationLoss`` take a ``TopK`` wherever they take teacher logits; how the
probability the teachers did not store (the tail) enters the loss is the
``tail`` rule.  The formulas are in ``docs/sparse.md`` and, as float64 NumPy, in
``numba_kd.reference.topk_rows``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from numba_kd import _math, _validate
from numba_kd._arrays import is_device_array

__all__ = ["TAILS", "TopK"]

Tail = Literal["renormalize", "bucket", "uniform"]
TAILS: tuple[str, ...] = _math.TAILS
# Stored log-probabilities above 0, or masses above 1, by at most this much are
# rounding (float16 keeps 11 significant bits); more is an error.
ROUNDING_TOLERANCE = 2.0**-10


class TopK:
    """The top-k log-probabilities of K teachers, per row.

    Parameters
    ----------
    indices : list of K int arrays [N, k] or [B, S, k], or one int array [K, N, k] or [K, B, S, k]
        The stored classes of each teacher and row; -1 marks an unused entry
        (a row that stores fewer than k classes). Within one teacher's row
        the classes must be distinct.
    logprobs : float arrays shaped like ``indices``
        Each stored class's log-probability (float16, float32 or float64) at
        ``temperature``: at most 0, and a row's probabilities sum to at most 1.
    tail : {"renormalize", "bucket", "uniform"}, default "bucket"
        What happens to the probability a teacher did not store: dropped (the
        stored probabilities are renormalized), kept as one tail class, or
        spread evenly over the classes the teacher did not store.
    temperature : float, default 1.0
        T_g, the temperature at which the log-probabilities were taken. The
        loss re-tempers them to its own temperature T.

    Raises
    ------
    TypeError
        Indices that are not integers, log-probabilities that are not
        floating point, or device arrays (sparse teachers run on the CPU).
    ValueError
        An unknown tail, a temperature that is not positive and finite,
        shapes that differ, an empty list, or no entries (k = 0).

    Notes
    -----
    The values are checked when a loss reads them, against the student's
    number of classes C: an index outside [0, C) other than -1, a class
    stored twice in one teacher's row, a log-probability above 0 or a row's
    mass above 1 (each beyond float16 rounding, 2**-10) raise ``ValueError``
    naming the teacher and the row.

    Examples
    --------
    >>> import numpy as np
    >>> import numba_kd as kd
    >>> student = np.array([[2.0, 0.5, 0.0, -1.0]])
    >>> top = kd.TopK(np.array([[[0, 1]]]), np.log([[[0.6, 0.3]]]), tail="bucket")
    >>> d = kd.DistillationLoss(temperature=1.0, alpha=1.0)
    >>> print(f"{d.forward(student, top, np.array([0])):.6f}")
    0.063078
    """

    def __init__(
        self,
        indices: Sequence[ArrayLike] | ArrayLike,
        logprobs: Sequence[ArrayLike] | ArrayLike,
        tail: Tail = "bucket",
        temperature: float = 1.0,
    ) -> None:
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(repr(t) for t in TAILS)}, got {tail!r}")
        t = _validate.real(temperature, "temperature")
        if not (t > 0.0 and math.isfinite(t) and math.isfinite(1.0 / t)):
            raise ValueError(f"temperature must be positive and finite with a finite 1/T, got {t}")
        self._indices = _stacked(indices, "indices")
        self._logprobs = _stacked(logprobs, "logprobs")
        if self._indices.dtype.kind not in "iu":
            raise TypeError(f"indices must be integer class indices, got dtype {self._indices.dtype}")
        if self._logprobs.dtype.kind != "f" or self._logprobs.dtype.itemsize > 8:
            raise TypeError(f"logprobs must be float16, float32 or float64, got dtype {self._logprobs.dtype}")
        if self._indices.shape != self._logprobs.shape:
            raise ValueError(
                f"indices shape {self._indices.shape} does not match logprobs shape {self._logprobs.shape}"
            )
        if self._indices.ndim not in (3, 4):
            raise ValueError(
                "indices must be [K, N, k] or [K, B, S, k] (or a list of [N, k] or [B, S, k] arrays), "
                f"got shape {self._indices.shape}"
            )
        if self._indices.shape[-1] == 0:
            raise ValueError(
                f"indices must hold at least one entry per row (k >= 1), got shape {self._indices.shape}"
            )
        self._tail = tail
        self._temperature = t

    @property
    def indices(self) -> np.ndarray:
        """The stored classes, [K, N, k] or [K, B, S, k] (a list given is stacked)."""
        return self._indices

    @property
    def logprobs(self) -> np.ndarray:
        """The stored log-probabilities, shaped like ``indices``."""
        return self._logprobs

    @property
    def tail(self) -> str:
        """The tail rule: "renormalize", "bucket" or "uniform"."""
        return self._tail

    @property
    def temperature(self) -> float:
        """T_g, the temperature of the stored log-probabilities."""
        return self._temperature

    @property
    def num_teachers(self) -> int:
        """K."""
        return int(self._indices.shape[0])

    @property
    def k(self) -> int:
        """Entries per row."""
        return int(self._indices.shape[-1])

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """The rows' shape: (N,) or (B, S), which the student's leading axes must match."""
        return tuple(int(n) for n in self._indices.shape[1:-1])

    def __repr__(self) -> str:
        return (
            f"TopK(num_teachers={self.num_teachers}, rows={self.lead_shape}, k={self.k}, "
            f"tail={self._tail!r}, temperature={self._temperature!r})"
        )


def _stacked(values: Any, name: str) -> np.ndarray:
    """One host array: a list of K arrays is stacked (K N k entries, not N C)."""
    if isinstance(values, (list, tuple)):
        if len(values) == 0:
            raise ValueError("Must have at least one teacher")
        arrays = [_host(v, f"{name}[{k}]") for k, v in enumerate(values)]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"All teachers' {name} must have the same shape, got {sorted(shapes)}")
        if arrays[0].ndim not in (2, 3):
            raise ValueError(f"{name}[0] must be [N, k] or [B, S, k], got shape {arrays[0].shape}")
        return np.stack(arrays)
    return _host(values, name)


def _host(value: Any, name: str) -> np.ndarray:
    if is_device_array(value):
        raise TypeError(f"{name} is a device array: sparse top-k teachers run on the CPU (pass NumPy arrays)")
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array: mark unused entries with index -1 instead")
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name} cannot be read as an array: {exc}") from None


_PROBLEMS = {
    1: "index {value} outside [0, {n_classes})",
    2: "class {value} stored twice",
    3: "log-probability {value:.6g} above 0",
    4: "probabilities summing to {value:.6g}, above 1",
    5: "a NaN log-probability (check_finite=True)",
}


def rows_for(top: TopK, lead: tuple[int, ...], n_classes: int, dtype: np.dtype, check_finite: bool):
    """(indices [K, N, k] int64, logprobs [K, N, k] of ``dtype``), checked against the
    student's rows ``lead`` and classes ``n_classes``."""
    if top.lead_shape != tuple(lead):
        raise ValueError(f"TopK rows {top.lead_shape} do not match the student's leading shape {tuple(lead)}")
    n_rows = math.prod(lead)
    indices = np.ascontiguousarray(top.indices.reshape(top.num_teachers, n_rows, top.k), dtype=np.int64)
    logprobs = np.ascontiguousarray(top.logprobs.reshape(top.num_teachers, n_rows, top.k), dtype=dtype)
    from numba_kd.cpu import kernels

    code, teacher, row, value = kernels.topk_first_problem(
        indices, logprobs, n_classes, ROUNDING_TOLERANCE, check_finite
    )
    if code:
        where = np.unravel_index(row, lead) if len(lead) > 1 else (row,)
        row_text = ", ".join(str(int(i)) for i in where)
        shown = int(value) if code in (1, 2) else value
        problem = _PROBLEMS[code].format(value=shown, n_classes=n_classes)
        raise ValueError(f"TopK teacher {teacher}, row {row_text}: {problem}")
    return indices, logprobs

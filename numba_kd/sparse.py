"""Sparse top-k teachers: ``TopK``, the stored top-k log-probabilities of K teachers.

Large-vocabulary teachers are stored as their k most probable classes per row
with those classes' log-probabilities.  ``EnsembleDistiller`` and
``DistillationLoss`` take a ``TopK`` wherever they take teacher logits; how the
probability the teachers did not store (the tail) enters the loss is the
``tail`` rule.  The formulas are in ``docs/sparse.md`` and, as float64 NumPy, in
``numba_kd.reference.topk_rows``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from numba_kd import _math, _validate
from numba_kd._arrays import is_device_array

__all__ = ["TAILS", "TopK", "iter_topk", "read_topk", "topk_file_info"]

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
    num_classes : int or None, default None
        C, when known (``read_topk`` sets it from the file): a loss then
        refuses a student with another number of classes.

    Raises
    ------
    TypeError
        Indices that are not integers, log-probabilities that are not
        floating point, or device arrays (the stored entries are host arrays;
        with a CUDA student the loss copies them to the device).
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
        num_classes: int | None = None,
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
        if num_classes is not None:
            if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
                raise TypeError(f"num_classes must be an int or None, got {type(num_classes).__name__}")
            if num_classes < 1:
                raise ValueError(f"num_classes must be at least 1, got {num_classes}")
            num_classes = int(num_classes)
        self._tail = tail
        self._temperature = t
        self._num_classes = num_classes

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
    def num_classes(self) -> int | None:
        """C, where it was given; None otherwise."""
        return self._num_classes

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
        raise TypeError(
            f"{name} is a device array: pass the stored entries as host (NumPy) arrays "
            "(with a CUDA student the loss copies them to the device)"
        )
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
    6: 'no stored probability, which tail="renormalize" cannot renormalize',
}


def rows_for(
    top: TopK, lead: tuple[int, ...], n_classes: int, dtype: np.dtype, labels: np.ndarray, options: Any
):
    """(indices [K, N, k] int64, logprobs [K, N, k] of ``dtype``), checked against the
    student's rows ``lead`` and classes ``n_classes``; rows whose label is the
    options' ignore_index are not checked, as the kernels do not read them."""
    if top.lead_shape != tuple(lead):
        raise ValueError(f"TopK rows {top.lead_shape} do not match the student's leading shape {tuple(lead)}")
    if top.num_classes is not None and top.num_classes != n_classes:
        raise ValueError(f"TopK teachers have {top.num_classes} classes; the student has {n_classes}")
    n_rows = math.prod(lead)
    if top.indices.dtype.kind == "u" and top.indices.size and top.indices.max() > np.iinfo(np.int64).max:
        raise ValueError("indices: a class index above the int64 range")
    indices = np.ascontiguousarray(top.indices.reshape(top.num_teachers, n_rows, top.k), dtype=np.int64)
    logprobs = np.ascontiguousarray(top.logprobs.reshape(top.num_teachers, n_rows, top.k), dtype=dtype)
    from numba_kd.cpu import kernels

    checks = (n_classes, ROUNDING_TOLERANCE, bool(options.check_finite), top.tail == "renormalize",
              options.ignore_code)  # fmt: skip
    code, teacher, row, value = kernels.topk_first_problem(indices, logprobs, labels, checks)
    if code:
        where = np.unravel_index(row, lead) if len(lead) > 1 else (row,)
        row_text = ", ".join(str(int(i)) for i in where)
        shown = int(value) if code in (1, 2) else value
        problem = _PROBLEMS[code].format(value=shown, n_classes=n_classes)
        raise ValueError(f"TopK teacher {teacher}, row {row_text}: {problem}")
    return indices, logprobs


# ---------------------------------------------------------------- Parquet files

#: The schema metadata key of numba-kd's top-k Parquet files.
PARQUET_KEY = b"numba_kd.topk"
PARQUET_FORMAT = 1


def parquet_columns(n_teachers: int) -> list[tuple[str, str]]:
    """(indices column, log-probabilities column) of each teacher in a top-k Parquet file."""
    return [(f"teacher{t}_indices", f"teacher{t}_logprobs") for t in range(n_teachers)]


def parquet_module():
    """pyarrow.parquet, imported on first use (the optional "parquet" extra)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError('top-k Parquet files need pyarrow: pip install "numba_kd[parquet]"') from None
    return pq


def read_topk(
    path: str | os.PathLike,
    rows: slice | range | None = None,
    tail: Tail = "bucket",
) -> TopK:
    """Read the top-k teachers of a Parquet file written by ``numba-kd topk``.

    Parameters
    ----------
    path : str or os.PathLike
        The Parquet file.
    rows : slice, range or None, default None
        The rows to read (a contiguous run, step 1); None reads them all.
    tail : {"renormalize", "bucket", "uniform"}, default "bucket"
        The tail rule of the returned TopK.

    Returns
    -------
    TopK
        K teachers' [K, N, k] entries with the file's temperature and number
        of classes. Each column is read without a copy where it is one
        contiguous Arrow buffer (one row group); the K columns are then
        stacked (K N k entries).

    Raises
    ------
    ImportError
        Without pyarrow.
    ValueError
        A file that does not exist, that is not a top-k file of numba-kd, or
        rows outside the file.
    """
    parquet, info = _open_topk(path)
    n_rows = parquet.metadata.num_rows
    if rows is None:
        start, stop = 0, n_rows
    elif isinstance(rows, (slice, range)):
        start, stop, step = (
            rows.indices(n_rows) if isinstance(rows, slice) else (rows.start, rows.stop, rows.step)
        )
        if step != 1 or not 0 <= start <= stop <= n_rows:
            raise ValueError(f"rows must be a contiguous run within the file's {n_rows} rows, got {rows}")
    else:
        raise TypeError(f"rows must be a slice, a range or None, got {type(rows).__name__}")
    # Only the row groups that hold the rows are read.
    groups, first_row, offset = [], 0, 0
    for group in range(parquet.metadata.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        if first_row < stop and first_row + size > start:
            if not groups:
                offset = first_row
            groups.append(group)
        first_row += size
    table = parquet.read_row_groups(groups) if groups else parquet.schema_arrow.empty_table()
    return _topk_of(table.slice(start - offset, stop - start), info, tail)


def iter_topk(path: str | os.PathLike, batch_rows: int, tail: Tail = "bucket"):
    """The rows of a top-k Parquet file as consecutive TopKs of up to ``batch_rows`` rows.

    Reads one batch at a time, so memory is bounded by the batch, not the file.

    Parameters
    ----------
    path : str or os.PathLike
        A Parquet file written by ``numba-kd topk``.
    batch_rows : int
        Rows per TopK, at least 1.
    tail : {"renormalize", "bucket", "uniform"}, default "bucket"
        The tail rule of the TopKs.

    Yields
    ------
    start : int
        The batch's first row.
    top : TopK
        Its entries.

    Raises
    ------
    ImportError
        Without pyarrow.
    ValueError
        A file that is not a top-k file of numba-kd.
    """
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, (int, np.integer)) or batch_rows < 1:
        raise ValueError(f"batch_rows must be an int of at least 1, got {batch_rows!r}")
    parquet, info = _open_topk(path)
    start = 0
    for batch in parquet.iter_batches(batch_size=int(batch_rows)):
        yield start, _topk_of(batch, info, tail)
        start += batch.num_rows


def topk_file_info(path: str | os.PathLike) -> tuple[int, dict]:
    """(rows, metadata) of a top-k Parquet file: the metadata holds num_classes, k,
    temperature, num_teachers, teachers (names) and the writing package's version."""
    parquet, info = _open_topk(path)
    return parquet.metadata.num_rows, info


def _open_topk(path: str | os.PathLike):
    pq = parquet_module()
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"path: {p} is not a file")
    try:
        parquet = pq.ParquetFile(p)
    except Exception as exc:  # pyarrow raises its own error types for a broken file
        raise ValueError(f"path: {p} cannot be read as Parquet ({type(exc).__name__}: {exc})") from None
    return parquet, read_topk_metadata(parquet.schema_arrow.metadata, p)


def _topk_of(table, info: dict, tail: Tail) -> TopK:
    """A TopK of the columns of a pyarrow Table or RecordBatch."""
    k = info["k"]
    indices, logprobs = [], []
    for index_name, logprob_name in parquet_columns(info["num_teachers"]):
        indices.append(_column(table, index_name, k))
        logprobs.append(_column(table, logprob_name, k))
    return TopK(
        np.stack(indices),
        np.stack(logprobs),
        tail=tail,
        temperature=info["temperature"],
        num_classes=info["num_classes"],
    )


def read_topk_metadata(metadata: dict | None, path: Path) -> dict:
    """The numba-kd entry of a Parquet schema's metadata, checked."""
    raw = (metadata or {}).get(PARQUET_KEY)
    if raw is None:
        raise ValueError(f"path: {path} is not a top-k file of numba-kd (no {PARQUET_KEY.decode()} metadata)")
    info = json.loads(raw)
    if info.get("format") != PARQUET_FORMAT:
        raise ValueError(
            f"path: {path} has top-k format {info.get('format')!r}; this version reads {PARQUET_FORMAT}"
        )
    return info


def _column(table, name: str, k: int) -> np.ndarray:
    """A fixed-size-list column as a [rows, k] array (no copy for one contiguous chunk)."""
    column = table.column(name)
    if not hasattr(column, "num_chunks"):  # a RecordBatch's column: one array
        chunk = column
    elif column.num_chunks == 0:
        return np.empty((0, k))
    else:
        chunk = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)

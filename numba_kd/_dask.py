"""Dask arrays: the CPU kernels run once per row block (``dask.array.blockwise``).

``EnsembleDistiller`` and ``DistillationLoss`` send dask inputs here; this module
(and dask) is imported only then.  Rows are independent, so every operation is
exact block by block: inputs are rechunked to one chunk along every axis but
the first (rows) and to the student's row chunks, and

- array results (combines, per-row losses, gradients) are dask arrays with
  those row chunks;
- reduced losses are 0-d dask arrays: per block the soft and hard sums and the
  number of rows not ignored, then one division over their totals, as the
  in-memory mean does (equal to it up to the order of the float64 sums).

Nothing is computed until the caller computes (on any scheduler, for example a
``dask.distributed`` cluster).  ``numba_kd.offline`` builds its cluster jobs
(``scheduler=``) on these functions.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from numba_kd import _arrays, _runtime, _validate
from numba_kd._options import LossComponents

try:
    import dask.array as da
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError('dask inputs need dask[array]: pip install "numba_kd[dask]"') from exc


def _row_chunked(arrays: Sequence[Any], rows: tuple[int, ...]) -> list[Any]:
    """``arrays`` with these row chunks and one chunk along every other axis."""
    return [a.rechunk((rows, *(-1,) * (a.ndim - 1))) for a in arrays]


def _teacher_list(teachers: Any) -> list[Any]:
    if isinstance(teachers, (list, tuple)):
        _validate.some_teachers(len(teachers))
        return [da.asarray(t) for t in teachers]
    stacked = da.asarray(teachers)
    if stacked.ndim < 3:
        raise ValueError(
            f"teachers must be a list of arrays or one array stacking them, got shape {stacked.shape}"
        )
    return [stacked[k] for k in range(stacked.shape[0])]


def _refuse_device_options(device: object, out: object = None) -> None:
    if device not in (None, "cpu"):
        raise ValueError('dask arrays run on the CPU kernels, block by block: device must be None or "cpu"')
    if out is not None:
        raise TypeError("out= is not supported for dask arrays (the result is a new dask array)")


def _result_dtype(*dtypes: Any) -> np.dtype:
    """The dtype of per-row losses: the arithmetic's (float32 unless an input is float64)."""
    dtype = np.result_type(*[np.dtype(d) for d in dtypes])
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _array_dtype(*dtypes: Any) -> np.dtype:
    """The dtype of gradients and combines: the inputs' promoted dtype (16-bit floats stay)."""
    dtype = np.result_type(*[np.dtype(d) for d in dtypes])
    return dtype if dtype.kind == "f" or _arrays.is_bfloat16(dtype) else _result_dtype(dtype)


def _cap_numba_threads() -> None:
    """On a dask.distributed worker, the kernels use at most as many threads as the
    worker has (``--nthreads``), so that a worker's tasks do not oversubscribe the
    cores numba would otherwise spread each of them over."""
    try:
        from distributed import get_worker

        nthreads = get_worker().state.nthreads
    except (ImportError, ValueError):
        return  # not on a distributed worker
    import numba

    numba.set_num_threads(max(1, min(_runtime.num_threads(), int(nthreads))))


def _indices(ndim: int) -> str:
    """Index letters for blockwise: rows first, classes last."""
    return string.ascii_lowercase[:ndim]


# ---------------------------------------------------------------- combines


def combine(call: Any, teachers: Any, device: object, out: object) -> Any:
    """``call(blocks)`` (the in-memory combine of a list of NumPy teacher blocks) over row blocks."""
    _refuse_device_options(device, out)
    arrays = _teacher_list(teachers)
    rows = arrays[0].chunks[0]
    arrays = _row_chunked(arrays, rows)
    index = _indices(arrays[0].ndim)
    dtype = _array_dtype(*[a.dtype for a in arrays])

    def block(*blocks):
        _cap_numba_threads()
        return call(list(blocks))

    pairs = [x for a in arrays for x in (a, index)]
    return da.blockwise(block, index, *pairs, dtype=dtype, meta=np.empty((0,) * len(index), dtype))


# ---------------------------------------------------------------- losses


def loss(
    call: Any,
    student: Any,
    teachers: Any,
    labels: Any,
    want_grad: bool,
    options: dict,
    device: object,
    out: object,
    return_device_scalar: bool,
) -> Any:
    """A loss (or ``(loss, grad)``) of dask inputs.

    ``call(student, teachers, labels, want_grad, **options)`` is the in-memory
    method for one block of NumPy arrays.
    """
    _refuse_device_options(device, out)
    if return_device_scalar:
        raise ValueError("return_device_scalar applies to CUDA inputs only")
    s = da.asarray(student)
    t = _teacher_list(teachers)
    y = da.asarray(labels)
    if s.ndim not in (2, 3):
        raise ValueError(f"student must be a 2-D or 3-D array, got shape {s.shape}")
    if y.ndim != s.ndim - 1:
        raise ValueError(f"labels must have shape {s.shape[:-1]} for student logits of shape {s.shape}")
    rows = s.chunks[0]
    s, *t = _row_chunked([s, *t], rows)
    (y,) = _row_chunked([y], rows)
    index = _indices(s.ndim)
    lead = index[:-1]
    dtype = _result_dtype(s.dtype, *[x.dtype for x in t])
    grad_dtype = _array_dtype(s.dtype, *[x.dtype for x in t])
    arithmetic_dtype = _arrays.arithmetic_dtype(grad_dtype)
    reduction = options.get("reduction", "mean")
    components = options.get("return_components", False)
    ignore_index = options.get("ignore_index")
    block_options = {**options, "return_components": True}
    inputs = [s, index, *[x for a in t for x in (a, index)], y, lead]

    def per_row_block(sb, *rest):
        _cap_numba_threads()
        *tb, yb = rest
        result = call(sb, list(tb), yb, False, **{**block_options, "reduction": "none"})
        return np.stack([result.loss, result.soft, result.hard])

    def sums_block(sb, *rest):
        _cap_numba_threads()
        *tb, yb = rest
        parts = call(sb, list(tb), yb, False, **{**block_options, "reduction": "sum"})
        valid = yb.size if ignore_index is None else int(np.count_nonzero(np.asarray(yb) != ignore_index))
        return np.array([parts.soft, parts.hard, float(valid)]).reshape((3,) + (1,) * len(lead))

    def grad_block(sb, *rest):
        _cap_numba_threads()
        *tb, yb = rest
        if reduction == "none":
            return call(sb, list(tb), yb, True, **options)[1]
        # The block's summed gradient is divided by the row count below: for 16-bit
        # inputs it stays float32 until then (the student's float32 copy is exact and
        # promotes the call), so that the result is rounded to 16 bits once.
        if grad_dtype.itemsize == 2:
            sb = sb.astype(np.float32)
        return call(sb, list(tb), yb, True, **{**options, "reduction": "sum"})[1]

    if reduction == "none":
        stacked = da.blockwise(
            per_row_block, "k" + lead, *inputs, new_axes={"k": 3}, concatenate=True, dtype=dtype,
            meta=np.empty((0,) * (len(lead) + 1), dtype),
        )  # fmt: skip
        result: Any = (stacked[0], stacked[1], stacked[2])
        divisor = None
    else:
        sums = da.blockwise(
            sums_block, "k" + lead, *inputs, new_axes={"k": 3}, concatenate=True, dtype=np.float64,
            adjust_chunks={c: 1 for c in lead}, meta=np.empty((0,) * (len(lead) + 1), np.float64),
        )  # fmt: skip
        totals = sums.reshape((3, -1)).sum(axis=1)
        divisor = da.maximum(totals[2], 1.0) if reduction == "mean" else 1.0
        soft, hard = totals[0] / divisor, totals[1] / divisor
        result = (soft + hard, soft, hard)
    value = LossComponents(*result) if components else result[0]
    if not want_grad:
        return value
    block_dtype = grad_dtype if divisor is None else arithmetic_dtype
    grad = da.blockwise(
        grad_block,
        index,
        *inputs,
        concatenate=True,
        dtype=block_dtype,
        meta=np.empty((0,) * s.ndim, block_dtype),
    )
    if divisor is not None:
        grad = (grad / divisor).astype(grad_dtype)
    return value, grad

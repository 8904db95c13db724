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
``dask.distributed`` cluster).  The functions for files on disk
(``soft_labels``, ``dataset_loss``) back ``numba-kd ... --scheduler ADDRESS``.
"""

from __future__ import annotations

import os
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    import dask
    import dask.array as da
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError('dask inputs need dask[array]: pip install "numba_kd[dask]"') from exc


def is_dask_array(x: object) -> bool:
    return isinstance(x, da.Array)


def _row_chunked(arrays: Sequence[Any], rows: tuple[int, ...]) -> list[Any]:
    """``arrays`` with these row chunks and one chunk along every other axis."""
    return [a.rechunk((rows, *(-1,) * (a.ndim - 1))) for a in arrays]


def _teacher_list(teachers: Any) -> list[Any]:
    if isinstance(teachers, (list, tuple)):
        if len(teachers) == 0:
            raise ValueError("Must have at least one teacher")
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
    dtype = np.result_type(*[np.dtype(d) for d in dtypes])
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _indices(ndim: int) -> str:
    """Index letters for blockwise: rows first, classes last."""
    return string.ascii_lowercase[:ndim]


# ---------------------------------------------------------------- combines


def combine(distiller: Any, teachers: Any, method: str, kwargs: dict, device: object, out: object) -> Any:
    """``distiller.<method>(teachers, **kwargs)`` over row blocks."""
    _refuse_device_options(device, out)
    arrays = _teacher_list(teachers)
    rows = arrays[0].chunks[0]
    arrays = _row_chunked(arrays, rows)
    index = _indices(arrays[0].ndim)
    dtype = _result_dtype(*[a.dtype for a in arrays])

    def block(*blocks):
        return getattr(distiller, method)(list(blocks), **kwargs)

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
    reduction = options.get("reduction", "mean")
    components = options.get("return_components", False)
    ignore_index = options.get("ignore_index")
    block_options = {**options, "return_components": True}
    inputs = [s, index, *[x for a in t for x in (a, index)], y, lead]

    def per_row_block(sb, *rest):
        *tb, yb = rest
        result = call(sb, list(tb), yb, False, **{**block_options, "reduction": "none"})
        return np.stack([result.loss, result.soft, result.hard])

    def sums_block(sb, *rest):
        *tb, yb = rest
        parts = call(sb, list(tb), yb, False, **{**block_options, "reduction": "sum"})
        valid = yb.size if ignore_index is None else int(np.count_nonzero(np.asarray(yb) != ignore_index))
        return np.array([parts.soft, parts.hard, float(valid)]).reshape((3,) + (1,) * len(lead))

    def grad_block(sb, *rest):
        *tb, yb = rest
        block_reduction = "none" if reduction == "none" else "sum"
        _, grad = call(sb, list(tb), yb, True, **{**options, "reduction": block_reduction})
        return grad

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
    value = _components(result) if components else result[0]
    if not want_grad:
        return value
    grad = da.blockwise(
        grad_block, index, *inputs, concatenate=True, dtype=dtype, meta=np.empty((0,) * s.ndim, dtype)
    )
    if divisor is not None:
        grad = (grad / divisor).astype(dtype)
    return value, grad


def _components(parts: tuple) -> Any:
    from numba_kd.distiller import LossComponents

    return LossComponents(*parts)


# ---------------------------------------------------------------- files on disk


def _read_npy_rows(path: str, start: int, stop: int) -> np.ndarray:
    return np.array(np.load(path, mmap_mode="r")[start:stop])


def open_rows(path: str | os.PathLike, chunk_rows: int) -> Any:
    """A dask array over a ``.npy`` file or a Zarr array, ``chunk_rows`` rows per block,
    read by the workers themselves (files must be visible to them)."""
    p = str(Path(path).resolve())
    if p.endswith(".zarr"):
        return da.from_zarr(p).rechunk((chunk_rows, *(-1,) * (len(da.from_zarr(p).shape) - 1)))
    header = np.load(p, mmap_mode="r")
    shape, dtype = header.shape, header.dtype
    del header
    blocks = [
        da.from_delayed(
            dask.delayed(_read_npy_rows)(p, start, min(start + chunk_rows, shape[0])),
            shape=(min(start + chunk_rows, shape[0]) - start, *shape[1:]),
            dtype=dtype,
        )
        for start in range(0, shape[0], chunk_rows)
    ]
    return da.concatenate(blocks, axis=0) if blocks else da.zeros((0, *shape[1:]), dtype=dtype)


class _NpyRows:
    """A ``dask.array.store`` target writing row blocks into an existing ``.npy`` file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        target = np.load(self.path, mmap_mode="r+")
        target[key] = value
        target.flush()
        del target


def _client(scheduler: str):
    try:
        from distributed import Client
    except ImportError:
        raise ImportError('--scheduler needs dask.distributed: pip install "numba_kd[dask]"') from None
    return Client(scheduler)


def soft_labels(
    teachers: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    scheduler: str,
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    combine: str = "logits",
    eps: float = 1e-10,
    chunk_rows: int | None = None,
    dtype: str = "float32",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Any:
    """``offline.soft_labels`` on a dask.distributed cluster: each worker reads its
    row blocks and writes them to OUT's temporary name, renamed when all are done."""
    import time

    from numba_kd import offline

    if resume:
        raise ValueError("--resume works without --scheduler only")
    plan = offline.plan_soft_labels(
        teachers, out, weights, temperature, combine, eps, chunk_rows, dtype, overwrite
    )
    distiller, out_path, rows = plan.distiller, plan.out_path, plan.rows_per_chunk
    n_rows, n_classes, in_dtype = plan.n_rows, plan.n_classes, plan.in_dtype
    del plan
    arrays = [open_rows(t, rows) for t in teachers]
    if combine == "logits":
        result = distiller.combine_teachers(arrays)
    else:
        result = distiller.combine_via_probabilities(arrays, eps)
    result = result.astype(np.dtype(dtype))
    partial = offline._partial_path(out_path)
    start = time.perf_counter()
    with _client(scheduler):
        if offline.is_zarr_path(out_path):
            if partial.exists():
                import shutil

                shutil.rmtree(partial)
            da.to_zarr(result, str(partial))
        else:
            np.lib.format.open_memmap(partial, mode="w+", dtype=np.dtype(dtype), shape=(n_rows, n_classes))
            target = _NpyRows(str(partial.resolve()))
            da.store(result, target, lock=False)
    offline._finish(None, out_path, overwrite)
    seconds = time.perf_counter() - start
    rate = n_rows / max(seconds, 1e-9)
    gb = rate * n_classes * np.dtype(in_dtype).itemsize * len(teachers) / 1e9
    return offline.Summary(n_rows, seconds, rate, gb)


def dataset_loss(
    student: str | os.PathLike,
    teachers: Sequence[str | os.PathLike],
    labels: str | os.PathLike,
    *,
    scheduler: str,
    alpha: float,
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    combine: str = "logits",
    chunk_rows: int | None = None,
) -> dict[str, float | int]:
    """``offline.dataset_loss`` on a dask.distributed cluster."""
    from numba_kd import offline

    local = [offline.open_input(p, name) for p, name in [(student, "student")] + [
        (t, f"teachers[{k}]") for k, t in enumerate(teachers)
    ]]  # fmt: skip
    n_rows, n_classes, in_dtype = offline._check_logits(
        local, ["student"] + [f"teachers[{k}]" for k in range(len(teachers))]
    )
    offline._read_labels(labels, n_rows)
    del local
    distiller = offline._ensemble(weights, len(teachers), temperature)
    rows = offline.chunk_rows_for(len(teachers) + 1, n_classes, np.dtype(in_dtype).itemsize, chunk_rows)
    s = open_rows(student, rows)
    t = [open_rows(p, rows) for p in teachers]
    y = open_rows(labels, rows)
    parts = distiller.distillation_loss(s, t, y, alpha, combine=combine, return_components=True)
    with _client(scheduler):
        loss_value, soft, hard = dask.compute(*parts)
    return {"loss": float(loss_value), "soft": float(soft), "hard": float(hard), "rows": n_rows}

"""Offline distillation at dataset scale: teacher logits on disk, streamed by rows.

``soft_labels`` combines K teachers' logits (``.npy`` files or Zarr arrays, each
``[N, C]``) into one soft-label array on disk; ``dataset_loss`` reports the
ensemble distillation loss of a student's logits over a whole dataset.  Both
read row chunks through the fused kernels, so memory use is set by the chunk
size, not by the dataset: memory-mapped pages are released after each chunk.

Outputs are written under a temporary name next to the final one and renamed
on success, so an interrupted run never leaves a half-written file under the
final name.  A Zarr output records the rows it has completed; ``resume=True``
continues an interrupted run from there.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from numba_kd import __version__, _validate, reference, sparse
from numba_kd.distiller import EnsembleDistiller

# Input bytes per chunk when --chunk-rows is not given.
DEFAULT_CHUNK_BYTES = 256 << 20
OUTPUT_DTYPES = ("float32", "float16")


def is_zarr_path(path: str | os.PathLike) -> bool:
    """Whether a path names a Zarr array: it ends in ``.zarr`` (trailing slashes ignored).

    Parameters
    ----------
    path : str or os.PathLike
        Any path; it need not exist.

    Returns
    -------
    bool
        True for a Zarr path, False otherwise (e.g. for a ``.npy`` file).

    Examples
    --------
    >>> from numba_kd.offline import is_zarr_path
    >>> is_zarr_path("teacher0.zarr/"), is_zarr_path("teacher0.npy")
    (True, False)
    """
    return str(path).rstrip("/").endswith(".zarr")


def _partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def open_input(path: str | os.PathLike, name: str) -> Any:
    """A read-only view of an input array on disk: a memory-mapped ``.npy`` file or a Zarr array.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.npy`` file, or a Zarr array (a path ending in ``.zarr``).
    name : str
        The argument's name in error messages, e.g. ``"teachers[0]"``.

    Returns
    -------
    numpy.memmap or zarr.Array
        The array, opened read-only; nothing is read yet.

    Raises
    ------
    ValueError
        A path that does not exist, that is neither ``.npy`` nor ``.zarr``, or
        that cannot be read as an array (an empty or truncated file, a
        directory named ``.npy``, no permission).
    ImportError
        A Zarr path without the zarr package.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{name}: {p} does not exist")
    if not (is_zarr_path(p) or p.suffix == ".npy"):
        raise ValueError(f"{name}: {p} is neither a .npy file nor a .zarr array")
    if p.suffix == ".npy" and p.is_dir():
        raise ValueError(f"{name}: {p} is a directory, not a .npy file")
    zarr = _zarr() if is_zarr_path(p) else None
    try:
        return zarr.open_array(str(p), mode="r") if zarr is not None else np.load(p, mmap_mode="r")
    except (OSError, EOFError, ValueError) as exc:
        # An empty or truncated .npy file, an unreadable path, a broken Zarr array.
        raise ValueError(f"{name}: {p} cannot be read as an array ({type(exc).__name__}: {exc})") from None


def _zarr():
    try:
        import zarr
    except ImportError:
        raise ImportError('Zarr arrays need the zarr package: pip install "numba_kd[dask]"') from None
    return zarr


def _release(*arrays: Any) -> None:
    """Drop the pages of memory-mapped arrays from this process (data stays on disk)."""
    for arr in arrays:
        mapping = getattr(arr, "_mmap", None)
        if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)


def _read_rows(arrays: Sequence[Any], start: int, stop: int, buffers: list[np.ndarray]) -> list[np.ndarray]:
    """Rows [start, stop) of each array, copied into its buffer.

    A sequential copy out of a memory map is several times faster than letting
    the kernels' threads fault the mapped pages in themselves."""
    views = []
    for arr, buffer in zip(arrays, buffers, strict=True):
        view = buffer[: stop - start]
        np.copyto(view, arr[start:stop], casting="no")
        views.append(view)
    return views


def _buffers(arrays: Sequence[Any], rows: int) -> list[np.ndarray]:
    return [np.empty((rows, *a.shape[1:]), dtype=a.dtype) for a in arrays]


def _zero_rows(buffers: list[np.ndarray]) -> list[np.ndarray]:
    """One row of zeros of each buffer's dtype and layout: a kernel call on them
    compiles the specialization the chunks will use."""
    return [np.zeros((1, *b.shape[1:]), dtype=b.dtype) for b in buffers]


def _check_logits(arrays: Sequence[Any], names: Sequence[str]) -> tuple[int, int, np.dtype]:
    """(rows, classes, dtype) of the teachers' (or student's) logit arrays."""
    shapes = {tuple(a.shape) for a in arrays}
    for a, name in zip(arrays, names, strict=True):
        if len(a.shape) != 2:
            raise ValueError(f"{name} must be a 2-D [rows, classes] array, got shape {tuple(a.shape)}")
        _validate.float_dtype(np.dtype(a.dtype), name)
    if len(shapes) > 1:
        raise ValueError(f"All teacher logits must have the same shape, got {sorted(shapes)}")
    rows, classes = arrays[0].shape
    if classes == 0:
        raise ValueError(f"{names[0]} must have at least one class")
    return int(rows), int(classes), np.result_type(*[np.dtype(a.dtype) for a in arrays])


def chunk_rows_for(n_arrays: int, n_classes: int, itemsize: int, chunk_rows: int | None) -> int:
    """The number of rows read per step: ``chunk_rows`` when given, else about 256 MB of input.

    Parameters
    ----------
    n_arrays : int
        The number of [N, C] arrays read per step.
    n_classes : int
        C, the number of classes.
    itemsize : int
        Bytes per element of the input arrays.
    chunk_rows : int or None
        Rows per step as asked for, at least 1; None picks
        ``DEFAULT_CHUNK_BYTES // (n_arrays * n_classes * itemsize)`` (at least 1).

    Returns
    -------
    int
        Rows per step, at least 1.

    Raises
    ------
    ValueError
        A ``chunk_rows`` below 1.

    Examples
    --------
    >>> from numba_kd.offline import chunk_rows_for
    >>> chunk_rows_for(4, 1000, 4, None), chunk_rows_for(4, 1000, 4, 512)
    (16777, 512)
    """
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        return int(chunk_rows)
    return max(1, DEFAULT_CHUNK_BYTES // max(1, n_arrays * n_classes * itemsize))


class Progress:
    """The rows done and the rates of a job, with a tqdm bar on stderr when it is a terminal.

    The bar shows rows, rows/s, GB/s of input read and the time left. The
    clock starts when the Progress is made, after the kernels have compiled,
    so that the rates exclude compile time.

    Parameters
    ----------
    total_rows : int
        The rows the job will process.
    bytes_per_row : int
        Input bytes read per row (all arrays together), for the GB/s rate.
    enabled : bool
        Show the bar (when stderr is a terminal); False never shows it.
    label : str
        The bar's description, e.g. ``"soft-labels"``.
    """

    def __init__(self, total_rows: int, bytes_per_row: int, enabled: bool, label: str) -> None:
        self.bytes_per_row = bytes_per_row
        self.done = 0
        self.bar = tqdm(
            total=total_rows, desc=label, unit="rows", unit_scale=True, file=sys.stderr,
            disable=None if enabled else True, dynamic_ncols=True,
        )  # fmt: skip
        self.start = time.perf_counter()

    def rates(self) -> tuple[float, float]:
        """The rates since the clock started.

        Returns
        -------
        rows_per_second : float
            Rows done per second.
        gb_per_second : float
            GB (1e9 bytes) of input read per second.
        """
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.done / elapsed, self.done * self.bytes_per_row / elapsed / 1e9

    def update(self, rows: int) -> None:
        """Count rows as done and advance the bar.

        Parameters
        ----------
        rows : int
            The rows just completed.

        Returns
        -------
        None
        """
        self.done += rows
        self.bar.set_postfix_str(f"{self.rates()[1]:.2f} GB/s", refresh=False)
        self.bar.update(rows)

    def close(self) -> None:
        """Close the bar (the counts and the clock stay readable).

        Returns
        -------
        None
        """
        self.bar.close()


@dataclass
class Summary:
    """What a soft_labels run did: rows written, seconds, and its rates.

    The rates (rows per second and GB of teacher logits read per second) of a
    local run are measured after the kernels compiled.

    Parameters
    ----------
    rows : int
        Rows written by this run (after a resume, the rows it added).
    seconds : float
        Wall time of the run; in a local run it excludes the kernels' compile time.
    rows_per_second : float
        Rows written per second.
    gb_per_second : float
        GB (1e9 bytes) of teacher logits read per second.
    """

    rows: int
    seconds: float
    rows_per_second: float
    gb_per_second: float


# ---------------------------------------------------------------- soft labels


def _ensemble(weights: Sequence[float] | None, n_teachers: int, temperature: float) -> EnsembleDistiller:
    """The distiller for ``n_teachers`` teachers (equal weights by default)."""
    if weights is None:
        return EnsembleDistiller.uniform(n_teachers, temperature)
    distiller = EnsembleDistiller(list(weights), temperature)
    if distiller.num_teachers != n_teachers:
        raise ValueError(
            f"Number of teachers must match number of weights: {n_teachers} teachers, "
            f"{distiller.num_teachers} weights"
        )
    return distiller


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file or directory (resolved, or the same inode)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_output_path(out_path: Path, inputs: Sequence[str | os.PathLike], overwrite: bool) -> None:
    """An output path that can be written without losing anything the run was not asked to replace."""
    for k, path in enumerate(inputs):
        if _same_file(out_path, Path(path)):
            raise ValueError(f"out: {out_path} is teachers[{k}]; an output never replaces an input")
    parent = out_path.parent
    if not parent.is_dir():
        raise ValueError(f"out: the directory {parent} does not exist")
    if out_path.exists() and not overwrite:
        raise ValueError(f"out: {out_path} exists (pass overwrite=True / --overwrite to replace it)")
    if out_path.exists() and out_path.is_dir() != is_zarr_path(out_path):
        kind = "a directory" if out_path.is_dir() else "a file"
        raise ValueError(
            f"out: {out_path} exists and is {kind}; --overwrite replaces only an output of its kind"
        )


def _check_partial(out_path: Path, overwrite: bool, shape: tuple[int, int], dtype: np.dtype) -> None:
    """OUT.partial may be replaced only when it is this tool's: a Zarr array it marked,
    or, with overwrite, an array of exactly this output's shape and dtype (a .npy run,
    which cannot be marked, killed before it could clean up)."""
    partial = _partial_path(out_path)
    if not (partial.exists() or partial.is_symlink()):
        return
    marked, same_shape = _partial_kind(partial, out_path, shape, dtype)
    if marked or (overwrite and same_shape):
        return
    hint = "" if overwrite or not same_shape else " (if an interrupted run left it, pass --overwrite)"
    raise ValueError(
        f"out: {partial} exists and is not a temporary output of numba-kd that this run may "
        f"replace; remove it or choose another out{hint}"
    )


def _partial_kind(
    partial: Path, out_path: Path, shape: tuple[int, int], dtype: np.dtype
) -> tuple[bool, bool]:
    """(ours to replace, an array of this shape and dtype) for an existing OUT.partial:
    a Zarr array this tool marked, or an empty directory or file, which holds nothing
    to lose (what a run killed while it created its output leaves)."""
    if partial.is_symlink():
        return False, False
    if _holds_nothing(partial):
        return True, False
    try:
        if is_zarr_path(out_path):
            if not partial.is_dir():
                return False, False
            arr = _zarr().open_array(str(partial), mode="r")
            marked = "numba_kd" in arr.attrs
        else:
            if not partial.is_file():
                return False, False
            arr = np.load(partial, mmap_mode="r")
            marked = False
    except (OSError, EOFError, ValueError, KeyError):
        return False, False
    return marked, tuple(arr.shape) == tuple(shape) and np.dtype(arr.dtype) == dtype


def _holds_nothing(path: Path) -> bool:
    """Whether ``path`` is an empty directory or an empty regular file (not a link)."""
    try:
        if path.is_symlink():
            return False
        if path.is_dir():
            return next(path.iterdir(), None) is None
        return path.is_file() and path.stat().st_size == 0
    except OSError:
        return False


def _remove(path: Path) -> None:
    """Delete ``path``: a directory with its contents, a file or a link (nothing if absent)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _reserve(path: Path, n_bytes: int) -> None:
    """Allocate the file's blocks now, so that a full disk fails here with ENOSPC
    instead of with SIGBUS while the memory map is written."""
    if not hasattr(os, "posix_fallocate") or n_bytes == 0:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, n_bytes)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return  # a filesystem that cannot reserve: writes report a full disk themselves
        raise OSError(
            exc.errno, f"out: cannot reserve {n_bytes:,} bytes for {path}: {exc.strerror}"
        ) from None
    finally:
        os.close(fd)


def _create_output(path: Path, shape: tuple[int, int], dtype: np.dtype, chunk_rows: int, attrs: dict):
    """A new output array under its temporary name, replacing what _check_partial
    allowed to be replaced there."""
    partial = _partial_path(path)
    _remove(partial)
    if is_zarr_path(path):
        zarr = _zarr()
        return zarr.create_array(
            str(partial), shape=shape, chunks=(chunk_rows, shape[1]), dtype=dtype, fill_value=0,
            attributes={"numba_kd": {**attrs, "completed_rows": 0}},
        )  # fmt: skip
    arr = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)
    try:
        _reserve(partial, os.path.getsize(partial))
    except OSError:
        del arr
        partial.unlink()
        raise
    return arr


def _resumed_output(path: Path, attrs: dict):
    """The partial Zarr output of an interrupted run with the same settings, and its
    completed row count."""
    zarr = _zarr()
    partial = _partial_path(path)
    if not partial.exists():
        raise ValueError(f"--resume: no interrupted run to resume ({partial} does not exist)")
    arr = zarr.open_array(str(partial), mode="r+")
    saved = dict(arr.attrs.get("numba_kd", {}))
    completed = int(saved.pop("completed_rows", 0))
    if saved != attrs:
        raise ValueError(
            f"--resume: {partial} was written with other settings ({json.dumps(saved)}); "
            "start again without --resume"
        )
    if completed >= arr.shape[0]:
        # A complete output under the temporary name: an earlier output that an
        # interrupted --overwrite swapped out, never one to put back.
        raise ValueError(f"--resume: {partial} holds no interrupted run; start again without --resume")
    return arr, completed


@dataclass
class SoftLabelPlan:
    """The validated inputs and settings of a soft-label run; nothing is written yet.

    Parameters
    ----------
    arrays : list of K arrays, each [N, C]
        The teachers' logits, opened read-only (memory-mapped ``.npy`` files
        or Zarr arrays).
    out_path : pathlib.Path
        The output path, ``.npy`` or ``.zarr``.
    distiller : EnsembleDistiller
        The weights and temperature of the run.
    n_rows : int
        N, the number of rows.
    n_classes : int
        C, the number of classes.
    in_dtype : numpy.dtype
        The teachers' promoted floating dtype.
    rows_per_chunk : int
        Rows read per step.
    out_dtype : numpy.dtype
        The output dtype, float32 or float16.
    """

    arrays: list[Any]
    out_path: Path
    distiller: EnsembleDistiller
    n_rows: int
    n_classes: int
    in_dtype: np.dtype
    rows_per_chunk: int
    out_dtype: np.dtype


def plan_soft_labels(
    teachers: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    weights: Sequence[float] | None,
    temperature: float,
    combine: str,
    eps: float,
    chunk_rows: int | None,
    dtype: str,
    overwrite: bool,
) -> SoftLabelPlan:
    """Every check of a soft-label run, made before anything is written.

    Parameters
    ----------
    teachers : sequence of paths
        K teacher logit arrays, each [N, C]: ``.npy`` files or Zarr arrays.
    out : str or os.PathLike
        The output path, ending in ``.npy`` or ``.zarr``.
    weights : sequence of float or None
        One weight per teacher; None gives equal weights.
    temperature : float
        The softmax temperature T.
    combine : str, one of {"logits", "probs"}
        How the teachers are combined, as in soft_labels.
    eps : float
        Added to the probability mixture; checked (finite, >= 0) with
        combine="probs" only.
    chunk_rows : int or None
        Rows read per step; None picks about 256 MB of input.
    dtype : str, one of {"float32", "float16"}
        The output dtype.
    overwrite : bool
        Whether an existing ``out`` may be replaced.

    Returns
    -------
    SoftLabelPlan
        The opened inputs and the settings of the run.

    Raises
    ------
    TypeError
        Logits that are not floating point, or weights or a temperature that
        are not real numbers.
    ValueError
        No teachers, an unknown combine or dtype, an output path that is
        neither ``.npy`` nor ``.zarr``, an existing ``out`` without overwrite,
        a missing input, inputs that are not 2-D or whose shapes differ, no
        classes, a number of weights other than K, invalid weights or
        temperature, a negative or non-finite eps, or a chunk_rows below 1.
    ImportError
        A Zarr path without the zarr package.
    """
    if combine not in ("logits", "probs"):
        raise ValueError(f"combine must be 'logits' or 'probs'; got {combine!r}")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {OUTPUT_DTYPES}; got {dtype!r}")
    _validate.some_teachers(len(teachers))
    out_path = Path(out)
    if not (is_zarr_path(out_path) or out_path.suffix == ".npy"):
        raise ValueError(f"out: {out_path} must end in .npy or .zarr")
    _check_output_path(out_path, teachers, overwrite)
    arrays = [open_input(t, f"teachers[{k}]") for k, t in enumerate(teachers)]
    n_rows, n_classes, in_dtype = _check_logits(arrays, [f"teachers[{k}]" for k in range(len(arrays))])
    distiller = _ensemble(weights, len(arrays), temperature)
    if combine == "probs" and not (eps >= 0.0 and np.isfinite(eps)):
        raise ValueError(f"eps must be finite and non-negative, got {eps}")
    rows_per_chunk = chunk_rows_for(len(arrays), n_classes, np.dtype(in_dtype).itemsize, chunk_rows)
    _check_partial(out_path, overwrite, (n_rows, n_classes), np.dtype(dtype))
    return SoftLabelPlan(
        arrays, out_path, distiller, n_rows, n_classes, in_dtype, rows_per_chunk, np.dtype(dtype)
    )


def soft_labels(
    teachers: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    combine: str = "logits",
    eps: float = 1e-10,
    chunk_rows: int | None = None,
    dtype: str = "float32",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    on_chunk: Callable[[int], None] | None = None,
    scheduler: str | None = None,
) -> Summary:
    """Combine teacher logit files into one soft-label file, streaming row chunks.

    Everything is validated before anything is written; the output is written
    under ``OUT.partial`` and renamed when complete.

    Parameters
    ----------
    teachers : sequence of paths
        K teacher logit arrays, each [N, C]: ``.npy`` files (read memory-mapped)
        or Zarr arrays (paths ending in ``.zarr``).
    out : path
        The soft labels, [N, C]: a ``.npy`` file or a Zarr array (``.zarr``).
    weights : sequence of float, optional
        One weight per teacher (normalized to sum 1); equal weights by default.
    temperature : float, default 1.0
        The softmax temperature T.
    combine : {"logits", "probs"}, default "logits"
        ``sum_k w_k t_k``, or ``T log(sum_k w_k softmax(t_k / T) + eps)``.
    eps : float, default 1e-10
        Added to the probability mixture with combine="probs"; 0 gives the exact
        log-mixture.
    chunk_rows : int, optional
        Rows read per step; by default about 256 MB of input. Memory grows with
        it, not with the dataset.
    dtype : {"float32", "float16"}, default "float32"
        The output dtype.
    resume : bool, default False
        Continue an interrupted Zarr output from its last complete chunk (the
        settings must match the interrupted run's).
    overwrite : bool, default False
        Replace ``out`` if it exists; without it an existing ``out`` raises
        ValueError.
    progress : bool, default False
        Show a progress bar on stderr when it is a terminal.
    on_chunk : callable, optional
        Called with the number of rows done after each chunk (local runs).
    scheduler : str, optional
        A dask.distributed scheduler address: the row chunks then run on that
        cluster's workers, which read and write the files themselves.

    Returns
    -------
    Summary
        Rows written, seconds and rates.

    Raises
    ------
    TypeError
        Logits that are not floating point.
    ValueError
        Inputs that do not match, an existing ``out`` without overwrite, an
        unknown option, or a resume whose settings differ.
    """
    if scheduler is not None:
        if on_chunk is not None:
            raise ValueError("on_chunk works without a scheduler only")
        return _soft_labels_on_cluster(
            teachers, out, scheduler=scheduler, weights=weights, temperature=temperature, combine=combine,
            eps=eps, chunk_rows=chunk_rows, dtype=dtype, resume=resume, overwrite=overwrite,
            progress=progress,
        )  # fmt: skip
    plan = plan_soft_labels(teachers, out, weights, temperature, combine, eps, chunk_rows, dtype, overwrite)
    if resume and not is_zarr_path(plan.out_path):
        raise ValueError("--resume needs a Zarr output (a path ending in .zarr)")
    arrays, out_path, distiller = plan.arrays, plan.out_path, plan.distiller
    n_rows, n_classes, in_dtype = plan.n_rows, plan.n_classes, plan.in_dtype
    rows_per_chunk, out_dtype = plan.rows_per_chunk, plan.out_dtype
    attrs = _settings(plan, teachers, combine, eps)
    # Everything from here on may leave a temporary output behind: on any error or
    # interruption (KeyboardInterrupt too) a .npy one is removed, a Zarr one kept.
    result = None
    try:
        if resume and not _holds_nothing(_partial_path(out_path)):
            result, start_row = _resumed_output(out_path, attrs)
        else:
            result, start_row = (
                _create_output(out_path, (n_rows, n_classes), out_dtype, rows_per_chunk, attrs),
                0,
            )
        compute_dtype = np.dtype(np.float64) if in_dtype == np.float64 else np.dtype(np.float32)
        buffer = np.empty((rows_per_chunk, n_classes), dtype=compute_dtype)
        inputs = _buffers(arrays, min(rows_per_chunk, n_rows))
        bytes_per_row = n_classes * sum(np.dtype(a.dtype).itemsize for a in arrays)
        # The kernels compile (or load from the cache) on one row of zeros of the
        # chunks' types before the clock starts.
        if combine == "logits":
            distiller.combine_teachers(_zero_rows(inputs), out=buffer[:1])
        else:
            distiller.combine_via_probabilities(_zero_rows(inputs), eps, out=buffer[:1])
        bar = Progress(n_rows - start_row, bytes_per_row, progress, "soft-labels")
        for start in range(start_row, n_rows, rows_per_chunk):
            stop = min(start + rows_per_chunk, n_rows)
            block = _read_rows(arrays, start, stop, inputs)
            target = buffer[: stop - start]
            if combine == "logits":
                distiller.combine_teachers(block, out=target)
            else:
                distiller.combine_via_probabilities(block, eps, out=target)
            result[start:stop] = target if out_dtype == compute_dtype else _narrowed(target, out_dtype, start)
            if is_zarr_path(out_path):
                meta = dict(result.attrs["numba_kd"])
                meta["completed_rows"] = stop
                result.attrs["numba_kd"] = meta
            # Unmapping written pages keeps them in the page cache, to be written back
            # later; the one flush happens before the rename.
            _release(result, *arrays)
            bar.update(stop - start)
            if on_chunk is not None:
                on_chunk(stop)
        bar.close()
        _finish(result, out_path, overwrite)
    except BaseException as exc:
        partial = _partial_path(out_path)
        if not is_zarr_path(out_path):
            # A .npy output cannot be resumed: its temporary file goes.  A Zarr one
            # stays for resume=True.
            del result
            try:
                partial.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only file system: report the error that stopped the run
        if isinstance(exc, OSError):
            kept = ""
            if is_zarr_path(out_path) and partial.is_dir():
                kept = f"; {partial} is kept: resume=True / --resume continues it"
            raise OSError(exc.errno, f"out: writing {partial} stopped: {exc.strerror or exc}{kept}") from exc
        raise
    rows_per_s, gb_per_s = bar.rates()
    return Summary(n_rows - start_row, time.perf_counter() - bar.start, rows_per_s, gb_per_s)


def _settings(plan: SoftLabelPlan, teachers: Sequence[str | os.PathLike], combine: str, eps: float) -> dict:
    """The settings a soft-label output is marked with (and a resume must match)."""
    return {
        "teachers": [str(Path(t).resolve()) for t in teachers],
        "weights": plan.distiller.weights.tolist(),
        "temperature": plan.distiller.temperature,
        "combine": combine,
        "eps": float(eps),
        "dtype": plan.out_dtype.name,
        "chunk_rows": plan.rows_per_chunk,
        "shape": [plan.n_rows, plan.n_classes],
    }


def _narrowed(block: np.ndarray, dtype: np.dtype, first_row: int) -> np.ndarray:
    """``block`` cast to the output dtype; a finite value that the cast would turn into
    an infinity (|x| above float16's 65504) is an error, not a silent inf."""
    with np.errstate(over="ignore"):  # reported below, with the row
        cast = block.astype(dtype)
    overflow = np.isinf(cast) & np.isfinite(block)
    if overflow.any():
        row = first_row + int(np.flatnonzero(overflow.any(axis=1))[0])
        raise ValueError(
            f"dtype: {int(np.count_nonzero(overflow))} values from row {row} on exceed the {dtype.name} "
            f"range (largest {np.finfo(dtype).max:g}); write dtype='float32' (--dtype float32)"
        )
    return cast


def _narrowed_block(block: np.ndarray, dtype: np.dtype, block_info: dict | None = None) -> np.ndarray:
    """_narrowed for one block of a dask array (``block_info`` gives its first row)."""
    first_row = block_info[0]["array-location"][0][0] if block_info else 0
    return _narrowed(block, dtype, first_row)


def _finish(result: Any, out_path: Path, overwrite: bool) -> None:
    """Move the completed output from its temporary name to ``out_path``.

    A file replaces the old one in one atomic rename.  A Zarr directory swaps
    places with the old one in one atomic exchange where the system has one
    (Linux); elsewhere the old one is renamed aside, the new one renamed in, and
    only then is the old one deleted.  Either way the old output is never lost
    before the new one is in place.
    """
    partial = _partial_path(out_path)
    if isinstance(result, np.memmap):
        result.flush()
        del result
    if not (overwrite and out_path.is_dir()):
        os.replace(partial, out_path)
        return
    aside = out_path.with_name(f"{out_path.name}.replaced-{os.getpid()}")
    if _exchange(partial, out_path):
        os.replace(partial, aside)  # the old output, swapped out, off the temporary name
    else:
        os.replace(out_path, aside)
        os.replace(partial, out_path)
    try:
        shutil.rmtree(aside)
    except OSError as exc:
        # The new output is in place: the run succeeded; the old one is left to the user.
        print(f"numba-kd: warning: could not delete the replaced output {aside}: {exc}", file=sys.stderr)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE);
    False where the system or the filesystem cannot."""
    if sys.platform != "linux":
        return False
    import ctypes

    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    at_cwd, exchange = -100, 2
    if rename(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


# ---------------------------------------------------------------- dataset loss


def _read_labels(path: str | os.PathLike, n_rows: int) -> Any:
    labels = open_input(path, "labels")
    if len(labels.shape) != 1 or labels.shape[0] != n_rows:
        raise ValueError(f"labels must be a 1-D array of {n_rows} entries, got shape {tuple(labels.shape)}")
    if np.dtype(labels.dtype).kind not in "iu":
        _validate.integer_labels(labels.dtype)
    return labels


def dataset_loss(
    student: str | os.PathLike,
    teachers: Sequence[str | os.PathLike],
    labels: str | os.PathLike,
    *,
    alpha: float,
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    combine: str = "logits",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    scale_by_t2: bool = True,
    teacher_weighting: str = "static",
    ignore_index: int | None = None,
    chunk_rows: int | None = None,
    progress: bool = False,
    scheduler: str | None = None,
) -> dict[str, float | int]:
    """The ensemble distillation loss of a student over a dataset on disk.

    Per chunk the soft and hard parts are summed (reduction="sum"), then the
    totals are divided once by the number of rows not ignored, as the
    in-memory mean does.

    Parameters
    ----------
    student : path
        The student's logits, [N, C]: ``.npy`` or Zarr.
    teachers : sequence of paths
        K teacher logit arrays, each [N, C].
    labels : path
        Integer labels, [N].
    alpha : float
        Weight of the soft term, in [0, 1].
    weights : sequence of float, optional
        One weight per teacher; equal weights by default.
    temperature : float, default 1.0
        The softmax temperature T.
    combine : {"logits", "probs"}, default "logits"
        The target, as in EnsembleDistiller.distillation_loss.
    divergence : str, default "forward_kl"
        As in EnsembleDistiller.distillation_loss, with its ``beta`` (JSD)
        and ``skew`` (skew KLs).
    beta : float, default 0.5
        The JSD weight.
    skew : float, default 0.1
        The skew KLs' lambda.
    scale_by_t2 : bool, default True
        Scale the soft term by T^2 (entrenar's convention).
    teacher_weighting : {"static", "confidence", "entropy"}, default "static"
        Per-row teacher weights, as in EnsembleDistiller.distillation_loss.
    ignore_index : int, optional
        Rows with this label add nothing and do not count in the mean.
    chunk_rows : int, optional
        Rows read per step; by default about 256 MB of input.
    progress : bool, default False
        Show a progress bar on stderr when it is a terminal.
    scheduler : str, optional
        A dask.distributed scheduler address: the chunks then run on that
        cluster's workers.

    Returns
    -------
    dict
        ``{"loss": float, "soft": float, "hard": float, "rows": int}``
        (``rows``: the rows read, ignored ones included).

    Raises
    ------
    TypeError
        Logits that are not floating point, labels that are not integers, or
        an option of the wrong type.
    ValueError
        Inputs that do not match, labels outside [0, C), alpha outside [0, 1],
        or an unknown option value.
    """
    options = {
        "combine": combine, "divergence": divergence, "beta": beta, "skew": skew,
        "scale_by_t2": scale_by_t2, "teacher_weighting": teacher_weighting, "ignore_index": ignore_index,
    }  # fmt: skip
    # Checked before any file is opened.
    _validate.loss_options(reduction="sum", return_components=True, check_finite=False, **options)
    if scheduler is not None:
        return _dataset_loss_on_cluster(
            student, teachers, labels, scheduler=scheduler, alpha=alpha, weights=weights,
            temperature=temperature, options=options, chunk_rows=chunk_rows, progress=progress,
        )  # fmt: skip
    _validate.some_teachers(len(teachers))
    s = open_input(student, "student")
    arrays = [open_input(t, f"teachers[{k}]") for k, t in enumerate(teachers)]
    n_rows, n_classes, _ = _check_logits(
        [s, *arrays], ["student", *[f"teachers[{k}]" for k in range(len(arrays))]]
    )
    if n_rows == 0:
        raise ValueError("student logits must have at least one row: the mean over rows is undefined")
    y = _read_labels(labels, n_rows)
    distiller = _ensemble(weights, len(arrays), temperature)
    itemsize = max(np.dtype(a.dtype).itemsize for a in [s, *arrays])
    rows_per_chunk = chunk_rows_for(len(arrays) + 1, n_classes, itemsize, chunk_rows)
    bytes_per_row = n_classes * sum(np.dtype(a.dtype).itemsize for a in [s, *arrays])
    inputs = _buffers([s, *arrays, y], min(rows_per_chunk, n_rows))
    warm_s, *warm_t, warm_y = _zero_rows(inputs)
    distiller.distillation_loss(
        warm_s, warm_t, warm_y, alpha, reduction="sum", return_components=True, **options
    )
    bar = Progress(n_rows, bytes_per_row, progress, "loss")
    soft_total = 0.0
    hard_total = 0.0
    counted = 0
    for start in range(0, n_rows, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_rows)
        block_s, *block_t, block_y = _read_rows([s, *arrays, y], start, stop, inputs)
        parts = distiller.distillation_loss(
            block_s, block_t, block_y, alpha, reduction="sum", return_components=True, **options
        )
        soft_total += parts.soft
        hard_total += parts.hard
        counted += _counted_rows(block_y, ignore_index)
        _release(s, y, *arrays)
        bar.update(stop - start)
    bar.close()
    soft, hard = soft_total / max(counted, 1), hard_total / max(counted, 1)
    return {"loss": soft + hard, "soft": soft, "hard": hard, "rows": n_rows}


def _counted_rows(labels: np.ndarray, ignore_index: int | None) -> int:
    """The rows of a chunk that count in the mean: those whose label is not ignore_index."""
    return len(labels) if ignore_index is None else int(np.count_nonzero(labels != ignore_index))


# ---------------------------------------------------------------- on a dask.distributed cluster


def _read_npy_rows(path: str, start: int, stop: int) -> np.ndarray:
    return np.array(np.load(path, mmap_mode="r")[start:stop])


def open_rows(path: str | os.PathLike, chunk_rows: int) -> Any:
    """A lazy dask array over a ``.npy`` file or a Zarr array, ``chunk_rows`` rows per block.

    The blocks are read by the workers themselves, so the files must be
    visible to them (the path is made absolute here).

    Parameters
    ----------
    path : str or os.PathLike
        A ``.npy`` file, or a Zarr array (a path ending in ``.zarr``).
    chunk_rows : int
        Rows per block (the last block may be shorter), at least 1.

    Returns
    -------
    dask.array.Array
        The array, of the file's shape and dtype, chunked along the rows only.

    Raises
    ------
    ImportError
        dask is not installed.
    FileNotFoundError
        A ``.npy`` path that does not exist.
    """
    dask, da = _dask_modules()
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


def _dask_modules():
    try:
        import dask
        import dask.array as da
    except ImportError:
        raise ImportError('scheduler= needs dask[array]: pip install "numba_kd[dask]"') from None
    return dask, da


def _run_on_cluster(client: Any, work: Any, progress: bool) -> Any:
    """Compute ``work`` (a dask collection, or a list of them) on the cluster, with
    distributed's own progress bar when asked for and stdout is a terminal."""
    futures = client.compute(work)
    if progress and sys.stdout.isatty():
        from distributed import progress as show_progress

        show_progress(futures)
    return client.gather(futures)


def _client(scheduler: str):
    try:
        from distributed import Client
    except ImportError:
        raise ImportError('scheduler= needs dask.distributed: pip install "numba_kd[dask]"') from None
    return Client(scheduler)


def _soft_labels_on_cluster(
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
) -> Summary:
    """``soft_labels`` on a dask.distributed cluster: each worker reads its
    row blocks and writes them to OUT's temporary name, renamed when all are done."""
    _, da = _dask_modules()
    if resume:
        raise ValueError("resume works without a scheduler only")
    plan = plan_soft_labels(teachers, out, weights, temperature, combine, eps, chunk_rows, dtype, overwrite)
    distiller, out_path, rows = plan.distiller, plan.out_path, plan.rows_per_chunk
    n_rows, n_classes, in_dtype, out_dtype = plan.n_rows, plan.n_classes, plan.in_dtype, plan.out_dtype
    attrs = _settings(plan, teachers, combine, eps)
    del plan
    arrays = [open_rows(t, rows) for t in teachers]
    if combine == "logits":
        result = distiller.combine_teachers(arrays)
    else:
        result = distiller.combine_via_probabilities(arrays, eps)
    if result.dtype != out_dtype:
        result = result.map_blocks(_narrowed_block, out_dtype, dtype=out_dtype)
    partial = _partial_path(out_path)
    start = time.perf_counter()
    # As in soft_labels: the output is created marked and with its blocks reserved,
    # and whatever stops the run removes it (a cluster run cannot be resumed).
    try:
        target = _create_output(out_path, (n_rows, n_classes), out_dtype, rows, attrs)
        if not is_zarr_path(out_path):
            target.flush()
            del target
            target = _NpyRows(str(partial.resolve()))
        with _client(scheduler) as client:
            _run_on_cluster(client, da.store(result, target, lock=False, compute=False), progress)
        if is_zarr_path(out_path):
            target.attrs["numba_kd"] = {**target.attrs["numba_kd"], "completed_rows": n_rows}
        _finish(None, out_path, overwrite)
    except BaseException:
        target = None
        try:
            _remove(partial)
        except OSError:
            pass  # report the error that stopped the run
        raise
    seconds = time.perf_counter() - start
    rate = n_rows / max(seconds, 1e-9)
    gb = rate * n_classes * np.dtype(in_dtype).itemsize * len(teachers) / 1e9
    return Summary(n_rows, seconds, rate, gb)


def _dataset_loss_on_cluster(
    student: str | os.PathLike,
    teachers: Sequence[str | os.PathLike],
    labels: str | os.PathLike,
    *,
    scheduler: str,
    alpha: float,
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    options: dict,
    chunk_rows: int | None = None,
    progress: bool = False,
) -> dict[str, float | int]:
    """``dataset_loss`` on a dask.distributed cluster (``options``: its loss options)."""
    _dask_modules()  # a clear ImportError without the dask extra
    local = [open_input(p, name) for p, name in [(student, "student")] + [
        (t, f"teachers[{k}]") for k, t in enumerate(teachers)
    ]]  # fmt: skip
    n_rows, n_classes, in_dtype = _check_logits(
        local, ["student"] + [f"teachers[{k}]" for k in range(len(teachers))]
    )
    _read_labels(labels, n_rows)
    del local
    distiller = _ensemble(weights, len(teachers), temperature)
    rows = chunk_rows_for(len(teachers) + 1, n_classes, np.dtype(in_dtype).itemsize, chunk_rows)
    s = open_rows(student, rows)
    t = [open_rows(p, rows) for p in teachers]
    y = open_rows(labels, rows)
    parts = distiller.distillation_loss(s, t, y, alpha, return_components=True, **options)
    with _client(scheduler) as client:
        loss_value, soft, hard = _run_on_cluster(client, list(parts), progress)
    return {"loss": float(loss_value), "soft": float(soft), "hard": float(hard), "rows": n_rows}


# ---------------------------------------------------------------- top-k teachers

TOPK_DTYPES = ("float16", "float32")


def topk(
    teachers: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    k: int,
    *,
    temperature: float = 1.0,
    dtype: str = "float16",
    names: Sequence[str] | None = None,
    chunk_rows: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> Summary:
    """Store each teacher's top-k log-probabilities per row in a Parquet file.

    For every row, each teacher's k most probable classes at ``temperature``
    (in decreasing order) and their log-probabilities log softmax(t / T_g), computed
    in float64. ``numba_kd.read_topk`` reads the file back as a ``TopK``.

    The file has, per teacher t, two fixed-size-list columns of k entries,
    ``teacher{t}_indices`` (int32) and ``teacher{t}_logprobs`` (``dtype``), one
    row group per chunk of rows, and the schema metadata ``numba_kd.topk``: a
    JSON object with the number of classes, k, the temperature, the teacher
    names and the package version. It is written under a hidden temporary
    name in OUT's directory, created exclusively (nothing existing is touched),
    and renamed to OUT when complete: an interrupted run never leaves a
    half-written OUT, and an existing OUT is replaced (with ``overwrite``) only
    by a complete file. A run killed with SIGKILL leaves its temporary file
    (``.OUT.*.partial``) behind.

    Parameters
    ----------
    teachers : sequence of paths
        K teacher logit arrays, each [N, C]: ``.npy`` files (read memory-mapped)
        or Zarr arrays (paths ending in ``.zarr``).
    out : path
        The Parquet file.
    k : int
        Entries per row and teacher, 1 <= k <= C.
    temperature : float, default 1.0
        T_g: the log-probabilities are those of softmax(t / T_g).
    dtype : {"float16", "float32"}, default "float16"
        The log-probabilities' dtype.
    names : sequence of str, optional
        The teachers' names in the metadata; the file names without their
        suffix by default.
    chunk_rows : int, optional
        Rows per step (one row group each); about 256 MB of input by default.
    overwrite : bool, default False
        Replace OUT if it exists.
    progress : bool, default False
        A progress bar on stderr (when it is a terminal).
    on_chunk : callable, optional
        Called with the number of rows done after each row group is written.

    Returns
    -------
    Summary
        Rows written, seconds, rows per second and GB of logits read per second.

    Raises
    ------
    ValueError
        Inputs that do not exist or differ in shape, a k outside [1, C], a bad
        temperature or dtype, names that do not match the teachers, non-finite
        logits (naming the teacher and the row), or an OUT that exists without
        ``overwrite`` or is one of the inputs.
    ImportError
        Without pyarrow, or a Zarr path without zarr.
    """
    import pyarrow as pa

    pq = sparse.parquet_module()
    if len(teachers) == 0:
        raise ValueError("Must have at least one teacher")
    arrays = [open_input(path, f"teachers[{i}]") for i, path in enumerate(teachers)]
    n_rows, n_classes, in_dtype = _check_logits(arrays, [f"teachers[{i}]" for i in range(len(arrays))])
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_classes:
        raise ValueError(f"k must be an int in [1, {n_classes}] (the number of classes), got {k!r}")
    k = int(k)
    t = _validate.real(temperature, "temperature")
    if not (t > 0.0 and np.isfinite(t) and np.isfinite(1.0 / t)):
        raise ValueError(f"temperature must be positive and finite with a finite 1/T, got {t}")
    if dtype not in TOPK_DTYPES:
        raise ValueError(f"dtype must be one of {TOPK_DTYPES}, got {dtype!r}")
    if names is None:
        names = [Path(str(path).rstrip("/")).stem for path in teachers]
    names = [str(name) for name in names]
    if len(names) != len(arrays):
        raise ValueError(f"names: {len(names)} names for {len(arrays)} teachers")
    out_path = Path(out)
    if is_zarr_path(out_path):
        raise ValueError(f"out: {out_path} names a Zarr array; the top-k output is a Parquet file")
    _check_output_path(out_path, teachers, overwrite)
    rows_per_step = chunk_rows_for(len(arrays), n_classes, np.dtype(in_dtype).itemsize, chunk_rows)
    columns = sparse.parquet_columns(len(arrays))
    info = {
        "format": sparse.PARQUET_FORMAT, "num_classes": n_classes, "k": k, "temperature": t,
        "num_teachers": len(arrays), "teachers": names, "logprob_dtype": dtype, "numba_kd": __version__,
    }  # fmt: skip
    fields = []
    for index_name, logprob_name in columns:
        fields.append(pa.field(index_name, pa.list_(pa.int32(), k), nullable=False))
        fields.append(
            pa.field(logprob_name, pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), k), nullable=False)
        )
    schema = pa.schema(fields, metadata={sparse.PARQUET_KEY: json.dumps(info).encode()})
    partial = _exclusive_file(out_path)
    bar = Progress(n_rows, len(arrays) * n_classes * np.dtype(in_dtype).itemsize, progress, "topk")
    try:
        with pq.ParquetWriter(partial, schema) as writer:
            for start in range(0, n_rows, rows_per_step):
                stop = min(n_rows, start + rows_per_step)
                batch = []
                for teacher, arr in enumerate(arrays):
                    indices, logprobs = _top_k_rows(np.asarray(arr[start:stop]), k, t, teacher, start)
                    batch.append(pa.FixedSizeListArray.from_arrays(pa.array(indices.ravel()), k))
                    batch.append(
                        pa.FixedSizeListArray.from_arrays(pa.array(logprobs.astype(dtype).ravel()), k)
                    )
                    _release(arr)
                writer.write_table(pa.Table.from_arrays(batch, schema=schema))
                bar.update(stop - start)
                if on_chunk is not None:
                    on_chunk(stop)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        _install(partial, out_path, overwrite)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    rows_per_second, gb_per_second = bar.rates()
    return Summary(n_rows, time.perf_counter() - bar.start, rows_per_second, gb_per_second)


def dataset_topk_loss(
    student: str | os.PathLike,
    topk_file: str | os.PathLike,
    labels: str | os.PathLike,
    *,
    alpha: float,
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    tail: str = "bucket",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    scale_by_t2: bool = True,
    ignore_index: int | None = None,
    chunk_rows: int | None = None,
    progress: bool = False,
) -> dict[str, float | int]:
    """The distillation loss of a student over a dataset against top-k teachers on disk.

    Streams row chunks of the student and labels and the same rows of the
    Parquet file (``numba-kd topk``); the teachers mix as probabilities, as
    for any TopK. Per chunk the parts are summed, then divided once by the
    number of rows not ignored.

    Parameters
    ----------
    student : path
        The student's logits, [N, C]: ``.npy`` or Zarr.
    topk_file : path
        The teachers' top-k Parquet file, N rows of C classes.
    labels : path
        Integer labels, [N].
    alpha : float
        Weight of the soft term, in [0, 1].
    weights : sequence of float, optional
        One weight per teacher; equal weights by default.
    temperature : float, default 1.0
        The loss temperature T (the file's T_g is re-tempered to it).
    tail : {"renormalize", "bucket", "uniform"}, default "bucket"
        The tail rule.
    divergence : {"forward_kl", "reverse_kl", "jsd"}, default "forward_kl"
        The divergence.
    beta : float, default 0.5
        The JSD weight.
    scale_by_t2 : bool, default True
        Scale the soft term by T^2 (entrenar's convention).
    ignore_index : int, optional
        Rows with this label add nothing and do not count in the mean.
    chunk_rows : int, optional
        Rows per step; by default about 256 MB of student logits.
    progress : bool, default False
        Show a progress bar on stderr when it is a terminal.

    Returns
    -------
    dict
        ``{"loss": float, "soft": float, "hard": float, "rows": int}``.

    Raises
    ------
    ValueError
        A student and a file that differ in rows or classes, labels outside
        [0, C), invalid stored entries, or an option the TopK loss refuses.
    ImportError
        Without pyarrow.
    """
    options = {
        "divergence": divergence,
        "beta": beta,
        "scale_by_t2": scale_by_t2,
        "ignore_index": ignore_index,
    }
    _validate.loss_options(
        reduction="sum", combine="probs", teacher_weighting="static", return_components=True,
        check_finite=False, **options,
    )  # fmt: skip
    s = open_input(student, "student")
    n_rows, n_classes, _ = _check_logits([s], ["student"])
    file_rows, info = sparse.topk_file_info(topk_file)
    if file_rows != n_rows or info["num_classes"] != n_classes:
        raise ValueError(
            f"topk_file: {file_rows} rows of {info['num_classes']} classes; the student has "
            f"{n_rows} rows of {n_classes}"
        )
    if n_rows == 0:
        raise ValueError("student logits must have at least one row: the mean over rows is undefined")
    y = _read_labels(labels, n_rows)
    distiller = _ensemble(weights, info["num_teachers"], temperature)
    rows_per_chunk = chunk_rows_for(1, n_classes, np.dtype(s.dtype).itemsize, chunk_rows)
    inputs = _buffers([s, y], min(rows_per_chunk, n_rows))
    bar = Progress(n_rows, n_classes * np.dtype(s.dtype).itemsize, progress, "loss")
    soft_total = 0.0
    hard_total = 0.0
    counted = 0
    for start, top in sparse.iter_topk(topk_file, rows_per_chunk, tail):
        stop = start + top.lead_shape[0]
        block_s, block_y = _read_rows([s, y], start, stop, inputs)
        parts = distiller.distillation_loss(
            block_s, top, block_y, alpha, reduction="sum", combine="probs", return_components=True, **options
        )
        soft_total += parts.soft
        hard_total += parts.hard
        counted += _counted_rows(block_y, ignore_index)
        _release(s, y)
        bar.update(stop - start)
    bar.close()
    soft, hard = soft_total / max(counted, 1), hard_total / max(counted, 1)
    return {"loss": soft + hard, "soft": soft, "hard": hard, "rows": n_rows}


def _install(partial: Path, out_path: Path, overwrite: bool) -> None:
    """Rename the complete file to OUT. Without ``overwrite`` a hard link puts it
    there only if OUT still does not exist (a file that appeared during the run is
    kept); where the file system has no hard links, a rename after a last check."""
    if overwrite:
        os.replace(partial, out_path)
        return
    try:
        os.link(partial, out_path)
    except FileExistsError:
        raise ValueError(
            f"out: {out_path} appeared while the run wrote its output; it was kept and the output dropped"
        ) from None
    except OSError:
        if out_path.exists() or out_path.is_symlink():
            raise ValueError(
                f"out: {out_path} appeared while the run wrote its output; it was kept"
            ) from None
        os.replace(partial, out_path)
        return
    partial.unlink()


def _exclusive_file(out_path: Path) -> Path:
    """A new empty file ``.OUT.<random>.partial`` next to OUT, created exclusively
    (never an existing file) with the permissions the umask gives new files."""
    while True:
        path = out_path.with_name(f".{out_path.name}.{secrets.token_hex(6)}.partial")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return path


def _top_k_rows(block: np.ndarray, k: int, temperature: float, teacher: int, first_row: int):
    """(indices int32 [n, k], log-probabilities float64 [n, k]) of the k most probable
    classes of each row of softmax(block / T), in decreasing order."""
    scaled = block.astype(np.float64) / temperature
    finite = np.isfinite(scaled).all(axis=1)
    if not finite.all():
        row = first_row + int(np.argmin(finite))
        raise ValueError(f"teachers[{teacher}] row {row} holds NaN or infinite logits")
    lse = reference.logsumexp(scaled)
    if k < scaled.shape[1]:
        candidates = np.argpartition(-scaled, k - 1, axis=1)[:, :k]
    else:
        candidates = np.broadcast_to(np.arange(k), scaled.shape).copy()
    values = np.take_along_axis(scaled, candidates, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    indices = np.take_along_axis(candidates, order, axis=1).astype(np.int32)
    return indices, np.take_along_axis(values, order, axis=1) - lse[:, None]

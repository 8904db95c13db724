"""The host backend: NumPy arrays and the CPU kernels.

Kernels take their arguments by parameter name; their signatures come from the
argument values (``numba_kd._signatures``).  A specialization is compiled on
first use, one per (operation, target, argument types), and kept for the
process; numba's on-disk cache lets a later process load it instead of
compiling it again.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from numba_kd import _math, _runtime, _signatures, _validate
from numba_kd._arrays import (
    arithmetic_dtype,
    as_library_array,
    bits_view,
    check_output,
    dlpack_device,
    flatten_arrays,
    host_from_dlpack,
    host_has_nonfinite,
    is_device_array,
)
from numba_kd._options import NO_IGNORE, LossOptions, SparseTeachers, compute_dtype

Teachers = tuple[Any, ...] | Any


# Empty arrays that carry the per-element arithmetic's dtype into the kernels.
_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}


# Calls that read at most this many input elements run the serial build of a kernel:
# starting the threads of a parallel launch costs more than such a call's work.
SERIAL_MAX_ELEMENTS = 16384


def _per_block(n_rows: int, elements: int) -> int:
    """Rows per work item of a kernel over ``n_rows`` rows that reads ``elements`` elements."""
    if elements <= SERIAL_MAX_ELEMENTS:
        return n_rows  # the serial build: one block, one scratch allocation
    return _kernels().rows_per_block(n_rows, _runtime.num_threads())


_KERNELS: list[Any] = []


def _kernels() -> Any:
    """numba_kd.cpu.kernels, imported on first use so that ``import numba_kd`` stays cheap."""
    if not _KERNELS:
        from numba_kd.cpu import kernels

        _KERNELS.append(kernels)
    return _KERNELS[0]


def run_cpu_kernel(op: str, elements: int, **arguments: Any) -> Any:
    """Run CPU kernel ``op`` on its arguments (by parameter name), reading ``elements``
    input elements.

    The specialization for the arguments' types is compiled (or loaded from
    numba's disk cache) on first use and kept for the process
    (:func:`numba_kd._signatures.cached_kernel`).  Serial and parallel builds
    compute every row the same way, so they give the same bits.
    """
    kernel = getattr(_kernels(), op)
    args = _signatures.bind(kernel.py_func, arguments)
    mode = _runtime.launch_mode()
    serial = mode == _runtime.SERIAL or elements <= SERIAL_MAX_ELEMENTS
    key = (op, "cpu", serial, _signatures.signature_key(args))

    def build():
        dispatcher = _runtime.serial_dispatcher(kernel) if serial else kernel
        signature = _signatures.types_of(kernel.py_func, args, host=True)
        return _runtime.compile_despite_a_broken_cache(lambda: dispatcher.compile(signature), _kernels())

    compiled = _signatures.cached_kernel(key, build)
    if serial:
        return compiled(*args)
    return _runtime.launch_parallel(compiled, args)


def _general_rows(student, teachers, weights, labels, params, compute, grad, d_rows, ce_rows) -> None:
    """The general loss kernel over these rows, with ``compute``'s per-element arithmetic."""
    elements = student.size * (len(teachers) + 1)
    run_cpu_kernel(
        "general_rows", elements, student=student, teachers=teachers, weights=weights, labels=labels,
        params=params, per_block=_per_block(student.shape[0], elements), compute=_EMPTY[np.dtype(compute)],
        grad=grad, d_rows=d_rows, ce_rows=ce_rows,
    )  # fmt: skip


def _topk_rows(student, top, weights, labels, params, compute, grad, d_rows, ce_rows) -> None:
    """The sparse-teacher loss kernel over these rows (top: SparseTeachers)."""
    elements = student.size + top.indices.size
    run_cpu_kernel(
        "topk_rows", elements, student=student, top=(top.indices, top.logprobs), weights=weights,
        labels=labels, params=params, sparse=top.params, per_block=_per_block(student.shape[0], elements),
        compute=_EMPTY[np.dtype(compute)], grad=grad, d_rows=d_rows, ce_rows=ce_rows,
    )  # fmt: skip


def _rows_again_in_float64(student, teachers, weights, labels, params, grad, d_rows, ce_rows) -> None:
    """Compute the rows whose float32 results are NaN or infinite again in float64.

    Finite logits can still overflow float32 once divided by T (|logits| of 1e33
    at T = 1e-6); float64 holds them.  Rows whose inputs hold NaN or infinities
    come out NaN again.  The other rows keep their results, bit for bit.
    """
    rows = np.flatnonzero(~(np.isfinite(d_rows) & np.isfinite(ce_rows)))
    if isinstance(teachers, SparseTeachers):
        sub_teachers = teachers._replace(
            indices=teachers.indices[:, rows], logprobs=teachers.logprobs[:, rows]
        )
        kernel = _topk_rows
    elif isinstance(teachers, tuple):
        sub_teachers = tuple(t[rows] for t in teachers)
        kernel = _general_rows
    else:
        sub_teachers = teachers[:, rows]
        kernel = _general_rows
    sub_grad = np.empty((len(rows), student.shape[1]) if params.want_grad else (0, 0), dtype=grad.dtype)
    sub_d = np.empty(len(rows))
    sub_ce = np.empty(len(rows))
    sub_student, sub_labels = student[rows], labels[rows]
    kernel(sub_student, sub_teachers, weights, sub_labels, params, np.float64, sub_grad, sub_d, sub_ce)
    d_rows[rows] = sub_d
    ce_rows[rows] = sub_ce
    if params.want_grad:
        grad[rows] = sub_grad


class HostBackend:
    """NumPy arrays, CPU kernels."""

    target = "cpu"

    def asarray(self, x: object) -> np.ndarray:
        if type(x) is np.ndarray:
            return x
        if is_device_array(x):
            return _to_host(x)
        where = dlpack_device(x)
        if where == "cpu":
            return host_from_dlpack(x)  # torch, JAX, ...: a view, bfloat16 included
        if where is not None:
            raise TypeError(f"it lives on DLPack device type {where}, which numba_kd does not read")
        return np.asarray(x)

    def cast(self, arr: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
        return arr.astype(dtype)

    def labels(self, y: object, n_rows: int, n_classes: int, ignore_index: int | None = None) -> np.ndarray:
        arr = self.asarray(y)
        _validate.integer_labels(arr.dtype)
        if arr.ndim != 1:
            raise ValueError(f"labels must be a 1-D array with one label per row, got shape {arr.shape}")
        if arr.shape[0] != n_rows:
            raise ValueError(f"labels has {arr.shape[0]} entries but the logits have {n_rows} rows")
        if arr.dtype == np.int64 and arr.flags.c_contiguous:
            # No ignore_index: 0, a valid label, which excuses no bad one.
            ignore = 0 if ignore_index is None else ignore_index
            first = _kernels().first_bad_label(arr, n_classes, ignore)
        else:
            bad = (arr < 0) | (arr >= n_classes)
            if ignore_index is not None:
                bad &= arr != ignore_index
            first = int(np.flatnonzero(bad)[0]) if bad.any() else -1
        if first >= 0:
            raise ValueError(f"labels must be in [0, {n_classes}): labels[{first}] = {arr[first]}")
        return np.ascontiguousarray(arr, dtype=np.int64)

    def merge_rows(self, arrays: list[tuple[str, Any]]) -> None:
        """NumPy merges the leading axes of any array (copying where it must): nothing to check."""

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def has_nonfinite(self, arr: np.ndarray, ignored: tuple[Any, int] | None = None) -> bool:
        """Whether ``arr`` holds a NaN or an infinity in a row the kernels read."""
        read = None if ignored is None else np.asarray(ignored[0]) != ignored[1]
        return host_has_nonfinite(arr, read)

    def output(self, out: object, shape: tuple[int, ...], dtype: np.dtype, inputs: list) -> np.ndarray:
        """A caller's ``out=`` array, checked: a writable C-contiguous NumPy array of
        this shape and dtype that shares no memory with the inputs."""
        if not isinstance(out, np.ndarray) and dlpack_device(out) == "cpu":
            try:
                out = host_from_dlpack(out)  # a torch or JAX CPU array, written in place
            except TypeError as exc:
                raise TypeError(f"out cannot be written: {exc}") from None
        elif not isinstance(out, np.ndarray) or is_device_array(out):
            raise TypeError(
                f"out must be a NumPy array or a CPU DLPack tensor for host inputs, got {type(out).__name__}"
            )
        check_output(out, shape, dtype)
        if not out.flags.writeable:
            raise ValueError(
                "out must be writable; this one is read-only "
                "(JAX arrays are immutable: use a NumPy or torch array)"
            )
        if not out.flags.c_contiguous:
            raise ValueError("out must be a writable C-contiguous array")
        for x in flatten_arrays(inputs):
            if np.may_share_memory(out, x):
                raise ValueError("out must not share memory with the inputs")
        return out

    def combine_logits(self, teachers: Teachers, weights: np.ndarray, out: np.ndarray) -> None:
        elements = out.size * len(teachers)
        run_cpu_kernel(
            "combine_logits", elements, teachers=_teachers_view(teachers), weights=weights,
            per_block=_per_block(out.shape[0], elements), out=bits_view(out),
        )  # fmt: skip

    def combine_probabilities(
        self, teachers: Teachers, weights: np.ndarray, temperature: float, eps: float, out: np.ndarray
    ) -> None:
        probs = _math.COMBINES.index("probs")
        params = _math.LossParams(NO_IGNORE, float(temperature), 0.5, probs, 0, 0, 0.0, 0.0, False)
        elements = out.size * len(teachers)
        run_cpu_kernel(
            "combine_probabilities", elements, teachers=_teachers_view(teachers), weights=weights,
            params=params, eps=float(eps), per_block=_per_block(out.shape[0], elements), out=bits_view(out),
        )  # fmt: skip

    def loss(
        self,
        student: np.ndarray,
        teachers: Teachers,
        weights: np.ndarray,
        labels: np.ndarray,
        temperature: float,
        alpha: float,
        options: LossOptions,
        want_grad: bool = False,
        return_device_scalar: bool = False,
        grad_out: np.ndarray | None = None,
    ) -> tuple[Any, Any, Any, np.ndarray | None]:
        """(loss, soft, hard, grad): floats for "mean"/"sum", per-row arrays for "none";
        grad (like student, written into grad_out when given) only with want_grad."""
        dtype = student.dtype
        n_rows = student.shape[0]
        divisor, c_soft, c_hard = options.scales(labels, n_rows, temperature, alpha)
        if grad_out is not None:
            grad = grad_out
        elif want_grad:
            grad = np.empty(student.shape, dtype=dtype)
        else:
            # Never written; of the arithmetic's dtype, so that a 16-bit loss shares its
            # kernel specialization with 16-bit gradients written into a float32 out=.
            grad = np.empty((0, 0), dtype=arithmetic_dtype(dtype))
        d_rows = np.empty(n_rows)
        ce_rows = np.empty(n_rows)
        params = _math.LossParams(
            options.ignore_code, float(temperature), float(options.mixture_weight), *options.codes,
            float(c_soft), float(c_hard), bool(want_grad),
        )  # fmt: skip
        compute = compute_dtype(dtype, temperature)
        factor = options.soft_factor(temperature)
        if isinstance(teachers, SparseTeachers):
            kernel, read_teachers = _topk_rows, teachers
        else:
            kernel, read_teachers = _general_rows, _teachers_view(teachers)
        batch = (bits_view(student), read_teachers, weights, labels, params)
        read_grad = bits_view(grad)
        kernel(*batch, compute, read_grad, d_rows, ce_rows)
        soft, hard = _kernels().reduce_rows(d_rows, ce_rows, divisor, alpha, factor)
        # Any NaN or infinite row makes a part non-finite (0 * inf is NaN too).
        if compute == np.float32 and not (math.isfinite(soft) and math.isfinite(hard)):
            _rows_again_in_float64(*batch, read_grad, d_rows, ce_rows)
            soft, hard = _kernels().reduce_rows(d_rows, ce_rows, divisor, alpha, factor)
        per_row = arithmetic_dtype(dtype)
        return _reduced(options, per_row, alpha, factor, d_rows, ce_rows, soft, hard, grad, want_grad)

    def wrap(self, out: np.ndarray, like: object) -> Any:
        return as_library_array(out, like)


HOST = HostBackend()


def _reduced(options, dtype, alpha, soft_factor, d_rows, ce_rows, soft, hard, grad, want_grad):
    """(loss, soft, hard, grad) as HostBackend.loss returns them."""
    if options.reduction == "none":
        soft = (alpha * soft_factor * d_rows).astype(dtype)
        hard = ((1.0 - alpha) * ce_rows).astype(dtype)
    loss = soft + hard
    return loss, soft, hard, grad if want_grad else None


def _teachers_view(teachers: Teachers) -> Teachers:
    """Teachers (a tuple of arrays or one array) as the kernels read them (bits_view)."""
    if isinstance(teachers, tuple):
        return tuple(bits_view(t) for t in teachers)
    return bits_view(teachers)


def _to_host(x: object) -> np.ndarray:
    """An explicit device="cpu" copy of a device array."""
    if hasattr(x, "copy_to_host"):
        return x.copy_to_host()
    if hasattr(x, "get"):  # CuPy
        return x.get()
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().numpy()
    from numba import cuda

    return cuda.as_cuda_array(x).copy_to_host()

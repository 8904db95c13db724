"""CUDA side of the dispatcher: array import, launch configuration, compiled-kernel
cache and the three operations.

Imported only when an input lives on a CUDA device (or ``device="cuda"``), so
``import numba_kd`` and every CPU call leave the CUDA driver alone.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import cuda

from numba_kd import _arrays, _options, _runtime, _signatures, _validate
from numba_kd._options import SparseTeachers, compute_dtype
from numba_kd.cuda.kernels import (
    BLOCK_THREADS,
    TOPK_MAP_BYTES,
    DeviceLossParams,
    DeviceTopKParams,
    make_kernels,
)

# The simulator runs every CUDA thread as a Python thread: keep launches tiny.
SIMULATOR_THREADS = 8
SIMULATOR_MAX_BLOCKS = 4
MAX_BLOCKS = 65535

_KERNELS: dict[str, Any] = {}
LABEL_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def simulating() -> bool:
    return bool(numba.config.ENABLE_CUDASIM)


def kernels_for(dtype: np.dtype):
    """The kernels whose arithmetic is in ``dtype``'s arithmetic dtype (float32 for
    16-bit floats and for their bits, which the kernels widen as they read them)."""
    dtype = np.dtype(np.float32) if dtype.itemsize == 2 else dtype
    kernels = _KERNELS.get(dtype.name)
    if kernels is None:
        kernels = _KERNELS[dtype.name] = make_kernels(numba.from_dtype(dtype))
    return kernels


# ---------------------------------------------------------------- launch shapes


def _block_threads() -> int:
    return SIMULATOR_THREADS if simulating() else BLOCK_THREADS


def _grid(n_blocks: int) -> int:
    cap = SIMULATOR_MAX_BLOCKS if simulating() else MAX_BLOCKS
    return max(1, min(n_blocks, cap))


def row_config(n_items: int, n_classes: int) -> tuple[int, tuple[int, int]]:
    """(grid, (threads_per_row, rows_per_block)) for row-wise reductions.

    Threads per row grow in powers of two until each has about four columns, so
    small C packs many rows into one block and large C spreads a row over all.
    """
    total = _block_threads()
    per_row = 1
    while per_row < total and per_row * 4 < n_classes:
        per_row *= 2
    rows_per_block = total // per_row
    return _grid(-(-n_items // rows_per_block)), (per_row, rows_per_block)


def elementwise_config(n_elements: int) -> tuple[int, int]:
    threads = _block_threads()
    return _grid(-(-n_elements // threads)), threads


# ---------------------------------------------------------------- signatures


def stand_ins(dtype: np.dtype, layout: str, kind: str, n_teachers: int | None, label_dtype=None) -> dict:
    """Host values with the types of every CUDA kernel parameter, by name: the PTX
    tests compile each kernel for these.  ``layout`` applies to the inputs: "C",
    "A" (strided), or "mixed" (a contiguous student and labels, strided teachers:
    each array's layout is part of the signature).  ``dtype`` uint16 or int16 stands
    for bfloat16 or float16 logits, which the kernels read as these bits (results
    then come in the same 16-bit type, everything else in float32).  Layout
    "float32-logits": C-contiguous float32 logits (and per-row results) read by
    the kernels of arithmetic ``dtype`` (float64), as at temperatures where float32
    arithmetic would lose the loss."""
    logit_dtype = dtype
    dtype = np.dtype(np.float32) if dtype.itemsize == 2 else dtype
    row_dtype = dtype
    if layout == "float32-logits":
        logit_dtype = row_dtype = np.dtype(np.float32)
        layout = "C"
    scalar = dtype.type(1.0)
    label_dtype = LABEL_DTYPES[0] if label_dtype is None else label_dtype

    def array(shape, array_dtype=dtype, array_layout="C"):
        full = np.zeros((*shape[:-1], 2 * shape[-1]), dtype=array_dtype)
        return full if array_layout == "C" else full[..., ::2]

    matrix = array((2, 3))
    vector = array((3,))
    teacher_layout = "A" if layout == "mixed" else layout
    layout = "C" if layout == "mixed" else layout
    if kind == "list":
        teachers = tuple(array((2, 3), logit_dtype, teacher_layout) for _ in range(n_teachers))
    else:
        teachers = array((n_teachers or 2, 2, 3), logit_dtype, teacher_layout)
    code = np.int64(0)
    values = {
        "teachers": teachers,
        "student": array((2, 3), logit_dtype, layout),
        "x": array((2, 3), logit_dtype, layout),
        "labels": array((2,), label_dtype, layout),
        "params": DeviceLossParams(code, scalar, scalar, code, code, code, scalar, scalar, True),
        "scratch": (matrix,) * 3,
        "ignore_index": code,
        "mean": True,
        "counter": array((1,), np.int32),
        "top": (np.zeros((2, 2, 3), np.int64), np.zeros((2, 2, 3), dtype)),
        "teacher_weights": np.zeros(2),
        "sparse": DeviceTopKParams(code, 1.0, 1.0, 0.5, 1.0),
        "workspace": (
            np.zeros((2, 3), np.int32),
            np.zeros((2, 6), np.int64),
            np.zeros((2, 6)),
            np.zeros((2, 5, 2)),
        ),
        "class_map": np.zeros((2, 3), np.int32),
        "bad_labels": array((1,), np.int32),
    }
    values["lse"] = matrix
    for name in ("out", "grad"):
        values[name] = array((2, 3), logit_dtype)
    for name in ("weights", "log_weights", "kl_rows", "ce_rows", "d_rows", "divisor", "results"):
        values[name] = vector
    for name in ("loss", "soft", "hard"):
        values[name] = array((3,), row_dtype)
    for name in ("inv_t", "temperature", "eps", "alpha", "alpha_t2", "one_m_alpha", "soft_factor"):
        values[name] = scalar
    return values


def kernel_signatures():
    """Every (op, dtype, layout, kind, K, label dtype) the PTX tests compile, with
    K = 1 and 3 standing for all list lengths; the loss kernels also for strided
    teachers beside a contiguous student; general_rows and topk_rows for some of
    their layouts."""
    for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        for layout in ("C", "A"):
            for kind, n_teachers in (("list", 1), ("list", 3), ("stacked", None)):
                for op in ("combine_logits", "teacher_lse", "mix_probabilities"):
                    yield op, dtype, layout, kind, n_teachers, None
                for label_dtype in LABEL_DTYPES:
                    yield "loss_rows", dtype, layout, kind, n_teachers, label_dtype
        # general_rows takes 6-7 s a signature: each student layout, teacher kind and
        # label dtype once per accumulation type (with "mixed" below), not every
        # combination.
        for layout, kind, n_teachers, label_dtype in (
            ("C", "stacked", None, LABEL_DTYPES[0]), ("A", "list", 1, LABEL_DTYPES[1]),
            ("A", "list", 3, LABEL_DTYPES[0]),
        ):  # fmt: skip
            yield "general_rows", dtype, layout, kind, n_teachers, label_dtype
        for layout in ("C", "A"):
            for label_dtype in LABEL_DTYPES:
                yield "count_valid", dtype, layout, "none", None, label_dtype
            yield "count_nonfinite", dtype, layout, "none", None, None
        for op in ("loss_rows", "general_rows"):
            yield op, dtype, "mixed", "list", 3, LABEL_DTYPES[1]
        yield "reduce_loss", dtype, "C", "none", None, None
        yield "clear_map", dtype, "C", "none", None, None
        # topk_rows takes 9-20 s to compile: one student layout and label dtype
        # per accumulation type (the other pairs change only the array types),
        # and tests/test_cuda_ptx.py compiles it for compute capability 8.0 only.
        if dtype == np.float32:
            yield "topk_rows", dtype, "C", "none", None, LABEL_DTYPES[1]
        else:
            yield "topk_rows", dtype, "A", "none", None, LABEL_DTYPES[0]
        yield "scale_rows", dtype, "C", "none", None, None
    # 16-bit logits (their bits: uint16 bfloat16, int16 float16) change only how the
    # kernels read logits and write results: each kernel that does, once.
    for bits in (np.dtype(np.uint16), np.dtype(np.int16)):
        for op in ("combine_logits", "teacher_lse", "mix_probabilities"):
            yield op, bits, "C", "list", 3, None
        yield "loss_rows", bits, "C", "list", 3, LABEL_DTYPES[1]
        yield "general_rows", bits, "C", "stacked", None, LABEL_DTYPES[1]
        yield "count_nonfinite", bits, "A", "none", None, None
    # float32 logits outside float32's temperature range run the float64 kernels.
    for op, kind, label_dtype in (
        ("loss_rows", "list", LABEL_DTYPES[0]), ("general_rows", "stacked", LABEL_DTYPES[1]),
        ("scale_rows", "none", None),
    ):  # fmt: skip
        yield op, np.dtype(np.float64), "float32-logits", kind, 3 if kind == "list" else None, label_dtype


def signature(op: str, dtype: np.dtype, layout: str, kind: str, n_teachers: int | None, label_dtype) -> tuple:
    """The argument types of kernel ``op`` for one entry of kernel_signatures()."""
    function = getattr(kernels_for(dtype), op).py_func
    values = stand_ins(dtype, layout, kind, n_teachers, label_dtype)
    args = _signatures.bind(function, {name: values[name] for name in _signatures.parameters(function)})
    return _signatures.types_of(function, args, host=False)


# Kernel parameters that hold logits (or results shaped like them): 16-bit floats go
# to the kernels as their bits (_arrays.bits_view), widened and rounded there.
_LOGIT_PARAMETERS = frozenset({"student", "teachers", "x", "out", "grad"})


def _as_read(name: str, value: Any) -> Any:
    if name not in _LOGIT_PARAMETERS:
        return value
    if isinstance(value, tuple):
        return tuple(_arrays.bits_view(v) for v in value)
    return _arrays.bits_view(value)


def _launch(op: str, dtype: np.dtype, griddim, blockdim, stream, **arguments: Any) -> None:
    """Launch kernel ``op`` (of the kernels accumulating in ``dtype``'s arithmetic
    dtype) on its arguments by parameter name, compiling its specialization on first use."""
    dispatcher = getattr(kernels_for(dtype), op)
    arguments = {name: _as_read(name, value) for name, value in arguments.items()}
    args = _signatures.bind(dispatcher.py_func, arguments)
    key = (op, "cuda", dtype.name, _signatures.signature_key(args))

    def build():
        if simulating():
            return dispatcher
        signature = _signatures.types_of(dispatcher.py_func, args, host=False)
        return _runtime.compile_despite_a_broken_cache(
            lambda: dispatcher.compile(signature), kernels_for(dtype)
        )

    kernel = _signatures.cached_kernel(key, build)
    if simulating():
        kernel[griddim, blockdim, stream](*args)
    else:
        kernel.launch(args, griddim, blockdim, stream, 0)


# ---------------------------------------------------------------- arrays


def _extent(arr) -> tuple[int, int] | None:
    """[first, last] byte addresses of a device array, None when unknown."""
    face = _interface(arr)
    if face is None:
        return None
    start = int(face["data"][0])
    itemsize = np.dtype(face["typestr"]).itemsize
    shape = face["shape"]
    strides = face.get("strides") or _c_strides(shape, itemsize)
    if any(n == 0 for n in shape):
        return None
    low = start + sum(min(0, (n - 1) * st) for n, st in zip(shape, strides, strict=True))
    high = start + sum(max(0, (n - 1) * st) for n, st in zip(shape, strides, strict=True)) + itemsize - 1
    return low, high


def _c_strides(shape, itemsize: int) -> tuple[int, ...]:
    strides = []
    step = itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _overlap(a, b) -> bool:
    """Whether two device arrays may share memory (conservative: address ranges)."""
    if simulating():
        return bool(np.may_share_memory(getattr(a, "_ary", a), getattr(b, "_ary", b)))
    ea, eb = _extent(a), _extent(b)
    if ea is None or eb is None:
        return False
    return ea[0] <= eb[1] and eb[0] <= ea[1]


def _interface(x) -> dict | None:
    try:
        return x.__cuda_array_interface__
    except AttributeError:
        return None
    except RuntimeError:
        # torch refuses the interface of tensors that require grad.
        return x.detach().__cuda_array_interface__


def stream_of(arrays, stream) -> Any:
    """The stream to launch on: ``stream=`` if given, else the inputs' own stream."""
    if stream is not None:
        if isinstance(stream, int):
            return cuda.external_stream(stream) if stream > 2 else 0
        return stream
    if simulating():
        return 0
    for a in arrays:
        iface = _interface(a)
        handle = iface.get("stream") if iface else None
        if isinstance(handle, int) and handle > 2:
            return cuda.external_stream(handle)
    return 0


class CudaBackend:
    """Array handling and kernel launches for inputs on a CUDA device."""

    target = "cuda"

    def __init__(self, stream) -> None:
        self.stream = stream

    def asarray(self, x):
        if _arrays.is_device_array(x):
            return self._device_array(x)[0]
        # Explicit device="cuda" with host data: the caller asked for the copy.
        return cuda.to_device(np.ascontiguousarray(np.asarray(x)), stream=self.stream)

    def _device_array(self, x):
        """(numba device array, read-only) of a device array ``x``: through its
        ``__cuda_array_interface__``, or through DLPack where only that describes it."""
        if simulating() or getattr(x, "__cuda_ndarray__", False):
            # A numba device array as it is: its dtype may be bfloat16, which its interface cannot name.
            return x, False
        try:
            face = x.__cuda_array_interface__
        except AttributeError:
            return self._from_dlpack(x)
        # The kernels run on the inputs' stream, so no synchronization is needed.
        arr = cuda.as_cuda_array(x, sync=False)
        if arr.dtype.kind == "V" and arr.dtype.itemsize == 2 and _arrays.names_bfloat16(x):
            arr = arr.view(_arrays.bfloat16_dtype())  # torch's interface spells bfloat16 "<V2"
        return arr, bool(face["data"][1])

    def _from_dlpack(self, x):
        """(array, read-only) of a CUDA tensor that only DLPack describes, exported for
        this backend's stream (the default stream is DLPack's stream 1)."""
        handle = 0 if self.stream == 0 else self.stream.handle
        number = int(getattr(handle, "value", handle) or 0)  # a ctypes NULL handle's value is None
        exported = _arrays.cuda_dlpack_interface(x, number or 1)
        arr = cuda.as_cuda_array(exported, sync=False)
        if exported.bfloat16:
            arr = arr.view(_arrays.bfloat16_dtype())
        return arr, bool(exported.interface["data"][1])

    def cast(self, arr, dtype: np.dtype, name: str):
        raise TypeError(
            f"{name} has dtype {arr.dtype} but the CUDA kernels need {dtype} here; "
            "cast on the device first (CUDA inputs share one dtype: float16, bfloat16, float32 or float64)"
        )

    def merge_rows(self, arrays: list[tuple[str, Any]]) -> None:
        """Device reshapes must be views: 3-D CUDA inputs (and their labels) must be C-contiguous."""
        for name, arr in arrays:
            if not _signatures.is_c_contiguous(arr):
                raise ValueError(
                    f"{name}: 3-D CUDA inputs are read as [B*S, C] rows and must be C-contiguous "
                    "(make a contiguous copy on the device first)"
                )

    def labels(self, y, n_rows: int, n_classes: int, ignore_index: int | None = None):
        arr = self.asarray(y)
        _validate.integer_labels(arr.dtype)
        if np.dtype(arr.dtype) not in LABEL_DTYPES:
            raise TypeError(f"CUDA labels must be int32 or int64, got dtype {arr.dtype}")
        if arr.ndim != 1:
            raise ValueError(f"labels must be a 1-D array with one label per row, got shape {arr.shape}")
        if arr.shape[0] != n_rows:
            raise ValueError(f"labels has {arr.shape[0]} entries but the logits have {n_rows} rows")
        return arr  # range is checked by the kernel: see loss()

    def empty(self, shape, dtype: np.dtype):
        return cuda.device_array(shape, dtype=dtype, stream=self.stream)

    def has_nonfinite(self, arr, ignored: tuple[Any, int] | None = None) -> bool:
        """Whether the device array ``arr`` holds a NaN or an infinity in a row the
        kernels read (synchronizes).  When some rows are ignored, the check copies
        ``arr`` to the host and skips them there."""
        if ignored is not None:
            read = ignored[0].copy_to_host(stream=self.stream) != ignored[1]
            if not read.all():
                return _arrays.host_has_nonfinite(arr.copy_to_host(stream=self.stream), read)
        counter = cuda.to_device(np.zeros(1, dtype=np.int32), stream=self.stream)
        dtype = np.dtype(arr.dtype)
        for matrix in arr if arr.ndim == 3 else (arr,):
            grid, block = elementwise_config(matrix.shape[0] * matrix.shape[1])
            _launch("count_nonfinite", dtype, grid, block, self.stream, x=matrix, counter=counter)
        return bool(counter.copy_to_host(stream=self.stream)[0])

    def output(self, out, shape: tuple[int, ...], dtype: np.dtype, inputs: list[object]):
        """A caller's ``out=`` device array, checked: C-contiguous, this shape and
        dtype, no memory shared with the inputs."""
        if not _arrays.is_device_array(out):
            raise TypeError(f"out must be a CUDA device array for CUDA inputs, got {type(out).__name__}")
        try:
            arr, read_only = self._device_array(out)
        except RuntimeError:  # torch
            raise TypeError("out is a tensor that requires grad: pass out.detach()") from None
        if read_only:
            raise ValueError("out must be writable; this one is read-only")
        _arrays.check_output(arr, shape, dtype)
        if not _signatures.is_c_contiguous(arr):
            raise ValueError("out must be a writable C-contiguous array")
        for x in _arrays.flatten_arrays(inputs):
            if _overlap(arr, x):
                raise ValueError("out must not share memory with the inputs")
        return arr

    def vector(self, values: np.ndarray, dtype: np.dtype):
        return cuda.to_device(np.ascontiguousarray(values, dtype=dtype), stream=self.stream)

    # ------------------------------------------------------------ operations

    def combine_logits(self, teachers, weights: np.ndarray, out) -> None:
        dtype = _arrays.arithmetic_dtype(np.dtype(out.dtype))
        grid, block = elementwise_config(out.shape[0] * out.shape[1])
        weights = self.vector(weights, dtype)
        _launch(
            "combine_logits", dtype, grid, block, self.stream, teachers=teachers, weights=weights, out=out
        )

    def combine_probabilities(
        self, teachers, weights: np.ndarray, temperature: float, eps: float, out
    ) -> None:
        dtype = _arrays.arithmetic_dtype(np.dtype(out.dtype))
        n_rows = out.shape[0]
        if n_rows == 0:
            return
        scalar = dtype.type
        inv_t = scalar(1.0 / temperature)
        lse = self.empty((len(weights), n_rows), dtype)
        grid, block = row_config(len(weights) * n_rows, out.shape[1])
        _launch("teacher_lse", dtype, grid, block, self.stream, teachers=teachers, inv_t=inv_t, lse=lse)
        with np.errstate(divide="ignore"):
            log_weights = np.log(weights)
        grid, block = elementwise_config(n_rows * out.shape[1])
        _launch(
            "mix_probabilities", dtype, grid, block, self.stream, teachers=teachers,
            weights=self.vector(weights, dtype), log_weights=self.vector(log_weights, dtype), lse=lse,
            temperature=scalar(temperature), inv_t=inv_t, eps=scalar(eps), out=out,
        )  # fmt: skip

    def loss(self, student, teachers, weights: np.ndarray, labels, temperature: float, alpha: float,
             options, want_grad: bool = False, return_device_scalar: bool = False,
             grad_out=None):  # fmt: skip
        """(loss, soft, hard, grad) on the device.

        entrenar's loss (mean, no mask, no gradient) runs the single-read loss_rows
        kernel; every other case runs general_rows.  Labels are range-checked on the
        device: with a synchronizing result an out-of-range label raises ValueError;
        a device scalar becomes NaN instead.
        """
        logit_dtype = np.dtype(student.dtype)
        # As on the CPU: float32 (and 16-bit) logits compute in float32 for temperatures
        # in [FLOAT32_MIN_TEMPERATURE, FAST_MAX_TEMPERATURE]; outside, where float32 would
        # lose the soft term's digits (large T) or overflow (tiny T), the float64 kernels
        # read them.  Per-row results keep the logits' arithmetic dtype.
        dtype = compute_dtype(logit_dtype, temperature)
        row_dtype = _arrays.arithmetic_dtype(logit_dtype)
        scalar = dtype.type
        n_rows, n_classes = student.shape
        n_teachers = len(weights)
        d_rows = self.empty((n_rows,), dtype)
        ce_rows = self.empty((n_rows,), dtype)
        bad_labels = cuda.to_device(np.zeros(1, dtype=np.int32), stream=self.stream)
        w = self.vector(weights, dtype)
        grid, block = row_config(n_rows, n_classes)
        divisor = self.empty((1,), dtype)
        threads = _block_threads()
        _launch(
            "count_valid", dtype, 1, threads, self.stream, labels=labels,
            ignore_index=np.int64(options.ignore_code), mean=options.reduction == "mean", divisor=divisor,
        )  # fmt: skip
        grad = None
        fast = temperature <= _options.FAST_MAX_TEMPERATURE  # see _options.FAST_MAX_TEMPERATURE
        sparse = isinstance(teachers, SparseTeachers)
        if options.is_default and options.ignore_index is None and not want_grad and fast and not sparse:
            _launch(
                "loss_rows", dtype, grid, block, self.stream, student=student, teachers=teachers,
                weights=w, labels=labels, inv_t=scalar(1.0 / temperature), kl_rows=d_rows,
                ce_rows=ce_rows, bad_labels=bad_labels,
            )  # fmt: skip
        else:
            if grad_out is not None:
                grad = grad_out
            else:
                grad = (
                    self.empty((n_rows, n_classes), logit_dtype) if want_grad else self.empty((1, 1), dtype)
                )
            params = DeviceLossParams(
                np.int64(options.ignore_code), scalar(1.0 / temperature), scalar(options.mixture_weight),
                *(np.int64(c) for c in options.codes), scalar(alpha * options.soft_factor(temperature)),
                scalar(1.0 - alpha), bool(want_grad),
            )  # fmt: skip
            rows = dict(
                student=student, labels=labels, params=params, divisor=divisor, grad=grad, d_rows=d_rows,
                ce_rows=ce_rows, bad_labels=bad_labels,
            )  # fmt: skip
            if sparse:
                self._topk_rows(teachers, weights, temperature, options.beta, rows, dtype)
            else:
                scratch = tuple(self.empty((n_rows, n_teachers), dtype) for _ in range(3))
                _launch(
                    "general_rows", dtype, grid, block, self.stream, teachers=teachers, weights=w,
                    scratch=scratch, **rows,
                )  # fmt: skip
        if options.reduction == "none":
            loss, soft, hard = (self.empty((n_rows,), row_dtype) for _ in range(3))
            egrid, eblock = elementwise_config(n_rows)
            _launch(
                "scale_rows", dtype, egrid, eblock, self.stream, d_rows=d_rows, ce_rows=ce_rows,
                alpha_t2=scalar(alpha * options.soft_factor(temperature)), one_m_alpha=scalar(1.0 - alpha),
                loss=loss, soft=soft, hard=hard,
            )  # fmt: skip
            self._raise_on_bad_labels(bad_labels, n_classes)
            return loss, soft, hard, grad if want_grad else None
        results = self.empty((3,), dtype)
        _launch(
            "reduce_loss", dtype, 1, threads, self.stream, kl_rows=d_rows, ce_rows=ce_rows,
            soft_factor=scalar(options.soft_factor(temperature)), alpha=scalar(alpha), divisor=divisor,
            results=results,
        )  # fmt: skip
        if return_device_scalar:
            return results[0:1], results[1:2], results[2:3], grad if want_grad else None
        values = results.copy_to_host(stream=self.stream)
        self._raise_on_bad_labels(bad_labels, n_classes)
        return float(values[0]), float(values[1]), float(values[2]), grad if want_grad else None

    def _topk_rows(self, top: SparseTeachers, weights: np.ndarray, temperature: float, beta: float,
                   rows: dict, dtype: np.dtype) -> None:  # fmt: skip
        """Launch topk_rows (the kernels of arithmetic ``dtype``) over ``rows`` (the
        arguments it shares with general_rows).

        The teachers' K N k entries (host arrays, checked by numba_kd.sparse) are
        copied to the device: they are C / k times smaller than the student.
        """
        student = rows["student"]
        n_rows, n_classes = student.shape
        n_teachers, _, per_teacher = top.indices.shape
        grid, block = row_config(n_rows, n_classes)
        rows_per_block = block[1]
        grid = max(1, min(grid, TOPK_MAP_BYTES // (4 * n_classes * rows_per_block)))
        n_slots = grid * rows_per_block
        class_map = self.empty((n_slots, n_classes), np.dtype(np.int32))
        egrid, eblock = elementwise_config(n_slots * n_classes)
        _launch("clear_map", dtype, egrid, eblock, self.stream, class_map=class_map)
        n_entries = n_teachers * per_teacher
        workspace = (
            class_map,
            self.empty((n_slots, n_entries), np.dtype(np.int64)),
            self.empty((n_slots, n_entries), np.dtype(np.float64)),
            self.empty((n_slots, 5, n_teachers), np.dtype(np.float64)),
        )
        tau = float(top.params.retemper)
        sparse = DeviceTopKParams(
            np.int64(top.params.tail), tau, tau * temperature, float(beta), 1.0 / temperature
        )
        top_arrays = (
            cuda.to_device(top.indices, stream=self.stream),
            cuda.to_device(top.logprobs, stream=self.stream),
        )
        _launch(
            "topk_rows", dtype, grid, block, self.stream, top=top_arrays,
            teacher_weights=self.vector(weights, np.dtype(np.float64)), sparse=sparse, workspace=workspace,
            **rows,
        )  # fmt: skip

    def _raise_on_bad_labels(self, bad_labels, n_classes: int) -> None:
        n_bad = int(bad_labels.copy_to_host(stream=self.stream)[0])
        if self.stream:
            self.stream.synchronize()
        if n_bad:
            raise ValueError(f"labels must be in [0, {n_classes}): {n_bad} labels are outside it")

    def wrap(self, out, like):
        """Return ``out`` as the array type of ``like`` when that type can wrap
        CUDA memory without a copy (CuPy, torch), else as a numba device array."""
        module = type(like).__module__.split(".")[0]
        bfloat16 = _arrays.is_bfloat16(np.dtype(out.dtype))
        if module == "cupy" and not bfloat16:  # CuPy has no bfloat16
            import cupy

            return cupy.asarray(out)
        if module == "torch":
            import torch

            if bfloat16:  # through its bits: an interface can only call bfloat16 "<V2"
                return torch.as_tensor(out.view(np.int16), device="cuda").view(torch.bfloat16)
            return torch.as_tensor(out, device="cuda")
        return out

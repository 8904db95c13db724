"""Target choice, the compiled-kernel cache, and the CPU backend.

``distiller.py`` validates arguments and then talks to a *backend*: the
``HostBackend`` here for NumPy inputs, or ``numba_kd.cuda.backend.CudaBackend``
(imported lazily) for inputs that live on a CUDA device.  Both offer the same
methods: ``asarray``, ``cast``, ``labels``, ``empty``, ``combine_logits``,
``combine_probabilities``, ``loss`` and ``wrap``.

Kernels take their arguments by parameter name; their signatures come from the
argument values (``numba_kd._signatures``).  A specialization is compiled on
first use, one per (operation, target, argument types), and kept in
``_COMPILED``; numba's on-disk cache lets a later process load it instead of
compiling it again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from numba_kd import _math, _runtime, _signatures

_COMPILED: dict[tuple, Any] = {}
_COMPILE_LOCK = threading.Lock()

Teachers = tuple[Any, ...] | Any


def compiled_signature_count() -> int:
    """Number of kernel specializations compiled (or loaded) in this process."""
    return len(_COMPILED)


def cached_kernel(key: tuple, build: Callable[[], Any]) -> Any:
    """The kernel for ``key``, built (compiled or loaded from disk) once per process."""
    kernel = _COMPILED.get(key)
    if kernel is None:
        with _COMPILE_LOCK:
            kernel = _COMPILED.get(key)
            if kernel is None:
                kernel = _COMPILED[key] = build()
    return kernel


# ---------------------------------------------------------------- device detection


def is_device_array(x: object) -> bool:
    """True for objects whose data lives on a CUDA device.

    Looks at ``__cuda_array_interface__`` (numba, CuPy, torch CUDA tensors)
    without importing any of those libraries; a torch tensor that requires grad
    refuses the attribute with RuntimeError, which still means "on the device".
    Simulator device arrays have no interface and are recognized by their type.
    """
    try:
        x.__cuda_array_interface__  # noqa: B018
    except AttributeError:
        module = type(x).__module__
        return module.startswith("numba") and "cuda" in module and hasattr(x, "copy_to_host")
    except RuntimeError:
        return True
    return True


def flatten_arrays(inputs: Iterable[object]) -> list[object]:
    """The arrays of ``inputs``, with lists and tuples of teacher arrays opened up."""
    flat: list[object] = []
    for x in inputs:
        if isinstance(x, (list, tuple)):
            flat.extend(x)
        else:
            flat.append(x)
    return flat


def has_dask_array(inputs: Iterable[object]) -> bool:
    """Whether any input is a dask array (without importing dask)."""
    return any(type(x).__module__.split(".")[0] == "dask" for x in flatten_arrays(inputs))


def backend_for(inputs: Iterable[object], device: str | None, stream: object = None):
    """The backend for these inputs: from where they live, or from ``device``."""
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f'device must be "cpu", "cuda" or None, got {device!r}')
    arrays = flatten_arrays(inputs)
    if device is None:
        on_device = [is_device_array(x) for x in arrays]
        if all(on_device):
            device = "cuda"
        elif not any(on_device):
            device = "cpu"
        else:
            raise ValueError(
                "inputs mix host (NumPy) arrays and CUDA device arrays; numba_kd does not copy "
                'silently: move them to one device, or pass device="cpu" or device="cuda" to copy'
            )
    if device == "cpu":
        if stream is not None:
            raise ValueError("stream= applies to CUDA inputs only")
        return HOST
    from numba_kd.cuda import backend as cuda_backend

    return cuda_backend.CudaBackend(cuda_backend.stream_of(arrays, stream))


# ---------------------------------------------------------------- CPU backend


# Above this temperature a float32 soft term, a difference of log-sums that agree
# to about 1/T^2 of their size, would lose its digits: float32 losses then
# compute per element in float64.
FAST_MAX_TEMPERATURE = 16.0
# Below this temperature float32 losses compute in float64: 1/T times a logit range
# could leave the float32 range.
FLOAT32_MIN_TEMPERATURE = 1e-6


def check_output(out: Any, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Shape and dtype of a caller's ``out=`` array (both targets)."""
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, the result has shape {tuple(shape)}")
    if np.dtype(out.dtype) != dtype:
        raise TypeError(f"out has dtype {np.dtype(out.dtype)}, the result has dtype {dtype}")


# Label value that never matches a validated label: "no ignore_index".
NO_IGNORE = int(np.iinfo(np.int64).min)
COMBINES = _math.COMBINES
DIVERGENCES = _math.DIVERGENCES
WEIGHTINGS = _math.WEIGHTINGS
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class LossOptions:
    """The loss options of distillation_loss / loss_and_grad, validated."""

    reduction: str = "mean"
    ignore_index: int | None = None
    combine: str = "logits"
    divergence: str = "forward_kl"
    beta: float = 0.5
    teacher_weighting: str = "static"

    @property
    def is_default(self) -> bool:
        """entrenar's loss (logit combine, forward KL, static weights): the fast kernel."""
        return (
            self.combine == "logits"
            and self.divergence == "forward_kl"
            and self.teacher_weighting == "static"
        )

    @property
    def ignore_code(self) -> int:
        return NO_IGNORE if self.ignore_index is None else self.ignore_index

    def codes(self) -> tuple[int, int, int]:
        return (
            COMBINES.index(self.combine),
            DIVERGENCES.index(self.divergence),
            WEIGHTINGS.index(self.teacher_weighting),
        )

    def scales(self, labels: Any, n_rows: int, temperature: float, alpha: float) -> tuple[int, float, float]:
        """(divisor, c_soft, c_hard) for host labels: the mean divides by the rows not
        ignored (at least 1).  The CUDA backend counts them on the device instead."""
        divisor = 1
        if self.reduction == "mean":
            ignored = 0 if self.ignore_index is None else int(np.count_nonzero(labels == self.ignore_index))
            valid = n_rows - ignored
            divisor = max(valid, 1)
        return divisor, alpha * temperature * temperature / divisor, (1.0 - alpha) / divisor


def _compute_dtype(dtype: np.dtype, temperature: float) -> np.dtype:
    """The per-element arithmetic of the general kernel: float32 inputs compute in
    float32 (vectorized exp and log) for temperatures in [FLOAT32_MIN_TEMPERATURE,
    FAST_MAX_TEMPERATURE], in float64 outside."""
    if dtype == np.float32 and FLOAT32_MIN_TEMPERATURE <= temperature <= FAST_MAX_TEMPERATURE:
        return dtype
    return np.dtype(np.float64)


# Empty arrays that carry the per-element arithmetic's dtype into the kernels.
_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}


def _per_block(n_rows: int) -> int:
    from numba_kd.cpu import kernels

    return kernels.rows_per_block(n_rows, numba.get_num_threads())


def run_cpu_kernel(op: str, **arguments: Any) -> Any:
    """Run CPU kernel ``op`` on its arguments (by parameter name).

    The specialization for the arguments' types is compiled (or loaded from
    numba's disk cache) on first use and kept in ``_COMPILED``.
    """
    from numba_kd.cpu import kernels

    kernel = getattr(kernels, op)
    args = _signatures.bind(kernel.py_func, arguments)
    mode = _runtime.launch_mode()
    key = (op, "cpu", mode == _runtime.SERIAL, _signatures.signature_key(args))

    def build():
        dispatcher = _runtime.serial_dispatcher(kernel) if mode == _runtime.SERIAL else kernel
        return dispatcher.compile(_signatures.types_of(kernel.py_func, args, host=True))

    compiled = cached_kernel(key, build)
    if mode == _runtime.LOCKED:
        return _runtime.locked(compiled)(*args)
    return compiled(*args)


class HostBackend:
    """NumPy arrays, CPU kernels."""

    target = "cpu"

    def asarray(self, x: object) -> np.ndarray:
        if is_device_array(x):
            return _to_host(x)
        return np.asarray(x)

    def cast(self, arr: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
        return arr.astype(dtype)

    def labels(self, y: object, n_rows: int, n_classes: int, ignore_index: int | None = None) -> np.ndarray:
        arr = self.asarray(y)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"labels must be integer class indices, got dtype {arr.dtype}")
        if arr.ndim != 1:
            raise ValueError(f"labels must be a 1-D array with one label per row, got shape {arr.shape}")
        if arr.shape[0] != n_rows:
            raise ValueError(f"labels has {arr.shape[0]} entries but the logits have {n_rows} rows")
        bad = (arr < 0) | (arr >= n_classes)
        if ignore_index is not None:
            bad &= arr != ignore_index
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(f"labels must be in [0, {n_classes}): labels[{first}] = {arr[first]}")
        return np.ascontiguousarray(arr, dtype=np.int64)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def has_nonfinite(self, arr: np.ndarray) -> bool:
        """Whether ``arr`` holds a NaN or an infinity (checked in row blocks: O(block) memory)."""
        rows = arr.reshape(-1, arr.shape[-1]) if arr.ndim > 2 else arr
        step = max(1, (1 << 20) // max(1, rows.shape[-1]))
        return any(not np.isfinite(rows[i : i + step]).all() for i in range(0, rows.shape[0], step))

    def output(self, out: object, shape: tuple[int, ...], dtype: np.dtype, inputs: list) -> np.ndarray:
        """A caller's ``out=`` array, checked: a writable C-contiguous NumPy array of
        this shape and dtype that shares no memory with the inputs."""
        if not isinstance(out, np.ndarray) or is_device_array(out):
            raise TypeError(f"out must be a NumPy array for host inputs, got {type(out).__name__}")
        check_output(out, shape, dtype)
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writable C-contiguous array")
        for x in flatten_arrays(inputs):
            if np.may_share_memory(out, x):
                raise ValueError("out must not share memory with the inputs")
        return out

    def combine_logits(self, teachers: Teachers, weights: np.ndarray, out: np.ndarray) -> None:
        run_cpu_kernel(
            "combine_logits", teachers=teachers, weights=weights, per_block=_per_block(out.shape[0]), out=out
        )

    def combine_probabilities(
        self, teachers: Teachers, weights: np.ndarray, temperature: float, eps: float, out: np.ndarray
    ) -> None:
        probs = _math.COMBINES.index("probs")
        params = _math.LossParams(NO_IGNORE, float(temperature), 0.5, probs, 0, 0, 0.0, 0.0, False)
        run_cpu_kernel(
            "combine_probabilities", teachers=teachers, weights=weights, params=params,
            eps=float(eps), per_block=_per_block(out.shape[0]), out=out,
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
        from numba_kd.cpu import kernels

        dtype = student.dtype
        n_rows = student.shape[0]
        divisor, c_soft, c_hard = options.scales(labels, n_rows, temperature, alpha)
        if grad_out is not None:
            grad = grad_out
        else:
            grad = np.empty(student.shape if want_grad else (0, 0), dtype=dtype)
        d_rows = np.empty(n_rows)
        ce_rows = np.empty(n_rows)
        params = _math.LossParams(
            options.ignore_code, float(temperature), float(options.beta), *options.codes(),
            float(c_soft), float(c_hard), bool(want_grad),
        )  # fmt: skip
        run_cpu_kernel(
            "general_rows", student=student, teachers=teachers, weights=weights, labels=labels,
            params=params, per_block=_per_block(n_rows), compute=_EMPTY[_compute_dtype(dtype, temperature)],
            grad=grad, d_rows=d_rows, ce_rows=ce_rows,
        )  # fmt: skip
        if options.reduction == "none":
            soft = (alpha * temperature * temperature * d_rows).astype(dtype)
            hard = ((1.0 - alpha) * ce_rows).astype(dtype)
            loss = soft + hard
        else:
            soft, hard = kernels.reduce_rows(d_rows, ce_rows, divisor, alpha, temperature)
            loss = soft + hard
        return loss, soft, hard, grad if want_grad else None

    def wrap(self, out: np.ndarray, like: object) -> np.ndarray:
        return out


HOST = HostBackend()


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

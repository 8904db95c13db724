"""The protocol both backends implement: ``cpu.backend.HostBackend`` (NumPy
arrays) and ``cuda.backend.CudaBackend`` (CUDA device arrays).

The public classes validate their arguments and then talk to a backend only
through these methods, so that they never ask where an array lives.
``tests/test_layers.py`` checks that both classes implement every method with
these parameter names.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from numba_kd._options import LossOptions


class Backend(Protocol):
    """Array handling and kernel launches for one target."""

    #: "cpu" or "cuda".
    target: str

    def asarray(self, x: object) -> Any:
        """``x`` as an array of this target (a copy only where the caller forced the target)."""

    def cast(self, arr: Any, dtype: np.dtype, name: str) -> Any:
        """``arr`` converted to ``dtype``, or ``TypeError`` where the target cannot convert it."""

    def labels(self, y: object, n_rows: int, n_classes: int, ignore_index: int | None = None) -> Any:
        """Labels checked for dtype, shape and range, as the kernels read them."""

    def merge_rows(self, arrays: list[tuple[str, Any]]) -> None:
        """Raise ``ValueError`` naming the array where merging the leading axes of
        ``[B, S, ...]`` inputs into rows would not give a view that the kernels can read."""

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """A new uninitialized array of this target."""

    def has_nonfinite(self, arr: Any, ignored: tuple[Any, int] | None = None) -> bool:
        """Whether ``arr`` ([N, C] or [K, N, C]) holds a NaN or an infinity in a row
        the kernels read: with ``ignored = (labels, ignore_index)``, rows whose label
        is ignore_index are never read and not checked."""

    def output(self, out: object, shape: tuple[int, ...], dtype: np.dtype, inputs: list) -> Any:
        """A caller's ``out=`` array, checked: shape, dtype, layout, and no memory shared with ``inputs``."""

    def combine_logits(self, teachers: Any, weights: np.ndarray, out: Any) -> None:
        """``out = sum_k w_k t_k``."""

    def combine_probabilities(
        self, teachers: Any, weights: np.ndarray, temperature: float, eps: float, out: Any
    ) -> None:
        """``out = T log(sum_k w_k softmax(t_k / T) + eps)`` (``eps = 0``: the exact log-mixture)."""

    def loss(
        self,
        student: Any,
        teachers: Any,
        weights: np.ndarray,
        labels: Any,
        temperature: float,
        alpha: float,
        options: LossOptions,
        want_grad: bool = False,
        return_device_scalar: bool = False,
        grad_out: Any = None,
    ) -> tuple[Any, Any, Any, Any]:
        """(loss, soft, hard, grad) of the rows; grad is None without ``want_grad``."""

    def wrap(self, out: Any, like: object) -> Any:
        """``out`` as the caller's array type where the target can share memory with it."""

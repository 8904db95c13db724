"""What the torch and JAX autograd adapters share: the argument rules and one
call of the loss (and its gradient) through the public classes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from numba_kd.distiller import DistillationLoss, EnsembleDistiller

# Options that place or shape the result, which an adapter decides itself.
_ADAPTER_DECIDES = ("out", "device", "stream", "return_device_scalar", "return_components")


def loss_function(distiller: object, alpha: float | None, options: Mapping[str, Any]) -> Callable[..., Any]:
    """``evaluate(student, teachers, labels, want_grad, **placement)``: the loss, or
    (loss, gradient), of ``distiller`` with ``alpha`` and the loss ``options``;
    ``placement`` is what the adapter decides (``stream=`` for CUDA tensors).

    An ``EnsembleDistiller`` needs ``alpha``; a ``DistillationLoss`` carries its own
    and takes ``alpha=None``."""
    taken = [name for name in _ADAPTER_DECIDES if name in options]
    if taken:
        raise TypeError(f"the autograd adapters do not take {', '.join(taken)}: they return the loss alone")
    options = dict(options)
    if isinstance(distiller, EnsembleDistiller):
        if alpha is None:
            raise TypeError("alpha is required with an EnsembleDistiller")

        def evaluate(student, teachers, labels, want_grad, **placement):
            method = distiller.loss_and_grad if want_grad else distiller.distillation_loss
            return method(student, teachers, labels, alpha, **options, **placement)

        return evaluate
    if isinstance(distiller, DistillationLoss):
        if alpha is not None:
            raise ValueError("alpha must be None with a DistillationLoss, which carries its own alpha")

        def evaluate(student, teacher, labels, want_grad, **placement):
            method = distiller.loss_and_grad if want_grad else distiller.forward
            return method(student, teacher, labels, **options, **placement)

        return evaluate
    raise TypeError(
        f"distiller must be an EnsembleDistiller or a DistillationLoss, got {type(distiller).__name__}"
    )

"""numba_kd's losses behind torch autograd (``pip install "numba_kd[torch]"``).

``distillation_loss`` returns a torch scalar (or per-row tensor) whose backward
is the gradient ``loss_and_grad`` computed in the same pass, on the CPU or on
the CUDA device where the tensors live.  Teachers receive no gradient.  First
derivatives only: a backward with ``create_graph=True`` raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from numba_kd import _adapters

__all__ = ["distillation_loss"]


def _detached(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (list, tuple)):
        return type(x)(_detached(item) for item in x)
    return x


def _loss_tensor(loss: Any, student: torch.Tensor) -> torch.Tensor:
    """The loss (a Python float or a per-row array) as a tensor beside the student."""
    if isinstance(loss, torch.Tensor):
        return loss.to(student.device)
    dtype = student.dtype if student.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.as_tensor(loss, dtype=dtype, device=student.device)


class _DistillationLoss(torch.autograd.Function):
    """The loss of ``evaluate``; its backward scales the gradient kept from the forward pass."""

    @staticmethod
    def forward(ctx, student, teachers, labels, evaluate: Callable[..., Any], per_row: bool):
        s, t, y = student.detach(), _detached(teachers), _detached(labels)
        ctx.per_row = per_row
        # torch's __cuda_array_interface__ names no stream: launch on torch's current
        # one, which orders the kernels after the work that produced the inputs.
        place = {"stream": torch.cuda.current_stream(s.device).cuda_stream} if s.is_cuda else {}
        if not ctx.needs_input_grad[0]:
            return _loss_tensor(evaluate(s, t, y, False, **place), student)
        loss, grad = evaluate(s, t, y, True, **place)
        ctx.save_for_backward(torch.as_tensor(grad, device=student.device))
        return _loss_tensor(loss, student)

    @staticmethod
    def backward(ctx, upstream):
        if torch.is_grad_enabled():
            # create_graph=True: the saved gradient is a constant to autograd, so any
            # derivative of this gradient (a Hessian product, a gradient penalty) would
            # silently lack the loss's second-order terms.
            raise RuntimeError(
                "numba_kd.torch gives first derivatives only: its gradient cannot be differentiated "
                "again (create_graph=True)"
            )
        (grad,) = ctx.saved_tensors
        scale = upstream.unsqueeze(-1) if ctx.per_row else upstream
        return (grad * scale).to(grad.dtype), None, None, None, None


def distillation_loss(
    distiller: Any,
    student: torch.Tensor,
    teachers: Any,
    labels: Any,
    alpha: float | None = None,
    **options: Any,
) -> torch.Tensor:
    """The distillation loss as a torch tensor, differentiable with respect to ``student``.

    Parameters
    ----------
    distiller : EnsembleDistiller or DistillationLoss
        The loss: an ``EnsembleDistiller`` with ``alpha``, or a
        ``DistillationLoss`` (one teacher), which carries its own alpha.
    student : torch.Tensor, shape [B, C] or [B, S, C]
        Student logits on the CPU or a CUDA device: float16, bfloat16, float32
        or float64.
    teachers : list of tensors, one stacked tensor, or TopK
        Teacher logits (one tensor for a ``DistillationLoss``), as the
        distiller takes them. They receive no gradient.
    labels : torch.Tensor or array_like of int
        Class indices, shape [B] or [B, S].
    alpha : float or None, default None
        The soft term's weight for an ``EnsembleDistiller``; None for a
        ``DistillationLoss``.
    **options
        The loss options of ``EnsembleDistiller.distillation_loss``
        (``reduction``, ``ignore_index``, ``combine``, ``divergence``, ``beta``,
        ``skew``, ``scale_by_t2``, ``teacher_weighting``, ``check_finite``).

    Returns
    -------
    torch.Tensor
        The loss: a 0-d tensor, or per row with ``reduction="none"``; float32
        for 16-bit students, else the student's dtype; on the student's device.
        Its backward is the gradient ``loss_and_grad`` computes with the loss.

    Raises
    ------
    TypeError
        For options an adapter decides itself (``out``, ``device``,
        ``stream``, ``return_device_scalar``, ``return_components``), a missing
        ``alpha``, or another object as ``distiller``; and as the distiller's
        methods raise.
    ValueError
        For ``alpha`` given with a ``DistillationLoss``, and as the
        distiller's methods raise.
    """
    if not isinstance(student, torch.Tensor):
        raise TypeError(f"student must be a torch.Tensor, got {type(student).__name__}")
    evaluate = _adapters.loss_function(distiller, alpha, options)
    per_row = options.get("reduction", "mean") == "none"
    return _DistillationLoss.apply(student, teachers, labels, evaluate, per_row)

"""numba_kd's losses behind JAX autodiff (``pip install "numba_kd[jax]"``).

``distillation_loss`` is a ``jax.custom_vjp`` function: the kernels run on the
host through ``jax.pure_callback`` (under ``jax.jit`` too), and the backward
pass scales the gradient that ``loss_and_grad`` computed in the forward pass.
Arrays on a GPU are copied to the host for the callback.  Teachers receive no
gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from numba_kd import _adapters

__all__ = ["distillation_loss"]


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def distillation_loss(
    distiller: Any, student: Any, teachers: Any, labels: Any, alpha: float | None = None, **options: Any
) -> jax.Array:
    """The distillation loss as a JAX array, differentiable with respect to ``student``.

    Parameters
    ----------
    distiller : EnsembleDistiller or DistillationLoss
        The loss: an ``EnsembleDistiller`` with ``alpha``, or a
        ``DistillationLoss`` (one teacher), which carries its own alpha.
    student : jax.Array, shape [B, C] or [B, S, C]
        Student logits: float16, bfloat16, float32 or float64 (float64 needs
        ``jax_enable_x64``).
    teachers : list of arrays, one stacked array, or TopK
        Teacher logits (one array for a ``DistillationLoss``), as the
        distiller takes them. They receive no gradient.
    labels : jax.Array or array_like of int
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
    jax.Array
        The loss: 0-d, or per row with ``reduction="none"``; float32 for
        16-bit logits, else the logits' (promoted) dtype. Its VJP with respect
        to ``student`` is the gradient ``loss_and_grad`` computes with the loss.

    Raises
    ------
    TypeError
        For options an adapter decides itself (``out``, ``device``,
        ``stream``, ``return_device_scalar``, ``return_components``), a missing
        ``alpha``, or another object as ``distiller``; and, when the callback
        runs, as the distiller's methods raise.
    ValueError
        For ``alpha`` given with a ``DistillationLoss``, and, when the callback
        runs, as the distiller's methods raise.
    """
    evaluate = _adapters.loss_function(distiller, alpha, options)
    student = jnp.asarray(student)
    # Teachers that are not arrays (TopK) hold host arrays: the callback closes over them.
    dense = jax.tree_util.tree_all(jax.tree_util.tree_map(_is_array, teachers))
    traced = jax.tree_util.tree_map(jnp.asarray, teachers) if dense else ()
    kept = None if dense else teachers
    dtypes = [student.dtype, *(x.dtype for x in jax.tree_util.tree_leaves(traced))]
    loss_dtype = (
        jnp.result_type(*dtypes, jnp.float32)
        if any(d.itemsize == 2 for d in dtypes)
        else jnp.result_type(*dtypes)
    )
    per_row = options.get("reduction", "mean") == "none"
    loss_type = jax.ShapeDtypeStruct(student.shape[:-1] if per_row else (), loss_dtype)
    grad_type = jax.ShapeDtypeStruct(student.shape, student.dtype)

    def host_loss(s, t, y):
        return np.asarray(evaluate(s, t if dense else kept, y, False), dtype=loss_dtype)

    def host_loss_and_grad(s, t, y):
        loss, grad = evaluate(s, t if dense else kept, y, True)
        return np.asarray(loss, dtype=loss_dtype), np.asarray(grad).astype(student.dtype, copy=False)

    @jax.custom_vjp
    def loss(s, t, y):
        return jax.pure_callback(host_loss, loss_type, s, t, y, vmap_method="sequential")

    def forward(s, t, y):
        value, grad = jax.pure_callback(
            host_loss_and_grad, (loss_type, grad_type), s, t, y, vmap_method="sequential"
        )
        return value, grad

    def backward(grad, upstream):
        scale = upstream[..., None] if per_row else upstream
        return (grad * scale).astype(grad.dtype), None, None

    loss.defvjp(forward, backward)
    return loss(student, traced, jnp.asarray(labels))

"""The public classes, ``EnsembleDistiller`` and ``DistillationLoss``.

The semantics are those of the Rust crate entrenar's ``distill`` module.  Each
public method checks nothing itself: it is one call into ``_entry``, with the
options validated by ``_validate`` and a ``Placement``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from numba_kd import _entry, _validate
from numba_kd._validate import MAX_TEMPERATURE

TeacherLogits = Sequence[ArrayLike] | ArrayLike
Device = Literal["cpu", "cuda"] | None
Reduction = Literal["mean", "sum", "none"]
Combine = Literal["logits", "probs"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Weighting = Literal["static", "confidence", "entropy"]

__all__ = ["MAX_TEMPERATURE", "DistillationLoss", "EnsembleDistiller"]


class EnsembleDistiller:
    """Multi-teacher knowledge distillation (entrenar's ``EnsembleDistiller``).

    Parameters
    ----------
    weights:
        One non-negative weight per teacher; normalized to sum to 1.
    temperature:
        Softmax temperature ``T > 0``.
    """

    def __init__(self, weights: ArrayLike, temperature: float) -> None:
        self._weights = _validate.weights(weights)
        self._temperature = _validate.check_temperature(temperature)

    @classmethod
    def uniform(cls, num_teachers: int, temperature: float) -> EnsembleDistiller:
        """Equal weights for ``num_teachers`` teachers."""
        return cls(np.ones(_validate.num_teachers(num_teachers)), temperature)

    @property
    def weights(self) -> NDArray[np.float64]:
        """Normalized teacher weights (read-only, sum to 1)."""
        return self._weights

    @property
    def temperature(self) -> float:
        return self._temperature

    @property
    def num_teachers(self) -> int:
        return int(self._weights.shape[0])

    def __repr__(self) -> str:
        return f"EnsembleDistiller(weights={self._weights.tolist()}, temperature={self._temperature})"

    def combine_teachers(
        self,
        teachers: TeacherLogits,
        *,
        out: Any = None,
        check_finite: bool = False,
        device: Device = None,
        stream: object = None,
    ) -> Any:
        """Weighted average of the teacher logits, ``sum_k w_k t_k``: ``[B, C]``.

        The result lives where the teachers live (see :ref:`Devices <devices>`);
        ``out`` receives it when given (and is returned).
        """
        return _entry.combine(
            self._weights, self._temperature, teachers, None, check_finite,
            _entry.Placement(device, stream, out),
        )  # fmt: skip

    def combine_via_probabilities(
        self,
        teachers: TeacherLogits,
        eps: float = 1e-10,
        *,
        out: Any = None,
        check_finite: bool = False,
        device: Device = None,
        stream: object = None,
    ) -> Any:
        """``T * log(sum_k w_k softmax(t_k / T) + eps)``: ``[B, C]``.

        ``eps = 0`` gives the exact log-mixture, computed in log space.  A row in
        which any teacher holds a NaN or an infinity is NaN.
        """
        return _entry.combine(
            self._weights, self._temperature, teachers, _validate.eps(eps), check_finite,
            _entry.Placement(device, stream, out),
        )  # fmt: skip

    def distillation_loss(
        self,
        student: ArrayLike,
        teachers: TeacherLogits,
        labels: ArrayLike,
        alpha: float,
        *,
        reduction: Reduction = "mean",
        ignore_index: int | None = None,
        combine: Combine = "logits",
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        teacher_weighting: Weighting = "static",
        return_components: bool = False,
        check_finite: bool = False,
        device: Device = None,
        stream: object = None,
        return_device_scalar: bool = False,
    ) -> Any:
        """``alpha * T^2 * D(p, q) + (1 - alpha) * CE`` reduced over rows.

        By default (entrenar's loss) ``D`` is ``KL(p || q)``, ``p = softmax(z / T)``
        with ``z`` the weighted logit average of the teachers, and the result is
        the mean over rows as a Python float.  See the user guide for every
        option; ``return_components=True`` returns ``LossComponents(loss, soft, hard)``.
        """
        return _entry.loss(
            self._weights, self._temperature, student, teachers, labels, alpha,
            _validate.loss_options(
                reduction, ignore_index, combine, divergence, beta, teacher_weighting, return_components,
                check_finite,
            ),
            _entry.Placement(device, stream, None, return_device_scalar),
            want_grad=False,
        )  # fmt: skip

    def loss_and_grad(
        self,
        student: ArrayLike,
        teachers: TeacherLogits,
        labels: ArrayLike,
        alpha: float,
        *,
        reduction: Reduction = "mean",
        ignore_index: int | None = None,
        combine: Combine = "logits",
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        teacher_weighting: Weighting = "static",
        return_components: bool = False,
        out: Any = None,
        check_finite: bool = False,
        device: Device = None,
        stream: object = None,
        return_device_scalar: bool = False,
    ) -> tuple[Any, Any]:
        """``(loss, grad)``: the loss of :meth:`distillation_loss` (on the CPU the same
        value, bit for bit) and its gradient with respect to the student logits,
        shaped like them, in the computation dtype (float16 logits compute in
        float32; mixed dtypes promote as NumPy does).  With ``reduction="none"`` the
        gradient is that of the sum of the per-row losses; ignored rows get a zero
        gradient.  ``out`` receives the gradient when given (and is returned)."""
        return _entry.loss(
            self._weights, self._temperature, student, teachers, labels, alpha,
            _validate.loss_options(
                reduction, ignore_index, combine, divergence, beta, teacher_weighting, return_components,
                check_finite,
            ),
            _entry.Placement(device, stream, out, return_device_scalar),
            want_grad=True,
        )  # fmt: skip


class DistillationLoss:
    """Single-teacher distillation loss (entrenar's ``DistillationLoss``).

    ``alpha * T^2 * mean KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * mean CE(s, y)``.
    """

    def __init__(self, temperature: float, alpha: float) -> None:
        self._temperature = _validate.check_temperature(temperature)
        self._alpha = _validate.check_alpha(alpha)

    @property
    def temperature(self) -> float:
        return self._temperature

    @property
    def alpha(self) -> float:
        return self._alpha

    def __repr__(self) -> str:
        return f"DistillationLoss(temperature={self._temperature}, alpha={self._alpha})"

    def forward(
        self,
        student: ArrayLike,
        teacher: ArrayLike,
        labels: ArrayLike,
        *,
        reduction: Reduction = "mean",
        ignore_index: int | None = None,
        combine: Combine = "logits",
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        teacher_weighting: Weighting = "static",
        return_components: bool = False,
        check_finite: bool = False,
        device: Device = None,
        stream: object = None,
        return_device_scalar: bool = False,
    ) -> Any:
        """The loss of ``student`` logits against one ``teacher``'s logits, as a float
        (options as in :meth:`EnsembleDistiller.distillation_loss`; with one teacher
        ``combine`` and ``teacher_weighting`` change nothing)."""
        return _entry.loss(
            None, self._temperature, student, teacher, labels, self._alpha,
            _validate.loss_options(
                reduction, ignore_index, combine, divergence, beta, teacher_weighting, return_components,
                check_finite,
            ),
            _entry.Placement(device, stream, None, return_device_scalar),
            want_grad=False,
        )  # fmt: skip

    def loss_and_grad(
        self,
        student: ArrayLike,
        teacher: ArrayLike,
        labels: ArrayLike,
        *,
        reduction: Reduction = "mean",
        ignore_index: int | None = None,
        combine: Combine = "logits",
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        teacher_weighting: Weighting = "static",
        return_components: bool = False,
        out: Any = None,
        check_finite: bool = False,
        device: Device = None,
        stream: object = None,
        return_device_scalar: bool = False,
    ) -> tuple[Any, Any]:
        """``(loss, grad)`` with the gradient with respect to the student logits
        (written into ``out`` when given)."""
        return _entry.loss(
            None, self._temperature, student, teacher, labels, self._alpha,
            _validate.loss_options(
                reduction, ignore_index, combine, divergence, beta, teacher_weighting, return_components,
                check_finite,
            ),
            _entry.Placement(device, stream, out, return_device_scalar),
            want_grad=True,
        )  # fmt: skip

    __call__ = forward

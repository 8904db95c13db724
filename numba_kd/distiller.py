"""The public classes, ``EnsembleDistiller`` and ``DistillationLoss``.

The semantics are those of the Rust crate entrenar's ``distill`` module.  Each
public method checks nothing itself: it is one call into ``_entry``, with the
options validated by ``_validate`` and a ``Placement``.
"""

from __future__ import annotations

import textwrap
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
Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"]
Weighting = Literal["static", "confidence", "entropy"]

__all__ = ["MAX_TEMPERATURE", "DistillationLoss", "EnsembleDistiller"]

# Shared parameter descriptions, written once and placed into the docstrings by
# _documented(), so that the loss methods of both classes cannot drift apart.
_DOC_BLOCKS = {
    "student": """student : array_like, shape [B, C] or [B, S, C]
    Student logits: float16, bfloat16 (ml_dtypes, torch or JAX), float32 or
    float64; 16-bit logits compute as float32. NumPy arrays, CUDA
    device arrays (CuPy, numba, torch), DLPack arrays (torch, JAX) or dask
    arrays; results live where they do, in the student's library.""",
    "teachers": """teachers : list of K arrays [B, C] or [B, S, C], or one array [K, B, C] or [K, B, S, C]
    Teacher logits, K being the number of weights. A list is read in place,
    never stacked; the arrays may have any strides.""",
    "teacher": """teacher : array_like, shape like student
    The teacher's logits.""",
    "labels": """labels : array_like of int, shape [B] or [B, S]
    Class indices in [0, C), or ignore_index.""",
    "alpha": """alpha : float
    Weight of the soft (distillation) term, in [0, 1]; the hard
    (cross-entropy) term gets 1 - alpha.""",
    "loss options": """reduction : {"mean", "sum", "none"}, default "mean"
    Over rows: the mean over the rows not ignored, the sum, or one value per
    row (an array shaped like labels).
ignore_index : int or None, default None
    Rows whose label equals it add nothing to the loss and get a zero
    gradient (-100 is the usual padding label).
combine : {"logits", "probs"}, default "logits"
    The target: softmax(z / T) of the weighted logit average z, or the
    weighted average of the teachers' softmax(t_k / T).
divergence : {"forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"}
    Default "forward_kl": KL(p || q), KL(q || p), the generalized Jensen-Shannon divergence with
    weight beta, the total variation distance sum |p - q| / 2, or the skew
    KLs KL(p || skew p + (1 - skew) q) and KL(q || skew q + (1 - skew) p),
    where p is the target and q = softmax(s / T).
beta : float, default 0.5
    The JSD weight, in (0, 1); used with divergence="jsd" only.
skew : float, default 0.1
    The skew KLs' lambda, in (0, 1]; used with the skew divergences only.
scale_by_t2 : bool, default True
    The soft term is alpha T^2 D (entrenar's convention, which keeps the
    gradient's size independent of T); False gives alpha D, the loss TRL and
    Liger-Kernel report.
teacher_weighting : {"static", "confidence", "entropy"}, default "static"
    The weights as given; or per row each weight times the teacher's
    probability of the label (confidence) or times exp(-entropy) of its
    softmax(t_k / T) (entropy), normalized to sum 1.
return_components : bool, default False
    Return LossComponents(loss, soft, hard) instead of the loss alone.
check_finite : bool, default False
    Raise ValueError for NaN or infinite logits; without it such a row
    gives NaN.""",
    "placement": """device : {"cpu", "cuda"} or None, default None
    Force a target and copy the inputs there; None runs where the inputs
    live (mixing host and device inputs raises ValueError).
stream : numba stream, int or None, default None
    CUDA only: the stream to launch on (an int is a raw cudaStream_t
    handle); None uses the stream the inputs name.""",
    "device scalar": """return_device_scalar : bool, default False
    CUDA only: return losses as 1-element device arrays, without
    synchronizing.""",
    "raises": """TypeError
    An argument of the wrong type: logits that are not floating point,
    labels that are not integers, a masked array, a tensor that requires
    grad, a flag that is not a bool.
ValueError
    Shapes that do not match, labels outside [0, C), an unknown option,
    alpha outside [0, 1], no rows, or non-finite logits with check_finite.""",
}


def _documented(method):
    """Fill the ``{name}`` lines of ``method``'s docstring from _DOC_BLOCKS."""
    doc = method.__doc__
    for name, text in _DOC_BLOCKS.items():
        marker = "        {" + name + "}"
        if marker in doc:
            doc = doc.replace(marker, textwrap.indent(text, " " * 8))
    method.__doc__ = doc
    return method


class EnsembleDistiller:
    """Multi-teacher knowledge distillation (entrenar's ``EnsembleDistiller``).

    Combines K teachers' logits and computes the distillation loss of a student
    against them, on the CPU or a CUDA device, wherever the inputs live.

    Parameters
    ----------
    weights : sequence of float, length K
        One non-negative weight per teacher, normalized to sum 1.
    temperature : float
        Softmax temperature T, with 0 < T <= 1e6 (MAX_TEMPERATURE) and a finite 1/T.

    Raises
    ------
    TypeError
        Weights that are not real numbers, or a temperature that is not one.
    ValueError
        No weights, a negative or non-finite weight, weights summing to 0, or a
        temperature outside its range.

    Examples
    --------
    >>> import numpy as np
    >>> import numba_kd as kd
    >>> d = kd.EnsembleDistiller([1.0, 3.0], temperature=2.0)
    >>> d.weights
    array([0.25, 0.75])
    >>> student = np.zeros((2, 3))
    >>> teachers = [np.zeros((2, 3)), np.zeros((2, 3))]
    >>> round(d.distillation_loss(student, teachers, np.array([0, 2]), alpha=0.5), 6)
    0.549306
    """

    def __init__(self, weights: ArrayLike, temperature: float) -> None:
        self._weights = _validate.weights(weights)
        self._temperature = _validate.check_temperature(temperature)

    @classmethod
    def uniform(cls, num_teachers: int, temperature: float) -> EnsembleDistiller:
        """A distiller with equal weights for ``num_teachers`` teachers.

        Parameters
        ----------
        num_teachers : int
            K >= 1.
        temperature : float
            Softmax temperature T, as for the constructor.

        Returns
        -------
        EnsembleDistiller

        Raises
        ------
        TypeError
            A num_teachers that is not an integer.
        ValueError
            num_teachers < 1, or a temperature outside its range.

        Examples
        --------
        >>> import numba_kd as kd
        >>> kd.EnsembleDistiller.uniform(4, temperature=1.0).weights
        array([0.25, 0.25, 0.25, 0.25])
        """
        return cls(np.ones(_validate.num_teachers(num_teachers)), temperature)

    @property
    def weights(self) -> NDArray[np.float64]:
        """Normalized teacher weights (sum to 1): a read-only copy, so that no change
        to it reaches the distiller."""
        copy = self._weights.copy()
        copy.flags.writeable = False
        return copy

    @property
    def temperature(self) -> float:
        """The softmax temperature T."""
        return self._temperature

    @property
    def num_teachers(self) -> int:
        """K, the number of teachers (of weights)."""
        return int(self._weights.shape[0])

    def __repr__(self) -> str:
        return f"EnsembleDistiller(weights={self._weights.tolist()}, temperature={self._temperature})"

    @_documented
    def combine_teachers(
        self,
        teachers: TeacherLogits,
        *,
        out: Any = None,
        check_finite: bool = False,
        device: Device = None,
        stream: object = None,
    ) -> Any:
        """The weighted average of the teacher logits, ``z = sum_k w_k t_k``.

        Parameters
        ----------
        {teachers}
        out : array, shape [B, C], optional
            Receives the result (and is returned): a writable C-contiguous array
            of the result's dtype (or float32 for a 16-bit result), on the
            teachers' device, sharing no memory with them.
        check_finite : bool, default False
            Raise ValueError for NaN or infinite logits; without it they follow
            IEEE arithmetic element by element.
        {placement}

        Returns
        -------
        array, shape [B, C]
            In the teachers' (promoted) dtype, where the teachers live: NumPy,
            CuPy, torch or numba device array, or dask array. 16-bit teachers
            compute as float32, rounded once into the result.

        Raises
        ------
        TypeError
            Logits that are not floating point, or an unusable ``out``.
        ValueError
            No teachers, a number of teachers other than K, shapes that differ.

        Examples
        --------
        >>> import numpy as np
        >>> import numba_kd as kd
        >>> d = kd.EnsembleDistiller([1.0, 3.0], temperature=2.0)
        >>> d.combine_teachers([np.array([[0.0, 4.0]]), np.array([[4.0, 0.0]])])
        array([[3., 1.]])
        """
        return _entry.combine(
            self._weights, self._temperature, teachers, None, check_finite,
            _entry.Placement(device, stream, out),
        )  # fmt: skip

    @_documented
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
        """Soft labels from the probability mixture: ``T log(sum_k w_k softmax(t_k / T) + eps)``.

        Parameters
        ----------
        {teachers}
        eps : float, default 1e-10
            Added to the mixture before the log (entrenar's form), >= 0. With
            ``eps=0`` the result is the exact log-mixture, computed in log space,
            so that no probability underflows to log(0).
        out : array, shape [B, C], optional
            Receives the result (and is returned), as for combine_teachers.
        check_finite : bool, default False
            Raise ValueError for NaN or infinite logits; without it a row in which
            any teacher holds one is NaN.
        {placement}

        Returns
        -------
        array, shape [B, C]
            In the teachers' (promoted) dtype, where the teachers live.

        Raises
        ------
        TypeError
            Logits that are not floating point, eps that is not a real number, or
            an unusable ``out``.
        ValueError
            A negative or non-finite eps, or teachers as for combine_teachers.

        Examples
        --------
        >>> import numpy as np
        >>> import numba_kd as kd
        >>> d = kd.EnsembleDistiller([1.0, 1.0], temperature=1.0)
        >>> z = d.combine_via_probabilities([np.array([[0.0, 0.0]]), np.array([[0.0, 0.0]])], eps=0)
        >>> np.exp(z).round(6)
        array([[0.5, 0.5]])
        """
        return _entry.combine(
            self._weights, self._temperature, teachers, _validate.eps(eps), check_finite,
            _entry.Placement(device, stream, out),
        )  # fmt: skip

    @_documented
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
        skew: float = 0.1,
        scale_by_t2: bool = True,
        teacher_weighting: Weighting = "static",
        return_components: bool = False,
        check_finite: bool = False,
        device: Device = None,
        stream: object = None,
        return_device_scalar: bool = False,
    ) -> Any:
        """The distillation loss ``alpha T^2 D(p, q) + (1 - alpha) CE(s, y)``, reduced over rows.

        By default (entrenar's loss) D is KL(p || q) with p = softmax(z / T), z the
        weighted logit average of the teachers, q = softmax(s / T), and the loss
        is the mean over rows. The formulas of every option are in the user
        guide (docs/guide.md).

        Parameters
        ----------
        {student}
        {teachers}
        {labels}
        {alpha}
        {loss options}
        {placement}
        {device scalar}

        Returns
        -------
        float, array or LossComponents
            A Python float for "mean" and "sum" (a device array with
            return_device_scalar), an array shaped like labels for "none" (float32
            for 16-bit logits); with return_components, LossComponents(loss,
            soft, hard) of those.

        Raises
        ------
        {raises}

        Examples
        --------
        >>> import numpy as np
        >>> import numba_kd as kd
        >>> d = kd.EnsembleDistiller([1.0, 1.0], temperature=2.0)
        >>> student = np.array([[1.0, 0.0, 0.0]])
        >>> teachers = [np.array([[2.0, 0.0, 0.0]]), np.array([[0.0, 0.0, 0.0]])]
        >>> parts = d.distillation_loss(student, teachers, np.array([0]), 0.5, return_components=True)
        >>> round(parts.loss, 6), round(parts.soft, 6), round(parts.hard, 6)
        (0.275722, 0.0, 0.275722)
        """
        return _entry.loss(
            self._weights, self._temperature, student, teachers, labels, alpha,
            _validate.loss_options(
                reduction, ignore_index, combine, divergence, beta, teacher_weighting, return_components,
                check_finite, skew, scale_by_t2,
            ),
            _entry.Placement(device, stream, None, return_device_scalar),
            want_grad=False,
        )  # fmt: skip

    @_documented
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
        skew: float = 0.1,
        scale_by_t2: bool = True,
        teacher_weighting: Weighting = "static",
        return_components: bool = False,
        check_finite: bool = False,
        out: Any = None,
        device: Device = None,
        stream: object = None,
        return_device_scalar: bool = False,
    ) -> tuple[Any, Any]:
        """The loss of distillation_loss and its gradient with respect to the student logits.

        One fused pass computes both; on the CPU the loss is the value
        distillation_loss gives, bit for bit.

        Parameters
        ----------
        {student}
        {teachers}
        {labels}
        {alpha}
        {loss options}
        out : array, shape like student, optional
            Receives the gradient (and is returned): a writable C-contiguous
            array of the gradient's dtype (or float32 for a 16-bit gradient), on
            the student's device, sharing no memory with the inputs.
        {placement}
        {device scalar}

        Returns
        -------
        loss : float, array or LossComponents
            As distillation_loss returns it.
        grad : array, shape like student
            d loss / d student, in the inputs' dtype (mixed dtypes promote as
            NumPy does; 16-bit logits compute in float32 and the gradient is
            rounded once to their dtype). With
            reduction="none" it is the gradient of the sum of the per-row
            losses; ignored rows get zeros.

        Raises
        ------
        {raises}

        Examples
        --------
        >>> import numpy as np
        >>> import numba_kd as kd
        >>> d = kd.EnsembleDistiller([1.0], temperature=1.0)
        >>> loss, grad = d.loss_and_grad(np.zeros((1, 2)), [np.zeros((1, 2))], np.array([1]), alpha=0.0)
        >>> round(loss, 6), grad
        (0.693147, array([[ 0.5, -0.5]]))
        """
        return _entry.loss(
            self._weights, self._temperature, student, teachers, labels, alpha,
            _validate.loss_options(
                reduction, ignore_index, combine, divergence, beta, teacher_weighting, return_components,
                check_finite, skew, scale_by_t2,
            ),
            _entry.Placement(device, stream, out, return_device_scalar),
            want_grad=True,
        )  # fmt: skip


class DistillationLoss:
    """Single-teacher distillation loss (entrenar's ``DistillationLoss``).

    ``alpha T^2 mean KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) mean CE(s, y)``
    by default; the one-teacher case of EnsembleDistiller's loss, with the same
    options.

    Parameters
    ----------
    temperature : float
        Softmax temperature T, with 0 < T <= 1e6 and a finite 1/T.
    alpha : float
        Weight of the soft term, in [0, 1].

    Raises
    ------
    TypeError
        A temperature or alpha that is not a real number.
    ValueError
        A temperature or alpha outside its range.

    Examples
    --------
    >>> import numpy as np
    >>> import numba_kd as kd
    >>> loss_fn = kd.DistillationLoss(temperature=2.0, alpha=1.0)
    >>> round(loss_fn(np.zeros((1, 4)), np.zeros((1, 4)), np.array([3])), 6)
    0.0
    """

    def __init__(self, temperature: float, alpha: float) -> None:
        self._temperature = _validate.check_temperature(temperature)
        self._alpha = _validate.check_alpha(alpha)

    @property
    def temperature(self) -> float:
        """The softmax temperature T."""
        return self._temperature

    @property
    def alpha(self) -> float:
        """The weight of the soft term."""
        return self._alpha

    def __repr__(self) -> str:
        return f"DistillationLoss(temperature={self._temperature}, alpha={self._alpha})"

    @_documented
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
        skew: float = 0.1,
        scale_by_t2: bool = True,
        teacher_weighting: Weighting = "static",
        return_components: bool = False,
        check_finite: bool = False,
        device: Device = None,
        stream: object = None,
        return_device_scalar: bool = False,
    ) -> Any:
        """The loss of the student's logits against one teacher's (also ``loss_fn(...)``).

        With one teacher, combine and teacher_weighting change nothing.

        Parameters
        ----------
        {student}
        {teacher}
        {labels}
        {loss options}
        {placement}
        {device scalar}

        Returns
        -------
        float, array or LossComponents
            As EnsembleDistiller.distillation_loss returns it.

        Raises
        ------
        {raises}
        """
        return _entry.loss(
            None, self._temperature, student, teacher, labels, self._alpha,
            _validate.loss_options(
                reduction, ignore_index, combine, divergence, beta, teacher_weighting, return_components,
                check_finite, skew, scale_by_t2,
            ),
            _entry.Placement(device, stream, None, return_device_scalar),
            want_grad=False,
        )  # fmt: skip

    @_documented
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
        skew: float = 0.1,
        scale_by_t2: bool = True,
        teacher_weighting: Weighting = "static",
        return_components: bool = False,
        check_finite: bool = False,
        out: Any = None,
        device: Device = None,
        stream: object = None,
        return_device_scalar: bool = False,
    ) -> tuple[Any, Any]:
        """The loss of forward and its gradient with respect to the student logits.

        Parameters
        ----------
        {student}
        {teacher}
        {labels}
        {loss options}
        out : array, shape like student, optional
            Receives the gradient (and is returned), as for
            EnsembleDistiller.loss_and_grad.
        {placement}
        {device scalar}

        Returns
        -------
        loss : float, array or LossComponents
            As forward returns it.
        grad : array, shape like student
            d loss / d student, as EnsembleDistiller.loss_and_grad returns it.

        Raises
        ------
        {raises}
        """
        return _entry.loss(
            None, self._temperature, student, teacher, labels, self._alpha,
            _validate.loss_options(
                reduction, ignore_index, combine, divergence, beta, teacher_weighting, return_components,
                check_finite, skew, scale_by_t2,
            ),
            _entry.Placement(device, stream, out, return_device_scalar),
            want_grad=True,
        )  # fmt: skip

    __call__ = forward

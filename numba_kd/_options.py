"""The loss options: their names and codes, the validated ``LossOptions``, the
rule that picks float32 or float64 arithmetic, and ``LossComponents``."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from numba_kd import _arrays, _math

# Above this temperature a float32 soft term, a difference of log-sums that agree
# to about 1/T^2 of their size, would lose its digits: float32 losses then
# compute per element in float64.
FAST_MAX_TEMPERATURE = 16.0
# Below this temperature float32 losses compute in float64: 1/T times a logit range
# could leave the float32 range.
FLOAT32_MIN_TEMPERATURE = 1e-6


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
    #: lambda of the skew KLs' mixture.
    skew: float = 0.1
    #: The soft term is alpha T^2 D (entrenar's convention), or alpha D without it.
    scale_by_t2: bool = True
    #: Return LossComponents(loss, soft, hard) instead of the loss alone.
    return_components: bool = False
    #: Refuse NaN and infinite logits with ValueError instead of giving NaN rows.
    check_finite: bool = False

    @property
    def is_default(self) -> bool:
        """entrenar's loss (logit combine, forward KL, static weights): the fast kernel."""
        return (
            self.combine == "logits"
            and self.divergence == "forward_kl"
            and self.teacher_weighting == "static"
        )

    @property
    def mixture_weight(self) -> float:
        """The kernels' mixture weight (LossParams.beta): the JSD's beta, the skew KLs'
        lambda, and 0.5 (not read) for the other divergences."""
        if self.divergence == "jsd":
            return self.beta
        if self.divergence.startswith("skew_"):
            return self.skew
        return 0.5

    def soft_factor(self, temperature: float) -> float:
        """The factor of alpha D in the loss: T^2, or 1 with scale_by_t2=False."""
        return temperature * temperature if self.scale_by_t2 else 1.0

    @property
    def ignore_code(self) -> int:
        return NO_IGNORE if self.ignore_index is None else self.ignore_index

    @functools.cached_property
    def codes(self) -> tuple[int, int, int]:
        """(combine, divergence, weighting) codes of the kernels."""
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
        return divisor, alpha * self.soft_factor(temperature) / divisor, (1.0 - alpha) / divisor


def compute_dtype(dtype: np.dtype, temperature: float) -> np.dtype:
    """The per-element arithmetic of the general kernel: float32 (and 16-bit) inputs compute in
    float32 (vectorized exp and log) for temperatures in [FLOAT32_MIN_TEMPERATURE,
    FAST_MAX_TEMPERATURE], in float64 outside."""
    arithmetic = _arrays.arithmetic_dtype(dtype)
    if arithmetic == np.float32 and FLOAT32_MIN_TEMPERATURE <= temperature <= FAST_MAX_TEMPERATURE:
        return arithmetic
    return np.dtype(np.float64)


class SparseTeachers(NamedTuple):
    """Sparse top-k teachers as the host kernels read them (numba_kd.sparse.rows_for)."""

    #: [K, N, k] int64 class indices, -1 for no entry.
    indices: Any
    #: [K, N, k] log-probabilities, float32 or float64.
    logprobs: Any
    params: _math.TopKParams


class LossComponents(NamedTuple):
    """A loss with its soft (divergence) and hard (cross-entropy) parts: loss = soft + hard."""

    loss: Any
    soft: Any
    hard: Any

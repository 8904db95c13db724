"""One registry of the public operations and their peer implementations.

Each ``Operation`` knows how to run numba_kd, the float64 NumPy reference and
(when installed) torch CPU on one ``Case``, and how many bytes the operation
must move at the least.  The test suite takes its oracles from here, and
``python -m numba_kd bench`` and the asv suite take their rows from here, so the
three always compare the same things.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from numba_kd import reference

TEMPERATURE = 2.0
ALPHA = 0.7


@dataclass(frozen=True)
class Case:
    """Synthetic logits: K teachers that broadly agree, a noisier student, labels."""

    n_teachers: int
    rows: int
    classes: int
    dtype: str = "float32"
    seed: int = 0

    def arrays(self) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        shape = (self.rows, self.classes)
        dtype = np.dtype(self.dtype)
        signal = rng.standard_normal(shape, dtype=np.float32) * np.float32(3.0)
        teachers = [
            (signal + rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
            for _ in range(self.n_teachers)
        ]
        student = (np.float32(0.5) * signal + rng.standard_normal(shape, dtype=np.float32) * 2).astype(dtype)
        labels = rng.integers(0, self.classes, size=self.rows)
        weights = np.arange(1.0, self.n_teachers + 1.0)
        return student, teachers, labels, weights


@dataclass(frozen=True)
class Operation:
    name: str
    # Number of [B, C] arrays the operation must move (read or written) at the least.
    arrays_moved: Callable[[int], int]
    numba_kd: Callable[..., Any]
    numpy: Callable[..., Any]
    torch: Callable[..., Any] | None = None
    scalar: bool = False
    notes: str = field(default="")

    def bytes_moved(self, case: Case) -> int:
        return self.arrays_moved(case.n_teachers) * case.rows * case.classes * np.dtype(case.dtype).itemsize


def _distiller(weights):
    import numba_kd as kd

    return kd.EnsembleDistiller(weights, temperature=TEMPERATURE)


# ---------------------------------------------------------------- numba_kd


def _kd_loss(student, teachers, labels, weights):
    return _distiller(weights).distillation_loss(student, teachers, labels, ALPHA)


def _kd_forward(student, teachers, labels, weights):
    import numba_kd as kd

    return kd.DistillationLoss(TEMPERATURE, ALPHA).forward(student, teachers[0], labels)


def _kd_combine(student, teachers, labels, weights):
    return _distiller(weights).combine_teachers(teachers)


def _kd_probs(student, teachers, labels, weights):
    return _distiller(weights).combine_via_probabilities(teachers)


def _kd_log_mixture(student, teachers, labels, weights):
    return _distiller(weights).combine_via_probabilities(teachers, eps=0.0)


def _kd_grad(student, teachers, labels, weights):
    """loss_and_grad, compared through its gradient (the loss is distillation_loss's)."""
    return _distiller(weights).loss_and_grad(student, teachers, labels, ALPHA)[1]


# ---------------------------------------------------------------- NumPy reference (float64)


def _np_loss(student, teachers, labels, weights):
    return reference.distillation_loss(student, teachers, labels, weights, TEMPERATURE, ALPHA)


def _np_forward(student, teachers, labels, weights):
    return reference.distillation_loss_single(student, teachers[0], labels, TEMPERATURE, ALPHA)


def _np_combine(student, teachers, labels, weights):
    return reference.combine_teachers(teachers, weights)


def _np_probs(student, teachers, labels, weights):
    return reference.combine_via_probabilities(teachers, weights, TEMPERATURE, 1e-10)


def _np_log_mixture(student, teachers, labels, weights):
    return reference.combine_via_probabilities(teachers, weights, TEMPERATURE, 0.0)


def _np_grad(student, teachers, labels, weights):
    return reference.general_grad(student, teachers, labels, weights, TEMPERATURE, ALPHA)


# ---------------------------------------------------------------- torch CPU (eager, input dtype)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_available() -> bool:
    return _torch() is not None


def _as_torch(student, teachers, labels, weights):
    torch = _torch()
    s = torch.from_numpy(np.ascontiguousarray(student))
    t = [torch.from_numpy(np.ascontiguousarray(x)) for x in teachers]
    w = reference.normalized_weights(weights).tolist()
    return torch, s, t, torch.from_numpy(np.asarray(labels, dtype=np.int64)), w


def _torch_ensemble(t, w):
    z = w[0] * t[0]
    for k in range(1, len(t)):
        z = z + w[k] * t[k]
    return z


def _torch_loss_tensor(torch, s, z, y):
    import torch.nn.functional as F

    kl = F.kl_div(
        F.log_softmax(s / TEMPERATURE, dim=-1),
        F.log_softmax(z / TEMPERATURE, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return ALPHA * TEMPERATURE**2 * kl + (1.0 - ALPHA) * F.cross_entropy(s, y)


def _torch_loss_from(torch, s, z, y):
    return float(_torch_loss_tensor(torch, s, z, y))


def _torch_loss(*args):
    torch, s, t, y, w = _as_torch(*args)
    return _torch_loss_from(torch, s, _torch_ensemble(t, w), y)


def _torch_forward(*args):
    torch, s, t, y, _ = _as_torch(*args)
    return _torch_loss_from(torch, s, t[0], y)


def _torch_grad(*args):
    torch, s, t, y, w = _as_torch(*args)
    s = s.detach().requires_grad_(True)
    loss = _torch_loss_tensor(torch, s, _torch_ensemble(t, w), y)
    loss.backward()
    return s.grad.numpy()


def _torch_combine(*args):
    _, _, t, _, w = _as_torch(*args)
    return _torch_ensemble(t, w).numpy()


def _torch_probs(*args):
    torch, _, t, _, w = _as_torch(*args)
    p = w[0] * torch.softmax(t[0] / TEMPERATURE, dim=-1)
    for k in range(1, len(t)):
        p = p + w[k] * torch.softmax(t[k] / TEMPERATURE, dim=-1)
    return (TEMPERATURE * torch.log(p + 1e-10)).numpy()


def _torch_log_mixture(*args):
    import math

    torch, _, t, _, w = _as_torch(*args)
    terms = torch.stack(
        [math.log(w[k]) + torch.log_softmax(t[k] / TEMPERATURE, dim=-1) for k in range(len(t)) if w[k] > 0]
    )
    return (TEMPERATURE * torch.logsumexp(terms, dim=0)).numpy()


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in [
        Operation("distillation_loss", lambda k: k + 1, _kd_loss, _np_loss, _torch_loss, scalar=True),
        Operation(
            "DistillationLoss.forward", lambda k: 2, _kd_forward, _np_forward, _torch_forward, scalar=True
        ),
        # Reads K + 1 arrays, writes the gradient; compared through the gradient.
        Operation("loss_and_grad", lambda k: k + 2, _kd_grad, _np_grad, _torch_grad),
        Operation("combine_teachers", lambda k: k + 1, _kd_combine, _np_combine, _torch_combine),
        Operation("combine_via_probabilities", lambda k: k + 1, _kd_probs, _np_probs, _torch_probs),
        Operation(
            "combine_via_probabilities(eps=0)",
            lambda k: k + 1,
            _kd_log_mixture,
            _np_log_mixture,
            _torch_log_mixture,
        ),
    ]
}


def relative_error(result: Any, expected: Any) -> float:
    """Max relative error: |result - expected| / max(|expected|) for arrays."""
    result = np.asarray(result, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.max(np.abs(expected))), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(result - expected)) / scale)

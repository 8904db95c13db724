"""The oracles of the test suite.

The float64 NumPy reference lives in ``numba_kd.reference`` so that the demo and
the benchmarks compare against the very same code; it is re-exported here.
torch (CPU build) is a second, independent oracle, used only when installed.
"""

from __future__ import annotations

import numpy as np

from numba_kd.reference import (  # noqa: F401  (re-exported for the tests)
    combine_teachers,
    combine_via_probabilities,
    cross_entropy_rows,
    distillation_loss,
    distillation_loss_single,
    general_grad,
    general_loss,
    kl_rows,
    log_softmax,
    normalized_weights,
    row_teacher_weights,
    stack_teachers,
)

try:
    import torch
except ImportError:  # torch is optional: its tests skip
    torch = None


def torch_distillation_loss(student, teachers, labels, weights, temperature: float, alpha: float) -> float:
    """alpha*T^2*kl_div(log_softmax(s/T), log_softmax(z/T), log_target, batchmean) + (1-alpha)*CE."""
    assert torch is not None
    import torch.nn.functional as F

    s = torch.as_tensor(np.asarray(student, dtype=np.float64))
    t = torch.as_tensor(stack_teachers(teachers))
    w = torch.as_tensor(normalized_weights(weights))
    z = torch.einsum("k,kbc->bc", w, t)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(z / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    ce = F.cross_entropy(s, y)
    return float(alpha * temperature**2 * kl + (1.0 - alpha) * ce)


def torch_general_loss_and_grad(
    student, teachers, labels, weights, temperature, alpha, reduction="mean", **options
):
    """The generalized loss in torch operations (``numba_kd.registry.torch_loss_function``,
    the benchmarks' torch peer) at float64; its gradient from autograd."""
    assert torch is not None
    from numba_kd.registry import torch_loss_function

    s = torch.tensor(np.asarray(student, dtype=np.float64), requires_grad=True)
    t = torch.as_tensor(stack_teachers(teachers))  # [K, N, C]
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    w = torch.as_tensor(normalized_weights(weights))
    result = torch_loss_function(options, temperature, alpha, reduction)(s, t, y, w)
    if reduction == "none":
        value = result.detach().numpy()
        result = result.sum()
    else:
        value = float(result.detach())
    result.backward()
    return value, s.grad.numpy()

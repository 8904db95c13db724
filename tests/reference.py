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
    """The generalized loss written with torch operations; its gradient from autograd."""
    assert torch is not None
    import torch.nn.functional as F

    combine = options.get("combine", "logits")
    divergence = options.get("divergence", "forward_kl")
    beta = options.get("beta", 0.5)
    weighting = options.get("teacher_weighting", "static")
    ignore_index = options.get("ignore_index")

    s = torch.tensor(np.asarray(student, dtype=np.float64), requires_grad=True)
    t = torch.as_tensor(stack_teachers(teachers))  # [K, N, C]
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    w = torch.as_tensor(normalized_weights(weights))
    valid = torch.ones_like(y, dtype=torch.bool) if ignore_index is None else y != ignore_index
    safe_y = torch.where(valid, y, torch.zeros_like(y))
    if weighting == "static":
        row_w = w.expand(y.shape[0], -1).clone()
    elif weighting == "confidence":
        conf = torch.softmax(t, dim=-1).gather(-1, safe_y.expand(t.shape[0], -1)[..., None])[..., 0].T
        row_w = w * conf
        fallback = ~valid | (row_w.sum(dim=1) <= 0)
        row_w[fallback] = w
    else:
        log_p_k = torch.log_softmax(t / temperature, dim=-1)
        entropy = -(log_p_k.exp() * log_p_k).sum(-1).T
        row_w = w * torch.exp(-entropy)
    row_w = row_w / row_w.sum(dim=1, keepdim=True)
    if combine == "logits":
        log_p = torch.log_softmax(torch.einsum("nk,knc->nc", row_w, t) / temperature, dim=-1)
    else:
        log_p = torch.logsumexp(
            torch.log(row_w.T)[..., None] + torch.log_softmax(t / temperature, dim=-1), dim=0
        )
    log_q = torch.log_softmax(s / temperature, dim=-1)
    if divergence == "forward_kl":
        d = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    elif divergence == "reverse_kl":
        d = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    else:
        log_m = torch.logaddexp(np.log(beta) + log_p, np.log1p(-beta) + log_q)
        d = beta * F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1) + (1 - beta) * F.kl_div(
            log_m, log_q, log_target=True, reduction="none"
        ).sum(-1)
    ce = F.cross_entropy(s, safe_y, reduction="none")
    rows = torch.where(valid, alpha * temperature**2 * d + (1 - alpha) * ce, torch.zeros_like(d))
    if reduction == "none":
        total = rows.sum()
        value = rows.detach().numpy()
    else:
        divisor = max(int(valid.sum()), 1) if reduction == "mean" else 1
        total = rows.sum() / divisor
        value = float(total.detach())
    total.backward()
    return value, s.grad.numpy()

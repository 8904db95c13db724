"""The CPU and CUDA kernels agree: float64, every loss option, loss and gradient.

Both targets compile the same formulas (``numba_kd._math``); this holds them to
1e-11 relative of each other (the loss, and the gradient relative to its largest
entry), JSD included at beta = 1e-9 and 1 - 1e-9 and the skew KLs at lambda = 1e-9
and 1.  Runs under the simulator in CI (tests/test_cuda_simulator.py) and on a real
device in scripts/gpu_check.sh.
"""

from __future__ import annotations

import itertools

import numba
import numpy as np
import pytest
from helpers import make_batch
from numba import cuda

import numba_kd as kd
from numba_kd import registry

if not (numba.config.ENABLE_CUDASIM or cuda.is_available()):
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 or a CUDA GPU", allow_module_level=True)

AGREEMENT_RTOL = registry.tolerance("float64", "cuda").peer
WEIGHTS = [1.0, 2.0, 0.5]
OPTIONS = (
    [
        {"combine": c, "divergence": d, "teacher_weighting": w, "beta": 0.3}
        for c, d, w in itertools.product(
            ("logits", "probs"), ("forward_kl", "reverse_kl", "jsd"), ("static", "confidence", "entropy")
        )
    ]
    + [
        {"combine": c, "divergence": "jsd", "beta": beta}
        for c, beta in itertools.product(("logits", "probs"), (1e-9, 1 - 1e-9))
    ]
    + [
        {"combine": c, "divergence": d, "teacher_weighting": w, "skew": 0.3}
        for (c, w), d in itertools.product(
            (("logits", "static"), ("probs", "entropy")), ("tvd", "skew_forward_kl", "skew_reverse_kl")
        )
    ]
    + [
        {"divergence": d, "skew": lam}
        for d, lam in itertools.product(("skew_forward_kl", "skew_reverse_kl"), (1e-9, 1.0))
    ]
)


def _id(options: dict) -> str:
    return "-".join(str(v) for v in options.values())


@pytest.mark.parametrize("options", OPTIONS, ids=_id)
def test_cpu_and_cuda_agree_at_float64(rng, options):
    student, teachers, labels = make_batch(rng, len(WEIGHTS), 3, 9, np.float64)
    labels[1] = -100
    d = kd.EnsembleDistiller(WEIGHTS, temperature=2.0)
    kwargs = dict(options, ignore_index=-100, reduction="none", return_components=True)
    (loss, soft, hard), grad = d.loss_and_grad(student, teachers, labels, 0.6, **kwargs)
    device = [cuda.to_device(x) for x in (student, *teachers, labels)]
    (d_loss, d_soft, d_hard), d_grad = d.loss_and_grad(device[0], device[1:-1], device[-1], 0.6, **kwargs)
    for cpu, dev in ((loss, d_loss), (soft, d_soft), (hard, d_hard)):
        np.testing.assert_allclose(dev.copy_to_host(), cpu, rtol=AGREEMENT_RTOL, atol=0)
    scale = float(np.max(np.abs(grad)))
    np.testing.assert_allclose(d_grad.copy_to_host(), grad, rtol=0, atol=AGREEMENT_RTOL * scale)


@pytest.mark.parametrize("divergence", ["forward_kl", "tvd"])
def test_scale_by_t2_off_agrees(rng, divergence):
    """scale_by_t2=False on the default kernel and its reduction (loss_rows,
    reduce_loss) and on the general one (general_rows, scale_rows)."""
    student, teachers, labels = make_batch(rng, len(WEIGHTS), 5, 9, np.float64)
    d = kd.EnsembleDistiller(WEIGHTS, temperature=3.0)
    device = [cuda.to_device(x) for x in (student, *teachers, labels)]
    for reduction in ("mean", "none"):
        kwargs = dict(divergence=divergence, scale_by_t2=False, reduction=reduction)
        loss = d.distillation_loss(student, teachers, labels, 0.6, **kwargs)
        d_loss = d.distillation_loss(device[0], device[1:-1], device[-1], 0.6, **kwargs)
        d_loss = d_loss if reduction == "mean" else d_loss.copy_to_host()
        np.testing.assert_allclose(d_loss, loss, rtol=AGREEMENT_RTOL, atol=0)
        scaled = d.distillation_loss(student, teachers, labels, 0.6, **dict(kwargs, scale_by_t2=True))
        assert not np.allclose(scaled, loss), "T^2 = 9 changes the loss"
        _, grad = d.loss_and_grad(student, teachers, labels, 0.6, **kwargs)
        _, d_grad = d.loss_and_grad(device[0], device[1:-1], device[-1], 0.6, **kwargs)
        scale = float(np.abs(grad).max())
        np.testing.assert_allclose(d_grad.copy_to_host(), grad, rtol=0, atol=AGREEMENT_RTOL * scale)

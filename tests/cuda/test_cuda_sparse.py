"""Sparse top-k teachers (numba_kd.TopK) on the CUDA target, against the float64
reference and the CPU kernel: every tail rule and divergence, the weightings, the
invariants of the sparse-teacher issue, the options and the bad rows.

Runs under the simulator in CI (tests/test_cuda_simulator.py) and on a real GPU
through scripts/gpu_check.sh.  Shapes stay tiny: the simulator runs every CUDA
thread as a Python thread.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from numba import cuda

import numba_kd as kd
from numba_kd import reference as R
from numba_kd import registry

if not (numba.config.ENABLE_CUDASIM or cuda.is_available()):
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 or a CUDA GPU", allow_module_level=True)

TAILS = kd.sparse.TAILS
CASES = [
    (tail, div)
    for tail in TAILS
    for div in ("forward_kl", "reverse_kl", "jsd")
    if not (div == "reverse_kl" and tail == "renormalize")
]
# Each (tail, divergence) once, the dtypes alternating (every tail meets both).
TYPED_CASES = [(*case, np.float32 if n % 2 == 0 else np.float64) for n, case in enumerate(CASES)]


def _top_k(rng, n_teachers, n_rows, n_classes, k, pad=True):
    """Top-k entries (indices, log-probabilities at T_g = 1) of random teachers,
    in shuffled order, with some entries dropped (-1)."""
    logits = rng.normal(scale=2.0, size=(n_teachers, n_rows, n_classes))
    log_p = logits - R.logsumexp(logits)[..., None]
    order = np.argsort(-logits, axis=-1)[..., :k]
    for t in range(n_teachers):
        for i in range(n_rows):
            order[t, i] = order[t, i, rng.permutation(k)]
    logprobs = np.take_along_axis(log_p, order, axis=-1)
    if pad:
        drop = rng.random(order.shape) < 0.2
        drop[..., 0] = False
        order[drop] = -1
        logprobs[drop] = 5.0  # never read
    return order, logprobs


def _expected(student, top, labels, weights, temperature, alpha, **options):
    kw = dict(tail=top.tail, topk_temperature=top.temperature, **options)
    args = (top.indices, top.logprobs.astype(np.float64), labels, weights, temperature, alpha)
    s = student.astype(np.float64)
    return R.topk_loss(s, *args, **kw), R.topk_grad(s, *args, **kw)


def _check(student, top, labels, weights, temperature, alpha, dtype, **options):
    """loss_and_grad on the device against the reference, and against the CPU kernel."""
    distiller = kd.EnsembleDistiller(weights, temperature=temperature)
    d_student, d_labels = cuda.to_device(student), cuda.to_device(labels)
    loss, grad = distiller.loss_and_grad(d_student, top, d_labels, alpha, combine="probs", **options)
    expected, expected_grad = _expected(student, top, labels, weights, temperature, alpha, **options)
    tol = registry.tolerance(dtype, "cuda")
    assert isinstance(loss, float)
    assert abs(loss - expected[0]) <= tol.loss * (abs(expected[0]) + 1.0), (loss, expected[0])
    host_grad = grad.copy_to_host()
    assert host_grad.dtype == np.dtype(dtype) and host_grad.shape == student.shape
    allowed = tol.grad * max(1.0, float(np.max(np.abs(expected_grad))))
    np.testing.assert_allclose(host_grad, expected_grad, rtol=0, atol=allowed)
    cpu_loss, cpu_grad = distiller.loss_and_grad(student, top, labels, alpha, combine="probs", **options)
    assert abs(loss - cpu_loss) <= tol.loss * (abs(cpu_loss) + 1.0)
    np.testing.assert_allclose(host_grad, cpu_grad, rtol=0, atol=allowed)


@pytest.mark.parametrize(
    ("tail", "divergence", "dtype"), TYPED_CASES, ids=lambda v: getattr(v, "__name__", v)
)
def test_topk_matches_reference(tail, divergence, dtype):
    n_rows, n_classes, n_teachers, k = 3, 21, 2, 5
    rng = np.random.default_rng(len(tail) * 13 + len(divergence))
    indices, logprobs = _top_k(rng, n_teachers, n_rows, n_classes, k)
    student = rng.normal(scale=2.0, size=(n_rows, n_classes)).astype(dtype)
    labels = np.array([indices[0, 0, 0], -100, 4])
    top = kd.TopK(indices, logprobs.astype(dtype), tail=tail, temperature=1.5)
    options = {"divergence": divergence, "beta": 0.3, "ignore_index": -100}
    _check(student, top, labels, [1.5, 0.5], 2.0, 0.6, dtype, **options)


@pytest.mark.parametrize(("tail", "weighting"), [("uniform", "confidence"), ("bucket", "entropy")])
def test_topk_teacher_weighting(tail, weighting):
    n_rows, n_classes, n_teachers, k = 3, 13, 3, 4
    rng = np.random.default_rng(len(tail) + len(weighting))
    indices, logprobs = _top_k(rng, n_teachers, n_rows, n_classes, k)
    student = rng.normal(scale=2.0, size=(n_rows, n_classes))
    labels = np.array([indices[1, 0, 0], 2, indices[0, 2, 0]])
    top = kd.TopK(indices, logprobs, tail=tail, temperature=0.7)
    options = {"teacher_weighting": weighting, "divergence": "jsd"}
    _check(student, top, labels, [1.0, 2.0, 0.5], 2.0, 0.6, np.float64, **options)


@pytest.mark.parametrize("tail", TAILS)
def test_full_support_is_the_dense_loss(tail):
    """k = C and T_g = T: one teacher gives the dense loss on the stored
    log-probabilities used as logits; K teachers give combine="probs" (the dense
    losses on the CPU, which tests/cuda/test_cuda_agreement.py holds to the CUDA ones)."""
    n_rows, n_classes, temperature = 3, 9, 2.0
    rng = np.random.default_rng(len(tail))
    logits = rng.normal(size=(2, n_rows, n_classes))
    log_p = logits / temperature - R.logsumexp(logits / temperature)[..., None]
    order = np.stack([np.stack([rng.permutation(n_classes) for _ in range(n_rows)]) for _ in range(2)])
    stored = np.take_along_axis(log_p, order, axis=-1)
    student = rng.normal(size=(n_rows, n_classes))
    labels = rng.integers(0, n_classes, n_rows)
    d_student, d_labels = cuda.to_device(student), cuda.to_device(labels)
    single = kd.DistillationLoss(temperature=temperature, alpha=0.6)
    one = kd.TopK(order[:1], stored[:1], tail=tail, temperature=temperature)
    sparse_one = single.forward(d_student, one, d_labels)
    dense_one = single.forward(student, log_p[0] * temperature, labels)
    assert abs(sparse_one - dense_one) <= 1e-12 * abs(dense_one)
    distiller = kd.EnsembleDistiller([1.0, 3.0], temperature=temperature)
    top = kd.TopK(order, stored, tail=tail, temperature=temperature)
    sparse_loss, sparse_grad = distiller.loss_and_grad(d_student, top, d_labels, 0.6, combine="probs")
    dense_loss, dense_grad = distiller.loss_and_grad(student, list(logits), labels, 0.6, combine="probs")
    assert abs(sparse_loss - dense_loss) <= 1e-12 * abs(dense_loss)
    np.testing.assert_allclose(sparse_grad.copy_to_host(), dense_grad, rtol=0, atol=1e-14)


def test_topk_options_on_the_device():
    """reduction="none", return_components, out= and [B, S, C] inputs."""
    rng = np.random.default_rng(5)
    b, s, n_classes = 2, 2, 11
    indices, logprobs = _top_k(rng, 1, b * s, n_classes, 3)
    student = rng.normal(size=(b, s, n_classes)).astype(np.float32)
    labels = rng.integers(0, n_classes, (b, s))
    top = kd.TopK(
        indices.reshape(1, b, s, 3), logprobs.reshape(1, b, s, 3).astype(np.float32), tail="uniform"
    )
    single = kd.DistillationLoss(temperature=1.0, alpha=0.5)
    d_student, d_labels = cuda.to_device(student), cuda.to_device(labels)
    rows = single.forward(d_student, top, d_labels, reduction="none").copy_to_host()
    expected, _ = _expected(
        student.reshape(b * s, n_classes), kd.TopK(indices, logprobs, tail="uniform"),
        labels.reshape(-1), [1.0], 1.0, 0.5, reduction="none",
    )  # fmt: skip
    assert rows.shape == (b, s)
    np.testing.assert_allclose(rows.reshape(-1), expected[0], rtol=1e-5, atol=1e-6)
    parts = single.forward(d_student, top, d_labels, return_components=True)
    assert abs(parts.loss - (parts.soft + parts.hard)) <= 1e-6 * abs(parts.loss)
    assert abs(parts.loss - expected[0].mean()) <= 1e-5 * abs(parts.loss)
    out = cuda.device_array(student.shape, dtype=np.float32)
    loss, grad = single.loss_and_grad(d_student, top, d_labels, out=out)
    assert grad is out and loss == parts.loss and loss == parts.loss
    mean_grad = R.topk_grad(
        student.reshape(b * s, n_classes).astype(np.float64), indices, logprobs, labels.reshape(-1), [1.0],
        1.0, 0.5, tail="uniform",
    )  # fmt: skip
    np.testing.assert_allclose(out.copy_to_host().reshape(b * s, n_classes), mean_grad, rtol=0, atol=1e-6)


def test_topk_bad_rows_on_the_device():
    """A NaN student logit or a NaN stored log-probability makes its row NaN (the
    rows beside it keep their values); check_finite refuses the student's NaN; an
    out-of-range label raises."""
    rng = np.random.default_rng(8)
    n_rows, n_classes = 3, 10
    indices, logprobs = _top_k(rng, 1, n_rows, n_classes, 3, pad=False)
    student = rng.normal(size=(n_rows, n_classes))
    labels = np.array([1, 2, 3])
    single = kd.DistillationLoss(temperature=1.0, alpha=0.5)
    poisoned = student.copy()
    poisoned[1, 4] = np.nan
    rows = single.forward(cuda.to_device(poisoned), kd.TopK(indices, logprobs), cuda.to_device(labels),
                          reduction="none").copy_to_host()  # fmt: skip
    clean = single.forward(student, kd.TopK(indices, logprobs), labels, reduction="none")
    assert np.isnan(rows[1]) and not np.isnan(rows[[0, 2]]).any()
    np.testing.assert_allclose(rows[[0, 2]], clean[[0, 2]], rtol=1e-12)
    nan_entry = logprobs.copy()
    nan_entry[0, 2, 1] = np.nan
    _, grad = single.loss_and_grad(
        cuda.to_device(student), kd.TopK(indices, nan_entry), cuda.to_device(labels)
    )
    grad = grad.copy_to_host()
    assert np.isnan(grad[2]).all() and np.isfinite(grad[:2]).all()
    with pytest.raises(ValueError, match="student holds NaN"):
        single.forward(cuda.to_device(poisoned), kd.TopK(indices, logprobs), cuda.to_device(labels),
                       check_finite=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        single.forward(
            cuda.to_device(student), kd.TopK(indices, logprobs), cuda.to_device(np.array([1, 10, 3]))
        )

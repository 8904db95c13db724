"""Sparse top-k teachers (numba_kd.TopK): the float64 reference's invariants and
gradients, the CPU kernel against the reference for every tail rule, divergence
and dtype, the loss options, and the validation of the stored entries."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref_helpers  # noqa: F401  (tests/reference.py: shared oracle helpers)
from helpers import LOSS_RTOL, central_differences

import numba_kd as kd
from numba_kd import reference as R
from numba_kd import registry

TAILS = kd.sparse.TAILS
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
CASES = [
    (tail, div)
    for tail in TAILS
    for div in DIVERGENCES
    if not (div == "reverse_kl" and tail == "renormalize")
]


def _top_k(rng, n_teachers, n_rows, n_classes, k, scale=2.0):
    """Teacher logits [K, N, C] and their top-k (indices, log-probabilities at T_g = 1)."""
    logits = rng.normal(scale=scale, size=(n_teachers, n_rows, n_classes))
    log_p = logits - R.logsumexp(logits)[..., None]
    order = np.argsort(-logits, axis=-1)[..., :k]
    return logits, order, np.take_along_axis(log_p, order, axis=-1)


def _with_padding(indices, logprobs, rng):
    """Some rows store fewer entries: -1 at random places, and shuffled entry order."""
    indices, logprobs = indices.copy(), logprobs.copy()
    for t in range(indices.shape[0]):
        for i in range(indices.shape[1]):
            perm = rng.permutation(indices.shape[2])
            indices[t, i], logprobs[t, i] = indices[t, i, perm], logprobs[t, i, perm]
    drop = rng.random(indices.shape) < 0.2
    drop[..., 0] = False
    indices[drop] = -1
    logprobs[drop] = 7.0  # never read
    return indices, logprobs


# --- the reference --------------------------------------------------------


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("n_teachers", [1, 3])
def test_reference_full_support_is_the_dense_probability_combine(rng, tail, n_teachers):
    """k = C and T_g = T: every tail rule is the dense loss on the stored
    log-probabilities (with one teacher, the logit combine; with K, combine="probs")."""
    n_rows, n_classes, temperature = 5, 7, 2.0
    logits = rng.normal(size=(n_teachers, n_rows, n_classes))
    log_p = logits / temperature - R.logsumexp(logits / temperature)[..., None]
    order = np.stack(
        [np.stack([rng.permutation(n_classes) for _ in range(n_rows)]) for _ in range(n_teachers)]
    )
    stored = np.take_along_axis(log_p, order, axis=-1)
    student = rng.normal(size=(n_rows, n_classes))
    labels = rng.integers(0, n_classes, n_rows)
    weights = rng.uniform(0.5, 2.0, n_teachers)
    for divergence in DIVERGENCES:
        if divergence == "reverse_kl" and tail == "renormalize":
            continue
        options = {"divergence": divergence, "beta": 0.3}
        dense = R.general_loss(student, logits, labels, weights, temperature, 0.6, combine="probs", **options)
        dense_grad = R.general_grad(
            student, logits, labels, weights, temperature, 0.6, combine="probs", **options
        )
        kw = dict(tail=tail, topk_temperature=temperature, **options)
        sparse = R.topk_loss(student, order, stored, labels, weights, temperature, 0.6, **kw)
        np.testing.assert_allclose(sparse, dense, rtol=1e-13)
        grad = R.topk_grad(student, order, stored, labels, weights, temperature, 0.6, **kw)
        np.testing.assert_allclose(grad, dense_grad, rtol=0, atol=1e-15)


@pytest.mark.parametrize(("tail", "divergence"), CASES)
def test_reference_gradient_matches_finite_differences(rng, tail, divergence):
    n_rows, n_classes, n_teachers, k = 4, 9, 2, 3
    _, indices, logprobs = _top_k(rng, n_teachers, n_rows, n_classes, k)
    indices, logprobs = _with_padding(indices, logprobs, rng)
    student = rng.normal(size=(n_rows, n_classes))
    labels = rng.integers(0, n_classes, n_rows)
    kw = dict(tail=tail, topk_temperature=1.5, divergence=divergence, beta=0.3)
    args = (indices, logprobs, labels, [1.0, 2.0], 2.0, 0.6)
    grad = R.topk_grad(student, *args, **kw)
    numeric = central_differences(lambda s: R.topk_loss(s, *args, **kw)[0], student)
    np.testing.assert_allclose(grad, numeric, rtol=0, atol=1e-8)


def test_reference_tail_rules_by_hand():
    """One teacher storing class 0 at 0.75 of C = 3 classes, T_g = T = 1."""
    idx, lp = np.array([[[0]]]), np.log([[[0.75]]])
    dense, tail_mass, _ = R.topk_teacher_distributions(idx, lp, 3, "uniform", 1.0, 1.0)
    np.testing.assert_allclose(dense[0, 0], [0.75, 0.125, 0.125])
    dense, tail_mass, _ = R.topk_teacher_distributions(idx, lp, 3, "bucket", 1.0, 1.0)
    np.testing.assert_allclose(dense[0, 0], [0.75, 0.0, 0.0])
    np.testing.assert_allclose(tail_mass, [[0.25]])
    dense, _, _ = R.topk_teacher_distributions(idx, lp, 3, "renormalize", 1.0, 1.0)
    np.testing.assert_allclose(dense[0, 0], [1.0, 0.0, 0.0])
    # Re-tempering at T = 2 T_g: weights proportional to p^(1/2), the bucket's too.
    dense, tail_mass, _ = R.topk_teacher_distributions(idx, lp, 3, "bucket", 1.0, 2.0)
    z = 0.75**0.5 + 0.25**0.5
    np.testing.assert_allclose([dense[0, 0, 0], tail_mass[0, 0]], [0.75**0.5 / z, 0.25**0.5 / z])


# --- the CPU kernel against the reference ---------------------------------

SHAPES = [(1, 1, 1, 1), (3, 2, 2, 2), (17, 50, 2, 5), (64, 1000, 3, 16), (5, 4000, 1, 64)]


def _check_against_reference(student, top, labels, weights, temperature, alpha, dtype, **options):
    distiller = kd.EnsembleDistiller(weights, temperature=temperature)
    loss, grad = distiller.loss_and_grad(student, top, labels, alpha, combine="probs", **options)
    kw = dict(tail=top.tail, topk_temperature=top.temperature, **options)
    args = (top.indices, top.logprobs.astype(np.float64), labels, weights, temperature, alpha)
    expected = R.topk_loss(student.astype(np.float64), *args, **kw)[0]
    expected_grad = R.topk_grad(student.astype(np.float64), *args, **kw)
    rtol = LOSS_RTOL[np.dtype(dtype)]
    assert isinstance(loss, float)
    assert abs(loss - expected) <= rtol * abs(expected) + rtol, (loss, expected)
    assert grad.dtype == np.dtype(dtype) and grad.shape == student.shape
    allowed = registry.tolerance(dtype).grad * max(1.0, float(np.max(np.abs(expected_grad))))
    np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=allowed)
    assert distiller.distillation_loss(student, top, labels, alpha, combine="probs", **options) == loss


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}xC{}xK{}xk{}".format(*s))
@pytest.mark.parametrize(("tail", "divergence"), CASES)
def test_kernel_against_reference(tail, divergence, shape, dtype):
    n_rows, n_classes, n_teachers, k = shape
    rng = np.random.default_rng(n_rows * 7919 + n_classes + k)
    _, indices, logprobs = _top_k(rng, n_teachers, n_rows, n_classes, k)
    indices, logprobs = _with_padding(indices, logprobs, rng)
    student = rng.normal(scale=2.0, size=(n_rows, n_classes)).astype(dtype)
    labels = rng.integers(0, n_classes, n_rows)
    weights = list(rng.uniform(0.5, 2.0, n_teachers))
    top = kd.TopK(indices, logprobs.astype(dtype), tail=tail, temperature=1.5)
    options = {"divergence": divergence, "beta": 0.3}
    _check_against_reference(student, top, labels, weights, 2.0, 0.6, dtype, **options)


PATH_CASES = [
    ("bucket", "forward_kl"),
    ("uniform", "reverse_kl"),
    ("uniform", "jsd"),
    ("renormalize", "forward_kl"),
]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0, 20.0])
@pytest.mark.parametrize(("tail", "divergence"), PATH_CASES)
def test_kernel_paths_by_temperature(tail, divergence, temperature):
    """float32 students at T = 1 and 2 (one exponential per class: the gradient sweep
    rewrites the stored exp(b) in place), T = 3 (two) and T = 20 (float64
    arithmetic: exp(b) in a float64 scratch row beside the float32 gradient)."""
    rng = np.random.default_rng(int(temperature))
    n_rows, n_classes, n_teachers, k = 17, 700, 2, 9
    _, indices, logprobs = _top_k(rng, n_teachers, n_rows, n_classes, k)
    indices, logprobs = _with_padding(indices, logprobs, rng)
    student = rng.normal(scale=2.0, size=(n_rows, n_classes)).astype(np.float32)
    labels = rng.integers(0, n_classes, n_rows)
    top = kd.TopK(indices, logprobs.astype(np.float32), tail=tail, temperature=1.5)
    options = {"divergence": divergence, "beta": 0.3}
    _check_against_reference(student, top, labels, [1.0, 3.0], temperature, 0.6, np.float32, **options)


WEIGHTED = [
    (tail, weighting, divergence)
    for tail in TAILS
    for weighting in ("confidence", "entropy")
    for divergence in ("forward_kl", "jsd")
    if not (weighting == "confidence" and tail == "bucket")
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("tail", "weighting", "divergence"), WEIGHTED)
def test_teacher_weighting_against_reference(tail, weighting, divergence, dtype):
    n_rows, n_classes, n_teachers, k = 23, 60, 3, 6
    rng = np.random.default_rng(len(tail) * 31 + len(weighting))
    _, indices, logprobs = _top_k(rng, n_teachers, n_rows, n_classes, k)
    indices, logprobs = _with_padding(indices, logprobs, rng)
    student = rng.normal(scale=2.0, size=(n_rows, n_classes)).astype(dtype)
    labels = rng.integers(0, n_classes, n_rows)
    labels[:8] = indices[0, :8, 0]  # some labels that teacher 0 stored
    labels[3] = -100
    top = kd.TopK(indices, logprobs.astype(dtype), tail=tail, temperature=0.7)
    options = {"divergence": divergence, "teacher_weighting": weighting, "ignore_index": -100}
    _check_against_reference(student, top, labels, [1.0, 2.0, 0.5], 2.0, 0.6, dtype, **options)


def test_teacher_weighting_reference_by_hand():
    """Confidence at temperature 1 and entropy at T, over the tail rule's distribution."""
    idx = np.array([[[0]], [[1]]])
    lp = np.log([[[0.8]], [[0.5]]])
    # Label 0: teacher 0 stored it (0.8); teacher 1 did not: its spread tail gives 0.5 / 2 of C = 3.
    w = R.topk_row_weights(idx, lp, [0], [1.0, 1.0], 3, 2.0, "uniform", 1.0, "confidence")
    np.testing.assert_allclose(w, [[0.8 / 1.05, 0.25 / 1.05]])
    w = R.topk_row_weights(idx, lp, [0], [1.0, 1.0], 3, 2.0, "renormalize", 1.0, "confidence")
    np.testing.assert_allclose(w, [[1.0, 0.0]])
    # Entropy at T = T_g of the bucket distributions (0.8, 0.2) and (0.5, 0.5).
    h = [-(0.8 * np.log(0.8) + 0.2 * np.log(0.2)), np.log(2.0)]
    w = R.topk_row_weights(idx, lp, [0], [1.0, 1.0], 3, 1.0, "bucket", 1.0, "entropy")
    np.testing.assert_allclose(w, [np.exp(-np.array(h)) / np.exp(-np.array(h)).sum()])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("tail", TAILS)
def test_kernel_full_support_equals_dense_probability_combine(rng, tail, dtype):
    n_rows, n_classes, n_teachers, temperature = 8, 300, 3, 2.0
    logits = rng.normal(scale=3.0, size=(n_teachers, n_rows, n_classes))
    log_p = logits / temperature - R.logsumexp(logits / temperature)[..., None]
    order = np.argsort(rng.random(log_p.shape), axis=-1)
    top = kd.TopK(
        order, np.take_along_axis(log_p, order, axis=-1).astype(dtype), tail=tail, temperature=temperature
    )
    student = rng.normal(scale=3.0, size=(n_rows, n_classes)).astype(dtype)
    labels = rng.integers(0, n_classes, n_rows)
    distiller = kd.EnsembleDistiller([1.0, 2.0, 3.0], temperature=temperature)
    teachers = list(log_p.astype(dtype) * temperature)
    loss, grad = distiller.loss_and_grad(student, top, labels, 0.7, combine="probs")
    dense_loss, dense_grad = distiller.loss_and_grad(student, teachers, labels, 0.7, combine="probs")
    rtol = LOSS_RTOL[np.dtype(dtype)]
    assert abs(loss - dense_loss) <= 2 * rtol * abs(dense_loss)
    np.testing.assert_allclose(
        grad, dense_grad, rtol=0, atol=2 * registry.tolerance(dtype).grad * np.abs(dense_grad).max()
    )


def test_single_teacher_full_support_equals_distillation_loss(rng):
    """DistillationLoss with a TopK of k = C and T_g = T is DistillationLoss on the
    stored log-probabilities used as logits."""
    n_rows, n_classes, temperature = 16, 40, 3.0
    teacher = rng.normal(scale=2.0, size=(n_rows, n_classes))
    log_p = teacher / temperature - R.logsumexp(teacher / temperature)[:, None]
    order = np.argsort(-log_p, axis=-1)
    student = rng.normal(size=(n_rows, n_classes))
    labels = rng.integers(0, n_classes, n_rows)
    loss_fn = kd.DistillationLoss(temperature=temperature, alpha=0.4)
    dense = loss_fn.forward(student, teacher, labels)
    for tail in TAILS:
        top = kd.TopK(
            order[None], np.take_along_axis(log_p, order, axis=-1)[None], tail=tail, temperature=temperature
        )
        assert loss_fn.forward(student, top, labels) == pytest.approx(dense, rel=1e-13)
        grad = loss_fn.loss_and_grad(student, top, labels)[1]
        np.testing.assert_allclose(
            grad, loss_fn.loss_and_grad(student, teacher, labels)[1], rtol=0, atol=1e-16
        )


def test_bucket_tail_keeps_its_digits_when_the_support_holds_almost_all_mass():
    """q_tail = 1 - sum over U of q is summed over the classes outside U, so a tail of
    1e-30 (float64) or of 1e-40, below float32's range, keeps its digits."""
    n_classes = 100
    student = np.zeros((2, n_classes))
    student[:, :5] = [[69.0], [92.0]]  # q outside U: about 95 e^-69 / 5 and 95 e^-92 / 5
    idx = np.tile(np.arange(5), (1, 2, 1))
    lp = np.log(np.full((1, 2, 5), 0.19))  # a tail of 0.05
    labels = np.zeros(2, np.int64)
    for dtype in (np.float64, np.float32):
        top = kd.TopK(idx, lp.astype(dtype), tail="bucket")
        _check_against_reference(student.astype(dtype), top, labels, [1.0], 1.0, 1.0, dtype)


# --- options ---------------------------------------------------------------


def test_options_match_the_reference(rng):
    n_rows, n_classes = 12, 30
    _, indices, logprobs = _top_k(rng, 2, n_rows, n_classes, 4)
    student = rng.normal(size=(n_rows, n_classes))
    labels = rng.integers(0, n_classes, n_rows)
    labels[[1, 5]] = -100
    top = kd.TopK(list(indices), list(logprobs), tail="uniform", temperature=1.0)
    distiller = kd.EnsembleDistiller([1.0, 1.0], temperature=2.0)
    kw = dict(tail="uniform", ignore_index=-100)
    args = (indices, logprobs, labels, [1.0, 1.0], 2.0, 0.5)
    for reduction in ("mean", "sum", "none"):
        got = distiller.distillation_loss(
            student,
            top,
            labels,
            0.5,
            combine="probs",
            ignore_index=-100,
            reduction=reduction,
            return_components=True,
        )
        expected = R.topk_loss(student, *args, reduction=reduction, **kw)
        for part, want in zip(got, expected, strict=True):
            np.testing.assert_allclose(part, want, rtol=1e-12, atol=1e-15)
    out = np.empty_like(student)
    _, returned = distiller.loss_and_grad(
        student, top, labels, 0.5, combine="probs", ignore_index=-100, out=out
    )
    assert returned is out
    np.testing.assert_allclose(out, R.topk_grad(student, *args, **kw), rtol=0, atol=1e-15)
    assert not out[[1, 5]].any()


def test_sequences_and_index_dtypes(rng):
    """[B, S, C] students with [K, B, S, k] entries; int32 indices and float16 log-probabilities."""
    batch, seq, n_classes = 3, 4, 25
    _, indices, logprobs = _top_k(rng, 2, batch * seq, n_classes, 6)
    student = rng.normal(size=(batch, seq, n_classes)).astype(np.float32)
    labels = rng.integers(0, n_classes, (batch, seq))
    distiller = kd.EnsembleDistiller([2.0, 1.0], temperature=1.0)
    flat = kd.TopK(indices, logprobs.astype(np.float16))
    shaped = kd.TopK(
        indices.reshape(2, batch, seq, 6).astype(np.int32),
        logprobs.reshape(2, batch, seq, 6).astype(np.float16),
    )
    loss, grad = distiller.loss_and_grad(student, shaped, labels, 0.5, combine="probs")
    flat_loss, flat_grad = distiller.loss_and_grad(
        student.reshape(-1, n_classes), flat, labels.reshape(-1), 0.5, combine="probs"
    )
    assert loss == flat_loss
    assert grad.shape == student.shape
    np.testing.assert_array_equal(grad.reshape(-1, n_classes), flat_grad)
    rows = distiller.distillation_loss(student, shaped, labels, 0.5, combine="probs", reduction="none")
    assert rows.shape == (batch, seq)


def test_nan_rows_are_nan_and_check_finite_refuses_them(rng):
    _, indices, logprobs = _top_k(rng, 1, 4, 10, 3)
    logprobs[0, 2, 1] = np.nan
    student = rng.normal(size=(4, 10))
    labels = np.zeros(4, np.int64)
    loss_fn = kd.DistillationLoss(temperature=1.0, alpha=0.5)
    top = kd.TopK(indices, logprobs)
    rows = loss_fn.forward(student, top, labels, reduction="none")
    assert np.isnan(rows[2]) and np.isfinite(rows[[0, 1, 3]]).all()
    with pytest.raises(ValueError, match="TopK teacher 0, row 2: a NaN"):
        loss_fn.forward(student, top, labels, check_finite=True)


# --- validation ------------------------------------------------------------


def _valid(n_rows=3, n_classes=8, k=3):
    idx = np.tile(np.arange(k), (2, n_rows, 1))
    lp = np.log(np.full((2, n_rows, k), 0.2))
    return idx, lp


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda idx, lp: idx.__setitem__((1, 2, 0), 8), r"teacher 1, row 2: index 8 outside \[0, 8\)"),
        (lambda idx, lp: idx.__setitem__((0, 1, 2), -2), r"teacher 0, row 1: index -2 outside"),
        (lambda idx, lp: idx.__setitem__((1, 0, 2), 0), r"teacher 1, row 0: class 0 stored twice"),
        (lambda idx, lp: lp.__setitem__((0, 2, 1), 0.01), r"teacher 0, row 2: log-probability 0.01 above 0"),
        (
            lambda idx, lp: lp.__setitem__((1, 1, slice(None)), np.log(0.4)),
            r"teacher 1, row 1: probabilities summing to 1.2",
        ),
    ],
)
def test_invalid_entries_name_the_teacher_and_the_row(change, message):
    idx, lp = _valid()
    change(idx, lp)
    distiller = kd.EnsembleDistiller([1.0, 1.0], temperature=1.0)
    student = np.zeros((3, 8))
    with pytest.raises(ValueError, match=message):
        distiller.distillation_loss(student, kd.TopK(idx, lp), np.zeros(3, np.int64), 0.5, combine="probs")


def test_rounding_within_float16_is_accepted():
    idx, lp = _valid()
    lp[0, 0] = [2.0**-12, -30.0, -30.0]
    lp[1, 1] = np.log(1.0 / 3.0 + 2.0**-13)
    distiller = kd.EnsembleDistiller([1.0, 1.0], temperature=1.0)
    loss = distiller.distillation_loss(
        np.zeros((3, 8)), kd.TopK(idx, lp), np.zeros(3, np.int64), 0.5, combine="probs"
    )
    assert np.isfinite(loss)


def test_bad_arguments():
    idx, lp = _valid()
    student, labels = np.zeros((3, 8)), np.zeros(3, np.int64)
    with pytest.raises(ValueError, match="tail must be one of"):
        kd.TopK(idx, lp, tail="drop")
    with pytest.raises(ValueError, match="temperature must be positive"):
        kd.TopK(idx, lp, temperature=0.0)
    with pytest.raises(TypeError, match="indices must be integer"):
        kd.TopK(idx.astype(float), lp)
    with pytest.raises(TypeError, match="logprobs must be float"):
        kd.TopK(idx, lp.astype(np.int64))
    with pytest.raises(ValueError, match="does not match logprobs shape"):
        kd.TopK(idx, lp[..., :2])
    with pytest.raises(ValueError, match="at least one entry"):
        kd.TopK(idx[..., :0], lp[..., :0])
    with pytest.raises(ValueError, match="Must have at least one teacher"):
        kd.TopK([], [])
    top = kd.TopK(idx, lp)
    distiller = kd.EnsembleDistiller([1.0, 1.0], temperature=1.0)
    with pytest.raises(ValueError, match='pass combine="probs"'):
        distiller.distillation_loss(student, top, labels, 0.5)
    with pytest.raises(ValueError, match='"confidence" is undefined for tail="bucket"'):
        distiller.distillation_loss(
            student, top, labels, 0.5, combine="probs", teacher_weighting="confidence"
        )
    with pytest.raises(ValueError, match='undefined for tail="renormalize"'):
        distiller.distillation_loss(
            student,
            kd.TopK(idx, lp, tail="renormalize"),
            labels,
            0.5,
            combine="probs",
            divergence="reverse_kl",
        )
    with pytest.raises(ValueError, match="Number of teachers must match"):
        kd.EnsembleDistiller([1.0], temperature=1.0).distillation_loss(student, top, labels, 0.5)
    with pytest.raises(ValueError, match="takes one teacher"):
        kd.DistillationLoss(temperature=1.0, alpha=0.5).forward(student, top, labels)
    with pytest.raises(ValueError, match=r"TopK rows \(3,\) do not match"):
        distiller.distillation_loss(np.zeros((4, 8)), top, np.zeros(4, np.int64), 0.5, combine="probs")
    with pytest.raises(ValueError, match="labels must have shape"):
        distiller.distillation_loss(student, top, np.zeros(2, np.int64), 0.5, combine="probs")


# --- edge cases ---------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bucket_that_the_student_gives_nothing(divergence):
    """U holds every class (two teachers' supports cover C = 3), or the student's
    probability outside U underflows: the bucket adds no gradient of its own."""
    distiller = kd.EnsembleDistiller([1.0, 1.0], temperature=1.0)
    covering = kd.TopK(np.array([[[0, 1]], [[2, 1]]]), np.log([[[0.5, 0.3]], [[0.4, 0.3]]]), tail="bucket")
    underflow = kd.TopK(np.array([[[0, 1]], [[1, 0]]]), np.log([[[0.5, 0.3]], [[0.4, 0.3]]]), tail="bucket")
    cases = [
        (np.array([[0.3, -0.2, 0.5]]), covering),
        (np.array([[800.0, 790.0, 0.0, -5.0, 0.0]]), underflow),
    ]
    for student, top in cases:
        _, grad = distiller.loss_and_grad(
            student, top, np.array([0]), 0.7, combine="probs", divergence=divergence
        )
        expected = R.topk_grad(
            student,
            top.indices,
            top.logprobs,
            [0],
            [1.0, 1.0],
            1.0,
            0.7,
            tail="bucket",
            divergence=divergence,
        )
        assert np.isfinite(grad).all()
        np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-12)


def test_rows_that_store_nothing():
    """An all-padding row: the whole teacher in the tail for "bucket" and "uniform";
    "renormalize" has nothing to renormalize and says so."""
    idx = np.array([[[0, 1], [-1, -1]], [[2, 3], [1, -1]]])
    lp = np.log(np.array([[[0.5, 0.2], [0.5, 0.5]], [[0.6, 0.1], [0.7, 0.5]]]))
    student = np.array([[0.1, 0.2, -0.3, 0.0, 0.4], [1.0, -1.0, 0.5, 0.0, 0.2]])
    labels = np.array([1, 2])
    distiller = kd.EnsembleDistiller([1.0, 2.0], temperature=1.5)
    for tail in ("bucket", "uniform"):
        top = kd.TopK(idx, lp, tail=tail)
        loss, grad = distiller.loss_and_grad(student, top, labels, 0.5, combine="probs")
        kw = dict(tail=tail)
        assert loss == pytest.approx(
            R.topk_loss(student, idx, lp, labels, [1.0, 2.0], 1.5, 0.5, **kw)[0], rel=1e-12
        )
        np.testing.assert_allclose(
            grad, R.topk_grad(student, idx, lp, labels, [1.0, 2.0], 1.5, 0.5, **kw), atol=1e-15
        )
    with pytest.raises(ValueError, match='teacher 0, row 1: no stored probability, which tail="renormalize"'):
        distiller.distillation_loss(
            student, kd.TopK(idx, lp, tail="renormalize"), labels, 0.5, combine="probs"
        )
    idx_zero = np.array([[[0, 1]], [[2, 3]]])
    with np.errstate(divide="ignore"):
        lp_zero = np.log(np.array([[[0.5, 0.2]], [[0.0, 0.0]]]))  # probabilities of exactly 0
    with pytest.raises(ValueError, match="teacher 1, row 0: no stored probability"):
        distiller.distillation_loss(
            student[:1], kd.TopK(idx_zero, lp_zero, tail="renormalize"), labels[:1], 0.5, combine="probs"
        )


def test_ignored_rows_are_not_checked():
    idx, lp = _valid()
    lp[0, 1, 0] = np.nan
    idx[1, 1, 0] = 99
    distiller = kd.EnsembleDistiller([1.0, 1.0], temperature=1.0)
    labels = np.array([0, -100, 2])
    loss = distiller.distillation_loss(
        np.zeros((3, 8)), kd.TopK(idx, lp), labels, 0.5, combine="probs", ignore_index=-100, check_finite=True
    )
    assert np.isfinite(loss)


def test_float16_rounding_of_many_entries_is_accepted():
    """k = C entries of a flat row, each rounded to float16: their sum may exceed 1
    by more than one entry's rounding; the mass check allows each entry's."""
    log_p = np.full((1, 2, 56), -np.log(56.0)).astype(np.float16)
    assert np.exp(log_p.astype(np.float64)).sum(-1).max() > 1.0 + 2.0**-10
    top = kd.TopK(np.tile(np.arange(56), (1, 2, 1)), log_p)
    assert np.isfinite(kd.DistillationLoss(1.0, 0.5).forward(np.zeros((2, 56)), top, np.zeros(2, np.int64)))

"""The torch and JAX autograd adapters (numba_kd.torch, numba_kd.jax).

Each adapter's loss and gradient are checked against numba_kd's own
``loss_and_grad`` (bit for bit: the adapter adds nothing), against the library's
own autodiff of the reference formula written in its operations (1e-12 at
float64), and, for torch, by ``torch.autograd.gradcheck`` (central finite
differences at float64)."""

from __future__ import annotations

import numpy as np
import pytest

import numba_kd as kd
from numba_kd import registry

B, C = 5, 13
T, ALPHA = registry.TEMPERATURE, registry.ALPHA
WEIGHTS = [1.0, 3.0]
DISTILLER = kd.EnsembleDistiller(WEIGHTS, T)
# Every divergence, combine and teacher weighting, ignore_index and the reductions.
OPTIONS = [
    *({"name": name, **opts} for name, opts in registry.LOSS_OPTIONS.items()),
    {"name": "sum", "reduction": "sum"},
    {"name": "none", "reduction": "none", "divergence": "jsd", "beta": 0.3},
]
IDS = [o["name"] or "default" for o in OPTIONS]


def _options(case):
    return {k: v for k, v in case.items() if k != "name"}


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    student = 2 * rng.standard_normal((B, C))
    teachers = [2 * rng.standard_normal((B, C)) for _ in WEIGHTS]
    labels = rng.integers(0, C, B)
    labels[1] = registry.IGNORE_INDEX  # read only with ignore_index
    return student, teachers, labels


def _top4(teachers):
    """The 4 largest log-probabilities at T of each teacher row, as TopK teachers."""
    stacked = np.stack(teachers) / T
    logprobs = stacked - np.log(np.exp(stacked - stacked.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logprobs -= stacked.max(-1, keepdims=True)
    indices = np.argsort(-logprobs, axis=-1)[..., :4]
    return kd.TopK(indices, np.take_along_axis(logprobs, indices, -1), temperature=T)


def _labels(labels, options):
    return labels if "ignore_index" in options else np.where(labels < 0, 0, labels)


# --- torch ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def kt(torch):
    import numba_kd.torch

    return numba_kd.torch


@pytest.mark.parametrize("case", OPTIONS, ids=IDS)
def test_torch_gradient_is_loss_and_grads(torch, kt, case):
    options = _options(case)
    s, t, y = _batch()
    y = _labels(y, options)
    loss, grad = DISTILLER.loss_and_grad(s, t, y, ALPHA, **options)
    student = torch.from_numpy(s).requires_grad_()
    teachers = [torch.from_numpy(x).requires_grad_() for x in t]  # receive no gradient
    value = kt.distillation_loss(DISTILLER, student, teachers, torch.from_numpy(y), ALPHA, **options)
    upstream = (
        torch.linspace(0.5, 2.0, B, dtype=torch.float64)
        if value.ndim
        else torch.tensor(1.5, dtype=torch.float64)
    )
    value.backward(upstream)
    np.testing.assert_array_equal(value.detach().numpy(), loss)
    scale = upstream.numpy()[:, None] if value.ndim else upstream.numpy()
    np.testing.assert_array_equal(student.grad.numpy(), grad * scale)
    assert all(x.grad is None for x in teachers)
    # torch's own autograd of the reference formula, written in torch operations.
    if case["name"] not in ("sum", "none"):
        oracle = torch.from_numpy(s).requires_grad_()
        w = torch.tensor(np.asarray(WEIGHTS) / sum(WEIGHTS))
        expected = registry.torch_loss_function(options)(
            oracle, torch.from_numpy(np.stack(t)), torch.from_numpy(y), w
        )
        expected.backward()
        np.testing.assert_allclose(value.item(), expected.item(), rtol=1e-12)
        np.testing.assert_allclose(student.grad.numpy() / 1.5, oracle.grad.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "case", [OPTIONS[0], OPTIONS[2], OPTIONS[8], OPTIONS[-1]], ids=lambda c: c["name"] or "default"
)
def test_torch_gradcheck(torch, kt, case):
    options = _options(case)
    s, t, y = _batch(1)
    teachers = [torch.from_numpy(x) for x in t]
    y = torch.from_numpy(_labels(y, options))

    def loss(student):
        return kt.distillation_loss(DISTILLER, student, teachers, y, ALPHA, **options)

    assert torch.autograd.gradcheck(loss, (torch.from_numpy(s).requires_grad_(),), eps=1e-6, atol=1e-8)


def test_torch_second_derivatives_are_refused(torch, kt):
    """The backward is the gradient loss_and_grad computed, a constant to autograd: a
    derivative of it (a Hessian product, a gradient penalty) would be silently wrong,
    so asking for its graph raises."""
    s, t, y = _batch(1)
    student = torch.from_numpy(s).requires_grad_()
    labels = torch.from_numpy(_labels(y, {}))
    loss = kt.distillation_loss(DISTILLER, student, [torch.from_numpy(x) for x in t], labels, ALPHA)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(loss, student, create_graph=True)
    (grad,) = torch.autograd.grad(loss, student)  # the first derivative, as before
    assert grad.shape == student.shape


def test_torch_one_teacher_3d_and_sixteen_bit(torch, kt):
    s, t, y = _batch(2)
    one = kd.DistillationLoss(T, 0.4)
    student = torch.from_numpy(s.reshape(1, B, C)).requires_grad_()
    value = kt.distillation_loss(
        one, student, torch.from_numpy(t[0].reshape(1, B, C)), torch.from_numpy(y.reshape(1, B) % C)
    )
    value.backward()
    loss, grad = one.loss_and_grad(s.reshape(1, B, C), t[0].reshape(1, B, C), y.reshape(1, B) % C)
    assert value.item() == loss
    np.testing.assert_array_equal(student.grad.numpy(), grad)
    half = torch.from_numpy(s).to(torch.bfloat16).requires_grad_()
    value = kt.distillation_loss(
        DISTILLER, half, [torch.from_numpy(x).to(torch.bfloat16) for x in t], y % C, ALPHA
    )
    value.backward()
    assert value.dtype == torch.float32 and half.grad.dtype == torch.bfloat16
    assert torch.isfinite(half.grad).all()


def test_torch_topk_teachers(torch, kt):
    s, t, y = _batch(3)
    top = _top4(t)
    student = torch.from_numpy(s).requires_grad_()
    value = kt.distillation_loss(DISTILLER, student, top, y % C, ALPHA, combine="probs")
    value.backward()
    loss, grad = DISTILLER.loss_and_grad(s, top, y % C, ALPHA, combine="probs")
    assert value.item() == loss
    np.testing.assert_array_equal(student.grad.numpy(), grad)


def test_torch_arguments_are_checked(torch, kt):
    s, t, y = _batch()
    student = torch.from_numpy(s)
    with pytest.raises(TypeError, match=r"alpha is required"):
        kt.distillation_loss(DISTILLER, student, t, y % C)
    with pytest.raises(ValueError, match=r"alpha must be None"):
        kt.distillation_loss(kd.DistillationLoss(T, 0.5), student, t[0], y % C, 0.5)
    with pytest.raises(TypeError, match=r"do not take out, return_components"):
        kt.distillation_loss(DISTILLER, student, t, y % C, ALPHA, out=None, return_components=True)
    with pytest.raises(TypeError, match=r"distiller must be"):
        kt.distillation_loss(object(), student, t, y % C, ALPHA)
    with pytest.raises(TypeError, match=r"student must be a torch.Tensor"):
        kt.distillation_loss(DISTILLER, s, t, y % C, ALPHA)
    with pytest.raises(ValueError, match=r"Alpha must be in \[0, 1\]"):
        kt.distillation_loss(DISTILLER, student.requires_grad_(), t, y % C, 1.5)


# --- JAX -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jax():
    jax = pytest.importorskip("jax")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", before)


@pytest.fixture(scope="module")
def kj(jax):
    import numba_kd.jax

    return numba_kd.jax


@pytest.mark.parametrize("case", OPTIONS, ids=IDS)
def test_jax_gradient_under_jit(jax, kj, case):
    jnp = jax.numpy
    options = _options(case)
    s, t, y = _batch()
    y = _labels(y, options)
    loss, grad = DISTILLER.loss_and_grad(s, t, y, ALPHA, **options)

    def value(student, teachers, labels):
        return kj.distillation_loss(DISTILLER, student, teachers, labels, ALPHA, **options)

    inputs = (jnp.asarray(s), [jnp.asarray(x) for x in t], jnp.asarray(y))
    got, vjp = jax.vjp(jax.jit(value), *inputs)
    upstream = jnp.linspace(0.5, 2.0, B) if got.ndim else jnp.asarray(1.5)
    got_grad, teacher_grads, _ = vjp(upstream)
    np.testing.assert_array_equal(np.asarray(got), loss)
    scale = np.asarray(upstream)[:, None] if got.ndim else 1.5
    np.testing.assert_array_equal(np.asarray(got_grad), grad * scale)
    assert all(not np.asarray(g).any() for g in teacher_grads)
    if case["name"] not in ("sum", "none"):
        w = jnp.asarray(np.asarray(WEIGHTS) / sum(WEIGHTS))
        oracle = jax.jit(jax.value_and_grad(registry.jax_loss_function(options)))
        expected, expected_grad = oracle(inputs[0], jnp.stack(inputs[1]), inputs[2], w)
        np.testing.assert_allclose(float(got), float(expected), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(got_grad) / 1.5, np.asarray(expected_grad), rtol=0, atol=1e-12)


def test_jax_bfloat16_one_teacher_and_topk(jax, kj):
    jnp = jax.numpy
    s, t, y = _batch(4)
    y = y % C
    grad = jax.grad(lambda a: kj.distillation_loss(kd.DistillationLoss(T, 0.4), a, jnp.asarray(t[0]), y))(
        jnp.asarray(s)
    )
    np.testing.assert_array_equal(np.asarray(grad), kd.DistillationLoss(T, 0.4).loss_and_grad(s, t[0], y)[1])
    half = [jnp.asarray(x).astype(jnp.bfloat16) for x in (s, *t)]
    value, grad = jax.value_and_grad(lambda a: kj.distillation_loss(DISTILLER, a, half[1:], y, ALPHA))(
        half[0]
    )
    assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    want = DISTILLER.loss_and_grad(np.asarray(half[0]), [np.asarray(x) for x in half[1:]], y, ALPHA)
    assert float(value) == np.float32(want[0])
    np.testing.assert_array_equal(np.asarray(grad), want[1])
    top = _top4(t)
    grad = jax.jit(jax.grad(lambda a: kj.distillation_loss(DISTILLER, a, top, y, ALPHA, combine="probs")))(
        jnp.asarray(s)
    )
    np.testing.assert_array_equal(
        np.asarray(grad), DISTILLER.loss_and_grad(s, top, y, ALPHA, combine="probs")[1]
    )

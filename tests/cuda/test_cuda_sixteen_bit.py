"""16-bit logits (float16, and bfloat16 from ml_dtypes) on the CUDA target.

The kernels read the 16-bit bits themselves, widen them to float32 exactly and
then compute as the float32 kernels do, so every result is checked bit for bit
against the float32 CUDA path on the widened values: losses equal, gradients and
combines equal to the float32 results rounded to the input dtype (to nearest,
ties to even), and a float32 ``out=`` receives the float32 gradient itself.
(The CPU's tests/test_sixteen_bit.py checks the conversions over every pattern,
and the accuracy against the float64 reference.)
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from helpers import make_batch, option_ids
from numba import cuda

import numba_kd as kd

if not (numba.config.ENABLE_CUDASIM or cuda.is_available()):
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 or a CUDA GPU", allow_module_level=True)

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
SIXTEEN_BIT = [F16, BF16]
ROWS, CLASSES = 3, 9
DISTILLER = kd.EnsembleDistiller([1.0, 2.0], temperature=2.0)


def _batch(rng, dtype):
    student, teachers, labels = make_batch(rng, 2, ROWS, CLASSES, np.float64, spread=4.0)
    return student.astype(dtype), [t.astype(dtype) for t in teachers], labels


def _on_device(student, teachers, labels):
    return cuda.to_device(student), [cuda.to_device(t) for t in teachers], cuda.to_device(labels)


def _widened(student, teachers):
    return student.astype(np.float32), [t.astype(np.float32) for t in teachers]


def _bits(x: np.ndarray, dtype) -> np.ndarray:
    return x.astype(dtype).view(np.uint16)


OPTIONS = [
    {},  # entrenar's loss: the single-read loss_rows kernel
    {"divergence": "jsd", "beta": 0.3, "ignore_index": -100},
    {"combine": "probs", "teacher_weighting": "entropy", "divergence": "tvd", "reduction": "none"},
]


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=option_ids)
def test_losses_compute_as_float32(rng, dtype, options):
    student, teachers, labels = _batch(rng, dtype)
    if options.get("ignore_index") is not None:
        labels[1] = options["ignore_index"]
    s, t, y = _on_device(student, teachers, labels)
    s32, t32 = _on_device(*_widened(student, teachers), labels)[:2]
    loss = DISTILLER.distillation_loss(s, t, y, 0.4, **options)
    loss32 = DISTILLER.distillation_loss(s32, t32, y, 0.4, **options)
    if options.get("reduction") == "none":
        loss, loss32 = loss.copy_to_host(), loss32.copy_to_host()
        assert loss.dtype == np.float32  # per-row losses keep the arithmetic's dtype
        np.testing.assert_array_equal(loss, loss32)
    else:
        assert loss == loss32
    if options:  # one gradient per kernel path is enough under the simulator
        return
    value, grad = DISTILLER.loss_and_grad(s, t, y, 0.4, **options)
    value32, grad32 = DISTILLER.loss_and_grad(s32, t32, y, 0.4, **options)
    assert value == value32
    host = grad.copy_to_host()
    assert host.dtype == dtype and host.shape == student.shape
    np.testing.assert_array_equal(host.view(np.uint16), _bits(grad32.copy_to_host(), dtype))


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_gradient_with_options_is_the_rounded_float32_gradient(rng, dtype):
    student, teachers, labels = _batch(rng, dtype)
    options = {"divergence": "skew_reverse_kl", "skew": 0.2, "teacher_weighting": "confidence"}
    s, t, y = _on_device(student, teachers, labels)
    s32, t32 = _on_device(*_widened(student, teachers), labels)[:2]
    _, grad = DISTILLER.loss_and_grad(s, t, y, 0.7, **options)
    _, grad32 = DISTILLER.loss_and_grad(s32, t32, y, 0.7, **options)
    np.testing.assert_array_equal(grad.copy_to_host().view(np.uint16), _bits(grad32.copy_to_host(), dtype))
    # A float32 out= receives the float32 gradient, unrounded.
    out = cuda.device_array(student.shape, np.float32)
    _, written = DISTILLER.loss_and_grad(s, t, y, 0.7, out=out, **options)
    assert written is out
    np.testing.assert_array_equal(out.copy_to_host(), grad32.copy_to_host())


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_combines_are_the_rounded_float32_combines(rng, dtype):
    _, teachers, _ = _batch(rng, dtype)
    on_device = [cuda.to_device(t) for t in teachers]
    widened = [cuda.to_device(t.astype(np.float32)) for t in teachers]
    for combine in (
        DISTILLER.combine_teachers,
        DISTILLER.combine_via_probabilities,
        lambda t: DISTILLER.combine_via_probabilities(t, eps=0.0),
    ):
        got = combine(on_device).copy_to_host()
        assert got.dtype == dtype
        np.testing.assert_array_equal(got.view(np.uint16), _bits(combine(widened).copy_to_host(), dtype))


def test_nonfinite_sixteen_bit_logits_are_refused(rng):
    student, teachers, labels = _batch(rng, BF16)
    student[1, 2] = np.inf
    s, t, y = _on_device(student, teachers, labels)
    with pytest.raises(ValueError, match="student"):
        DISTILLER.distillation_loss(s, t, y, 0.5, check_finite=True)
    # Without the check, the row's loss is NaN (not a number computed from garbage).
    rows = DISTILLER.distillation_loss(s, t, y, 0.5, reduction="none").copy_to_host()
    assert np.isnan(rows[1]) and np.isfinite(rows[[0, 2]]).all()


def test_a_sixteen_bit_out_of_the_other_type_is_refused(rng):
    student, teachers, labels = _batch(rng, F16)
    s, t, y = _on_device(student, teachers, labels)
    out = cuda.to_device(np.zeros(student.shape, BF16))
    refusal = r"out has dtype bfloat16, the result has dtype float16 \(or float32\)"
    with pytest.raises(TypeError, match=refusal):
        DISTILLER.loss_and_grad(s, t, y, 0.5, out=out)


def _torch_on_a_gpu():
    if numba.config.ENABLE_CUDASIM:
        pytest.skip("torch CUDA tensors need a GPU, not the simulator")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA device")
    return torch


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_torch_sixteen_bit_cuda_tensors(rng, kind):
    torch = _torch_on_a_gpu()
    dtype = BF16 if kind == "bfloat16" else F16
    student, teachers, labels = _batch(rng, dtype)

    def tensor(x):
        return torch.from_numpy(x.view(np.int16)).view(getattr(torch, kind)).cuda()

    s, t, y = tensor(student), [tensor(x) for x in teachers], torch.from_numpy(labels).cuda()
    loss, grad = DISTILLER.loss_and_grad(s, t, y, 0.4)
    s32, t32 = _on_device(*_widened(student, teachers), labels)[:2]
    loss32, grad32 = DISTILLER.loss_and_grad(s32, t32, cuda.to_device(labels), 0.4)
    assert loss == loss32
    assert isinstance(grad, torch.Tensor) and grad.dtype == getattr(torch, kind) and grad.is_cuda
    host = grad.cpu().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(host, _bits(grad32.copy_to_host(), dtype))


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_topk_teachers_with_a_sixteen_bit_student(rng, dtype):
    """The sparse kernel reads a 16-bit student as the dense ones do."""
    student, teachers, labels = _batch(rng, dtype)
    logits = np.stack([t.astype(np.float64) for t in teachers])
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    indices = np.argsort(-logits, axis=-1)[..., :4]
    top = kd.TopK(indices, np.take_along_axis(log_p, indices, axis=-1).astype(np.float32), tail="uniform")
    s, y = cuda.to_device(student), cuda.to_device(labels)
    s32 = cuda.to_device(student.astype(np.float32))
    loss, grad = DISTILLER.loss_and_grad(s, top, y, 0.4, combine="probs", divergence="jsd")
    loss32, grad32 = DISTILLER.loss_and_grad(s32, top, y, 0.4, combine="probs", divergence="jsd")
    assert loss == loss32
    np.testing.assert_array_equal(grad.copy_to_host().view(np.uint16), _bits(grad32.copy_to_host(), dtype))

"""DLPack inputs: torch and JAX CPU arrays read without a copy (bfloat16 included),
results returned in the caller's library, CUDA DLPack tensors routed to the CUDA
backend, and detection that imports none of those libraries."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import numba_kd as kd
from numba_kd import _arrays, _targets

ml_dtypes = pytest.importorskip("ml_dtypes")

B, C = 6, 37
DISTILLER = kd.EnsembleDistiller([1.0, 2.0], 2.0)


def _batch(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    student = (3 * rng.standard_normal((B, C))).astype(dtype)
    teachers = [(3 * rng.standard_normal((B, C))).astype(dtype) for _ in range(2)]
    return student, teachers, rng.integers(0, C, B)


class Legacy:
    """A producer older than DLPack 1.0: ``__dlpack__`` takes no max_version."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, stream=None):
        return self.tensor.__dlpack__()

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()


class OnDevice:
    """An object that DLPack places on a device (type ``device_type``), and nothing else."""

    def __init__(self, device_type: int):
        self.device_type = device_type

    def __dlpack__(self, stream=None, max_version=None):
        raise AssertionError("a device tensor is never exported to the host")

    def __dlpack_device__(self):
        return (self.device_type, 0)


# --- torch ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_inputs_give_the_numpy_results_as_tensors(torch, dtype):
    s, t, y = _batch(dtype)
    loss, grad = DISTILLER.loss_and_grad(s, t, y, 0.4)
    got_loss, got_grad = DISTILLER.loss_and_grad(
        torch.from_numpy(s), [torch.from_numpy(x) for x in t], torch.from_numpy(y), 0.4
    )
    assert got_loss == loss
    assert isinstance(got_grad, torch.Tensor) and got_grad.dtype == torch.from_numpy(s).dtype
    np.testing.assert_array_equal(got_grad.numpy(), grad)
    rows = DISTILLER.distillation_loss(
        torch.from_numpy(s), [torch.from_numpy(x) for x in t], y, 0.4, reduction="none"
    )
    assert isinstance(rows, torch.Tensor)
    np.testing.assert_array_equal(rows.numpy(), DISTILLER.distillation_loss(s, t, y, 0.4, reduction="none"))
    for method in (DISTILLER.combine_teachers, DISTILLER.combine_via_probabilities):
        got = method([torch.from_numpy(x) for x in t])
        assert isinstance(got, torch.Tensor)
        np.testing.assert_array_equal(got.numpy(), method(t))


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_torch_sixteen_bit_is_read_in_place(torch, kind):
    s, t, y = _batch()
    ours = ml_dtypes.bfloat16 if kind == "bfloat16" else np.float16
    theirs = getattr(torch, kind)
    # Every other column: a strided view, read through the tensor's strides.
    y = y // 2
    tensors = [torch.from_numpy(x).to(theirs)[:, ::2] for x in (s, *t)]
    arrays = [x.astype(ours)[:, ::2] for x in (s, *t)]
    view = _arrays.host_from_dlpack(tensors[0])
    assert view.dtype == np.dtype(ours)
    assert view.__array_interface__["data"][0] == tensors[0].data_ptr()  # no copy
    assert view.strides == tuple(n * 2 for n in tensors[0].stride())
    loss, grad = DISTILLER.loss_and_grad(arrays[0], arrays[1:], y, 0.4, divergence="jsd")
    got_loss, got_grad = DISTILLER.loss_and_grad(
        tensors[0], tensors[1:], torch.from_numpy(y), 0.4, divergence="jsd"
    )
    assert got_loss == loss
    assert got_grad.dtype == theirs
    np.testing.assert_array_equal(got_grad.float().numpy(), grad.astype(np.float32))
    combined = DISTILLER.combine_teachers(tensors[1:])
    assert combined.dtype == theirs
    np.testing.assert_array_equal(
        combined.float().numpy(), DISTILLER.combine_teachers(arrays[1:]).astype(np.float32)
    )


def test_a_legacy_bfloat16_capsule_reads_the_same(torch):
    s, _, _ = _batch()
    tensor = torch.from_numpy(s).bfloat16()
    versioned = _arrays.host_from_dlpack(tensor)
    legacy = _arrays.host_from_dlpack(Legacy(tensor))
    assert legacy.__array_interface__["data"][0] == tensor.data_ptr()
    np.testing.assert_array_equal(legacy.view(np.uint16), versioned.view(np.uint16))
    np.testing.assert_array_equal(versioned.astype(np.float32), tensor.float().numpy())


def test_a_torch_out_is_written_in_place(torch):
    s, t, y = _batch()
    _, grad = DISTILLER.loss_and_grad(s, t, y, 0.4)
    out = torch.full((B, C), float("nan"))
    _, got = DISTILLER.loss_and_grad(torch.from_numpy(s), [torch.from_numpy(x) for x in t], y, 0.4, out=out)
    assert got is out
    np.testing.assert_array_equal(out.numpy(), grad)
    out16 = torch.zeros((B, C), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"out has dtype bfloat16, the result has dtype float32"):
        DISTILLER.loss_and_grad(s, t, y, 0.4, out=out16)


def test_torch_tensors_that_need_grad_are_refused_by_name(torch):
    s, t, y = _batch()
    with pytest.raises(TypeError, match=r"student is a tensor that requires grad"):
        DISTILLER.distillation_loss(torch.from_numpy(s).requires_grad_(), t, y, 0.4)
    with pytest.raises(TypeError, match=r"out cannot be written"):
        DISTILLER.loss_and_grad(s, t, y, 0.4, out=torch.zeros((B, C), requires_grad=True))


def test_types_dlpack_cannot_describe_are_refused_by_name(torch):
    s, t, y = _batch()
    with pytest.raises(TypeError, match=r"student"):
        DISTILLER.distillation_loss(torch.from_numpy(s).to(torch.complex64), t, y, 0.4)
    with pytest.raises(TypeError, match=r"teachers\[1\] cannot be read as an array: DLPack type code 10 "):
        DISTILLER.distillation_loss(s, [t[0], torch.from_numpy(t[1]).to(torch.float8_e4m3fn)], y, 0.4)


def test_bfloat16_without_ml_dtypes_says_what_to_install(torch, monkeypatch):
    s, t, y = _batch()
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(TypeError, match=r"student .*needs ml_dtypes"):
        DISTILLER.distillation_loss(torch.from_numpy(s).bfloat16(), t, y, 0.4)


# --- JAX -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jnp():
    return pytest.importorskip("jax.numpy")


@pytest.mark.parametrize("kind", ["float32", "bfloat16"])
def test_jax_arrays_give_jax_results(jnp, kind):
    s, t, y = _batch()
    ours = ml_dtypes.bfloat16 if kind == "bfloat16" else np.float32
    loss, grad = DISTILLER.loss_and_grad(s.astype(ours), [x.astype(ours) for x in t], y, 0.4)
    arrays = [jnp.asarray(x).astype(kind) for x in (s, *t)]
    got_loss, got_grad = DISTILLER.loss_and_grad(arrays[0], arrays[1:], jnp.asarray(y), 0.4)
    assert got_loss == loss
    assert type(got_grad) is type(arrays[0]) and got_grad.dtype == np.dtype(ours)
    np.testing.assert_array_equal(np.asarray(got_grad).astype(np.float32), grad.astype(np.float32))


@pytest.mark.parametrize("kind", ["float32", "bfloat16"])
def test_jax_arrays_cannot_be_out(jnp, kind):
    """JAX arrays are immutable; JAX exports them as DLPack capsules older than 1.0,
    which cannot say so, and which are therefore read only (bfloat16 ones too, which
    NumPy's DLPack reader does not see)."""
    s, t, y = _batch()
    ours = ml_dtypes.bfloat16 if kind == "bfloat16" else np.float32
    s, t = s.astype(ours), [x.astype(ours) for x in t]
    out = jnp.zeros((B, C), kind)
    with pytest.raises(ValueError, match=r"out must be writable; this one is read-only"):
        DISTILLER.loss_and_grad(s, t, y, 0.4, out=out)
    with pytest.raises(ValueError, match=r"out must be writable; this one is read-only"):
        DISTILLER.combine_teachers(t, out=out)
    assert not np.asarray(out).astype(np.float32).any()


# --- where DLPack tensors go, without their libraries ----------------------------------


def test_cuda_dlpack_tensors_go_to_the_cuda_backend():
    pytest.importorskip("numba.cuda")
    for device_type in (2, 13):  # CUDA, CUDA managed
        assert _arrays.is_device_array(OnDevice(device_type))
        assert _targets.backend_for([OnDevice(device_type)], None).target == "cuda"
    assert not _arrays.is_device_array(OnDevice(1))
    with pytest.raises(ValueError, match=r"mix host"):
        _targets.backend_for([np.zeros(3), OnDevice(2)], None)


def test_other_devices_are_refused_by_name():
    s, t, y = _batch()
    with pytest.raises(TypeError, match=r"teachers\[0\] cannot be read as an array: .*DLPack device type 10"):
        DISTILLER.distillation_loss(s, [OnDevice(10), t[1]], y, 0.4)


class NoDeviceNumber(OnDevice):
    """Like a torch "meta" tensor: __dlpack_device__ raises."""

    def __dlpack_device__(self):
        raise ValueError("Unknown device type meta for Dlpack")


def test_a_device_dlpack_cannot_name_is_refused_by_name():
    _, t, y = _batch()
    with pytest.raises(
        TypeError, match=r"student cannot be read as an array: .*unknown \(Unknown device type meta"
    ):
        DISTILLER.distillation_loss(NoDeviceNumber(1), t, y, 0.4)


def test_detection_imports_no_array_library():
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import numba_kd as kd

        class Producer:  # a third-party CPU array, seen only through DLPack
            def __init__(self, a):
                self.a = a
            def __dlpack__(self, stream=None, max_version=None):
                return self.a.__dlpack__()
            def __dlpack_device__(self):
                return self.a.__dlpack_device__()

        rng = np.random.default_rng(0)
        s, t = rng.normal(size=(3, 5)), [rng.normal(size=(3, 5)) for _ in range(2)]
        d = kd.EnsembleDistiller([1.0, 1.0], 2.0)
        got = d.loss_and_grad(Producer(s), [Producer(x) for x in t], np.arange(3), 0.5)
        want = d.loss_and_grad(s, t, np.arange(3), 0.5)
        assert got[0] == want[0] and type(got[1]) is np.ndarray
        assert np.array_equal(got[1], want[1])
        loaded = sorted({"torch", "jax", "jaxlib", "cupy", "ml_dtypes"} & set(sys.modules))
        assert not loaded, loaded
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)

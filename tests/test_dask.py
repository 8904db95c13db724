"""Dask arrays, computed on a real dask.distributed LocalCluster (2 worker processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import make_batch

import numba_kd as kd

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

B, C = 600, 29
WEIGHTS = [1.0, 2.0, 3.0]


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def batch():
    student, teachers, labels = make_batch(np.random.default_rng(11), 3, B, C, np.float32)
    labels[::9] = -100
    return student, teachers, labels


def _dask(student, teachers, labels):
    """Row chunks that differ between the inputs and a split class axis: both are rechunked."""
    return (
        da.from_array(student, chunks=(128, 10)),
        [da.from_array(t, chunks=(200, C)) for t in teachers],
        da.from_array(labels, chunks=150),
    )


def test_combines(client, batch):
    _, teachers, _ = batch
    d = kd.EnsembleDistiller(WEIGHTS, 2.0)
    _, dt, _ = _dask(*batch)
    got = d.combine_teachers(dt)
    assert isinstance(got, da.Array) and got.chunks[0] == dt[0].chunks[0]
    np.testing.assert_array_equal(got.compute(), d.combine_teachers(teachers))
    stacked = da.stack(dt)
    for eps in (1e-10, 0.0):
        np.testing.assert_array_equal(
            d.combine_via_probabilities(stacked, eps).compute(), d.combine_via_probabilities(teachers, eps)
        )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"divergence": "jsd", "teacher_weighting": "confidence"}])
def test_losses_and_gradients(client, batch, reduction, options):
    student, teachers, labels = batch
    d = kd.EnsembleDistiller(WEIGHTS, 2.0)
    ds, dt, dy = _dask(student, teachers, labels)
    kw = {"reduction": reduction, "ignore_index": -100, "return_components": True, **options}
    parts = d.distillation_loss(ds, dt, dy, 0.4, **kw)
    assert all(isinstance(p, da.Array) for p in parts)
    expected = d.distillation_loss(student, teachers, labels, 0.4, **kw)
    for got, want in zip(client.gather(client.compute(list(parts))), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    (loss, grad) = d.loss_and_grad(ds, dt, dy, 0.4, **{**kw, "return_components": False})
    want_loss, want_grad = d.loss_and_grad(
        student, teachers, labels, 0.4, **{**kw, "return_components": False}
    )
    loss, grad = client.gather(client.compute([loss, grad]))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    assert grad.dtype == np.float32
    # float32 gradients: the mean's division happens per element here, in-kernel there.
    np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-6 * np.abs(want_grad).max())


def test_single_teacher_and_3d(client, batch):
    student, teachers, labels = batch
    labels = np.clip(labels, 0, None)
    single = kd.DistillationLoss(2.0, 0.3)
    ds, dt, dy = _dask(student, teachers, labels)
    np.testing.assert_allclose(
        single.forward(ds, dt[0], dy).compute(), single.forward(student, teachers[0], labels), rtol=1e-12
    )
    s3, y3 = student.reshape(60, 10, C), labels.reshape(60, 10)
    t3 = [t.reshape(60, 10, C) for t in teachers]
    d = kd.EnsembleDistiller(WEIGHTS, 2.0)
    got = d.distillation_loss(
        da.from_array(s3, chunks=(25, 5, C)), [da.from_array(t) for t in t3], da.from_array(y3), 0.5
    )
    np.testing.assert_allclose(got.compute(), d.distillation_loss(s3, t3, y3, 0.5), rtol=1e-12)


def test_dask_options_that_do_not_apply(batch):
    d = kd.EnsembleDistiller(WEIGHTS, 2.0)
    ds, dt, dy = _dask(*batch)
    with pytest.raises(ValueError, match="device must be"):
        d.combine_teachers(dt, device="cuda")
    with pytest.raises(TypeError, match="out= is not supported"):
        d.loss_and_grad(ds, dt, dy, 0.5, out=np.empty((B, C), np.float32))
    with pytest.raises(ValueError, match="Alpha must be in"):
        d.distillation_loss(ds, dt, dy, 2.0)


def test_cli_on_the_cluster(client, batch, tmp_path):
    student, teachers, labels = batch
    labels = np.clip(labels, 0, None)
    paths = []
    for k, t in enumerate(teachers):
        np.save(tmp_path / f"t{k}.npy", t)
        paths.append(str(tmp_path / f"t{k}.npy"))
    np.save(tmp_path / "s.npy", student)
    np.save(tmp_path / "y.npy", labels)
    address = client.scheduler.address
    d = kd.EnsembleDistiller(WEIGHTS, 2.0)
    for out in ("soft.npy", "soft.zarr"):
        run = subprocess.run(
            [sys.executable, "-m", "numba_kd", "soft-labels", *paths, "--out", str(tmp_path / out),
             "--weights", "1,2,3", "--temperature", "2", "--chunk-rows", "128", "--scheduler", address],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        got = np.load(tmp_path / out) if out.endswith(".npy") else zarr.open_array(str(tmp_path / out))[:]
        np.testing.assert_array_equal(got, d.combine_teachers(teachers))
    run = subprocess.run(
        [sys.executable, "-m", "numba_kd", "loss", str(tmp_path / "s.npy"), *paths, "--labels",
         str(tmp_path / "y.npy"), "--alpha", "0.3", "--weights", "1,2,3", "--temperature", "2",
         "--chunk-rows", "100", "--scheduler", address, "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    np.testing.assert_allclose(
        result["loss"], d.distillation_loss(student, teachers, labels, 0.3), rtol=1e-12
    )
    assert result["rows"] == B


def test_numpy_inputs_do_not_import_dask():
    code = (
        "import sys, numpy as np, numba_kd as kd\n"
        "d = kd.EnsembleDistiller([1.0], 2.0)\n"
        "d.distillation_loss(np.ones((2, 3)), [np.ones((2, 3))], [0, 1], 0.5)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'zarr')))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_kernels_on_a_worker_use_at_most_its_threads(client):
    """Workers here have one thread each: a block's kernels run on one numba thread."""

    def threads_in_a_block(_):
        import numba

        from numba_kd import _dask

        _dask._cap_numba_threads()
        return numba.get_num_threads()

    assert client.gather(client.map(threads_in_a_block, range(4))) == [1, 1, 1, 1]


def _save_teachers(tmp_path, teachers) -> list[str]:
    paths = []
    for k, t in enumerate(teachers):
        np.save(tmp_path / f"t{k}.npy", t)
        paths.append(str(tmp_path / f"t{k}.npy"))
    return paths


@pytest.mark.parametrize("out", ["soft.npy", "soft.zarr"])
def test_cluster_soft_labels_are_marked_and_complete(client, batch, tmp_path, out):
    """A cluster run writes the same marked output as a local run, and leaves no partial."""
    from numba_kd import offline

    paths = _save_teachers(tmp_path, batch[1])
    address = client.scheduler.address
    offline.soft_labels(
        paths, tmp_path / out, weights=WEIGHTS, temperature=2.0, chunk_rows=128, scheduler=address
    )
    offline.soft_labels(paths, tmp_path / f"local-{out}", weights=WEIGHTS, temperature=2.0, chunk_rows=128)
    if out.endswith(".npy"):
        np.testing.assert_array_equal(np.load(tmp_path / out), np.load(tmp_path / f"local-{out}"))
    else:
        got, local = zarr.open_array(str(tmp_path / out)), zarr.open_array(str(tmp_path / f"local-{out}"))
        np.testing.assert_array_equal(got[:], local[:])
        settings = dict(got.attrs["numba_kd"])
        assert settings["completed_rows"] == B
        assert {k: v for k, v in settings.items() if k != "teachers"} == {
            k: v for k, v in local.attrs["numba_kd"].items() if k != "teachers"
        }
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []


@pytest.mark.parametrize("out", ["soft.npy", "soft.zarr"])
def test_cluster_float16_overflow_is_an_error_and_leaves_nothing(client, batch, tmp_path, out):
    """Teacher logits beyond float16's range: the cluster run refuses, as the local one
    does, names the first row, and removes its temporary output."""
    from numba_kd import offline

    teachers = [t.copy() for t in batch[1]]
    for t in teachers:
        t[300, 5] = 1e5
    paths = _save_teachers(tmp_path, teachers)
    address = client.scheduler.address
    with pytest.raises(ValueError, match="from row 300 on exceed the float16 range"):
        offline.soft_labels(paths, tmp_path / out, chunk_rows=128, dtype="float16", scheduler=address)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("soft")) == []


def test_cluster_run_refuses_a_partial_it_did_not_write(client, batch, tmp_path):
    from numba_kd import offline

    paths = _save_teachers(tmp_path, batch[1])
    (tmp_path / "soft.npy.partial").write_text("user data")
    with pytest.raises(ValueError, match="is not a temporary output of numba-kd"):
        offline.soft_labels(paths, tmp_path / "soft.npy", overwrite=True, scheduler=client.scheduler.address)
    assert (tmp_path / "soft.npy.partial").read_text() == "user data"


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bfloat16_blocks(client, batch, reduction):
    """16-bit inputs: gradients and combines keep the input dtype, per-row losses are
    float32, and a mean's gradient is rounded to 16 bits once, after the division."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    student, teachers, labels = (
        batch[0].astype(ml_dtypes.bfloat16), [t.astype(ml_dtypes.bfloat16) for t in batch[1]], batch[2]
    )  # fmt: skip
    d = kd.EnsembleDistiller(WEIGHTS, 2.0)
    ds, dt, dy = _dask(student, teachers, labels)
    combined = d.combine_teachers(dt)
    assert combined.dtype == student.dtype
    np.testing.assert_array_equal(
        combined.compute().view(np.uint16), d.combine_teachers(teachers).view(np.uint16)
    )
    kw = {"reduction": reduction, "ignore_index": -100, "divergence": "jsd"}
    loss, grad = d.loss_and_grad(ds, dt, dy, 0.4, **kw)
    assert grad.dtype == student.dtype
    loss, grad = client.gather(client.compute([loss, grad]))
    want_loss, want_grad = d.loss_and_grad(student, teachers, labels, 0.4, **kw)
    assert grad.dtype == student.dtype
    assert np.asarray(loss).dtype == (np.float32 if reduction == "none" else np.float64)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12 if reduction == "mean" else 0)
    # The kernel scales by 1/N per element before its rounding; here the float32 sum
    # is divided afterwards: the two roundings to bfloat16 differ by at most one ulp
    # (2^-7 of an entry).
    got, want = grad.astype(np.float64), want_grad.astype(np.float64)
    assert np.all(np.abs(got - want) <= 2.0**-7 * np.abs(want))

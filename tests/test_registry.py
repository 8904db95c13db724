"""The registry that drives the benchmarks: each operation's numba_kd call agrees with
its NumPy reference and with torch (when installed), and the bench machinery runs."""

from __future__ import annotations

import numpy as np
import pytest

from numba_kd import bench
from numba_kd.registry import (
    LOSS_OPTIONS,
    OPERATIONS,
    SPARSE_OPERATIONS,
    Case,
    SparseCase,
    jax_available,
    relative_error,
    tolerance,
    torch_available,
)

# Max error relative to the largest magnitude of the float64 reference; against
# torch and jax, which compute in the input precision with their own kernels, the
# peer tolerance.
RTOL = {dtype: tolerance(dtype).loss for dtype in ("float32", "float64")}
TORCH_RTOL = {dtype: tolerance(dtype).peer for dtype in ("float32", "float64")}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(OPERATIONS))
def test_operation_matches_its_reference(name, dtype):
    op = OPERATIONS[name]
    args = Case(3, 17, 130, dtype, seed=4).arrays(ignored=op.ignored)
    result = op.numba_kd(*args)
    assert relative_error(result, op.numpy(*args)) <= RTOL[dtype]
    if op.scalar:
        assert isinstance(result, float)
    else:
        assert result.dtype == np.dtype(dtype)


@pytest.mark.skipif(not torch_available(), reason="torch is not installed")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(OPERATIONS))
def test_operation_matches_torch(name, dtype):
    op = OPERATIONS[name]
    args = Case(3, 17, 130, dtype, seed=5).arrays(ignored=op.ignored)
    assert relative_error(op.numba_kd(*args), op.torch(*args)) <= TORCH_RTOL[dtype]


@pytest.mark.skipif(not jax_available(), reason="jax is not installed")
@pytest.mark.parametrize("name", [name for name, op in OPERATIONS.items() if op.jax_jit is not None])
def test_operation_matches_jax(name):
    op = OPERATIONS[name]
    args = Case(3, 17, 130, "float32", seed=6).arrays(ignored=op.ignored)
    assert relative_error(op.numba_kd(*args), op.jax_jit(*args)()) <= TORCH_RTOL["float32"]


# The bfloat16 bench rows: the operations without options, and the JSD.
BFLOAT16_ROWS = [name for name in OPERATIONS if "[" not in name or name.endswith("[jsd]")]
# torch computes these rows in bfloat16 arithmetic (8 significant bits per
# operation, its softmax and autograd included); measured at most 1.3e-2 here.
TORCH_BFLOAT16_RTOL = 4e-2


@pytest.mark.parametrize("name", BFLOAT16_ROWS)
def test_bfloat16_rows(name):
    pytest.importorskip("ml_dtypes")
    op = OPERATIONS[name]
    args = Case(3, 17, 130, "bfloat16", seed=7).arrays(ignored=op.ignored)
    assert args[0].dtype.name == "bfloat16"
    tol = tolerance("bfloat16")
    result = op.numba_kd(*args)
    reference = op.numpy(*args)
    assert relative_error(result, reference) <= (tol.loss if op.scalar else tol.array)
    if not op.scalar:
        assert result.dtype.name == "bfloat16"
    if torch_available():
        peer = op.torch(*args)
        assert op.scalar or peer.dtype.name == "bfloat16"
        assert relative_error(peer, reference) <= TORCH_BFLOAT16_RTOL


def test_every_loss_option_is_a_row():
    for option in LOSS_OPTIONS:
        for operation in ("distillation_loss", "loss_and_grad"):
            assert (f"{operation}[{option}]" if option else operation) in OPERATIONS


def test_bench_measures_every_operation():
    rows = bench.measure([(8, 40)], n_teachers=2, dtype="float32", rounds=2, peers=False)
    assert [r.operation for r in rows] == list(OPERATIONS)
    for r in rows:
        assert r.numba_kd_ms > 0 and r.gb_per_s > 0 and r.roofline_pct > 0
        assert r.max_rel_error <= 1e-6
        assert r.peer_ms == {}
    table = bench.format_table(rows)
    assert all(name in table for name in OPERATIONS)


def test_bench_times_the_peers_in_the_same_rounds():
    names = ["distillation_loss", "combine_teachers"]
    rows = bench.measure([(8, 40)], n_teachers=2, dtype="float32", rounds=2, operations=names)
    assert [r.operation for r in rows] == names
    for r in rows:
        assert "numpy" in r.peer_ms
        assert ("torch.compile" in r.peer_ms) == torch_available()
        assert ("jax.jit" in r.peer_ms) == jax_available()
        assert all(ms > 0 for ms in r.peer_ms.values())


def test_bench_redraws_a_stored_run(tmp_path, capsys):
    """The README's table and plot both come from the stored JSON run."""
    pytest.importorskip("matplotlib")
    from pathlib import Path

    from numba_kd import cli

    stored = Path(__file__).resolve().parent.parent / "docs" / "bench.json"
    assert cli.main(["bench", "--from-json", str(stored), "--plot", str(tmp_path / "plot.png")]) == 0
    assert "| distillation_loss | 8192 x 1000 |" in capsys.readouterr().out
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- sparse top-k rows


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(SPARSE_OPERATIONS))
def test_sparse_operation_matches_its_reference_and_torch(name, dtype):
    op = SPARSE_OPERATIONS[name]
    args = SparseCase(2, 19, 400, 9, dtype, seed=7).arrays()
    result = op.numba_kd(*args)
    assert relative_error(result, op.numpy(*args)) <= RTOL[dtype]
    if torch_available():
        # torch scatters the mixture into a dense target: an independent oracle.
        assert relative_error(result, op.torch(*args)) <= TORCH_RTOL[dtype]


def test_sparse_case_stores_distinct_classes_and_the_stated_mass():
    _, (indices, logprobs), _, _ = SparseCase(3, 50, 1000, 64, "float64", seed=1).arrays()
    ordered = np.sort(indices, axis=-1)
    assert (np.diff(ordered, axis=-1) > 0).all() and ordered.min() >= 0 and ordered.max() < 1000
    np.testing.assert_allclose(np.exp(logprobs).sum(-1), 0.9, rtol=1e-12)


def test_bench_measures_the_sparse_rows():
    rows = bench.measure_sparse(SparseCase(2, 40, 500, 8), rounds=2)
    assert [r.operation for r in rows] == list(SPARSE_OPERATIONS)
    for r in rows:
        assert r.numba_kd_ms > 0 and r.roofline_pct > 0 and r.max_rel_error <= 1e-6
        assert ("torch.compile" in r.peer_ms) == torch_available()

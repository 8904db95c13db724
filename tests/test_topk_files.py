"""Top-k teacher files: ``numba-kd topk`` / ``offline.topk`` writes them,
``read_topk`` and ``iter_topk`` read them, ``numba-kd loss --topk`` streams them;
the writes are atomic, also when the writer is killed."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

import numba_kd as kd
from numba_kd import cli, offline
from numba_kd import reference as R
from numba_kd.sparse import iter_topk, topk_file_info

pytest.importorskip("pyarrow")

N_ROWS, N_CLASSES, K = 300, 50, 7


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for t in range(2):
        path = tmp_path / f"teacher{t}.npy"
        np.save(path, rng.normal(scale=2.0, size=(N_ROWS, N_CLASSES)).astype(np.float32))
        paths.append(path)
    student = tmp_path / "student.npy"
    np.save(student, rng.normal(size=(N_ROWS, N_CLASSES)).astype(np.float32))
    labels = tmp_path / "labels.npy"
    np.save(labels, rng.integers(0, N_CLASSES, N_ROWS))
    return paths, student, labels


def _expected(path, k, temperature):
    scaled = np.load(path).astype(np.float64) / temperature
    log_p = scaled - R.logsumexp(scaled)[:, None]
    order = np.argsort(-log_p, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(log_p, order, axis=1)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip(files, tmp_path, dtype):
    teachers, _, _ = files
    out = tmp_path / "top.parquet"
    summary = offline.topk(teachers, out, K, temperature=2.0, dtype=dtype, chunk_rows=64, names=["a", "b"])
    assert summary.rows == N_ROWS
    top = kd.read_topk(out, tail="uniform")
    assert (top.num_teachers, top.lead_shape, top.k) == (2, (N_ROWS,), K)
    assert (top.tail, top.temperature, top.num_classes) == ("uniform", 2.0, N_CLASSES)
    assert top.indices.dtype == np.int32 and top.logprobs.dtype == np.dtype(dtype)
    rounding = 1e-7 if dtype == "float32" else 2.0**-11
    for t, path in enumerate(teachers):
        order, log_p = _expected(path, K, 2.0)
        np.testing.assert_array_equal(top.indices[t], order)
        np.testing.assert_allclose(top.logprobs[t], log_p, rtol=rounding, atol=rounding)
    rows, info = topk_file_info(out)
    assert rows == N_ROWS
    assert info["teachers"] == ["a", "b"] and info["numba_kd"] == kd.__version__ and info["k"] == K


def test_rows_and_batches(files, tmp_path):
    teachers, _, _ = files
    out = tmp_path / "top.parquet"
    offline.topk(teachers, out, K, chunk_rows=64)
    whole = kd.read_topk(out)
    part = kd.read_topk(out, rows=slice(50, 190))
    np.testing.assert_array_equal(part.indices, whole.indices[:, 50:190])
    np.testing.assert_array_equal(part.logprobs, whole.logprobs[:, 50:190])
    starts = []
    for start, top in iter_topk(out, 100):
        starts.append(start)
        np.testing.assert_array_equal(top.indices, whole.indices[:, start : start + top.lead_shape[0]])
    assert starts == [0, 100, 200]
    with pytest.raises(ValueError, match="contiguous run"):
        kd.read_topk(out, rows=slice(0, 10, 2))
    with pytest.raises(TypeError, match="rows must be a slice"):
        kd.read_topk(out, rows=[1, 2])


def test_the_loss_from_a_file_matches_the_loss_in_memory(files, tmp_path, capsys):
    teachers, student, labels = files
    out = tmp_path / "top.parquet"
    assert cli.main([
        "topk", *map(str, teachers), "--k", str(K), "--out", str(out), "--dtype", "float32", "--no-progress",
    ]) == 0  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    args = ["loss", str(student), "--topk", str(out), "--labels", str(labels), "--alpha", "0.6"]
    assert cli.main([*args, "--temperature", "2", "--tail", "uniform", "--chunk-rows", "70", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    top = kd.read_topk(out, tail="uniform")
    expected = kd.EnsembleDistiller([1.0, 1.0], temperature=2.0).distillation_loss(
        np.load(student), top, np.load(labels), 0.6, combine="probs", return_components=True
    )
    assert result["rows"] == N_ROWS
    np.testing.assert_allclose([result["loss"], result["soft"], result["hard"]], expected, rtol=1e-12)
    assert cli.main(["loss", str(student), str(teachers[0]), *args[2:]]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli.main([*args, "--combine", "logits"]) == 2
    assert "mix as probabilities" in capsys.readouterr().err


def test_bad_requests_write_nothing(files, tmp_path):
    teachers, _, _ = files
    out = tmp_path / "top.parquet"
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 50\]"):
        offline.topk(teachers, out, 51)
    with pytest.raises(ValueError, match="dtype must be one of"):
        offline.topk(teachers, out, K, dtype="float64")
    with pytest.raises(ValueError, match="2 teachers"):
        offline.topk(teachers, out, K, names=["a"])
    with pytest.raises(ValueError, match="an output never replaces an input"):
        offline.topk(teachers, teachers[0], K, overwrite=True)
    with pytest.raises(ValueError, match="temperature must be positive"):
        offline.topk(teachers, out, K, temperature=-1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "labels.npy",
        "student.npy",
        "teacher0.npy",
        "teacher1.npy",
    ]


def test_existing_output_is_kept_unless_replaced_by_a_complete_file(files, tmp_path):
    teachers, _, _ = files
    out = tmp_path / "top.parquet"
    out.write_bytes(b"the user's file")
    with pytest.raises(ValueError, match="exists"):
        offline.topk(teachers, out, K)
    assert out.read_bytes() == b"the user's file"
    bad = tmp_path / "bad.npy"
    logits = np.load(teachers[1])
    logits[250, 3] = np.nan
    np.save(bad, logits)
    with pytest.raises(ValueError, match=r"teachers\[1\] row 250 holds NaN"):
        offline.topk([teachers[0], bad], out, K, chunk_rows=64, overwrite=True)
    assert out.read_bytes() == b"the user's file"
    assert not list(tmp_path.glob(".top.parquet.*"))
    offline.topk(teachers, out, K, overwrite=True)
    assert kd.read_topk(out).k == K
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask


def test_read_refuses_other_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), other)
    with pytest.raises(ValueError, match="not a top-k file of numba-kd"):
        kd.read_topk(other)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="cannot be read as Parquet"):
        kd.read_topk(garbage)
    with pytest.raises(ValueError, match="is not a file"):
        kd.read_topk(tmp_path / "missing.parquet")


KILLED_WRITER = """
import os, signal, sys
from numba_kd import offline

def die(rows):
    if rows >= 128:
        os.kill(os.getpid(), signal.SIGKILL)

offline.topk(sys.argv[1:3], sys.argv[3], 5, chunk_rows=64, overwrite=True, on_chunk=die)
"""


def test_a_killed_writer_leaves_the_old_output_whole(files, tmp_path):
    teachers, _, _ = files
    out = tmp_path / "top.parquet"
    offline.topk(teachers, out, 3)
    before = out.read_bytes()
    run = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, *map(str, teachers), str(out)], capture_output=True, timeout=300
    )
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()
    assert out.read_bytes() == before
    assert kd.read_topk(out).k == 3
    leftovers = list(tmp_path.glob(".top.parquet.*.partial"))
    assert len(leftovers) == 1  # the killed run's temporary file; OUT never saw it
    offline.topk(teachers, out, 5, overwrite=True)
    assert kd.read_topk(out).k == 5


APPEARING_OUTPUT = """
import sys
from pathlib import Path
from numba_kd import offline

def appear(rows):
    if rows == 64:
        Path(sys.argv[3]).write_bytes(b"written meanwhile")

try:
    offline.topk(sys.argv[1:3], sys.argv[3], 5, chunk_rows=64, on_chunk=appear)
except ValueError as exc:
    print(exc)
"""


def test_an_output_that_appears_during_the_run_is_kept(files, tmp_path):
    teachers, _, _ = files
    out = tmp_path / "top.parquet"
    run = subprocess.run(
        [sys.executable, "-c", APPEARING_OUTPUT, *map(str, teachers), str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "appeared while the run wrote its output" in run.stdout, run.stderr
    assert out.read_bytes() == b"written meanwhile"
    assert not list(tmp_path.glob(".top.parquet.*"))


def test_iter_topk_checks_batch_rows(files, tmp_path):
    teachers, _, _ = files
    out = tmp_path / "top.parquet"
    offline.topk(teachers, out, 3)
    with pytest.raises(ValueError, match="batch_rows must be an int of at least 1"):
        next(iter_topk(out, 0))

"""Offline soft labels and dataset losses over files: numba_kd.offline and the CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import numba_kd as kd
from numba_kd import offline

zarr = pytest.importorskip("zarr")

ROWS, CLASSES = 1000, 37
WEIGHTS = [1.0, 2.0, 3.0]


@pytest.fixture
def data(tmp_path):
    """Three teachers (two .npy, one .zarr), a student and labels on disk, and in memory."""
    rng = np.random.default_rng(5)
    teachers = [rng.normal(scale=3.0, size=(ROWS, CLASSES)).astype(np.float32) for _ in range(3)]
    student = rng.normal(size=(ROWS, CLASSES)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=ROWS)
    paths = []
    for k, t in enumerate(teachers[:2]):
        np.save(tmp_path / f"t{k}.npy", t)
        paths.append(str(tmp_path / f"t{k}.npy"))
    z = zarr.create_array(str(tmp_path / "t2.zarr"), shape=t.shape, chunks=(300, CLASSES), dtype="float32")
    z[:] = teachers[2]
    paths.append(str(tmp_path / "t2.zarr"))
    np.save(tmp_path / "s.npy", student)
    np.save(tmp_path / "y.npy", labels)
    return {
        "teachers": teachers,
        "student": student,
        "labels": labels,
        "paths": paths,
        "student_path": str(tmp_path / "s.npy"),
        "labels_path": str(tmp_path / "y.npy"),
        "dir": tmp_path,
    }


def _read(path) -> np.ndarray:
    return zarr.open_array(str(path), mode="r")[:] if str(path).endswith(".zarr") else np.load(path)


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
@pytest.mark.parametrize(("combine", "eps"), [("logits", 1e-10), ("probs", 1e-10), ("probs", 0.0)])
def test_soft_labels_equal_the_in_memory_combine(data, suffix, combine, eps):
    out = data["dir"] / f"soft{suffix}"
    summary = offline.soft_labels(
        data["paths"], out, weights=WEIGHTS, temperature=2.0, combine=combine, eps=eps, chunk_rows=128
    )
    assert summary.rows == ROWS
    d = kd.EnsembleDistiller(WEIGHTS, 2.0)
    if combine == "logits":
        expected = d.combine_teachers(data["teachers"])
    else:
        expected = d.combine_via_probabilities(data["teachers"], eps)
    np.testing.assert_array_equal(_read(out), expected)
    assert not offline._partial_path(out).exists()


def test_float16_output(data):
    out = data["dir"] / "soft16.npy"
    offline.soft_labels(data["paths"], out, temperature=2.0, dtype="float16", chunk_rows=100)
    expected = (
        kd.EnsembleDistiller([1.0, 1.0, 1.0], 2.0).combine_teachers(data["teachers"]).astype(np.float16)
    )
    got = np.load(out)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"weights": [1.0, 2.0]}, ValueError, "Number of teachers must match number of weights"),
        ({"combine": "max"}, ValueError, "combine must be"),
        ({"dtype": "int8"}, ValueError, "dtype must be one of"),
        ({"temperature": 0.0}, ValueError, "Temperature must be positive"),
        ({"chunk_rows": 0}, ValueError, "chunk_rows must be at least 1"),
    ],
)
def test_invalid_settings_write_nothing(data, change, error, words):
    out = data["dir"] / "soft.npy"
    with pytest.raises(error, match=words):
        offline.soft_labels(data["paths"], out, **change)
    assert not out.exists() and not offline._partial_path(out).exists()


def test_invalid_inputs_write_nothing(data):
    out = data["dir"] / "soft.zarr"
    np.save(data["dir"] / "short.npy", np.zeros((ROWS - 1, CLASSES), np.float32))
    np.save(data["dir"] / "ints.npy", np.zeros((ROWS, CLASSES), np.int32))
    for extra, words in [
        ("short.npy", "same shape"),
        ("ints.npy", "floating-point"),
        ("missing.npy", "does not exist"),
        ("s.txt", "does not exist"),
    ]:
        with pytest.raises((TypeError, ValueError), match=words):
            offline.soft_labels([*data["paths"][:2], str(data["dir"] / extra)], out)
        assert not out.exists() and not offline._partial_path(out).exists()
    with pytest.raises(ValueError, match="an output never replaces an input"):
        offline.soft_labels(data["paths"], data["paths"][0])
    with pytest.raises(ValueError, match="exists"):
        offline.soft_labels(data["paths"], data["student_path"])


class Interrupt(Exception):
    pass


def _interrupt_after(rows: int):
    def on_chunk(done: int) -> None:
        if done >= rows:
            raise Interrupt

    return on_chunk


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_interrupted_run_leaves_no_output(data, suffix):
    out = data["dir"] / f"soft{suffix}"
    with pytest.raises(Interrupt):
        offline.soft_labels(data["paths"], out, chunk_rows=100, on_chunk=_interrupt_after(300))
    assert not out.exists()


def test_resume_continues_an_interrupted_zarr_output(data):
    out = data["dir"] / "soft.zarr"
    options = {"weights": WEIGHTS, "temperature": 3.0, "combine": "probs", "chunk_rows": 100}
    with pytest.raises(Interrupt):
        offline.soft_labels(data["paths"], out, on_chunk=_interrupt_after(400), **options)
    partial = zarr.open_array(str(offline._partial_path(out)), mode="r")
    assert partial.attrs["numba_kd"]["completed_rows"] == 400
    resumed = []
    summary = offline.soft_labels(data["paths"], out, resume=True, on_chunk=resumed.append, **options)
    assert summary.rows == ROWS - 400 and resumed[0] == 500
    expected = kd.EnsembleDistiller(WEIGHTS, 3.0).combine_via_probabilities(data["teachers"])
    np.testing.assert_array_equal(_read(out), expected)
    with pytest.raises(ValueError, match="no interrupted run"):
        offline.soft_labels(data["paths"], data["dir"] / "other.zarr", resume=True, **options)
    # Other settings than the interrupted run's are refused.
    with pytest.raises(Interrupt):
        offline.soft_labels(data["paths"], data["dir"] / "x.zarr", on_chunk=_interrupt_after(100), **options)
    with pytest.raises(ValueError, match="other settings"):
        offline.soft_labels(
            data["paths"], data["dir"] / "x.zarr", resume=True, **{**options, "temperature": 1.0}
        )


def test_dataset_loss_equals_the_in_memory_loss(data):
    got = offline.dataset_loss(
        data["student_path"], data["paths"], data["labels_path"], alpha=0.3, weights=WEIGHTS, temperature=2.0,
        chunk_rows=64,
    )  # fmt: skip
    d = kd.EnsembleDistiller(WEIGHTS, 2.0)
    expected = d.distillation_loss(
        data["student"], data["teachers"], data["labels"], 0.3, return_components=True
    )
    assert got["rows"] == ROWS
    for key, value in zip(("loss", "soft", "hard"), expected, strict=True):
        assert abs(got[key] - value) <= 1e-12 * abs(value), key


@pytest.mark.parametrize(
    "options",
    [
        {"divergence": "jsd", "beta": 0.3, "combine": "probs"},
        {"divergence": "skew_reverse_kl", "skew": 0.2, "teacher_weighting": "entropy"},
        {"divergence": "tvd", "scale_by_t2": False, "teacher_weighting": "confidence"},
        {"divergence": "reverse_kl", "ignore_index": -100},
    ],
    ids=["jsd-probs", "skew-entropy", "tvd-no-t2", "ignore_index"],
)
def test_dataset_loss_options_equal_the_in_memory_loss(data, options):
    labels = data["labels"].copy()
    if "ignore_index" in options:
        labels[::7] = -100
        np.save(data["labels_path"], labels)
    got = offline.dataset_loss(
        data["student_path"], data["paths"], data["labels_path"], alpha=0.3, weights=WEIGHTS, temperature=2.0,
        chunk_rows=64, **options,
    )  # fmt: skip
    d = kd.EnsembleDistiller(WEIGHTS, 2.0)
    expected = d.distillation_loss(
        data["student"], data["teachers"], labels, 0.3, return_components=True, **options
    )
    assert got["rows"] == ROWS
    for key, value in zip(("loss", "soft", "hard"), expected, strict=True):
        assert abs(got[key] - value) <= 1e-12 * abs(value), key


def test_dataset_loss_checks_options_before_reading(data):
    with pytest.raises(ValueError, match=r"divergence"):
        offline.dataset_loss("missing.npy", ["missing.npy"], "missing.npy", alpha=0.3, divergence="kl")
    with pytest.raises(ValueError, match=r"beta"):
        offline.dataset_topk_loss(
            "missing.npy", "missing.parquet", "missing.npy", alpha=0.3, divergence="jsd", beta=1.5
        )


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "numba_kd", *args], capture_output=True, text=True, timeout=600
    )


def test_cli_soft_labels_and_loss(data):
    out = data["dir"] / "cli.zarr"
    run = _cli("soft-labels", *data["paths"], "--out", str(out), "--weights", "1,2,3", "--temperature", "2",
               "--chunk-rows", "200")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "rows/s" not in run.stderr  # no progress bar when stderr is not a terminal
    np.testing.assert_array_equal(
        _read(out), kd.EnsembleDistiller(WEIGHTS, 2.0).combine_teachers(data["teachers"])
    )
    options = ["--alpha", "0.3", "--weights", "1,2,3", "--temperature", "2", "--json", "--no-progress"]
    run = _cli("loss", data["student_path"], *data["paths"], "--labels", data["labels_path"], *options)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert set(result) == {"loss", "soft", "hard", "rows"}
    expected = kd.EnsembleDistiller(WEIGHTS, 2.0).distillation_loss(
        data["student"], data["teachers"], data["labels"], 0.3
    )
    assert abs(result["loss"] - expected) <= 1e-12 * expected
    labels = data["labels"].copy()
    labels[::5] = -1
    np.save(data["labels_path"], labels)
    flags = ["--divergence", "skew_forward_kl", "--skew", "0.3", "--no-t2-scaling", "--ignore-index", "-1"]
    run = _cli(
        "loss", data["student_path"], *data["paths"], "--labels", data["labels_path"], *options, *flags
    )
    assert run.returncode == 0, run.stderr
    expected = kd.EnsembleDistiller(WEIGHTS, 2.0).distillation_loss(
        data["student"], data["teachers"], labels, 0.3, divergence="skew_forward_kl", skew=0.3,
        scale_by_t2=False, ignore_index=-1,
    )  # fmt: skip
    assert abs(json.loads(run.stdout)["loss"] - expected) <= 1e-12 * expected
    run = _cli("soft-labels", *data["paths"], "--out", str(out))
    assert run.returncode == 2 and "exists" in run.stderr


def test_cli_help_documents_every_option():
    run = _cli("soft-labels", "--help")
    assert run.returncode == 0
    for option in ("--out", "--weights", "--temperature", "--combine", "--eps", "--chunk-rows", "--dtype",
                   "--resume", "--overwrite", "--scheduler", "--no-progress"):  # fmt: skip
        assert option in run.stdout, option
    run = _cli("loss", "--help")
    for option in ("--labels", "--alpha", "--weights", "--temperature", "--combine", "--json", "--scheduler",
                   "--divergence", "--beta", "--skew", "--no-t2-scaling", "--teacher-weighting",
                   "--ignore-index"):  # fmt: skip
        assert option in run.stdout, option


PEAK = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from numba_kd import offline
    rows, classes, chunk, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    rng = np.random.default_rng(0)
    paths = []
    for k in range(3):
        # Written chunk by chunk, so that making the data does not raise the peak.
        t = np.lib.format.open_memmap(
            f"{folder}/t{k}.npy", mode="w+", dtype=np.float32, shape=(rows, classes)
        )
        for start in range(0, rows, chunk):
            t[start:start + chunk] = rng.normal(size=(min(chunk, rows - start), classes))
            t.flush()
            offline._release(t)
        del t
        paths.append(f"{folder}/t{k}.npy")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    offline.soft_labels(paths, f"{folder}/soft.npy", temperature=2.0, chunk_rows=chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_kib": base, "peak_kib": peak}))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB and MADV_DONTNEED: Linux")
def test_peak_memory_does_not_grow_with_the_dataset(tmp_path):
    """Chunks of 2048 x 1024 float32 from 3 teachers (24 MiB of input): the peak resident
    memory over 4 chunks and over 16 chunks (288 MiB more data) differs by less than one
    chunk's input."""
    chunk, classes = 2048, 1024
    chunk_bytes = 3 * chunk * classes * 4
    peaks = []
    for n_chunks in (4, 16):
        folder = tmp_path / str(n_chunks)
        folder.mkdir()
        proc = subprocess.run(
            [sys.executable, "-c", PEAK, str(n_chunks * chunk), str(classes), str(chunk), str(folder)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        peaks.append(json.loads(proc.stdout)["peak_kib"] * 1024)
    print(f"peak RSS: {peaks[0] / 2**20:.1f} MiB over 4 chunks, {peaks[1] / 2**20:.1f} MiB over 16 chunks")
    assert peaks[1] - peaks[0] < chunk_bytes, (peaks, chunk_bytes)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = offline.Progress(1000, 4000, True, "soft-labels")
    for _ in range(4):
        bar.update(250)
    bar.close()
    shown = terminal.getvalue()
    assert "soft-labels" in shown and "1.00k/1.00k" in shown and "GB/s" in shown
    rows_per_s, gb_per_s = bar.rates()
    assert gb_per_s == pytest.approx(rows_per_s * 4000 / 1e9)
    silent = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", silent)
    quiet = offline.Progress(1000, 4000, True, "soft-labels")
    quiet.update(1000)
    quiet.close()
    assert silent.getvalue() == ""


# ---------------------------------------------------------------- faults: nothing lost


def _last_line(stderr: str) -> str:
    """The CLI's own message: the last line (libraries may warn on stderr before it)."""
    return stderr.strip().splitlines()[-1] if stderr.strip() else ""


def _fingerprint(path) -> bytes:
    """The bytes of a file, or of every file of a directory tree, in path order."""
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        return path.read_bytes()
    return b"".join(p.name.encode() + p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())


@pytest.mark.parametrize("spelling", ["same", "dotted", "zarr"])
def test_out_never_replaces_an_input(data, spelling):
    """--out naming a teacher is refused even with --overwrite, however it is spelled."""
    target = data["paths"][2] if spelling == "zarr" else data["paths"][0]
    (data["dir"] / "sub").mkdir()
    out = str(data["dir"] / "sub" / ".." / target.split("/")[-1]) if spelling == "dotted" else target
    before = _fingerprint(target)
    with pytest.raises(ValueError, match=r"is teachers\[\d\]; an output never replaces an input"):
        offline.soft_labels(data["paths"], out, overwrite=True)
    result = _cli("soft-labels", *data["paths"], "--out", str(out), "--overwrite")
    assert result.returncode == 2 and "numba-kd: error: out:" in result.stderr
    assert _fingerprint(target) == before


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_partial_the_tool_did_not_write_is_refused(data, suffix, overwrite):
    out = data["dir"] / f"soft{suffix}"
    partial = offline._partial_path(out)
    if suffix == ".npy":
        np.save(partial, np.arange(5.0))  # np.save keeps the name: it ends in .partial
        partial = partial.with_name(partial.name + ".npy")
        partial.rename(offline._partial_path(out))
        partial = offline._partial_path(out)
    else:
        zarr.create_array(str(partial), shape=(3,), dtype="float32")[:] = 1.0  # no numba_kd attrs
    before = _fingerprint(partial)
    with pytest.raises(ValueError, match="is not a temporary output of numba-kd that this run may replace"):
        offline.soft_labels(data["paths"], out, overwrite=overwrite)
    assert _fingerprint(partial) == before and not out.exists()


def test_a_partial_the_tool_left_is_replaced(data):
    out = data["dir"] / "soft.zarr"
    with pytest.raises(Interrupt):
        offline.soft_labels(data["paths"], out, chunk_rows=100, on_chunk=_interrupt_after(300))
    offline.soft_labels(data["paths"], out, chunk_rows=100)
    expected = kd.EnsembleDistiller([1.0, 1.0, 1.0], 1.0).combine_teachers(data["teachers"])
    np.testing.assert_array_equal(_read(out), expected)
    assert not offline._partial_path(out).exists()


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
@pytest.mark.parametrize("left", ["empty directory", "empty file"])
@pytest.mark.parametrize("resume", [False, True])
def test_an_empty_partial_is_replaced(data, suffix, left, resume):
    """A run killed while it created its output leaves an empty OUT.partial (the
    directory before zarr.json is written, or the file before its header): it holds
    nothing, so a rerun replaces it without --overwrite, and --resume starts afresh."""
    if resume and suffix == ".npy":
        pytest.skip("--resume needs a Zarr output")
    out = data["dir"] / f"soft{suffix}"
    partial = offline._partial_path(out)
    if left == "empty directory":
        partial.mkdir()
    else:
        partial.touch()
    offline.soft_labels(data["paths"], out, resume=resume)
    expected = kd.EnsembleDistiller([1.0, 1.0, 1.0], 1.0).combine_teachers(data["teachers"])
    np.testing.assert_array_equal(_read(out), expected)
    assert not partial.exists()


def test_an_interrupted_npy_run_removes_its_partial(data):
    out = data["dir"] / "soft.npy"
    with pytest.raises(Interrupt):
        offline.soft_labels(data["paths"], out, chunk_rows=100, on_chunk=_interrupt_after(300))
    assert not out.exists() and not offline._partial_path(out).exists()


@pytest.mark.parametrize("fail_at", ["exchange", "delete"])
def test_overwriting_a_zarr_output_never_loses_it(data, monkeypatch, fail_at):
    """A failure while a new Zarr output replaces an old one leaves OUT complete: the old
    output before the swap, the new one after it."""
    out = data["dir"] / "soft.zarr"
    offline.soft_labels(data["paths"], out, temperature=1.0)
    old = _read(out)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    if fail_at == "exchange":
        monkeypatch.setattr(offline, "_exchange", fail)
    else:
        monkeypatch.setattr(offline.shutil, "rmtree", fail)
    with pytest.raises(KeyboardInterrupt):
        offline.soft_labels(data["paths"], out, temperature=2.0, overwrite=True)
    monkeypatch.undo()
    new = kd.EnsembleDistiller([1.0, 1.0, 1.0], 2.0).combine_teachers(data["teachers"])
    np.testing.assert_array_equal(_read(out), old if fail_at == "exchange" else new)


def test_overwriting_a_zarr_output_without_an_atomic_exchange(data, monkeypatch):
    out = data["dir"] / "soft.zarr"
    offline.soft_labels(data["paths"], out, temperature=1.0)
    monkeypatch.setattr(offline, "_exchange", lambda a, b: False)
    offline.soft_labels(data["paths"], out, temperature=2.0, overwrite=True)
    expected = kd.EnsembleDistiller([1.0, 1.0, 1.0], 2.0).combine_teachers(data["teachers"])
    np.testing.assert_array_equal(_read(out), expected)
    assert sorted(p.name for p in data["dir"].iterdir() if p.name.startswith("soft")) == ["soft.zarr"]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("missing directory", "the directory"),
        ("empty input", "cannot be read as an array"),
        ("directory input", "is a directory, not a .npy file"),
        ("file partial", "is not a temporary output of numba-kd"),
        ("directory out", "exists and is a directory"),
    ],
)
def test_os_errors_are_clean_cli_errors(data, case, words):
    """Faults of the file system end in `numba-kd: error: ...` and exit status 2, never a traceback."""
    d = data["dir"]
    teachers = list(data["paths"])
    out = d / "soft.npy"
    extra = []
    if case == "missing directory":
        out = d / "no" / "such" / "soft.npy"
    elif case == "empty input":
        (d / "empty.npy").write_bytes(b"")
        teachers[0] = str(d / "empty.npy")
    elif case == "directory input":
        (d / "dir.npy").mkdir()
        teachers[0] = str(d / "dir.npy")
    elif case == "file partial":
        out = d / "soft.zarr"
        offline._partial_path(out).write_text("user data")
    elif case == "directory out":
        (d / "soft.npy").mkdir()
        extra = ["--overwrite"]
    result = _cli("soft-labels", *teachers, "--out", str(out), *extra)
    assert result.returncode == 2, result.stderr
    assert _last_line(result.stderr).startswith("numba-kd: error: ") and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    if case == "empty input":
        loss = _cli("loss", teachers[0], *data["paths"], "--labels", data["labels_path"], "--alpha", "0.5")
        assert loss.returncode == 2 and "cannot be read as an array" in loss.stderr, loss.stderr


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs directory (root only; skipped elsewhere)."""
    mounted = []

    def mount(options: str):
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], capture_output=True)


def _big_teachers(directory):
    rng = np.random.default_rng(8)
    paths = []
    for k in range(2):
        paths.append(str(directory / f"big{k}.npy"))
        np.save(paths[-1], rng.normal(size=(4000, 1000)).astype(np.float32))  # 16 MB each
    return paths


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_a_full_disk_is_a_clean_error(tmp_path, mount_tmpfs, suffix):
    """16 MB of output on a file system with 8 MB free: exit 2 with a message, no
    SIGBUS; a .npy leaves nothing behind, a Zarr output keeps its partial for --resume."""
    small = mount_tmpfs("size=20m")
    (small / "filler").write_bytes(b"\0" * (12 << 20))
    out = small / f"o{suffix}"
    result = _cli("soft-labels", *_big_teachers(tmp_path), "--out", str(out), "--no-progress")
    assert result.returncode == 2, result.stderr
    assert (
        _last_line(result.stderr).startswith("numba-kd: error: ")
        and "No space left on device" in result.stderr
    )
    assert not out.exists()
    assert offline._partial_path(out).exists() == (suffix == ".zarr")
    if suffix == ".zarr":
        assert "--resume continues it" in result.stderr


def test_a_read_only_file_system_is_a_clean_error(tmp_path, mount_tmpfs):
    read_only = mount_tmpfs("ro,size=1m")
    result = _cli("soft-labels", *_big_teachers(tmp_path), "--out", str(read_only / "o.npy"), "--no-progress")
    assert result.returncode == 2 and _last_line(result.stderr).startswith("numba-kd: error: "), result.stderr
    assert "Read-only file system" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_float16_overflow_is_refused(data, suffix):
    """Teacher logits of 1e5 do not fit float16: the run fails naming the first row, writes
    no OUT and exits 2 from the CLI."""
    big = data["teachers"][0].copy()
    big[700, 3] = 1e5
    np.save(data["dir"] / "big.npy", big)
    teachers = [str(data["dir"] / "big.npy"), *data["paths"][1:]]
    out = data["dir"] / f"soft16{suffix}"
    with pytest.raises(ValueError, match=r"dtype: 1 values from row 700 on exceed the float16 range"):
        offline.soft_labels(teachers, out, weights=[1.0, 0.0, 0.0], dtype="float16", chunk_rows=100)
    assert not out.exists()
    run = _cli(
        "soft-labels", *teachers, "--out", str(out), "--weights", "1,0,0", "--dtype", "float16", "--overwrite"
    )
    assert run.returncode == 2 and "exceed the float16 range" in run.stderr, run.stderr
    assert not out.exists()


def test_a_killed_npy_run_s_partial_is_replaced_with_overwrite(data):
    """A .npy partial cannot be marked: one of exactly the output's shape and dtype (what a
    killed run leaves) is replaced with --overwrite, and refused without it."""
    out = data["dir"] / "soft.npy"
    np.lib.format.open_memmap(offline._partial_path(out), mode="w+", dtype=np.float32, shape=(ROWS, CLASSES))
    with pytest.raises(ValueError, match="if an interrupted run left it, pass --overwrite"):
        offline.soft_labels(data["paths"], out)
    offline.soft_labels(data["paths"], out, overwrite=True)
    expected = kd.EnsembleDistiller([1.0, 1.0, 1.0], 1.0).combine_teachers(data["teachers"])
    np.testing.assert_array_equal(np.load(out), expected)


def test_a_swapped_out_old_output_is_never_resumed(data, monkeypatch):
    """If a run is killed right after the atomic swap, OUT.partial briefly holds the old
    complete output: --resume refuses it instead of swapping it back in."""
    out = data["dir"] / "soft.zarr"
    settings = {"temperature": 2.0, "chunk_rows": 1000}  # the old output's: the dangerous case
    offline.soft_labels(data["paths"], out, **settings)

    exchange = offline._exchange

    def killed_after_the_swap(a, b):
        exchange(a, b)
        raise KeyboardInterrupt

    monkeypatch.setattr(offline, "_exchange", killed_after_the_swap)
    with pytest.raises(KeyboardInterrupt):
        offline.soft_labels(data["paths"], out, overwrite=True, **settings)
    monkeypatch.undo()
    assert offline._partial_path(out).is_dir()  # the old output, swapped out
    with pytest.raises(ValueError, match="holds no interrupted run"):
        offline.soft_labels(data["paths"], out, resume=True, overwrite=True, **settings)
    offline.soft_labels(data["paths"], out, overwrite=True, **settings)  # a fresh run replaces it
    assert not offline._partial_path(out).exists()


def test_a_failed_delete_of_the_old_output_is_a_warning(data, monkeypatch, capsys):
    out = data["dir"] / "soft.zarr"
    offline.soft_labels(data["paths"], out, temperature=1.0)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(offline.shutil, "rmtree", refuse)
    offline.soft_labels(data["paths"], out, temperature=2.0, overwrite=True)
    expected = kd.EnsembleDistiller([1.0, 1.0, 1.0], 2.0).combine_teachers(data["teachers"])
    np.testing.assert_array_equal(_read(out), expected)
    assert "could not delete the replaced output" in capsys.readouterr().err

"""Fault injection: the soft-labels CLI killed at random moments loses nothing.

For `.npy` and Zarr outputs, fresh, over an existing output with --overwrite, and
continued with --resume, the CLI is killed with SIGKILL or SIGINT at a random
moment of its run, 50 times in all (400 more with --runslow).  After each kill
OUT is absent, or the old
complete output, or the new complete one; after --resume it equals an
uninterrupted run bit for bit, and a rerun with --overwrite succeeds whatever
the kill left behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

import numba_kd as kd
from numba_kd import offline

zarr = pytest.importorskip("zarr")

ROWS, CLASSES = 3000, 1000
# Kills per (scenario, signal): 10 cases x 5 in CI, x 40 more with --runslow.
KILLS = [5, pytest.param(40, marks=pytest.mark.slow, id="slow")]
SCENARIOS = ["npy fresh", "zarr fresh", "npy overwrite", "zarr overwrite", "zarr resume"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(17)
    arrays = [rng.normal(scale=3.0, size=(ROWS, CLASSES)).astype(np.float32) for _ in range(2)]
    paths = []
    for k, a in enumerate(arrays):
        paths.append(str(directory / f"t{k}.npy"))
        np.save(paths[-1], a)
    expected = {
        t: kd.EnsembleDistiller([1.0, 2.0], t).combine_teachers(arrays) for t in (1.0, 2.0)
    }  # old (T = 1) and new (T = 2) outputs
    return paths, expected


def _command(paths, out, temperature, *flags):
    return [
        sys.executable, "-m", "numba_kd", "soft-labels", *paths, "--out", str(out), "--weights", "1,2",
        "--temperature", str(temperature), "--chunk-rows", "20", "--no-progress", *flags,
    ]  # fmt: skip


def _read(path):
    return zarr.open_array(str(path), mode="r")[:] if str(path).endswith(".zarr") else np.load(path)


def _same(path, expected) -> bool:
    try:
        return np.array_equal(_read(path), expected)
    except Exception:  # an unreadable OUT is a failure of the guarantee
        return False


def _signal_at_a_random_moment(run, partial, rng, attempt, suffix) -> bool:
    """Send the signal at a random moment; returns whether the run was writing then.

    Even attempts wait for the temporary output to appear (the run is writing
    rows) and signal a few milliseconds later; odd ones signal at a random time
    of the whole run (starting up, writing, renaming or done)."""
    if attempt % 2 == 0:
        deadline = time.monotonic() + 120
        while not partial.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.2 if suffix == ".zarr" else 0.02))
    else:
        time.sleep(rng.uniform(0.2, 2.0))
    writing = partial.exists() and run.poll() is None
    return writing


@pytest.mark.parametrize("kills", KILLS)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_killed_cli_loses_nothing(teachers, tmp_path, scenario, sig, kills):
    paths, expected = teachers
    suffix = ".zarr" if scenario.startswith("zarr") else ".npy"
    rng = np.random.default_rng(zlib.crc32(f"{scenario} {sig.name} {kills}".encode()))
    outcomes = []
    for attempt in range(kills):
        out = tmp_path / f"out{attempt}{suffix}"
        flags = []
        if scenario.endswith("overwrite"):
            subprocess.run(_command(paths, out, 1.0), check=True, capture_output=True)
            flags = ["--overwrite"]
        run = subprocess.Popen(
            _command(paths, out, 2.0, *flags), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        writing = _signal_at_a_random_moment(run, offline._partial_path(out), rng, attempt, suffix)
        run.send_signal(sig)
        run.wait(timeout=120)
        if scenario.endswith("fresh"):
            assert not out.exists() or _same(out, expected[2.0]), (scenario, attempt)
            state = "absent" if not out.exists() else "new"
        elif scenario.endswith("overwrite"):
            old, new = _same(out, expected[1.0]), _same(out, expected[2.0])
            assert old or new, (scenario, attempt)
            state = "old" if old else "new"
        else:
            state = "new" if out.exists() else "resumed"
            if not out.exists():
                resume = ["--resume"] if offline._partial_path(out).exists() else []
                subprocess.run(_command(paths, out, 2.0, *resume), check=True, capture_output=True)
            assert _same(out, expected[2.0]), (scenario, attempt)
        if suffix == ".npy" and sig == signal.SIGINT:
            assert not offline._partial_path(out).exists()  # an interrupted .npy run cleans up
        if scenario != "zarr resume":
            # Whatever the kill left behind, running the job again with --overwrite succeeds.
            subprocess.run(_command(paths, out, 2.0, "--overwrite"), check=True, capture_output=True)
            assert _same(out, expected[2.0]), (scenario, attempt)
        outcomes.append((writing, state))
    print(f"{scenario} {sig.name}: (signalled while writing, OUT after) = {outcomes}")
    assert any(writing for writing, _ in outcomes), "no signal landed while the run was writing"

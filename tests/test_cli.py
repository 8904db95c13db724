from __future__ import annotations

import subprocess
import sys

import pytest


def test_check_runs_and_matches_reference():
    out = subprocess.run(
        [sys.executable, "-m", "numba_kd", "check", "--batch", "64", "--classes", "50", "--repeats", "2"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = out.stdout.splitlines()
    loss = float(next(line for line in lines if "numba_kd loss" in line).split()[-1])
    reference = float(next(line for line in lines if "NumPy float64 reference" in line).split()[3])
    assert abs(loss - reference) <= 1e-6 * abs(reference)
    assert "speed-up vs the reference" in out.stdout


def test_help():
    out = subprocess.run(
        [sys.executable, "-m", "numba_kd", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in out.stdout


def test_demo_trains_students():
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn")
    out = subprocess.run(
        [sys.executable, "-m", "numba_kd", "demo", "--quick", "--seeds", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "%" in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert "student: ensemble, confidence weights" in names
    assert len(rows) == 8
    for row in rows:
        accuracy = float(row.split("|")[2].split("%")[0])
        # Ten classes: chance is 10 %; every model here learns far beyond it.
        assert 50.0 < accuracy <= 100.0, row
    assert "inside numba_kd" in out.stdout

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_matches_reference():
    out = subprocess.run(
        [sys.executable, "-m", "numba_kd", "demo", "--batch", "64", "--classes", "50", "--repeats", "2"],
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

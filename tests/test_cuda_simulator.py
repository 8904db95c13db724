"""Runs tests/cuda in a process of its own with NUMBA_ENABLE_CUDASIM=1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

TESTS = Path(__file__).parent


def test_cuda_kernels_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", str(TESTS / "cuda"), "-q", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        env=env,
        cwd=TESTS,
    )
    tail = out.stdout[-4000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    summary = re.search(r"(\d+) passed", out.stdout)
    assert summary and int(summary.group(1)) >= 20, tail
    assert "failed" not in out.stdout.splitlines()[-1], tail

"""Every Python block of the README runs as written.

Blocks run in README order in one namespace, as a reader would paste them, so
that a later block may use the names an earlier one defined.  The CUDA blocks
need a GPU (and CuPy for the CuPy block); without one they are reported as
skipped.  The dask block reads teacher0.zarr ... teacher2.zarr, which the test
writes first into a scratch working directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = [
    (README.read_text()[: match.start()].count("\n") + 1, match.group(1))
    for match in re.finditer(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
]


def _needs(code: str) -> str | None:
    """Why a block cannot run here, or None."""
    if "cuda" not in code and "cupy" not in code:
        return None
    from numba import cuda

    if not cuda.is_available():
        return "needs a CUDA GPU"
    if "cupy" in code:
        try:
            import cupy  # noqa: F401
        except ImportError:
            return "needs CuPy"
    return None


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_block_runs(index, tmp_path, monkeypatch):
    line, code = BLOCKS[index]
    reason = _needs(code)
    if reason:
        pytest.skip(f"README block at line {line} {reason}")
    if "dask" in code:
        pytest.importorskip("distributed")
        zarr = pytest.importorskip("zarr")
        rng = np.random.default_rng(0)
        for k in range(3):
            zarr.save_array(str(tmp_path / f"teacher{k}.zarr"), rng.normal(size=(64, 10)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for earlier_line, earlier in BLOCKS[:index]:
        if _needs(earlier) is None and "dask" not in earlier:
            exec(compile(earlier, f"README.md:{earlier_line}", "exec"), namespace)
    exec(compile(code, f"README.md:{line}", "exec"), namespace)


def test_benchmark_tables_match_their_json():
    """The README's benchmark tables are generated from docs/*.json, never pasted."""
    import subprocess
    import sys

    script = README.parent / "scripts" / "readme_tables.py"
    run = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert README.read_text().count("<!-- table: ") >= 2

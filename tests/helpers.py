"""Shared test helpers: comparisons, over the registry's tolerances and data generator."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from numba_kd import registry

# The tolerances live in numba_kd.registry.TOLERANCES: loss is relative (with an
# absolute floor of rtol times the logit scale, because a loss is a difference of
# log-sum-exps of that size and can be ~0); arrays are absolute per unit of the
# logit scale.
LOSS_RTOL = {np.dtype(d): registry.tolerance(d).loss for d in ("float16", "float32", "float64")}
ARRAY_ATOL = {np.dtype(d): registry.tolerance(d).array for d in ("float16", "float32", "float64")}


def logit_scale(*arrays) -> float:
    return 1.0 + max(float(np.max(np.abs(np.asarray(a, dtype=np.float64)))) for a in arrays)


def assert_loss_close(actual: float, expected: float, dtype, scale: float) -> None:
    rtol = LOSS_RTOL[np.dtype(dtype)]
    assert isinstance(actual, float)
    assert abs(actual - expected) <= rtol * abs(expected) + rtol * scale, (actual, expected)


def assert_array_close(actual: np.ndarray, expected: np.ndarray, dtype) -> None:
    dtype = np.dtype(dtype)
    assert actual.dtype == dtype
    assert actual.shape == expected.shape
    scale = logit_scale(expected) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ARRAY_ATOL[dtype] * scale)


def central_differences(loss, student: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """d loss / d student by central differences: loss(student') for student' moved by
    +-h at one entry at a time (error ~ h^2 + eps / h for a float64 loss)."""
    numeric = np.zeros_like(student)
    for idx in np.ndindex(student.shape):
        up, down = student.copy(), student.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (loss(up) - loss(down)) / (2 * h)
    return numeric


def make_batch(rng, n_teachers: int, rows: int, classes: int, dtype, spread: float = 3.0):
    """Student, teacher list and labels with teachers that broadly agree (registry.synthetic_batch)."""
    return registry.synthetic_batch(rng, n_teachers, rows, classes, dtype, spread)


def check_recompiles_a_damaged_cache(code: str, cache_dir, pattern: str, damage: str):
    """Run ``code`` in a fresh interpreter with NUMBA_CACHE_DIR=cache_dir, damage the
    cache files named ``pattern`` + .nbi ("garbage index") or .nbc ("truncated data"),
    run it again, and check that the second run prints the same, with one warning
    that the cache is unreadable.  Returns the damaged files and the second run's stderr."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    run = [sys.executable, "-c", code]
    first = subprocess.run(run, env=env, capture_output=True, text=True, check=True)
    suffix = ".nbi" if damage == "garbage index" else ".nbc"
    files = sorted(cache_dir.rglob(f"{pattern}{suffix}"))
    assert files, sorted(p.name for p in cache_dir.rglob("*"))
    for path in files:
        data = path.read_bytes()
        path.write_bytes(b"garbage\n" if suffix == ".nbi" else data[: len(data) // 3])
    second = subprocess.run(run, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert second.stderr.count("is unreadable") == 1, second.stderr
    return files, second.stderr


def option_ids(options: dict) -> str:
    """A test id for a dict of loss options: "key=value,..." or "default"."""
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"

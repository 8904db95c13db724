"""``python -m numba_kd bench``: numba_kd against its peers and the memory roofline.

Every figure is measured in this process, side by side, as a median over
repeated calls after warm-up.  The roofline of an operation is the time
``np.copyto`` takes to copy an array of as many bytes as the operation must
move (its inputs read, plus its output written for the combines); a copy is
timed right before each timed call, so "% of roofline" is the median of those
paired ratios and drifts of a shared machine cancel out.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from numba_kd.registry import OPERATIONS, Case, relative_error, torch_available

SHAPES = [(8192, 1000), (512, 32000)]
QUICK_SHAPES = [(1024, 1000), (64, 32000)]
N_TEACHERS = 4


@dataclass
class Row:
    operation: str
    rows: int
    classes: int
    n_teachers: int
    dtype: str
    numba_kd_ms: float
    numpy_ms: float | None
    torch_ms: float | None
    gb_per_s: float
    roofline_pct: float
    copy_gb_per_s: float
    max_rel_error: float


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_with_copy(fn: Callable[[], object], n_bytes: int, repeats: int) -> tuple[float, float, float]:
    """(median time of fn, median copy time, median of copy/fn ratios)."""
    src = np.ones(n_bytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    fn()
    np.copyto(dst, src)
    op_times, copy_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        copy_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        fn()
        op_times.append(time.perf_counter() - start)
    ratios = [c / o for c, o in zip(copy_times, op_times, strict=True)]
    return statistics.median(op_times), statistics.median(copy_times), statistics.median(ratios)


def measure(
    shapes, n_teachers: int, dtype: str, repeats: int, peer_repeats: int, peers: bool = True
) -> list[Row]:
    import numba

    if torch_available():
        import torch

        torch.set_num_threads(numba.get_num_threads())
    rows = []
    for n_rows, n_classes in shapes:
        case = Case(n_teachers, n_rows, n_classes, dtype)
        args = case.arrays()
        for op in OPERATIONS.values():
            result = op.numba_kd(*args)
            expected = op.numpy(*args)
            n_bytes = op.bytes_moved(case)
            t_op, t_copy, ratio = paired_with_copy(functools.partial(op.numba_kd, *args), n_bytes, repeats)
            t_numpy = _median_time(functools.partial(op.numpy, *args), peer_repeats) if peers else None
            t_torch = None
            if peers and op.torch is not None and torch_available():
                t_torch = _median_time(functools.partial(op.torch, *args), peer_repeats)
            rows.append(
                Row(
                    operation=op.name,
                    rows=n_rows,
                    classes=n_classes,
                    n_teachers=n_teachers,
                    dtype=dtype,
                    numba_kd_ms=t_op * 1e3,
                    numpy_ms=None if t_numpy is None else t_numpy * 1e3,
                    torch_ms=None if t_torch is None else t_torch * 1e3,
                    gb_per_s=n_bytes / t_op / 1e9,
                    roofline_pct=100.0 * ratio,
                    copy_gb_per_s=n_bytes / t_copy / 1e9,
                    max_rel_error=relative_error(result, expected),
                )
            )
    return rows


def _first_call_seconds(cache_dir: str) -> float:
    code = (
        "import time\n"
        "from numba_kd.registry import Case, OPERATIONS\n"
        f"args = Case({N_TEACHERS}, 64, 1000).arrays()\n"
        "start = time.perf_counter()\n"
        "OPERATIONS['distillation_loss'].numba_kd(*args)\n"
        "print(time.perf_counter() - start)\n"
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def compile_latency() -> dict[str, float]:
    """import time, cold first call (empty cache), first call with a warm on-disk cache."""
    code = "import time; start = time.perf_counter(); import numba_kd; print(time.perf_counter() - start)"
    imports = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        imports.append(float(out.stdout.strip()))
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = _first_call_seconds(cache_dir)
        warm = statistics.median(_first_call_seconds(cache_dir) for _ in range(3))
    return {
        "import_s": statistics.median(imports),
        "cold_first_call_s": cold,
        "warm_cache_first_call_s": warm,
    }


def machine() -> dict[str, str]:
    import numba

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "numba_threads": str(numba.get_num_threads()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    if torch_available():
        import torch

        info["torch"] = torch.__version__
    return info


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[Row]) -> str:
    header = (
        f"| operation | B x C | numba_kd ms | NumPy ms | torch ms | GB/s | % roofline | "
        f"x NumPy | x torch | max rel err |\n|{'---|' * 10}"
    )
    lines = [header]
    for r in rows:
        vs_numpy = None if r.numpy_ms is None else r.numpy_ms / r.numba_kd_ms
        vs_torch = None if r.torch_ms is None else r.torch_ms / r.numba_kd_ms
        lines.append(
            f"| {r.operation} | {r.rows} x {r.classes} | {r.numba_kd_ms:.2f} | {_fmt(r.numpy_ms, '.1f')} | "
            f"{_fmt(r.torch_ms, '.1f')} | {r.gb_per_s:.1f} | {r.roofline_pct:.0f}% | "
            f"{_fmt(vs_numpy, '.1f')} | {_fmt(vs_torch, '.1f')} | {r.max_rel_error:.1e} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit('--plot needs matplotlib: pip install "numba_kd[bench]"') from exc
    labels = [f"{r.operation}\n{r.rows}x{r.classes}" for r in rows]
    x = np.arange(len(rows))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 1.2 * len(rows)), 8), sharex=True)
    top.bar(x, [r.roofline_pct for r in rows], color="tab:blue")
    top.axhline(100, color="grey", linestyle="--", linewidth=1)
    top.set_ylabel("% of copy roofline")
    width = 0.4
    numpy = [0 if r.numpy_ms is None else r.numpy_ms / r.numba_kd_ms for r in rows]
    torch = [0 if r.torch_ms is None else r.torch_ms / r.numba_kd_ms for r in rows]
    bottom.bar(x - width / 2, numpy, width, label="vs NumPy reference")
    bottom.bar(x + width / 2, torch, width, label="vs torch CPU")
    bottom.axhline(1, color="grey", linestyle="--", linewidth=1)
    bottom.set_ylabel("speed-up of numba_kd (x)")
    bottom.set_yscale("log")
    bottom.legend()
    bottom.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
    first = rows[0]
    fig.suptitle(f"numba_kd, K={first.n_teachers}, {first.dtype}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run(args) -> int:
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = 3 if args.quick else args.repeats
    info = machine()
    print(
        f"# numba_kd bench: {info['cpu']}, {info['cores']} cores, {info['numba_threads']} numba threads, "
        f"Python {info['python']}, NumPy {info['numpy']}, numba {info['numba']}, "
        f"torch {info.get('torch', '-')}, {info['date']}"
    )
    print(
        f"# K={N_TEACHERS}, {args.dtype}; medians of {repeats} calls after warm-up; torch at the same threads"
    )
    rows = measure(shapes, N_TEACHERS, args.dtype, repeats, max(1, min(repeats, 5)))
    print(format_table(rows))
    latency = compile_latency()
    print(
        f"\ncompile latency: import numba_kd {latency['import_s'] * 1e3:.0f} ms; "
        f"distillation_loss first call: cold cache {latency['cold_first_call_s']:.2f} s, "
        f"warm on-disk cache {latency['warm_cache_first_call_s']:.2f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": [asdict(r) for r in rows], "compile": latency}, f, indent=2)
    if args.plot:
        plot(rows, args.plot)
    return 0

"""``python -m numba_kd bench``: numba_kd against its peers and the memory roofline.

Every figure is measured in this process, side by side.  For each row (an
operation with its options, from ``numba_kd.registry``) the implementations run
in rounds: in every round each implementation is timed once, right after a
``np.copyto`` of as many bytes as the operation must move (its inputs read,
plus its output written for the combines and the gradient).  An
implementation's time is the median over the rounds, and its "% of roofline" is
the median of its paired copy/call ratios, so a drift of a shared machine hits
every implementation of a row alike.  The NumPy reference is slow; it is timed
in the first ``NUMPY_ROUNDS`` rounds only.

Peers: the float64 NumPy reference, eager torch, ``torch.compile`` (inductor)
and ``jax.jit`` (XLA) when installed, all at numba's thread count.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from numba_kd.registry import (
    OPERATIONS,
    SPARSE_OPERATIONS,
    SPARSE_SHAPE,
    Case,
    Operation,
    SparseCase,
    jax_available,
    relative_error,
    torch_available,
)

SHAPES = [(8192, 1000), (512, 32000), (64, 128000)]
QUICK_SHAPES = [(1024, 1000), (64, 32000)]
N_TEACHERS = 4
NUMPY_ROUNDS = 3
PEERS = ("numpy", "torch", "torch.compile", "jax.jit")


@dataclass
class Row:
    """One measured row of the benchmark: an operation on one shape.

    Parameters
    ----------
    operation : str
        The row's name, a key of ``registry.OPERATIONS``.
    rows : int
        B, the number of rows.
    classes : int
        C, the number of classes.
    n_teachers : int
        K, the number of teachers.
    dtype : str, one of {"float32", "float64", "float16", "bfloat16"}
        The logits' dtype.
    numba_kd_ms : float
        numba_kd's median time, in milliseconds.
    gb_per_s : float
        The bytes the operation must move over numba_kd's median time, in GB/s.
    roofline_pct : float
        numba_kd's share of the copy roofline: 100 times the median of its
        paired copy/call time ratios.
    copy_gb_per_s : float
        The bandwidth of the paired copies (median), in GB/s.
    max_rel_error : float
        The relative error of numba_kd's result against the float64 NumPy
        reference (``registry.relative_error``).
    peer_ms : dict of str to float, default {}
        The median time in milliseconds of each peer that ran, keyed by a
        name from PEERS.
    peer_roofline_pct : dict of str to float, default {}
        The share of the copy roofline of each peer that ran, likewise.
    """

    operation: str
    rows: int
    classes: int
    n_teachers: int
    dtype: str
    numba_kd_ms: float
    gb_per_s: float
    roofline_pct: float
    copy_gb_per_s: float
    max_rel_error: float
    # Median ms and % of the roofline of each peer that ran (keys from PEERS).
    peer_ms: dict[str, float] = field(default_factory=dict)
    peer_roofline_pct: dict[str, float] = field(default_factory=dict)

    def speedup(self, peer: str) -> float | None:
        """A peer's time over numba_kd's: above 1, numba_kd is faster.

        Parameters
        ----------
        peer : str, one of {"numpy", "torch", "torch.compile", "jax.jit"}
            The peer, a name from PEERS.

        Returns
        -------
        float or None
            The ratio, or None when that peer did not run.
        """
        ms = self.peer_ms.get(peer)
        return None if ms is None else ms / self.numba_kd_ms


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_with_copy(fn: Callable[[], object], n_bytes: int, repeats: int) -> tuple[float, float, float]:
    """Time a callable, each call right after a copy of ``n_bytes``.

    Parameters
    ----------
    fn : callable
        Called without arguments: once to warm up, then ``repeats`` times timed.
    n_bytes : int
        The size of the copy made before each timed call.
    repeats : int
        The number of timed calls, at least 1.

    Returns
    -------
    call_seconds : float
        The median time of fn.
    copy_seconds : float
        The median time of the copies.
    roofline : float
        The median of the paired copy/call time ratios (1 means fn ran at the
        speed of a copy of n_bytes).

    Raises
    ------
    statistics.StatisticsError
        ``repeats`` below 1.
    """
    timings = interleaved({"fn": fn}, n_bytes, repeats)["fn"]
    return timings.median, timings.copy_median, timings.roofline


@dataclass
class Timings:
    """The timings of one implementation: each call's time and the time of the copy before it.

    Parameters
    ----------
    calls : list of float, default []
        Seconds of each timed call.
    copies : list of float, default []
        Seconds of the copy made right before each call, in the same order.
    """

    calls: list[float] = field(default_factory=list)
    copies: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """The median call time, in seconds."""
        return statistics.median(self.calls)

    @property
    def copy_median(self) -> float:
        """The median copy time, in seconds."""
        return statistics.median(self.copies)

    @property
    def roofline(self) -> float:
        """The median of the paired copy/call time ratios: the share of the copy roofline."""
        return statistics.median(c / t for c, t in zip(self.copies, self.calls, strict=True))


def interleaved(
    implementations: dict[str, Callable[[], object]],
    n_bytes: int,
    rounds: int,
    limited: dict[str, int] | None = None,
) -> dict[str, Timings]:
    """Time every implementation once per round, each call right after its own copy.

    Each implementation is first called once to warm up (and compile). Then,
    in every round, each one in turn is timed right after a copy of
    ``n_bytes``, so that a drift of a shared machine hits all of them alike.
    Each round starts one implementation further down the list, so that each
    follows every other equally often: a library's worker threads can still
    hold the cores after its call returns (XLA's, after a bfloat16 jax.jit call,
    halved the speed of the next call on two cores), which a fixed order would
    charge to the same implementation every round.

    Parameters
    ----------
    implementations : dict of str to callable
        The zero-argument callables to time, by name.
    n_bytes : int
        The size of the copy made before each timed call.
    rounds : int
        The number of rounds.
    limited : dict of str to int, optional
        Caps the rounds of slow implementations: name to its number of rounds.

    Returns
    -------
    dict of str to Timings
        The timings of each implementation, by name.
    """
    src = np.ones(max(n_bytes // 4, 1), dtype=np.float32)
    dst = np.empty_like(src)
    for fn in implementations.values():
        fn()  # warm-up (and compilation)
    results = {name: Timings() for name in implementations}
    names = list(implementations)
    for r in range(rounds):
        first = r % len(names)
        for name in names[first:] + names[:first]:
            if limited and r >= limited.get(name, rounds):
                continue
            fn = implementations[name]
            results[name].copies.append(_timed(lambda: np.copyto(dst, src)))
            results[name].calls.append(_timed(fn))
    return results


def _peer_calls(op: Operation, args, peers: bool) -> dict[str, Callable[[], object]]:
    calls: dict[str, Callable[[], object]] = {}
    if not peers:
        return calls
    calls["numpy"] = lambda: op.numpy(*args)
    if torch_available():
        if op.torch is not None:
            calls["torch"] = lambda: op.torch(*args)
        if op.torch_compile is not None:
            calls["torch.compile"] = op.torch_compile(*args)
    if jax_available() and op.jax_jit is not None:
        calls["jax.jit"] = op.jax_jit(*args)
    return calls


def _timed_row(name, case, n_bytes, calls, rounds, error, limited=None) -> Row:
    """Time ``calls`` (numba_kd's under "numba_kd", then its peers) with ``interleaved``
    and make the Row of operation ``name`` on ``case`` (a Case or a SparseCase)."""
    timings = interleaved(calls, n_bytes, rounds, limited)
    mine = timings.pop("numba_kd")
    return Row(
        operation=name,
        rows=case.rows,
        classes=case.classes,
        n_teachers=case.n_teachers,
        dtype=case.dtype,
        numba_kd_ms=mine.median * 1e3,
        gb_per_s=n_bytes / mine.median / 1e9,
        roofline_pct=100.0 * mine.roofline,
        copy_gb_per_s=n_bytes / mine.copy_median / 1e9,
        max_rel_error=error,
        peer_ms={k: t.median * 1e3 for k, t in timings.items()},
        peer_roofline_pct={k: 100.0 * t.roofline for k, t in timings.items()},
    )


def measure(
    shapes,
    n_teachers: int,
    dtype: str,
    rounds: int,
    peers: bool = True,
    operations: list[str] | None = None,
    progress: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Measure every (shape, operation) row, every implementation timed in the same rounds.

    Each row's numba_kd result is first compared with the NumPy reference's,
    then numba_kd and its peers are timed with ``interleaved`` (the NumPy
    reference in at most NUMPY_ROUNDS rounds). When torch is installed, its
    thread count is set to numba's.

    Parameters
    ----------
    shapes : iterable of (int, int)
        The (rows, classes) shapes, B x C.
    n_teachers : int
        K, the number of teachers.
    dtype : str, one of {"float32", "float64", "float16", "bfloat16"}
        The logits' dtype.
    rounds : int
        The number of timing rounds, at least 1.
    peers : bool, default True
        Time the peers too: the NumPy reference, and torch, torch.compile and
        jax.jit where installed.
    operations : list of str, optional
        Names of ``registry.OPERATIONS`` rows; all of them by default.
    progress : callable, optional
        Called with each Row as soon as it is measured.

    Returns
    -------
    list of Row
        One per shape and operation, shapes in the outer loop.

    Raises
    ------
    KeyError
        An operation name that is not in ``registry.OPERATIONS``.
    """
    import numba

    if torch_available():
        import torch

        torch.set_num_threads(numba.get_num_threads())
    rows = []
    for n_rows, n_classes in shapes:
        case = Case(n_teachers, n_rows, n_classes, dtype)
        for name in operations or list(OPERATIONS):
            op = OPERATIONS[name]
            args = case.arrays(ignored=op.ignored)
            error = relative_error(op.numba_kd(*args), op.numpy(*args))
            calls = {"numba_kd": lambda op=op, args=args: op.numba_kd(*args), **_peer_calls(op, args, peers)}
            limited = {"numpy": min(rounds, NUMPY_ROUNDS)}
            rows.append(_timed_row(name, case, op.bytes_moved(case), calls, rounds, error, limited))
            if progress is not None:
                progress(rows[-1])
    return rows


# The sparse rows' error is measured on the first rows: their float64 reference
# materializes each teacher's distribution over all C classes.
SPARSE_ERROR_ROWS = 32


def measure_sparse(
    case: SparseCase,
    rounds: int,
    peers: bool = True,
    operations: list[str] | None = None,
    progress: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Measure the sparse top-k rows (``registry.SPARSE_OPERATIONS``) on one SparseCase.

    As ``measure``, with torch and torch.compile as the peers (the NumPy
    reference is not timed: it builds dense [K, N, C] float64 teachers). The
    error is that of the first SPARSE_ERROR_ROWS rows against the reference.

    Parameters
    ----------
    case : SparseCase
        The shape, number of teachers, k and dtype.
    rounds : int
        The number of timing rounds, at least 1.
    peers : bool, default True
        Time torch and torch.compile too, where installed.
    operations : list of str, optional
        Names of ``registry.SPARSE_OPERATIONS`` rows; all of them by default.
    progress : callable, optional
        Called with each Row as soon as it is measured.

    Returns
    -------
    list of Row
        One per operation.
    """
    import numba

    if torch_available():
        import torch

        torch.set_num_threads(numba.get_num_threads())
    args = case.arrays()
    student, (indices, logprobs), labels, weights = args
    head = SPARSE_ERROR_ROWS
    head_args = (student[:head], (indices[:, :head], logprobs[:, :head]), labels[:head], weights)
    rows = []
    for name in operations or list(SPARSE_OPERATIONS):
        op = SPARSE_OPERATIONS[name]
        error = relative_error(op.numba_kd(*head_args), op.numpy(*head_args))
        calls = {"numba_kd": lambda op=op: op.numba_kd(*args)}
        if peers and torch_available():
            calls["torch"] = lambda op=op: op.torch(*args)
            calls["torch.compile"] = op.torch_compile(*args)
        rows.append(_timed_row(name, case, op.bytes_moved(case), calls, rounds, error))
        if progress is not None:
            progress(rows[-1])
    return rows


def _first_call_seconds(cache_dir: str, operation: str) -> float:
    code = (
        "import time\n"
        "from numba_kd.registry import Case, OPERATIONS\n"
        f"op = OPERATIONS[{operation!r}]\n"
        f"args = Case({N_TEACHERS}, 64, 1000).arrays(ignored=op.ignored)\n"
        "start = time.perf_counter()\n"
        "op.numba_kd(*args)\n"
        "print(time.perf_counter() - start)\n"
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


LATENCY_OPERATIONS = [
    "distillation_loss",
    "loss_and_grad",
    "combine_teachers",
    "combine_via_probabilities",
]


def compile_latency(operations: list[str] | None = None) -> dict[str, dict[str, float]]:
    """The import time and, per operation, the latency of a first call in a fresh process.

    The import time is the median of 3 fresh processes. Each operation's
    first call runs once with an empty on-disk cache (cold), then 3 times with
    the cache that call left (warm, median), on a 64 x 1000 Case with
    N_TEACHERS teachers.

    Parameters
    ----------
    operations : list of str, optional
        Names of ``registry.OPERATIONS`` rows; LATENCY_OPERATIONS by default.

    Returns
    -------
    dict of str to dict of str to float
        ``{"import": {"seconds": s}}`` and, for each operation,
        ``{name: {"cold_s": s, "warm_s": s}}``.

    Raises
    ------
    subprocess.CalledProcessError
        A subprocess failed, e.g. for an unknown operation name.
    """
    code = "import time; start = time.perf_counter(); import numba_kd; print(time.perf_counter() - start)"
    imports = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        imports.append(float(out.stdout.strip()))
    result: dict[str, dict[str, float]] = {"import": {"seconds": statistics.median(imports)}}
    for name in operations or LATENCY_OPERATIONS:
        with tempfile.TemporaryDirectory() as cache_dir:
            cold = _first_call_seconds(cache_dir, name)
            warm = statistics.median(_first_call_seconds(cache_dir, name) for _ in range(3))
        result[name] = {"cold_s": cold, "warm_s": warm}
    return result


def machine() -> dict[str, str]:
    """A description of this machine and its software, for the benchmark's header.

    Returns
    -------
    dict of str to str
        cpu, cores, numba_threads, python, numpy, numba, date and load_before
        (the load averages), plus torch and jax versions where installed.
    """
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
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    if torch_available():
        import torch

        info["torch"] = torch.__version__
    if jax_available():
        import jax

        info["jax"] = jax.__version__
    return info


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLE_HEADER = (
    "| operation | B x C | numba_kd ms | % roofline | x NumPy | x torch | x torch.compile | x jax.jit "
    "| best compiler % roofline | max rel err |\n|" + "---|" * 10
)


def format_row(r: Row) -> str:
    """One Markdown table line for a Row, in the columns of TABLE_HEADER.

    Parameters
    ----------
    r : Row
        The measured row.

    Returns
    -------
    str
        The line; "-" stands for a peer that did not run.
    """
    compilers = [r.peer_roofline_pct[p] for p in ("torch.compile", "jax.jit") if p in r.peer_roofline_pct]
    return (
        f"| {r.operation} | {r.rows} x {r.classes} | {r.numba_kd_ms:.2f} | {r.roofline_pct:.0f}% | "
        + " | ".join(_fmt(r.speedup(p), ".2f") for p in PEERS)
        + f" | {_fmt(max(compilers) if compilers else None, '.0f')} | {r.max_rel_error:.1e} |"
    )


def format_table(rows: list[Row]) -> str:
    """The Markdown table of the rows.

    Columns: numba_kd's time and share of the roofline, each peer's time over
    numba_kd's (above 1: numba_kd is faster), the better compiler's share of
    the roofline, and the error.

    Parameters
    ----------
    rows : list of Row
        The measured rows.

    Returns
    -------
    str
        TABLE_HEADER followed by one line per row.
    """
    return "\n".join([TABLE_HEADER, *(format_row(r) for r in rows)])


def plot(rows: list[Row], path: str) -> None:
    """Write a PNG bar chart of the rows: numba_kd's share of the roofline, and the speed-ups.

    Parameters
    ----------
    rows : list of Row
        The measured rows, at least one.
    path : str
        The PNG file to write.

    Returns
    -------
    None

    Raises
    ------
    SystemExit
        matplotlib is not installed.
    IndexError
        No rows.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit('--plot needs matplotlib: pip install "numba_kd[bench]"') from exc
    labels = [f"{r.operation}\n{r.rows}x{r.classes}" for r in rows]
    x = np.arange(len(rows))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(10, 0.45 * len(rows)), 9), sharex=True)
    top.bar(x, [r.roofline_pct for r in rows], color="tab:blue")
    top.axhline(100, color="grey", linestyle="--", linewidth=1)
    top.set_ylabel("numba_kd, % of copy roofline")
    shown = [p for p in ("torch", "torch.compile", "jax.jit") if any(p in r.peer_ms for r in rows)]
    width = 0.8 / max(len(shown), 1)
    for n, peer in enumerate(shown):
        values = [r.speedup(peer) or 0.0 for r in rows]
        bottom.bar(x + (n - (len(shown) - 1) / 2) * width, values, width, label=f"vs {peer}")
    bottom.axhline(1, color="grey", linestyle="--", linewidth=1)
    bottom.set_ylabel("peer time / numba_kd time")
    bottom.set_yscale("log")
    if shown:
        bottom.legend()
    bottom.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    first = rows[0]
    fig.suptitle(f"numba_kd, K={first.n_teachers}, {first.dtype}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def rows_from_json(path: str) -> tuple[dict[str, str], list[Row]]:
    """The machine description and the rows of a ``bench --json`` file.

    Parameters
    ----------
    path : str
        The JSON file written by ``bench --json``.

    Returns
    -------
    machine : dict of str to str
        As ``machine`` returned it for that run.
    rows : list of Row
        The measured rows.

    Raises
    ------
    OSError
        The file cannot be read.
    KeyError
        A JSON object without "machine" or "rows".
    """
    with open(path) as f:
        data = json.load(f)
    return data["machine"], [Row(**row) for row in data["rows"]]


def print_header(dtype: str, rounds: int, what: str) -> dict[str, str]:
    """Print the run's machine, load and method lines.

    Parameters
    ----------
    dtype : str
        The logits' dtype.
    rounds : int
        The number of timing rounds.
    what : str
        What the rows measure, e.g. ``"K=4"``.

    Returns
    -------
    dict of str to str
        ``machine()``, read before the run.
    """
    info = machine()
    print(
        f"# numba_kd bench: {info['cpu']}, {info['cores']} cores, {info['numba_threads']} numba threads, "
        f"Python {info['python']}, NumPy {info['numpy']}, numba {info['numba']}, "
        f"torch {info.get('torch', '-')}, jax {info.get('jax', '-')}, {info['date']}, "
        f"load {info['load_before']}"
    )
    print(
        f"# {what}, {dtype}; medians of {rounds} interleaved rounds after warm-up "
        f"(NumPy: {min(rounds, NUMPY_ROUNDS)}); peers at numba's thread count; x PEER = peer time / "
        "numba_kd time"
    )
    return info


def _run_sparse(args) -> int:
    """``bench --sparse``: the sparse top-k rows at SPARSE_SHAPE (``--quick``: a small shape)."""
    n_rows, n_classes, n_teachers, k = (256, 32000, 2, 64) if args.quick else SPARSE_SHAPE
    rounds = 3 if args.quick else args.repeats
    operations = None
    if args.operations:
        operations = [name.strip() for name in args.operations.split(",")]
        unknown = [name for name in operations if name not in SPARSE_OPERATIONS]
        if unknown:
            raise SystemExit(f"unknown sparse operations {unknown}; known: {', '.join(SPARSE_OPERATIONS)}")
    info = print_header(args.dtype, rounds, f"sparse top-k teachers: K={n_teachers}, k={k}, forward KL")
    print(TABLE_HEADER, flush=True)
    case = SparseCase(n_teachers, n_rows, n_classes, k, args.dtype)
    rows = measure_sparse(
        case, rounds, peers=not args.no_peers, operations=operations,
        progress=lambda row: print(format_row(row), flush=True),
    )  # fmt: skip
    info["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# load average after: {info['load_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": [asdict(r) for r in rows], "compile": {}}, f, indent=2)
    return 0


def run(args) -> int:
    """Run ``numba-kd bench``: print the table row by row, then the compile latency.

    With ``from_json`` it only prints the table of a saved run, and with
    ``plot`` draws that run's chart. Otherwise it
    measures (``quick``: small shapes and 3 rounds), prints each row as it is
    measured, then the compile latency (unless ``no_latency``), and writes the
    JSON file and the plot when asked for.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed ``bench`` options: from_json, quick, repeats, operations,
        shapes, no_peers, no_latency, dtype ({"float32", "float64", "float16", "bfloat16"}), json
        and plot.

    Returns
    -------
    int
        The exit status, 0.

    Raises
    ------
    SystemExit
        An unknown operation name, or ``--plot`` without matplotlib.
    ValueError
        A ``--shapes`` entry that is not of the form BxC.
    """
    if getattr(args, "sparse", False):
        return _run_sparse(args)
    if args.from_json:
        _, rows = rows_from_json(args.from_json)
        print(format_table(rows))
        if args.plot:
            plot(rows, args.plot)
        return 0
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rounds = 3 if args.quick else args.repeats
    operations = None
    if args.operations:
        operations = [name.strip() for name in args.operations.split(",")]
        unknown = [name for name in operations if name not in OPERATIONS]
        if unknown:
            raise SystemExit(f"unknown operations {unknown}; known: {', '.join(OPERATIONS)}")
    info = print_header(args.dtype, rounds, f"K={N_TEACHERS}")
    if args.shapes:
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    print(TABLE_HEADER, flush=True)
    rows = measure(
        shapes, N_TEACHERS, args.dtype, rounds, peers=not args.no_peers, operations=operations,
        progress=lambda row: print(format_row(row), flush=True),
    )  # fmt: skip
    info["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# load average after: {info['load_after']}")
    latency = {} if args.no_latency else compile_latency()
    if latency:
        parts = [f"import numba_kd {latency['import']['seconds'] * 1e3:.0f} ms"]
        for name in LATENCY_OPERATIONS:
            parts.append(
                f"{name} cold {latency[name]['cold_s']:.2f} s / warm {latency[name]['warm_s']:.2f} s"
            )
        print("\ncompile latency (first call in a fresh process): " + "; ".join(parts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": [asdict(r) for r in rows], "compile": latency}, f, indent=2)
    if args.plot:
        plot(rows, args.plot)
    return 0

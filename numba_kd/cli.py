"""Command line: ``python -m numba_kd demo|check|bench`` (also installed as ``numba-kd``)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def check(args: argparse.Namespace) -> int:
    import numba

    import numba_kd as kd
    from numba_kd import reference

    rng = np.random.default_rng(args.seed)
    dtype = np.dtype(args.dtype)
    shape = (args.batch, args.classes)
    # Teachers agree on a shared signal and differ by their own noise; the
    # student is a noisier copy, as early in training.
    signal = rng.normal(scale=3.0, size=shape)
    teachers = [(signal + rng.normal(size=shape)).astype(dtype) for _ in range(args.teachers)]
    student = (0.5 * signal + rng.normal(scale=2.0, size=shape)).astype(dtype)
    labels = np.argmax(signal, axis=1)
    weights = np.arange(1, args.teachers + 1, dtype=np.float64)

    distiller = kd.EnsembleDistiller(weights, temperature=args.temperature)
    print(
        f"numba_kd {kd.__version__} check: K={args.teachers} teachers, B={args.batch}, C={args.classes}, "
        f"{dtype.name}, weights={distiller.weights.round(3).tolist()}, T={args.temperature}, "
        f"alpha={args.alpha}, {numba.get_num_threads()} threads"
    )

    start = time.perf_counter()
    loss = distiller.distillation_loss(student, teachers, labels, args.alpha)
    first_call = time.perf_counter() - start
    ref_loss = reference.distillation_loss(student, teachers, labels, weights, args.temperature, args.alpha)

    def run_kernel():
        distiller.distillation_loss(student, teachers, labels, args.alpha)

    def run_reference():
        reference.distillation_loss(student, teachers, labels, weights, args.temperature, args.alpha)

    kernel_time = _median_time(run_kernel, args.repeats)
    reference_time = _median_time(run_reference, args.repeats)
    rel_err = abs(loss - ref_loss) / abs(ref_loss)
    print(f"  numba_kd loss            {loss:.10f}")
    print(f"  NumPy float64 reference  {ref_loss:.10f}   (relative difference {rel_err:.1e})")
    print(f"  first call (compile or cache load)  {first_call * 1e3:9.1f} ms")
    print(f"  numba_kd, median of {args.repeats}          {kernel_time * 1e3:9.2f} ms")
    print(f"  NumPy reference, median of {args.repeats}   {reference_time * 1e3:9.2f} ms")
    print(f"  speed-up vs the reference          {reference_time / kernel_time:9.1f}x")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="numba_kd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo", help="distill an ensemble of small MLPs on the digits data (needs scikit-learn)"
    )
    d.add_argument("--seeds", type=int, default=5, help="training runs to average (default 5)")
    d.add_argument("--quick", action="store_true", help="fewer training steps (a smoke test)")
    d.set_defaults(func=_demo)

    p = sub.add_parser("check", help="distillation loss on a synthetic ensemble batch, checked and timed")
    p.add_argument("--teachers", type=int, default=4, help="number of teachers K (default 4)")
    p.add_argument("--batch", type=int, default=2048, help="rows B (default 2048)")
    p.add_argument("--classes", type=int, default=1000, help="classes C (default 1000)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per implementation (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=check)

    b = sub.add_parser("bench", help="numba_kd vs NumPy, torch CPU and the memory roofline")
    b.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke test)")
    b.add_argument("--repeats", type=int, default=9, help="timed calls per measurement (default 9)")
    b.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b.add_argument("--plot", metavar="PATH", help="also write a PNG bar chart (needs matplotlib)")
    b.set_defaults(func=_bench)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from numba_kd import demo

    return demo.run(args)


def _bench(args: argparse.Namespace) -> int:
    from numba_kd import bench

    return bench.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)

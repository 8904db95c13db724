"""Time per call of distillation_loss on a tiny batch, where the Python layer dominates.

    python scripts/call_overhead.py [--batch 8] [--classes 10] [--teachers 4] [--calls 20000]

Prints the best and the median of five rounds, each the mean over --calls calls.
At this size the kernel itself takes a few microseconds; the rest is the Python
layer: validation, target choice and the kernel lookup.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import numba_kd as kd


def per_call(function, calls: int) -> list[float]:
    function()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--teachers", type=int, default=4)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.batch, args.classes)
    student = rng.normal(size=shape).astype(np.float32)
    teachers = [rng.normal(size=shape).astype(np.float32) for _ in range(args.teachers)]
    labels = rng.integers(0, args.classes, size=args.batch)
    distiller = kd.EnsembleDistiller(np.arange(1.0, args.teachers + 1), temperature=2.0)
    rounds = per_call(lambda: distiller.distillation_loss(student, teachers, labels, 0.5), args.calls)
    print(
        f"distillation_loss B={args.batch} C={args.classes} K={args.teachers} float32: "
        f"best {min(rounds):.1f} us, median {np.median(rounds):.1f} us per call"
    )


if __name__ == "__main__":
    main()

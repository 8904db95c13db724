"""Time per call of the loss methods on a tiny batch, where the Python layer dominates.

    python scripts/call_overhead.py [--batch 8] [--classes 10] [--teachers 4] [--calls 20000]

Prints the best and the median of five rounds, each the mean over --calls calls.
At this size the kernel (a serial build) takes a few microseconds; the rest is the Python
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
    single = kd.DistillationLoss(temperature=2.0, alpha=0.5)
    calls = {
        "distillation_loss": lambda: distiller.distillation_loss(student, teachers, labels, 0.5),
        "loss_and_grad": lambda: distiller.loss_and_grad(student, teachers, labels, 0.5),
        "DistillationLoss (one teacher)": lambda: single(student, teachers[0], labels),
    }
    for name, call in calls.items():
        rounds = per_call(call, args.calls)
        print(
            f"{name} B={args.batch} C={args.classes} K={args.teachers} float32: "
            f"best {min(rounds):.1f} us, median {np.median(rounds):.1f} us per call"
        )


if __name__ == "__main__":
    main()

"""Each loss option's time as a multiple of the default loss's, interleaved in one process.

    python scripts/option_ratios.py [--shapes 8192x1000,512x32000] [--rounds 7] [--grad] [--teachers 4]

float32, K = 4 teachers, T = 2. Every round times each option once, in turn, so
that load changes on a shared machine reach all of them alike; the medians are
compared. This is the measurement behind the option-ratio table of the README.
With several teacher counts (``--teachers 1,2,4``) every count is timed in the
same rounds and the times are printed too, so that the cost of one more
teacher can be read off.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import numba_kd as kd
from numba_kd.registry import LOSS_OPTIONS

# The bench's option rows (registry.LOSS_OPTIONS), ignore_index aside.
OPTIONS = {"default": {}} | {
    name: options for name, options in LOSS_OPTIONS.items() if name not in ("", "ignore_index")
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8192x1000,512x32000")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--grad", action="store_true", help="time loss_and_grad instead of the loss")
    parser.add_argument("--teachers", default="4", help="teacher counts, e.g. 1,2,4 (at most 4)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    counts = [int(k) for k in args.teachers.split(",")]
    for shape in args.shapes.split(","):
        n_rows, n_classes = (int(n) for n in shape.split("x"))
        signal = rng.normal(scale=3.0, size=(n_rows, n_classes))
        teachers = [(signal + rng.normal(size=signal.shape)).astype(np.float32) for _ in range(4)]
        student = (0.5 * signal + rng.normal(scale=2.0, size=signal.shape)).astype(np.float32)
        labels = rng.integers(0, n_classes, size=n_rows)
        calls = {}
        for k in counts:
            distiller = kd.EnsembleDistiller([1.0, 2.0, 3.0, 4.0][:k], temperature=2.0)
            operation = distiller.loss_and_grad if args.grad else distiller.distillation_loss
            for name, options in OPTIONS.items():
                calls[k, name] = (operation, teachers[:k], options)
        for operation, subset, options in calls.values():  # compile and warm up
            operation(student, subset, labels, 0.5, **options)
        times: dict[tuple[int, str], list[float]] = {key: [] for key in calls}
        for _ in range(args.rounds):
            for key, (operation, subset, options) in calls.items():
                start = time.perf_counter()
                operation(student, subset, labels, 0.5, **options)
                times[key].append(time.perf_counter() - start)
        kind = "loss_and_grad" if args.grad else "distillation_loss"
        for k in counts:
            default = float(np.median(times[k, "default"]))
            ratios = " ".join(
                f"{name} {np.median(times[k, name]) / default:.2f}" for name in OPTIONS if name != "default"
            )
            print(f"{shape} {kind} K={k}: default {default * 1e3:.1f} ms | {ratios}")
            if len(counts) > 1:
                ms = " ".join(f"{name} {np.median(times[k, name]) * 1e3:.1f}" for name in OPTIONS)
                print(f"    ms: {ms}")


if __name__ == "__main__":
    main()

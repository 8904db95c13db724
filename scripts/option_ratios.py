"""Each loss option's time as a multiple of the default loss's, interleaved in one process.

    python scripts/option_ratios.py [--shapes 8192x1000,512x32000] [--rounds 7] [--grad]

float32, K = 4 teachers, T = 2. Every round times each option once, in turn, so
that load changes on a shared machine reach all of them alike; the medians are
compared. This is the measurement behind the option-ratio table of the README.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import numba_kd as kd

OPTIONS = {
    "default": {},
    "reverse_kl": {"divergence": "reverse_kl"},
    "jsd": {"divergence": "jsd"},
    "probs": {"combine": "probs"},
    "confidence": {"teacher_weighting": "confidence"},
    "entropy": {"teacher_weighting": "entropy"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8192x1000,512x32000")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--grad", action="store_true", help="time loss_and_grad instead of the loss")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    distiller = kd.EnsembleDistiller([1.0, 2.0, 3.0, 4.0], temperature=2.0)
    for shape in args.shapes.split(","):
        n_rows, n_classes = (int(n) for n in shape.split("x"))
        signal = rng.normal(scale=3.0, size=(n_rows, n_classes))
        teachers = [(signal + rng.normal(size=signal.shape)).astype(np.float32) for _ in range(4)]
        student = (0.5 * signal + rng.normal(scale=2.0, size=signal.shape)).astype(np.float32)
        labels = rng.integers(0, n_classes, size=n_rows)
        operation = distiller.loss_and_grad if args.grad else distiller.distillation_loss
        for options in OPTIONS.values():  # compile and warm up
            operation(student, teachers, labels, 0.5, **options)
        times: dict[str, list[float]] = {name: [] for name in OPTIONS}
        for _ in range(args.rounds):
            for name, options in OPTIONS.items():
                start = time.perf_counter()
                operation(student, teachers, labels, 0.5, **options)
                times[name].append(time.perf_counter() - start)
        default = float(np.median(times["default"]))
        ratios = " ".join(
            f"{name} {np.median(t) / default:.2f}" for name, t in times.items() if name != "default"
        )
        kind = "loss_and_grad" if args.grad else "distillation_loss"
        print(f"{shape} {kind}: default {default * 1e3:.1f} ms | {ratios}")


if __name__ == "__main__":
    main()

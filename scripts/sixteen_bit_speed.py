"""Time of 16-bit inputs relative to float32 inputs holding the same values.

Every operation on float32, bfloat16 and float16 logits (K = 4), timed
interleaved in rounds in one process; prints the median times and the ratios
16-bit / float32 (below 1: the 16-bit call was faster).

    python scripts/sixteen_bit_speed.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import time

import ml_dtypes
import numpy as np

import numba_kd as kd
from numba_kd import registry

SHAPES = [(8192, 1000), (512, 32000)]
N_TEACHERS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    d = kd.EnsembleDistiller.uniform(N_TEACHERS, temperature=2.0)
    operations = {
        "distillation_loss": lambda s, t, y: d.distillation_loss(s, t, y, 0.5),
        "loss_and_grad": lambda s, t, y: d.loss_and_grad(s, t, y, 0.5),
        "loss_and_grad jsd": lambda s, t, y: d.loss_and_grad(s, t, y, 0.5, divergence="jsd"),
        "combine_teachers": lambda s, t, y: d.combine_teachers(t),
        "combine_via_probabilities": lambda s, t, y: d.combine_via_probabilities(t),
    }
    print("| shape | operation | float32 ms | bfloat16 / float32 | float16 / float32 |")
    print("|---|---|---|---|---|")
    for n_rows, n_classes in SHAPES:
        rng = np.random.default_rng(0)
        student, teachers, labels = registry.synthetic_batch(rng, N_TEACHERS, n_rows, n_classes, np.float32)
        inputs = {
            name: (student.astype(dtype), [t.astype(dtype) for t in teachers])
            for name, dtype in [
                ("float32", np.float32),
                ("bfloat16", ml_dtypes.bfloat16),
                ("float16", np.float16),
            ]
        }
        for op_name, op in operations.items():
            for s, t in inputs.values():
                op(s, t, labels)  # compile and warm up
            times: dict[str, list[float]] = {name: [] for name in inputs}
            for _ in range(args.rounds):
                for name, (s, t) in inputs.items():
                    start = time.perf_counter()
                    op(s, t, labels)
                    times[name].append(time.perf_counter() - start)
            median = {name: float(np.median(v)) for name, v in times.items()}
            base = median["float32"]
            ratios = " | ".join(f"{median[name] / base:.2f}" for name in ("bfloat16", "float16"))
            print(f"| {n_rows} x {n_classes} | {op_name} | {base * 1e3:.1f} | {ratios} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

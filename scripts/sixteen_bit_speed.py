"""Time of 16-bit inputs relative to float32 inputs holding the same values.

Every operation on float32, bfloat16 and float16 logits (K = 4), timed
interleaved in rounds in one process, each call after its copy of the float32
inputs' size (``numba_kd.bench.interleaved``); prints the float32 median and
the ratios 16-bit / float32 (below 1: the 16-bit call was faster).

    python scripts/sixteen_bit_speed.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os

import ml_dtypes
import numpy as np

import numba_kd as kd
from numba_kd import registry
from numba_kd.bench import interleaved

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
        n_bytes = (N_TEACHERS + 1) * n_rows * n_classes * 4  # the float32 inputs
        for op_name, op in operations.items():
            calls = {name: (lambda op=op, s=s, t=t, y=labels: op(s, t, y)) for name, (s, t) in inputs.items()}
            median = {name: t.median for name, t in interleaved(calls, n_bytes, args.rounds).items()}
            base = median["float32"]
            ratios = " | ".join(f"{median[name] / base:.2f}" for name in ("bfloat16", "float16"))
            print(f"| {n_rows} x {n_classes} | {op_name} | {base * 1e3:.1f} | {ratios} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

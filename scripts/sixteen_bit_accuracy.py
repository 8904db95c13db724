"""Accuracy of 16-bit (float16, bfloat16) inputs against the float64 reference.

For each dtype and divergence: the loss's relative error and the gradient's
error, against ``numba_kd.reference`` evaluated in float64 on the very 16-bit
values the kernels read (the kernels' own error: float32 arithmetic, then one
rounding of each gradient entry to the input dtype), for the gradient in the
input dtype and with ``out=`` in float32.  The gradient's error is normwise per
row, max_i ||g_i - g_ref_i|| / ||g_ref_i||: entries where q_j and p_j nearly
cancel have no relative accuracy of their own in any precision.  The share of
gradient entries below the dtype's smallest normal is shown: there (float16
below 6.1e-5) the spacing is absolute, 6e-8, and a mean over many rows of a
large vocabulary puts most entries there.

    python scripts/sixteen_bit_accuracy.py [--rows 256] [--classes 32000]
"""

from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np

import numba_kd as kd
from numba_kd import reference, registry

DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--teachers", type=int, default=4)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    student, teachers, labels = registry.synthetic_batch(
        rng, args.teachers, args.rows, args.classes, np.float64
    )
    d = kd.EnsembleDistiller.uniform(args.teachers, temperature=2.0)
    print(f"B={args.rows} C={args.classes} K={args.teachers} T=2 alpha=0.5, mean reduction")
    columns = ["dtype", "divergence", "loss rel. err", "grad err, input dtype", "grad err, out= float32"]
    print("| " + " | ".join([*columns, "entries below normal"]) + " |")
    print("|---|---|---|---|---|---|")
    for name, dtype in DTYPES.items():
        s16, t16 = student.astype(dtype), [t.astype(dtype) for t in teachers]
        s64, t64 = s16.astype(np.float64), [t.astype(np.float64) for t in t16]
        normal = float(ml_dtypes.finfo(dtype).smallest_normal)
        for divergence in DIVERGENCES:
            options = {"divergence": divergence}
            loss, grad = d.loss_and_grad(s16, t16, labels, 0.5, **options)
            out = np.empty(s16.shape, np.float32)
            d.loss_and_grad(s16, t16, labels, 0.5, out=out, **options)
            expected = reference.general_loss(s64, t64, labels, d.weights, 2.0, 0.5, "mean", **options)[0]
            g_ref = reference.general_grad(s64, t64, labels, d.weights, 2.0, 0.5, "mean", **options)
            norm = np.linalg.norm(g_ref, axis=1)
            err16 = np.max(np.linalg.norm(grad.astype(np.float64) - g_ref, axis=1) / norm)
            err32 = np.max(np.linalg.norm(out - g_ref, axis=1) / norm)
            below = np.mean(np.abs(g_ref) < normal)
            print(
                f"| {name} | {divergence} | {abs(loss - expected) / abs(expected):.1e} | "
                f"{err16:.1e} | {err32:.1e} | {below:.0%} |"
            )


if __name__ == "__main__":
    main()

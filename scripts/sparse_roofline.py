"""The sparse loss_and_grad against the copy that bounds it, and what a new gradient costs.

Each loss_and_grad call (registry.SparseCase: N = 1024, C = 128000, K = 2,
k = 64, float32, T = 2) is timed right after a copy of the student alone, which
reads and writes exactly the bytes the kernel must move (the student read, the
gradient written); the share of that copy is the median of the paired
copy/call ratios.  Then ``loss_and_grad[topk_bucket]`` with a new gradient per
call, with NumPy's huge-page advice on (its default) and off, beside ``out=``.

Run: python scripts/sparse_roofline.py [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import numba_kd as kd
from numba_kd import registry


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    student, (indices, logprobs), labels, weights = registry.SparseCase(2, 1024, 128000, 64).arrays()
    out = np.empty_like(student)
    copy = np.empty_like(student)
    distiller = kd.EnsembleDistiller(weights, temperature=2.0)
    tops = {tail: kd.TopK(indices, logprobs, tail=tail) for tail in kd.sparse.TAILS}

    def with_out(top):
        return lambda: distiller.loss_and_grad(student, top, labels, 0.5, combine="probs", out=out)

    print(f"# load {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {args.rounds} interleaved rounds")
    calls = {tail: with_out(top) for tail, top in tops.items()}
    for fn in calls.values():
        fn()
    ratios = {tail: [] for tail in calls}
    times = {tail: [] for tail in calls}
    copies = []
    for _ in range(args.rounds):
        for tail, fn in calls.items():
            c = _seconds(lambda: np.copyto(copy, student))
            t = _seconds(fn)
            copies.append(c)
            ratios[tail].append(c / t)
            times[tail].append(t)
    print(f"copy of the student (512 MB read, 512 MB written): {statistics.median(copies) * 1e3:.1f} ms")
    for tail in calls:
        print(
            f"loss_and_grad[topk_{tail}+out]: {statistics.median(times[tail]) * 1e3:.1f} ms, "
            f"{100 * statistics.median(ratios[tail]):.0f}% of the copy's speed"
        )
    bucket = tops["bucket"]
    madvise = getattr(np._core.multiarray, "_set_madvise_hugepage", None)
    new = {
        "new gradient": lambda: distiller.loss_and_grad(student, bucket, labels, 0.5, combine="probs"),
        "out=": calls["bucket"],
    }
    results = {name: [] for name in [*new, "new gradient, no huge-page advice"]}
    for _ in range(max(3, args.rounds // 2)):
        for name, fn in new.items():
            results[name].append(_seconds(fn))
        if madvise is not None:
            previous = madvise(False)
            results["new gradient, no huge-page advice"].append(_seconds(new["new gradient"]))
            madvise(previous)
    for name, values in results.items():
        if values:
            print(f"loss_and_grad[topk_bucket], {name}: {statistics.median(values) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()

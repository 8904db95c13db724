"""Throughput of `numba-kd soft-labels` (streaming .npy files) next to the in-memory kernel.

    python scripts/offline_bench.py [--rows 100000] [--classes 1000] [--teachers 4]

Writes K teacher files of random float32 logits to a temporary folder, then, in
one process, times the streaming combine (numba_kd.offline.soft_labels, the
code behind the CLI) and the same combine of arrays already in memory, for both
combine modes.  Rates are GB/s of teacher logits read; the files are fresh, so
they are read from the page cache, not from the disk.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import numba_kd as kd
from numba_kd import offline


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--teachers", type=int, default=4)
    parser.add_argument("--chunk-rows", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.rows, args.classes)
    in_bytes = args.teachers * args.rows * args.classes * 4
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for k in range(args.teachers):
            path = Path(folder) / f"teacher{k}.npy"
            t = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
            for start in range(0, args.rows, 10_000):
                t[start : start + 10_000] = rng.normal(scale=3.0, size=t[start : start + 10_000].shape)
            t.flush()
            del t
            paths.append(str(path))
        print(
            f"{args.teachers} teachers x {args.rows} x {args.classes} float32 "
            f"({in_bytes / 1e9:.2f} GB of input)"
        )
        in_memory = [np.load(p) for p in paths]
        distiller = kd.EnsembleDistiller.uniform(args.teachers, 2.0)
        for combine in ("logits", "probs"):
            out = Path(folder) / "soft.npy"
            stream_times, memory_times = [], []
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                offline.soft_labels(
                    paths, out, temperature=2.0, combine=combine, chunk_rows=args.chunk_rows, overwrite=True
                )
                stream_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                if combine == "logits":
                    distiller.combine_teachers(in_memory)
                else:
                    distiller.combine_via_probabilities(in_memory)
                memory_times.append(time.perf_counter() - start)
            # The first round compiles; medians of the others.
            stream = float(np.median(stream_times[1:]))
            memory = float(np.median(memory_times[1:]))
            print(
                f"  {combine:6s}  soft-labels {in_bytes / stream / 1e9:5.2f} GB/s "
                f"({args.rows / stream:,.0f} rows/s)"
                f"   in memory {in_bytes / memory / 1e9:5.2f} GB/s   ratio {memory / stream:.2f}"
            )


if __name__ == "__main__":
    main()

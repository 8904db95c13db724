"""Offline distillation end to end: teacher logits on disk -> soft labels -> a student.

    python scripts/offline_example.py teachers DIR     # 1. teachers write their logits
    numba-kd soft-labels DIR/teacher0.npy DIR/teacher1.npy DIR/teacher2.npy \\
        --out DIR/soft.zarr --temperature 4 --combine probs  # 2. combine them once
    python scripts/offline_example.py student DIR      # 3. train from the soft labels

The data is scikit-learn's digits, split as in ``python -m numba_kd demo``: 150
labeled images, a transfer set without labels, a test set.  Three small MLP
teachers learn from the labeled images and write their logits over the labeled
and transfer images (one ``.npy`` file each).  The student learns from the
labels on the labeled images and from the soft labels alone (``alpha = 1``) on
the transfer images; a student trained on the labels only is the baseline.
Needs the demo and dask extras (scikit-learn, zarr).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import numba_kd as kd
from numba_kd import demo

TEMPERATURE = 4.0
STEPS = 400


def _split():
    x_lab, y_lab, x_tr, x_test, y_test = demo.load_digits_split(seed=0)
    return x_lab, y_lab, x_tr, x_test, y_test


def teachers(folder: Path) -> None:
    x_lab, y_lab, x_tr, x_test, y_test = _split()
    rng = np.random.default_rng(0)
    x_all = np.concatenate([x_lab, x_tr])
    folder.mkdir(parents=True, exist_ok=True)
    for k, width in enumerate(demo.TEACHER_WIDTHS):
        net = demo.train_teacher(rng, x_lab, y_lab, width, 10, STEPS)
        np.save(folder / f"teacher{k}.npy", net.forward(x_all)[1].astype(np.float32))
        print(f"teacher{k}.npy: {len(x_all)} rows, test accuracy {demo.accuracy(net, x_test, y_test):.3f}")


def _train(x_lab, y_lab, x_tr, soft, seed: int) -> demo.MLP:
    """A student MLP; with ``soft`` it also distills the transfer images (alpha = 1)."""
    rng = np.random.default_rng(seed)
    net = demo.MLP.new(rng, x_lab.shape[1], demo.STUDENT_WIDTH, 10, np.arange(x_lab.shape[1]))
    opt = demo.Adam(net.params(), lr=0.01)
    hard_only = kd.DistillationLoss(TEMPERATURE, 0.0)
    soft_only = kd.DistillationLoss(TEMPERATURE, 1.0)
    x = np.concatenate([x_lab, x_tr]) if soft is not None else x_lab
    for _ in range(STEPS):
        h, logits = net.forward(x)
        s_lab = logits[: len(x_lab)]
        # alpha = 0: the teacher argument is unused; the student's own logits fill it.
        _, g_lab = hard_only.loss_and_grad(s_lab, s_lab, y_lab, reduction="sum")
        grads = [g_lab]
        if soft is not None:
            s_tr = logits[len(x_lab) :]
            pseudo = np.argmax(soft, axis=1)  # unused by the loss at alpha = 1, but must be valid
            _, g_tr = soft_only.loss_and_grad(s_tr, soft, pseudo, reduction="sum")
            grads.append(g_tr)
        opt.step(net.backward(x, h, np.concatenate(grads) / len(x)))
    return net


def student(folder: Path) -> None:
    import numba
    import zarr

    # Batches of a few hundred rows: one thread avoids contention with NumPy's BLAS threads.
    numba.set_num_threads(1)
    x_lab, y_lab, x_tr, x_test, y_test = _split()
    soft_all = zarr.open_array(str(folder / "soft.zarr"), mode="r")[:]
    soft = np.ascontiguousarray(soft_all[len(x_lab) :], dtype=np.float64)
    seeds = range(5)
    baseline = [demo.accuracy(_train(x_lab, y_lab, x_tr, None, s), x_test, y_test) for s in seeds]
    distilled = [demo.accuracy(_train(x_lab, y_lab, x_tr, soft, s), x_test, y_test) for s in seeds]
    for name, scores in (("the labels only", baseline), ("the offline soft labels", distilled)):
        print(f"student from {name + ':':25s} test accuracy {np.mean(scores):.3f} ± {np.std(scores):.3f}")


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("teachers", "student"):
        print(__doc__)
        return 2
    (teachers if sys.argv[1] == "teachers" else student)(Path(sys.argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

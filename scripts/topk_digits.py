"""Distillation from stored top-k teachers on the digits demo's setup.

    python scripts/topk_digits.py [--seeds 5] [--quick]

The demo's three teachers, student and data split (``numba_kd.demo``), seed for
seed.  Each teacher's top-k log-probabilities at T_g = 1 (what an inference
server returns) are stored for k in {1, 2, 3, 5, 10}, and the student learns
from the three-teacher mixture with each tail rule; the loss re-tempers them to
the demo's T = 4.  Next to it: the student trained on the dense teachers with
the same probability mixture (``combine="probs"``), and on the labels alone.
Prints a Markdown table of test accuracy (mean and standard deviation over the
seeds) and each student's share of the dense teachers' gain over the labels alone.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

import numba_kd as kd
from numba_kd import demo

KS = (1, 2, 3, 5, 10)


def stored_top_k(teacher_logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each teacher's k most probable classes per row and their log-probabilities at T = 1."""
    shifted = teacher_logits - teacher_logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    order = np.argsort(-log_p, axis=-1)[..., :k]
    return order, np.take_along_axis(log_p, order, axis=-1)


def train(rng, data, teachers, steps, hard_only=False):
    """The demo's student, trained on loss_and_grad against ``teachers``: dense logits
    [K, rows, C] or a pair of TopKs (labeled rows, transfer rows)."""
    x_lab, y_lab, x_tr, pseudo = data["x_lab"], data["y_lab"], data["x_tr"], data["pseudo"]
    net = demo.MLP.new(rng, x_lab.shape[1], demo.STUDENT_WIDTH, 10, np.arange(x_lab.shape[1]))
    opt = demo.Adam(net.params(), lr=0.01)
    x_all = np.concatenate([x_lab, x_tr])
    distiller = kd.EnsembleDistiller([1.0, 1.0, 1.0], temperature=demo.TEMPERATURE)
    lab_teachers, tr_teachers = teachers
    n_lab, n_tr = len(x_lab), len(x_tr)
    for _ in range(steps):
        h, logits = net.forward(x_all)
        s_lab, s_tr = logits[:n_lab], logits[n_lab:]
        if hard_only:
            _, g_lab = distiller.loss_and_grad(s_lab, lab_teachers, y_lab, 0.0, combine="probs")
            g_tr = np.zeros_like(s_tr)
        else:
            options = {"reduction": "sum", "combine": "probs"}
            _, g_lab = distiller.loss_and_grad(s_lab, lab_teachers, y_lab, demo.ALPHA, **options)
            _, g_tr = distiller.loss_and_grad(s_tr, tr_teachers, pseudo, 1.0, **options)
            g_lab /= n_lab + n_tr
            g_tr /= n_lab + n_tr
        opt.step(net.backward(x_all, h, np.concatenate([g_lab, g_tr])))
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="150 training steps instead of 400")
    args = parser.parse_args()
    steps = 150 if args.quick else 400
    results: dict[str, list[float]] = {}
    start = time.perf_counter()
    for seed in range(args.seeds):
        rng = np.random.default_rng(1000 + seed)
        x_lab, y_lab, x_tr, x_test, y_test = demo.load_digits_split(seed)
        teachers = [demo.train_teacher(rng, x_lab, y_lab, w, 10, steps) for w in demo.TEACHER_WIDTHS]
        x_all = np.concatenate([x_lab, x_tr])
        logits = np.stack([t.forward(x_all)[1] for t in teachers])
        uniform = kd.EnsembleDistiller.uniform(len(teachers), temperature=demo.TEMPERATURE)
        pseudo = np.argmax(uniform.combine_teachers(logits[:, len(x_lab) :]), axis=1)
        data = {"x_lab": x_lab, "y_lab": y_lab, "x_tr": x_tr, "pseudo": pseudo}
        n_lab = len(x_lab)
        dense = (logits[:, :n_lab], logits[:, n_lab:])
        runs = [("hard labels only", dense, True), ("dense teachers (combine=probs)", dense, False)]
        for k in KS:
            indices, logprobs = stored_top_k(logits, k)
            for tail in kd.sparse.TAILS:
                top = (
                    kd.TopK(indices[:, :n_lab], logprobs[:, :n_lab], tail=tail),
                    kd.TopK(indices[:, n_lab:], logprobs[:, n_lab:], tail=tail),
                )
                runs.append((f"top-{k}, {tail}", top, False))
        for name, teacher_set, hard_only in runs:
            net = train(np.random.default_rng(seed), data, teacher_set, steps, hard_only)
            results.setdefault(name, []).append(demo.accuracy(net, x_test, y_test))
    print(
        f"digits, K = 3 teachers stored at T_g = 1, loss at T = {demo.TEMPERATURE}, alpha = {demo.ALPHA}, "
        f"{args.seeds} seeds, {steps} steps ({time.perf_counter() - start:.0f} s)\n"
    )
    hard = np.mean(results["hard labels only"])
    gain = np.mean(results["dense teachers (combine=probs)"]) - hard
    print("| student trained on | test accuracy (mean ± std) | share of the dense teachers' gain |")
    print("|---|---|---|")
    for name, accs in results.items():
        share = "-" if name == "hard labels only" else f"{100 * (np.mean(accs) - hard) / gain:.0f} %"
        print(f"| {name} | {100 * np.mean(accs):.1f} % ± {100 * np.std(accs):.1f} | {share} |")


if __name__ == "__main__":
    import numba

    numba.set_num_threads(1)
    with threadpool_limits(limits=1, user_api="blas"):
        main()

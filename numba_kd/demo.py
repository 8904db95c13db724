"""``python -m numba_kd demo``: distilling an ensemble of small MLPs on scikit-learn's digits.

Everything but the data loading is NumPy and numba_kd: the networks, their
backward passes and the Adam optimizer are written out below, and every
student gradient comes from ``loss_and_grad``.

Story: 150 labeled images, a larger transfer set without labels, a held-out
test set.  K = 3 teachers (different widths, seeds and pixel subsets) learn from
the labeled images; a smaller student then learns four ways: from the labels
alone; from the best single teacher; from the ensemble with static weights; from
the ensemble with per-sample ``teacher_weighting="confidence"``.  The transfer
images have no labels, so they are distilled with ``alpha = 1`` (soft loss
only); there the confidence weighting measures each teacher's probability of the
ensemble's predicted class, the labeled images use their true label.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

N_LABELED = 150
N_TEST = 500
TEACHER_WIDTHS = (64, 48, 32)
TEACHER_PIXELS = 48  # of 64: each teacher sees its own random subset
STUDENT_WIDTH = 16
TEMPERATURE = 4.0
ALPHA = 0.5  # on the labeled rows; transfer rows use alpha = 1
IGNORE = -100


@dataclass
class MLP:
    """One hidden ReLU layer; ``pixels`` selects the input columns it sees."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    pixels: np.ndarray

    @classmethod
    def new(cls, rng, n_in_pixels, width, n_classes, pixels):
        return cls(
            rng.normal(0, np.sqrt(2 / n_in_pixels), (n_in_pixels, width)),
            np.zeros(width),
            rng.normal(0, np.sqrt(1 / width), (width, n_classes)),
            np.zeros(n_classes),
            pixels,
        )

    def params(self):
        return [self.w1, self.b1, self.w2, self.b2]

    def forward(self, x):
        h = np.maximum(x[:, self.pixels] @ self.w1 + self.b1, 0.0)
        return h, h @ self.w2 + self.b2

    def backward(self, x, h, d_logits):
        dh = (d_logits @ self.w2.T) * (h > 0)
        xs = x[:, self.pixels]
        return [xs.T @ dh, dh.sum(0), h.T @ d_logits, d_logits.sum(0)]


class Adam:
    def __init__(self, params, lr=0.01, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4):
        self.params, self.lr, self.b1, self.b2, self.eps, self.wd = params, lr, b1, b2, eps, weight_decay
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            g = g + self.wd * p
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            m_hat = m / (1 - self.b1**self.t)
            v_hat = v / (1 - self.b2**self.t)
            p -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def _softmax_ce_grad(logits, labels):
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1
    return p / len(labels)


def train_teacher(rng, x, y, width, n_classes, steps):
    pixels = np.sort(rng.choice(x.shape[1], TEACHER_PIXELS, replace=False))
    net = MLP.new(rng, TEACHER_PIXELS, width, n_classes, pixels)
    opt = Adam(net.params(), lr=0.01, weight_decay=1e-3)
    for _ in range(steps):
        h, logits = net.forward(x)
        opt.step(net.backward(x, h, _softmax_ce_grad(logits, y)))
    return net


def accuracy(net, x, y):
    return float(np.mean(np.argmax(net.forward(x)[1], axis=1) == y))


@dataclass
class Clock:
    kd: float = 0.0
    rest: float = 0.0


def train_student(rng, data, teacher_logits, mode, weights, steps, clock):
    """mode: "hard" (labels only) or a teacher set to distill from (static/confidence)."""
    import numba_kd as kd

    x_lab, y_lab, x_tr, pseudo = data["x_lab"], data["y_lab"], data["x_tr"], data["pseudo"]
    n_classes = 10
    net = MLP.new(rng, x_lab.shape[1], STUDENT_WIDTH, n_classes, np.arange(x_lab.shape[1]))
    opt = Adam(net.params(), lr=0.01)
    x_all = np.concatenate([x_lab, x_tr])
    distiller = kd.EnsembleDistiller(weights, temperature=TEMPERATURE)
    # One [K, rows, classes] array (sliced, not copied): a single compiled
    # specialization serves K = 1 and K = 3, which keeps the first run short.
    lab_teachers = teacher_logits[:, : len(x_lab)]
    tr_teachers = teacher_logits[:, len(x_lab) :]
    weighting = "confidence" if mode == "confidence" else "static"
    for _ in range(steps):
        start = time.perf_counter()
        h, logits = net.forward(x_all)
        s_lab, s_tr = logits[: len(x_lab)], logits[len(x_lab) :]
        middle = time.perf_counter()
        if mode == "hard":
            # alpha = 0: the cross-entropy alone; the transfer rows carry no label.
            _, g_lab = distiller.loss_and_grad(s_lab, lab_teachers, y_lab, 0.0)
            g_tr = np.zeros_like(s_tr)
        else:
            n_lab, n_tr = len(x_lab), len(x_tr)
            # Sum reductions, then one mean over all rows of the step.
            _, g_lab = distiller.loss_and_grad(
                s_lab, lab_teachers, y_lab, ALPHA, reduction="sum", teacher_weighting=weighting
            )
            _, g_tr = distiller.loss_and_grad(
                s_tr, tr_teachers, pseudo, 1.0, reduction="sum", teacher_weighting=weighting
            )
            g_lab /= n_lab + n_tr
            g_tr /= n_lab + n_tr
        after = time.perf_counter()
        opt.step(net.backward(x_all, h, np.concatenate([g_lab, g_tr])))
        end = time.perf_counter()
        clock.kd += after - middle
        clock.rest += (middle - start) + (end - after)
    return net


def _progress(message: str) -> None:
    """One updating line on a terminal; nothing when stderr is redirected."""
    if sys.stderr.isatty():
        print(f"\r{message:<78}", end="" if message else "\r", file=sys.stderr, flush=True)


def load_digits_split(seed):
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit('the demo loads scikit-learn\'s digits data: pip install "numba_kd[demo]"') from exc
    digits = load_digits()
    x = digits.data / 16.0
    y = digits.target
    order = np.random.default_rng(seed).permutation(len(y))
    test, lab, tr = order[:N_TEST], order[N_TEST : N_TEST + N_LABELED], order[N_TEST + N_LABELED :]
    return x[lab], y[lab], x[tr], x[test], y[test]


def run(args) -> int:
    import numba

    try:
        from threadpoolctl import threadpool_limits
    except ImportError as exc:
        raise SystemExit('the demo needs threadpoolctl: pip install "numba_kd[demo]"') from exc

    # The batches are tiny (at most ~1,150 x 10 logits), and the NumPy matrix
    # products and numba_kd's kernels alternate: one thread each, so that neither
    # pool spins on cores the other needs.
    numba.set_num_threads(1)
    with threadpool_limits(limits=1, user_api="blas"):
        return _run(args)


def _run(args) -> int:
    import numba_kd as kd

    seeds = list(range(args.seeds))
    teacher_steps, student_steps = (150, 150) if args.quick else (400, 400)
    results: dict[str, list[float]] = {}
    clock = Clock()
    start = time.perf_counter()
    print(
        f"numba_kd {kd.__version__} demo: digits, {N_LABELED} labeled / transfer / {N_TEST} test images, "
        f"K={len(TEACHER_WIDTHS)} teachers (hidden {TEACHER_WIDTHS}, {TEACHER_PIXELS} of 64 pixels each), "
        f"student hidden {STUDENT_WIDTH}, T={TEMPERATURE}, alpha={ALPHA}, {len(seeds)} seeds"
    )
    for seed in seeds:
        rng = np.random.default_rng(1000 + seed)
        x_lab, y_lab, x_tr, x_test, y_test = load_digits_split(seed)
        teachers = [train_teacher(rng, x_lab, y_lab, w, 10, teacher_steps) for w in TEACHER_WIDTHS]
        x_all = np.concatenate([x_lab, x_tr])
        teacher_logits = np.stack([t.forward(x_all)[1] for t in teachers])
        uniform = kd.EnsembleDistiller.uniform(len(teachers), temperature=TEMPERATURE)
        ensemble_test = uniform.combine_teachers(np.stack([t.forward(x_test)[1] for t in teachers]))
        pseudo = np.argmax(uniform.combine_teachers(teacher_logits[:, len(x_lab) :]), axis=1)
        for k, t in enumerate(teachers):
            results.setdefault(f"teacher {k + 1} (hidden {TEACHER_WIDTHS[k]})", []).append(
                accuracy(t, x_test, y_test)
            )
        results.setdefault("teacher ensemble (logit average)", []).append(
            float(np.mean(np.argmax(ensemble_test, axis=1) == y_test))
        )
        best = int(np.argmax([accuracy(t, x_test, y_test) for t in teachers]))
        data = {"x_lab": x_lab, "y_lab": y_lab, "x_tr": x_tr, "pseudo": pseudo}
        variants = [
            ("student: hard labels only", "hard", teacher_logits[best : best + 1], [1.0]),
            ("student: best single teacher", "static", teacher_logits[best : best + 1], [1.0]),
            ("student: ensemble, static weights", "static", teacher_logits, [1.0] * len(teachers)),
            ("student: ensemble, confidence weights", "confidence", teacher_logits, [1.0] * len(teachers)),
        ]
        for name, mode, logits, weights in variants:
            student_rng = np.random.default_rng(seed)  # same initialization for every variant
            net = train_student(student_rng, data, logits, mode, weights, student_steps, clock)
            results.setdefault(name, []).append(accuracy(net, x_test, y_test))
            _progress(f"seed {seed + 1}/{len(seeds)}: {name} done ({time.perf_counter() - start:.0f} s)")
    _progress("")
    print(f"\n| model | test accuracy (mean ± std over {len(seeds)} seeds) |\n|---|---|")
    for name, accs in results.items():
        print(f"| {name} | {100 * np.mean(accs):.1f} % ± {100 * np.std(accs):.1f} |")
    total = time.perf_counter() - start
    print(
        f"\nstudent training: {clock.kd:.2f} s inside numba_kd (loss_and_grad), "
        f"{clock.rest:.2f} s in the NumPy forward/backward/optimizer; {total:.1f} s in all"
    )
    print('"best single teacher" is chosen on the test set: an upper bound for picking one teacher.')
    return 0

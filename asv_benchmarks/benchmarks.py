"""airspeed velocity suite for numba_kd's public operations."""

import numpy as np

import numba_kd as kd


def _batch(n_teachers, rows, classes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    signal = rng.normal(scale=3.0, size=(rows, classes))
    teachers = [(signal + rng.normal(size=(rows, classes))).astype(dtype) for _ in range(n_teachers)]
    student = (0.5 * signal + rng.normal(scale=2.0, size=(rows, classes))).astype(dtype)
    labels = rng.integers(0, classes, size=rows)
    return student, teachers, labels


class DistillationLoss:
    params = ([4], [(8192, 1000), (512, 32000)], ["float32", "float64"])
    param_names = ["K", "shape", "dtype"]  # noqa: RUF012

    def setup(self, n_teachers, shape, dtype):
        self.student, self.teachers, self.labels = _batch(n_teachers, *shape, dtype)
        self.distiller = kd.EnsembleDistiller.uniform(n_teachers, temperature=2.0)
        # Compile (or load from the cache) outside the timed region.
        self.distiller.distillation_loss(self.student, self.teachers, self.labels, 0.7)

    def time_distillation_loss(self, n_teachers, shape, dtype):
        self.distiller.distillation_loss(self.student, self.teachers, self.labels, 0.7)

    def peakmem_distillation_loss(self, n_teachers, shape, dtype):
        self.distiller.distillation_loss(self.student, self.teachers, self.labels, 0.7)

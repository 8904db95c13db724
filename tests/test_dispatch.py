"""The compiled-kernel cache and import-time behaviour."""

from __future__ import annotations

import subprocess
import sys


def test_import_compiles_nothing():
    code = (
        "import sys, numba_kd\n"
        "from numba_kd import _signatures\n"
        "assert _signatures.compiled_signature_count() == 0\n"
        "assert 'numba_kd.cpu.kernels' not in sys.modules, 'kernels imported at import time'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


REPEATED_CALLS = """
import numpy as np
from numba_kd import _signatures, registry

rng = np.random.default_rng(0)
student = rng.normal(size=(6, 9)).astype(np.float32)
teachers = [rng.normal(size=(6, 9)).astype(np.float32) for _ in range(2)]
labels = rng.integers(0, 9, size=6)
weights = np.array([1.0, 2.0])


def all_ops(s, t):
    # Every row of the registry: every operation, each loss option its own row.
    y = labels[: len(s)] % s.shape[1]
    ignored = np.where(np.arange(len(y)) % 8 == 0, registry.IGNORE_INDEX, y)
    for op in registry.OPERATIONS.values():
        op.numba_kd(s, t, ignored if op.ignored else y, weights)


all_ops(student, teachers)
all_ops(student, np.stack(teachers))
count = _signatures.compiled_signature_count()
# Same kinds of input (dtype, layout, list vs stacked, K); other values and shapes.
all_ops(student[:3] * 2, [t[:3].copy() for t in teachers])
all_ops(student + 1, np.stack(teachers) - 1)
big = rng.normal(size=(6, 20)).astype(np.float32)
all_ops(big, [big, big])
assert _signatures.compiled_signature_count() == count, (count, _signatures.compiled_signature_count())
# A new kind of input (float64) adds specializations.
all_ops(student.astype(np.float64), [t.astype(np.float64) for t in teachers])
assert _signatures.compiled_signature_count() > count
print(count)
"""


def test_repeated_calls_compile_nothing():
    out = subprocess.run([sys.executable, "-c", REPEATED_CALLS], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # combine_logits, combine_probabilities and general_rows for list and stacked
    # teachers, and general_rows for DistillationLoss's one teacher: every loss option
    # runs the same specialization of general_rows.
    assert int(out.stdout) == 7


def _small_batch(n_teachers: int = 2):
    import numpy as np

    rng = np.random.default_rng(3)
    student = rng.normal(size=(4, 7)).astype(np.float32)
    teachers = [rng.normal(size=(4, 7)).astype(np.float32) for _ in range(n_teachers)]
    return student, teachers, rng.integers(0, 7, size=4)


def test_a_known_layout_still_checks_what_it_does_not_fix():
    """After a call with the same dtypes, shapes and strides, the label values, the
    logits' finiteness and the number of teachers are still checked on every call."""
    import numpy as np
    import pytest

    import numba_kd as kd

    student, teachers, labels = _small_batch()
    d = kd.EnsembleDistiller([1.0, 2.0], temperature=2.0)
    expected = d.distillation_loss(student, teachers, labels, 0.5)
    assert d.distillation_loss(student, teachers, labels, 0.5) == expected
    bad = labels.copy()
    bad[3] = 7
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\): labels\[3\] = 7"):
        d.distillation_loss(student, teachers, bad, 0.5)
    bad[3] = -3
    with pytest.raises(ValueError, match=r"labels\[3\] = -3"):
        d.loss_and_grad(student, teachers, bad, 0.5)
    nan_student = student.copy()
    nan_student[1, 2] = np.nan
    with pytest.raises(ValueError, match="student holds NaN"):
        d.distillation_loss(nan_student, teachers, labels, 0.5, check_finite=True)
    assert np.isnan(d.distillation_loss(nan_student, teachers, labels, 0.5))
    with pytest.raises(ValueError, match="1 teachers, 2 weights"):
        d.distillation_loss(student, teachers[:1], labels, 0.5)
    three = kd.EnsembleDistiller([1.0, 1.0, 1.0], temperature=2.0)
    with pytest.raises(ValueError, match="2 teachers, 3 weights"):
        three.distillation_loss(student, teachers, labels, 0.5)
    with pytest.raises(ValueError, match="Alpha must be in"):
        d.distillation_loss(student, teachers, labels, 1.5)
    single = kd.DistillationLoss(temperature=2.0, alpha=0.5)
    assert single(student, teachers[0], labels) == single(student, teachers[0], labels)
    with pytest.raises(ValueError, match=r"labels\[3\] = 7"):
        single(student, teachers[0], np.where(np.arange(4) == 3, 7, labels))

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
import numba_kd as kd
from numba_kd import _signatures

rng = np.random.default_rng(0)
student = rng.normal(size=(6, 9)).astype(np.float32)
teachers = [rng.normal(size=(6, 9)).astype(np.float32) for _ in range(2)]
labels = rng.integers(0, 9, size=6)
d = kd.EnsembleDistiller([1.0, 2.0], temperature=2.0)


def all_ops(s, t):
    d.distillation_loss(s, t, labels[: len(s)] % s.shape[1], 0.5)
    d.combine_teachers(t)
    d.combine_via_probabilities(t)
    d.combine_via_probabilities(t, eps=0.0)


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
    # combine_logits, combine_probabilities, distillation_loss_terms for list and stacked
    assert int(out.stdout) == 6

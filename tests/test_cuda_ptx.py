"""Every CUDA kernel signature the dispatcher can produce compiles to real PTX.

This catches code that the simulator accepts and the CUDA compiler rejects. It
needs NVVM (shipped by numba-cuda[cu13]) but no GPU.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

if cuda.config.ENABLE_CUDASIM:  # pragma: no cover - guarded by conftest
    pytest.skip("PTX compilation needs the real CUDA target", allow_module_level=True)

from numba_kd.cuda import backend  # noqa: E402

SIGNATURES = list(backend.kernel_signatures())


# The logit dtypes the signatures' uint16 and int16 bits stand for.
BITS_OF = {np.dtype(np.uint16): "bfloat16", np.dtype(np.int16): "float16"}
FLOAT_DTYPES = {np.dtype(np.float32), np.dtype(np.float64)}


def _first_per_kernel(signatures):
    """The first signature of each (kernel, float dtype), topk_rows aside (9-20 s each)."""
    seen = {}
    for sig in signatures:
        if sig[0] != "topk_rows" and sig[1] in FLOAT_DTYPES:
            seen.setdefault((sig[0], sig[1]), sig)
    return list(seen.values())


# Every signature for compute capability 8.0; for 9.0 one per kernel and dtype: the
# NVVM IR is the same for both, only the code generation for the target differs.
CASES = [(sig, (8, 0)) for sig in SIGNATURES] + [(sig, (9, 0)) for sig in _first_per_kernel(SIGNATURES)]


def _id(case) -> str:
    (op, dtype, layout, kind, n_teachers, label_dtype), cc = case
    parts = [
        op,
        BITS_OF.get(dtype, dtype.name),
        layout,
        kind if n_teachers is None else f"{kind}{n_teachers}",
    ]
    return "-".join(parts + ([label_dtype.name] if label_dtype is not None else []) + [f"sm{cc[0]}{cc[1]}"])


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_compiles_to_ptx(case):
    sig, cc = case
    op, dtype = sig[0], sig[1]
    kernel = getattr(backend.kernels_for(dtype), op)
    ptx, _ = cuda.compile_ptx(kernel.py_func, backend.signature(*sig), cc=cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert ".entry" in ptx
    if dtype == np.float32 and op == "topk_rows":
        # The sparse kernel merges the K k stored entries of a row, and computes the
        # classes of U, in float64 (as on the CPU); its sweeps over the C student
        # classes exponentiate in float32.
        assert re.search(r"ex2\.approx[.a-z]*\.f32", ptx)
    elif dtype != np.float64 and op != "reduce_loss":
        # float32 kernels accumulate in float32, and 16-bit logits widen to float32:
        # no double-precision arithmetic.
        assert ".f64" not in ptx
    if dtype in BITS_OF and op != "count_nonfinite":
        # 16-bit logits are read (and results written) as 16-bit words.
        assert re.search(r"\bld(\.global)?(\.nc)?\.u16\b", ptx)
        if op in ("combine_logits", "mix_probabilities", "general_rows"):  # those that write logits
            assert re.search(r"\bst(\.global)?\.u16\b", ptx)


def test_signature_list_covers_every_kernel():
    ops = {sig[0] for sig in SIGNATURES}
    kernels = {"combine_logits", "teacher_lse", "mix_probabilities", "loss_rows", "reduce_loss"}
    others = {"general_rows", "count_valid", "scale_rows", "count_nonfinite", "topk_rows", "clear_map"}
    assert ops == kernels | others
    assert {sig[1] for sig in SIGNATURES} == FLOAT_DTYPES | set(BITS_OF)
    for bits in BITS_OF:
        assert {sig[0] for sig in SIGNATURES if sig[1] == bits} == kernels - {"reduce_loss"} | {
            "general_rows",
            "count_nonfinite",
        }

"""The kernel signature resolver: argument values to numba types and cache keys."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
from numba import types

from numba_kd import _math, _signatures
from numba_kd.cpu import kernels

PACKAGE = pathlib.Path(_signatures.__file__).parent
MAX_POSITIONAL = 12


def _kernel(student, teachers, per_block, out):
    return None


def test_bind_orders_arguments_like_the_definition():
    args = _signatures.bind(_kernel, {"out": 4, "per_block": 3, "student": 1, "teachers": 2})
    assert args == (1, 2, 3, 4)


@pytest.mark.parametrize(
    "arguments",
    [{"student": 1, "teachers": 2, "per_block": 3}, {"student": 1, "teachers": 2, "per_block": 3, "outt": 4}],
    ids=["missing", "misspelled"],
)
def test_bind_names_the_expected_parameters(arguments):
    with pytest.raises(TypeError, match="_kernel takes student, teachers, per_block, out"):
        _signatures.bind(_kernel, arguments)


def test_reads_rejects_unknown_parameters():
    with pytest.raises(TypeError, match=r"no parameters \['labels'\]"):
        _signatures.reads("labels")(_kernel)


def test_arrays_are_typed_by_dtype_rank_and_contiguity():
    matrix = np.zeros((3, 4), np.float32)
    assert _signatures.numba_type(matrix) == types.Array(types.float32, 2, "C")
    assert _signatures.numba_type(matrix[:, ::2]) == types.Array(types.float32, 2, "A")
    assert _signatures.numba_type(matrix.T) == types.Array(types.float32, 2, "A")
    assert _signatures.numba_type(matrix, read_only=True) == types.Array(types.float32, 2, "C", readonly=True)
    assert _signatures.type_key(matrix) != _signatures.type_key(matrix[:, ::2])
    assert _signatures.type_key(matrix) != _signatures.type_key(matrix.astype(np.float64))
    assert _signatures.type_key(matrix) == _signatures.type_key(np.ones((5, 1), np.float32))


def test_contiguity_from_strides_matches_numpy():
    base = np.zeros((4, 6))
    views = [base, base[1:3], base[:, 1:3], base[::2], base.T, base[:1, :], base[:, :1].T, np.zeros((0, 3))]
    for view in views:

        class Strided:
            shape, strides, dtype = view.shape, view.strides, view.dtype

        assert _signatures.is_c_contiguous(Strided()) == view.flags.c_contiguous, view.strides


def test_teacher_tuples_of_mixed_layout_share_the_generic_layout():
    c = np.zeros((3, 4))
    f = np.asfortranarray(c)
    mixed = _signatures.numba_type((c, f, c), read_only=True)
    assert mixed == types.UniTuple(types.Array(types.float64, 2, "A", readonly=True), 3)
    assert _signatures.numba_type((c, c)) == types.UniTuple(types.Array(types.float64, 2, "C"), 2)


def test_scalars_and_named_tuples():
    params = _math.LossParams(-1, 2.0, 0.5, 0, 1, 2, 1.0, 0.5, True)
    typed = _signatures.numba_type(params)
    assert isinstance(typed, types.NamedTuple) and typed.instance_class is _math.LossParams
    assert list(typed.types) == [types.int64, types.float64, types.float64, *[types.int64] * 3,
                                 types.float64, types.float64, types.boolean]  # fmt: skip
    assert _signatures.numba_type(np.float32(1.0)) == types.float32
    assert _signatures.type_key(True) != _signatures.type_key(1)
    with pytest.raises(TypeError, match="no kernel argument type for str"):
        _signatures.numba_type("x")


def test_host_kernels_read_only_their_inputs():
    function = kernels.general_rows.py_func
    values = {name: np.zeros(2) for name in _signatures.parameters(function)}
    values["teachers"] = (np.zeros((2, 2)),) * 2
    signature = _signatures.types_of(function, _signatures.bind(function, values), host=True)
    read_only = {
        name for name, typ in zip(_signatures.parameters(function), signature, strict=True) if _read_only(typ)
    }
    assert read_only == {"student", "teachers", "weights", "labels"}
    device = _signatures.types_of(function, _signatures.bind(function, values), host=False)
    assert not any(_read_only(t) for t in device)


def _read_only(typ) -> bool:
    array = typ.dtype if isinstance(typ, types.UniTuple) else typ
    return isinstance(array, types.Array) and not array.mutable


def _positional_counts():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count = len(node.args.posonlyargs) + len(node.args.args)
                yield f"{path.relative_to(PACKAGE)}:{node.name}", count


def test_no_function_takes_more_than_twelve_positional_parameters():
    too_many = {name: count for name, count in _positional_counts() if count > MAX_POSITIONAL}
    assert not too_many
    assert max(count for _, count in _positional_counts()) > 3  # the scan saw real functions

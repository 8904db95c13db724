"""The package's architecture, checked from its import graph.

Every import of a ``numba_kd`` module counts, lazy imports inside functions
included.  The rules (DESIGN): each module imports only from layers below its
own, so there are no cycles; no module uses another public module's underscore
names; the dask path never imports the public classes.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "numba_kd"

# Bottom to top.  A module may import modules of lower layers only.
LAYERS = [
    {"numba_kd._math", "numba_kd._runtime", "numba_kd._signatures", "numba_kd._arrays", "numba_kd.reference"},
    {"numba_kd._options", "numba_kd.cpu.kernels", "numba_kd.cuda.kernels"},
    {"numba_kd._validate"},
    {
        "numba_kd.cpu.backend",
        "numba_kd.cuda.backend",
        "numba_kd._dask",
        "numba_kd._backend",
        "numba_kd.sparse",
    },
    {"numba_kd._targets"},
    {"numba_kd._entry"},
    {"numba_kd.distiller"},
    {"numba_kd"},
    {"numba_kd.offline", "numba_kd.registry", "numba_kd.demo", "numba_kd._adapters"},
    {"numba_kd.torch", "numba_kd.jax"},
    {"numba_kd.bench"},
    {"numba_kd.cli"},
    {"numba_kd.__main__"},
]
NAMESPACES = {"numba_kd.cpu", "numba_kd.cuda"}  # empty package markers


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every numba_kd import in ``name``."""
    found = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "numba_kd":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append((submodule, None) if submodule in MODULES else (node.module, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "numba_kd"]
    return found


def _layer(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def test_every_module_has_a_layer():
    placed = set().union(*LAYERS) | NAMESPACES
    assert set(MODULES) == placed


@pytest.mark.parametrize("name", sorted(set(MODULES) - NAMESPACES))
def test_imports_point_down(name):
    for module, _ in _imports(name):
        if module == name or module in NAMESPACES:
            continue
        assert _layer(module) < _layer(name), f"{name} imports {module}, which is not below it"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_names_of_public_modules(name):
    for module, imported in _imports(name):
        public = not module.split(".")[-1].startswith("_")
        if imported is not None and public and imported.startswith("_") and not imported.startswith("__"):
            pytest.fail(f"{name} imports {imported} from the public module {module}")
    tree = ast.parse(MODULES[name].read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "numba_kd":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in MODULES:
                    aliases[alias.asname or alias.name] = submodule
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module = aliases[node.value.id]
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            if private and not module.split(".")[-1].startswith("_") and module != name:
                pytest.fail(f"{name} uses {module}.{node.attr}")


def test_the_dask_path_does_not_import_the_classes():
    assert "numba_kd.distiller" not in {m for m, _ in _imports("numba_kd._dask")}
    assert _layer("numba_kd._dask") < _layer("numba_kd.distiller")


def _protocol_methods():
    from numba_kd._backend import Backend

    return {
        name: value
        for name, value in vars(Backend).items()
        if inspect.isfunction(value) and not name.startswith("_")
    }


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_backends_implement_the_protocol(target):
    if target == "cpu":
        from numba_kd.cpu.backend import HostBackend as backend
    else:
        backend = pytest.importorskip("numba_kd.cuda.backend", reason="needs numba-cuda").CudaBackend
    assert backend.target == target
    for name, method in _protocol_methods().items():
        implemented = getattr(backend, name, None)
        assert callable(implemented), f"{backend.__name__} lacks {name}"
        expected = list(inspect.signature(method).parameters)
        assert list(inspect.signature(implemented).parameters) == expected, f"{backend.__name__}.{name}"


MAX_POSITIONAL = 12


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_function_takes_more_than_twelve_positional_parameters(name):
    """Kernel arguments travel as named tuples (LossParams, DeviceLossParams,
    TopKParams, ...), so that no call site repeats a long parameter order by hand."""
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            count = len(node.args.posonlyargs) + len(node.args.args)
            assert count <= MAX_POSITIONAL, f"{name}.{node.name} takes {count} positional parameters"

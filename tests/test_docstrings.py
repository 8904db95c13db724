"""The public API documents itself: numpydoc sections that name every parameter,
and examples that run (doctests).

Besides the classes of the public API, every public function, class and method
of the reference, registry, bench and offline modules (found by introspection)
names its parameters in a Parameters section and has a Returns or Yields
section."""

from __future__ import annotations

import doctest
import inspect
import re

import pytest

import numba_kd as kd
from numba_kd import _options, bench, distiller, offline, reference, registry

PUBLIC = {
    "EnsembleDistiller": kd.EnsembleDistiller,
    "EnsembleDistiller.uniform": kd.EnsembleDistiller.uniform,
    "EnsembleDistiller.combine_teachers": kd.EnsembleDistiller.combine_teachers,
    "EnsembleDistiller.combine_via_probabilities": kd.EnsembleDistiller.combine_via_probabilities,
    "EnsembleDistiller.distillation_loss": kd.EnsembleDistiller.distillation_loss,
    "EnsembleDistiller.loss_and_grad": kd.EnsembleDistiller.loss_and_grad,
    "DistillationLoss": kd.DistillationLoss,
    "DistillationLoss.forward": kd.DistillationLoss.forward,
    "DistillationLoss.loss_and_grad": kd.DistillationLoss.loss_and_grad,
    "offline.soft_labels": offline.soft_labels,
    "offline.dataset_loss": offline.dataset_loss,
}


# Modules whose every public function, class and method has numpydoc sections.
DOCUMENTED_MODULES = [reference, registry, bench, offline]


def _parameters(obj) -> list[str]:
    function = obj.__init__ if inspect.isclass(obj) else obj
    return [name for name in inspect.signature(function).parameters if name not in ("self", "cls")]


def _documented_parameters(doc: str) -> list[str]:
    """The names of a docstring's Parameters section, in order (``**options`` is ``options``)."""
    section = re.split(r"\n\n\w+\n-+\n", doc.split("Parameters\n----------\n")[1])[0]
    return re.findall(r"^\*{0,2}(\w+)(?: :|$)", section, flags=re.M)


def _module_members(module) -> dict[str, object]:
    """The public functions and classes defined in ``module``, and the public methods of those
    classes (properties aside), by qualified name."""
    members = {}
    for name, obj in inspect.getmembers(module, lambda o: inspect.isfunction(o) or inspect.isclass(o)):
        if name.startswith("_") or obj.__module__ != module.__name__:
            continue
        members[f"{module.__name__}.{name}"] = obj
        if inspect.isclass(obj):
            for method_name, method in vars(obj).items():
                if inspect.isfunction(method) and not method_name.startswith("_"):
                    members[f"{module.__name__}.{name}.{method_name}"] = method
    return members


MODULE_MEMBERS = {name: obj for module in DOCUMENTED_MODULES for name, obj in _module_members(module).items()}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_parameter_is_documented(name):
    obj = PUBLIC[name]
    doc = inspect.getdoc(obj)
    assert doc and "Parameters\n----------" in doc, name
    assert _documented_parameters(doc) == _parameters(obj), name
    if not inspect.isclass(obj):
        assert "Returns\n-------" in doc, name
    assert "Raises\n------" in doc, name
    assert "{" + "student}" not in doc and "{" + "teachers}" not in doc  # every shared block was filled in


def test_allowed_option_values_are_in_help():
    doc = inspect.getdoc(kd.EnsembleDistiller.distillation_loss)
    for allowed in (_options.REDUCTIONS, _options.COMBINES, _options.DIVERGENCES, _options.WEIGHTINGS):
        assert "{" + ", ".join(f'"{value}"' for value in allowed) + "}" in doc


def test_modules_have_public_members():
    for module in DOCUMENTED_MODULES:
        assert any(name.startswith(module.__name__ + ".") for name in MODULE_MEMBERS), module.__name__


@pytest.mark.parametrize("name", sorted(MODULE_MEMBERS))
def test_module_member_is_documented(name):
    obj = MODULE_MEMBERS[name]
    doc = inspect.getdoc(obj)
    assert doc, name
    parameters = _parameters(obj)
    if parameters:
        assert "Parameters\n----------" in doc, name
        assert _documented_parameters(doc) == parameters, name
    if not inspect.isclass(obj):
        assert "Returns\n-------" in doc or "Yields\n------" in doc, name


@pytest.mark.parametrize("module", [distiller, offline, reference], ids=lambda m: m.__name__)
def test_examples_run(module):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module) if t.examples]
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0
    if module is distiller:
        assert result.attempted >= 20
    if module is reference:
        assert result.attempted >= 20
        for name in ("combine_teachers", "combine_via_probabilities", "distillation_loss",
                     "distillation_loss_single", "general_loss"):  # fmt: skip
            assert any(t.examples for t in finder.find(getattr(reference, name), name)), name

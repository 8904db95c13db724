"""The public API documents itself: numpydoc sections that name every parameter,
and examples that run (doctests)."""

from __future__ import annotations

import doctest
import inspect
import re

import pytest

import numba_kd as kd
from numba_kd import distiller, offline

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


def _parameters(obj) -> list[str]:
    function = obj.__init__ if inspect.isclass(obj) else obj
    return [name for name in inspect.signature(function).parameters if name not in ("self", "cls")]


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_parameter_is_documented(name):
    obj = PUBLIC[name]
    doc = inspect.getdoc(obj)
    assert doc and "Parameters\n----------" in doc, name
    section = re.split(r"\n\n\w+\n-+\n", doc.split("Parameters\n----------\n")[1])[0]
    documented = re.findall(r"^(\w+) :", section, flags=re.M)
    assert documented == _parameters(obj), name
    if not inspect.isclass(obj):
        assert "Returns\n-------" in doc, name
    assert "Raises\n------" in doc, name
    assert "{" + "student}" not in doc and "{" + "teachers}" not in doc  # every shared block was filled in


def test_allowed_option_values_are_in_help():
    doc = inspect.getdoc(kd.EnsembleDistiller.distillation_loss)
    for values in ('{"mean", "sum", "none"}', '{"logits", "probs"}', '{"forward_kl", "reverse_kl", "jsd"}',
                   '{"static", "confidence", "entropy"}'):  # fmt: skip
        assert values in doc


@pytest.mark.parametrize("module", [distiller, offline], ids=lambda m: m.__name__)
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

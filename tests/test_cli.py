from __future__ import annotations

import subprocess
import sys

import pytest


def test_check_runs_and_matches_reference():
    out = subprocess.run(
        [sys.executable, "-m", "numba_kd", "check", "--batch", "64", "--classes", "50", "--repeats", "2"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = out.stdout.splitlines()
    loss = float(next(line for line in lines if "numba_kd loss" in line).split()[-1])
    reference = float(next(line for line in lines if "NumPy float64 reference" in line).split()[3])
    assert abs(loss - reference) <= 1e-6 * abs(reference)
    assert "speed-up vs the reference" in out.stdout


def test_help():
    out = subprocess.run(
        [sys.executable, "-m", "numba_kd", "--help"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("usage: numba-kd ")
    for command in ("demo", "check", "bench", "soft-labels", "loss"):
        assert command in out.stdout


def test_version():
    import numba_kd

    out = subprocess.run(
        [sys.executable, "-m", "numba_kd", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"numba-kd {numba_kd.__version__}"


def _options(parser):
    """(subcommand name, option action) for every option of every subcommand."""
    subcommands = parser._subparsers._group_actions[0].choices
    for name, sub in subcommands.items():
        for option in sub._actions:
            if option.option_strings and option.dest != "help":
                yield name, sub, option


def test_subcommand_help_shows_defaults_and_no_markup():
    from numba_kd.cli import build_parser

    parser = build_parser()
    assert "``" not in parser.format_help()
    for name, sub, option in _options(parser):
        text = sub.format_help()
        assert "``" not in text and ":func:" not in text, name
        if option.default is not None and option.nargs != 0:
            flag = option.option_strings[-1]
            entry = text[text.index("\n  " + flag) + 1 :].split("\n  -")[0]
            assert f"(default: {option.default})" in " ".join(entry.split()), (name, flag)


def test_demo_trains_students():
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn")
    out = subprocess.run(
        [sys.executable, "-m", "numba_kd", "demo", "--quick", "--seeds", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "%" in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert "student: ensemble, confidence weights" in names
    assert len(rows) == 8
    for row in rows:
        accuracy = float(row.split("|")[2].split("%")[0])
        # Ten classes: chance is 10 %; every model here learns far beyond it.
        assert 50.0 < accuracy <= 100.0, row
    assert "inside numba_kd" in out.stdout

"""Regenerate the README's benchmark tables from the stored ``bench --json`` runs.

    python scripts/readme_tables.py           # rewrite the tables in README.md
    python scripts/readme_tables.py --check   # exit 1 if a table differs from its JSON

Each table sits between ``<!-- table: PATH -->`` and ``<!-- end table -->``,
where PATH is a ``python -m numba_kd bench --json`` file; the table is what
``python -m numba_kd bench --from-json PATH`` prints, so no number is pasted by
hand.  tests/test_readme.py runs the check.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from numba_kd.bench import format_table, rows_from_json

ROOT = Path(__file__).resolve().parent.parent
MARKED = re.compile(r"(<!-- table: (?P<path>\S+) -->\n)(?P<table>.*?)(<!-- end table -->)", re.S)


def regenerate(text: str) -> str:
    """``text`` with every marked table rebuilt from its JSON file."""

    def table(match: re.Match) -> str:
        _, rows = rows_from_json(str(ROOT / match["path"]))
        return match.group(1) + format_table(rows) + "\n" + match.group(4)

    return MARKED.sub(table, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the tables are current")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    fresh = regenerate(text)
    if args.check:
        if fresh != text:
            print("README.md tables differ from their bench JSON files", file=sys.stderr)
            return 1
        return 0
    readme.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())

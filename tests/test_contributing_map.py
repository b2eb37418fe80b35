"""The package map in docs/contributing.md matches ``peft_infosteer/`` as it is: every module listed once, and each
row's *imported by* column equal to the modules that import it."""

from __future__ import annotations

import re
from pathlib import Path

from test_imports import _graph

MAP = Path(__file__).resolve().parents[1] / "docs" / "contributing.md"


def _short(module: str) -> str:
    return "__init__" if module == "peft_infosteer" else module.removeprefix("peft_infosteer.")


def _documented() -> dict[str, set[str]]:
    text = MAP.read_text().split("## Map of the package", 1)[1]
    rows: dict[str, set[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        module = cells[0].strip("`")
        assert module not in rows, f"docs/contributing.md lists {module} twice"
        # a parenthesised note (who reaches it by name, the console script) is not an import
        rows[module] = set(re.findall(r"`([\w.]+)`", re.sub(r"\(.*?\)", "", cells[2])))
    return rows


def test_the_map_lists_every_module_with_its_importers():
    graph = _graph()
    actual = {_short(m): set() for m in graph}
    for module, deps in graph.items():
        for dep in deps:
            actual[_short(dep)].add(_short(module))
    documented = _documented()
    assert set(documented) == set(actual), (
        f"docs/contributing.md's map is out of date: missing {sorted(set(actual) - set(documented))}, "
        f"gone {sorted(set(documented) - set(actual))}"
    )
    stale = {m: (sorted(documented[m]), sorted(actual[m])) for m in actual if documented[m] != actual[m]}
    assert not stale, f"docs/contributing.md: 'imported by' differs for (documented, actual): {stale}"

"""Griffe extension for the API reference: render ``>>>`` doctest blocks as Python console code blocks.

The package's docstrings follow PEFT's style: a ``>>>`` example, often without an ``Examples:`` section title. Plain
Markdown would read ``>>>`` as nested block quotes (and ``>>> # comment`` as a heading); this wraps every run of
doctest lines, with its output lines, in a fenced ``pycon`` block before mkdocstrings renders the docstring.
"""

from __future__ import annotations

from typing import Any

from griffe import Extension, Object


def fence_doctests(text: str) -> str:
    """Wrap each doctest block (``>>>``/``...`` lines and their output, up to a blank line) in a ``pycon`` fence."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
                i += 1
            out += [f"{indent}```pycon", *(indent + b for b in block), f"{indent}```"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class DoctestBlocks(Extension):
    """Fence the doctest blocks of every docstring that has one."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)

"""House rules that read the package's source: no measured numbers in code (docs/benchmarks.md holds the evidence).

Help texts, docstrings, comments and messages say what a knob does and why; timings, memory ratios, accuracy
differences and seed counts go stale in source first, so they live in docs/benchmarks.md, docs/analysis.md and
benchmarks/README.md next to the result files they come from.
"""

from __future__ import annotations

import ast
import doctest
import io
import re
import tokenize
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*sorted((ROOT / "peft_infosteer").rglob("*.py")), ROOT / "_build_pth.py"]

_NUM = r"(?<![\w.])[+-]?\d+(?:[.,]\d+)*"  # a number that is not the tail of a name (float32, bf16) or of a version
_WORD_NUM = r"(?:\d+|one|two|three|four|five|six|seven|eight|nine|ten)"

# What a measurement looks like in prose. Formulas (1e-4, 0.01 * 100), defaults ("p = 1%", "default 0.01"), shapes,
# versions and doctest examples do not match these.
MEASURED: dict[str, re.Pattern[str]] = {
    "a duration": re.compile(_NUM + r"\s*(?:ms|µs|us|ns|s|sec|seconds?|min|minutes?|hours?)(?![\w/])"),
    "a throughput": re.compile(_NUM + r"\s*(?:tokens|it|steps|samples|examples)/s\b"),
    "a memory size": re.compile(_NUM + r"\s*(?:[KMGT]i?B|bytes?)\b"),
    "a ratio": re.compile(
        rf"(?<![:%]){_NUM}x(?![\w*])"  # 1.20x, but not a format spec ({:02x}) or a shape (2x2)
        rf"|{_NUM}\s*x\s+(?:LoRA|the|as|faster|slower|more|less|fewer)\b"
        r"|\btimes\s+(?:LoRA|faster|slower|as\s+(?:fast|slow|much|long))\b"
    ),
    "a change in percent": re.compile(
        r"(?<![\w.])[+-]\d+(?:\.\d+)?\s*%"  # +9%: a change, where a setting would be unsigned (p = 1%)
        rf"|{_NUM}\s*%\s+(?:more|less|faster|slower|higher|lower|better|worse|overhead|peak|memory|time|speed)\b"
        rf"|{_NUM}\s*%\s+of\s+(?:an?\s+|the\s+|its\s+)?(?:\w+\s+){{0,2}}(?:step|time|memory|peak|runtime)\b"
    ),
    "accuracy points": re.compile(_NUM + r"\s*(?:accuracy\s+)?(?:points?|pts|pp)\b", re.IGNORECASE),
    "a seed count": re.compile(r"\b" + _WORD_NUM + r"\s+(?:random\s+)?seeds\b|\bseeds\s+\d", re.IGNORECASE),
    "a before/after figure": re.compile(
        r"\b(?:fell|dropped|rose|grew|went|improved|regressed|shrank|sped\s+up)\s+from\s+[+-]?\d", re.IGNORECASE
    ),
    "a confidence interval": re.compile(r"±\s*\d|\bIQR\b|\bCI\s*\["),
    "a result file": re.compile(r"\bbenchmarks/results\b"),  # the docs cite results; code points to the docs
}

WHERE = (
    "Measured numbers go stale in source first: say what the knob does and why, and point to docs/benchmarks.md "
    "(or docs/analysis.md, benchmarks/README.md), where the number lives next to its result file."
)


class Text(NamedTuple):
    path: Path
    text: str
    #: (offset in ``text``, source line) where each literal of the string starts: several for an implicit
    #: concatenation ("..." "..." over several lines, as help texts are written), one otherwise
    starts: tuple[tuple[int, int], ...]

    def line(self, offset: int) -> int:
        start, line = max((s for s in self.starts if s[0] <= offset), default=(0, self.starts[0][1]))
        return line + self.text.count("\n", start, offset)


class Finding(NamedTuple):
    path: Path
    line: int
    kind: str
    excerpt: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.kind}: {self.excerpt!r}"


def _prose(value: str) -> str:
    """``value`` without its doctest examples (their source and expected output are code, not prose)."""
    if ">>>" not in value:
        return value
    try:
        parts = doctest.DocTestParser().parse(value)
    except ValueError:  # not a well-formed doctest: check all of it
        return value
    # keep line numbers: an example becomes as many empty lines as it took
    return "".join(p if isinstance(p, str) else "\n" * (p.source.count("\n") + p.want.count("\n")) for p in parts)


def _starts(node: ast.Constant, strings: list[tokenize.TokenInfo]) -> tuple[tuple[int, int], ...]:
    """Where each literal of ``node`` starts, in its value and in the source (see :class:`Text`)."""
    begin, end = (node.lineno, node.col_offset), (node.end_lineno or node.lineno, node.end_col_offset or 0)
    starts, offset = [], 0
    for tok in strings:
        if begin <= tok.start and tok.end <= end:
            starts.append((offset, tok.start[0]))
            try:
                offset += len(ast.literal_eval(tok.string))
            except (ValueError, SyntaxError):  # an f-string's part: its line is good enough
                return ((0, node.lineno),)
    return tuple(starts) or ((0, node.lineno),)


def texts(path: Path, source: str | None = None) -> list[Text]:
    """The prose of one source file: string constants (docstrings, help texts, messages) and comment blocks."""
    source = path.read_text(encoding="utf-8") if source is None else source
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    strings = [tok for tok in tokens if tok.type == tokenize.STRING]
    found = [
        Text(path, _prose(node.value), _starts(node, strings))
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]
    block: list[str] = []
    start = last = 0
    for tok in tokens:
        if tok.type != tokenize.COMMENT:
            continue
        line = tok.start[0]
        if block and line != last + 1:
            found.append(Text(path, "\n".join(block), ((0, start),)))
            block = []
        if not block:
            start = line
        block.append(tok.string.lstrip("#:").strip())
        last = line
    if block:
        found.append(Text(path, "\n".join(block), ((0, start),)))
    return found


def measured_numbers(text: Text) -> list[Finding]:
    """Every place in ``text`` that reads like a measurement, with its line and a little context."""
    findings = []
    for kind, pattern in MEASURED.items():
        for match in pattern.finditer(text.text):  # across line breaks too: a docstring wraps where it likes
            line = text.line(match.start())
            excerpt = " ".join(text.text[max(0, match.start() - 40) : match.end() + 40].split())
            findings.append(Finding(text.path, line, kind, excerpt))
    return findings


def test_no_measured_numbers_in_the_package() -> None:
    findings = sorted({f for path in SOURCES for t in texts(path) for f in measured_numbers(t)})
    if findings:
        pytest.fail("\n".join([WHERE, *map(str, findings)]), pytrace=False)


PLANTED = '''
class Knob:
    """A knob.

    With it the step fell from 13.7 to
    8.4 ms, 1.20x LoRA's time.

    >>> Knob()  # the doctest itself is code: 3 seeds here do not count
    """

    rate: float = field(
        default=0.2,
        metadata={"help": "The default 0.2 gained 1.1 points "
                  "over three seeds (benchmarks/results/knob)."},
    )
    # a plain comment; the one below is a measurement
    # +9% peak memory of a compiled step
    #     and 12 MiB more


def warn(n):
    raise ValueError(f"{n} is slow: 12.6 tokens/s, ±0.4")
'''


def test_the_checker_catches_planted_measurements() -> None:
    """The checker is not silently blind: each kind of measurement planted here is found, on its own line."""
    findings = [f for t in texts(ROOT / "planted.py", PLANTED) for f in measured_numbers(t)]
    assert {(f.line, f.kind) for f in findings} == {
        (5, "a before/after figure"),
        (6, "a duration"),
        (6, "a ratio"),
        (13, "accuracy points"),
        (14, "a seed count"),
        (14, "a result file"),
        (17, "a change in percent"),
        (18, "a memory size"),
        (22, "a throughput"),
        (22, "a confidence interval"),
    }
    # the message names the file, the line and the text
    message = "planted.py:14: a seed count: 'The default 0.2 gained 1.1 points over three seeds"
    assert any(str(f).startswith(message) for f in findings)


def test_the_checker_leaves_legitimate_numbers_alone() -> None:
    """Defaults, formulas, thresholds, shapes, versions and doctest output are not measurements."""
    legitimate = '''
"""The paper's p = 1% (default 0.01): ceil(0.01 * 100) counts 1, lr 1e-4, bottom 1% of d_ff.

Shapes [2048, 1536], rows x d_ff, float32 and bf16, 4-bit, PEFT 0.21, Python 3.10 to 3.13, a gap of 0.01 flux,
the 2nd to 98th percentile, seed=0, about 16M logits per chunk, 0x1f, 2x2 grids.

>>> elevate_count(0.01, 1536)  # 1.20x
16
>>> timing()
13.7 ms
"""
# lambda moves by at most a factor exp(rate) per step
'''
    assert [f for t in texts(ROOT / "ok.py", legitimate) for f in measured_numbers(t)] == []

"""The ``peft-infosteer`` commands printed in the README and the guides run as written on this CPU-only machine.

Each complete command of a ``bash`` block (lines with ``...`` elide flags and are not run) runs in order in one
directory, on a tiny model: model names and paths become the tiny model's directory, the data files tiny real files,
and training gets ``--max_steps 1`` (appended: a later flag wins) so that it stays cheap. Nothing else is changed, so
a command that fails on a CPU as written (say, TRL's bf16 default) fails here.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from tiny_models import save_tiny_model_with_tokenizer

from peft_infosteer import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MODEL_NAMES = ("PATH", "BASE_DIR", "HuggingFaceTB/SmolLM2-135M-Instruct", "path/to/base")
CHEAP = ["--max_steps", "1", "--max_length", "32", "--report_to", "none", "--logging_steps", "1"]


def documented_commands() -> list[tuple[str, str]]:
    """``(page, command)`` for each complete ``peft-infosteer train|merge|flux`` command in a bash block."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.DOTALL):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                command = line.split("  #")[0].strip()
                if re.match(r"peft-infosteer (train|merge|flux)\b", command) and "..." not in command:
                    found.append((str(page.relative_to(ROOT)), command))
    return found


def _substitute(command: str, model: Path) -> list[str]:
    words = []
    for word in shlex.split(command.replace("[--load_in_4bit]", "")):
        words.append(str(model) if word in MODEL_NAMES else word)
    if words[1] == "train":
        words += CHEAP
    return words[1:]


def test_the_documented_commands_are_found():
    pages = {page for page, _ in documented_commands()}
    assert {"README.md", "docs/guides/trl-sft.md", "docs/guides/merging.md", "docs/analysis.md"} <= pages


@pytest.mark.slow
def test_documented_commands_run_as_written(tmp_path, monkeypatch, capsys):
    model = save_tiny_model_with_tokenizer(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    chats = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": "ok"}]}
        for i in range(8)
    ]
    Path("data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chats))
    Path("texts.jsonl").write_text("".join(json.dumps({"text": f"What is {i} plus {i}?"}) + "\n" for i in range(3)))
    commands = documented_commands()
    outputs = {}  # adapters the guides refer to by other names are the ones trained before them
    for page, command in commands:
        argv = _substitute(command, model)
        for name in ("SFT_LORA_DIR", "INFOSTEER_DIR"):
            argv = [outputs.get("any", name) if word == name else word for word in argv]
        if argv[0] == "merge" and not Path(argv[argv.index("--adapter") + 1]).exists():
            argv[argv.index("--adapter") + 1] = outputs["any"]  # a guide's adapter path: the last one trained
        status = cli.main(argv)
        captured = capsys.readouterr()
        assert status == 0, f"{page}: {command}\n{captured.err[-2000:]}"
        if argv[0] == "train":
            outputs["any"] = argv[argv.index("--output_dir") + 1]
    assert any(argv.startswith("peft-infosteer train") for _, argv in commands)

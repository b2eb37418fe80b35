"""Reproduce the figures of docs/analysis.md from the real SmolLM2-135M-Instruct (offline, CPU is fine).

    python docs/img/make_analysis_figures.py --work /tmp/flux-docs [--train-steps 40]

1. With ``--train-steps N`` (default 0: base model only, as in the committed figures) trains two adapters with
   ``peft-infosteer demo`` (same data, seed and LoRA): "SFT-LoRA" (``--entropy-weight 0 --intervention none``: the
   InfoSteer layer is then the identity, so this is plain LoRA SFT) and "InfoSteer" (the demo's defaults:
   ``entropy_weight=100``, ``intervention="gain"``). On a shared 2-core CPU a step takes 25-35 s.
2. Measures held-out questions with ``peft-infosteer flux``: documents of the demo's shuffled ARC-Easy /
   ARC-Challenge / SciQ pool after its first 368 documents (the demo trains on the first 240 and evaluates on the next
   16 by default), as chat examples.
3. Copies the figures into ``docs/img/`` and prints the summary tables.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import peft_infosteer  # noqa: F401
from peft_infosteer.analysis import load_reports, plot_token_heatmap
from peft_infosteer.assets import load_task_docs, mc_chat_example, smollm2_model_dir
from peft_infosteer.cli import main

IMG = Path(__file__).resolve().parent
TASKS = ("arc_easy", "arc_challenge", "sciq")  # the demo's pool and shuffle (peft_infosteer/commands/demo.py)
DEMO_USED = 368  # at least the demo's --train-examples + --eval-examples (240 + 16 by default)


def held_out_examples(n: int, seed: int = 0) -> list[dict]:
    docs = [doc for task in TASKS for doc in load_task_docs(task)]
    random.Random(seed).shuffle(docs)
    return [mc_chat_example(doc) for doc in docs[DEMO_USED : DEMO_USED + n]]


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/flux-docs"))
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--texts", type=int, default=40)
    args = parser.parse_args(argv)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    model_dir = smollm2_model_dir()

    texts = work / "heldout.jsonl"
    texts.write_text("\n".join(json.dumps(x) for x in held_out_examples(args.texts)) + "\n", encoding="utf-8")

    adapters, labels = [], ["base"]
    if args.train_steps > 0:
        for label, extra in (("SFT-LoRA", ["--entropy-weight", "0", "--intervention", "none"]), ("InfoSteer", [])):
            out = work / label
            if not (out / "adapter_config.json").is_file():
                code = main(["demo", "--output-dir", str(out), "--max-steps", str(args.train_steps), *extra])
                if code != 0:
                    return code
            adapters += ["--adapter", str(out)]
            labels.append(label)

    report_dir = work / "report"
    code = main(
        ["flux", "--model", str(model_dir), *adapters, "--labels", *labels, "--texts", str(texts),
         "--out", str(report_dir), "--show-texts", "0", "--no-progress"]
    )  # fmt: skip
    if code != 0:
        return code

    for name in ("class_flux", "class_flux_residual", "flux_vs_surprisal", "layer_profile", "class_differences"):
        if (report_dir / f"{name}.png").is_file():
            shutil.copy(report_dir / f"{name}.png", IMG / f"flux_{name}.png")
    # heatmap of the first text from the user's question on (the system prompt before it is template scaffolding)
    base = load_reports(report_dir / "report.parquet")[0]
    text = base.text(0)
    start = next(i for i, c in enumerate(text.token_classes) if c != "special")
    plot_token_heatmap(base, 0, start=max(0, start - 2), max_tokens=60, path=IMG / "flux_heatmap", formats=("png",))
    print((report_dir / "summary.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_())

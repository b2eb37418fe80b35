"""The paper's second claim, with trained adapters: does InfoSteer move flux toward content tokens, relative to SFT?

On the same held-out texts, flux per token class (content, function, punctuation, number, operator) for the base
model, LoRA SFT, InfoSteer with a fixed lambda (``infosteer-gain``, the dev sweep's choice) and InfoSteer with the
flux target (``infosteer-target``), with the surprisal control of ``peft_infosteer.analysis``: paired differences
against SFT, raw and after regressing out each token's surprisal.

The adapters are the efficacy benchmark's seed-0 trainings of those methods (``efficacy.py``: same data, LoRA, steps,
schedule); they are taken from its local cache under ``results/<name>/adapters/`` or trained again (deterministic).
The texts are test documents of the ID tasks (never trained on, never used for a choice), question + gold answer in
the layout training used (chat examples, or the plain rc layout for a tokenizer without a chat template).

    python -m benchmarks.flux_classes --model smollm2     # writes results/flux-classes/smollm2/
    python -m benchmarks.flux_classes --model gemma3
    python -m benchmarks.flux_classes --quick             # tiny run, for the tests

Efficacy options override the run's chosen settings, e.g. the flux target of the dev sweep on an older result set:

    python -m benchmarks.flux_classes --model smollm2 --gain-entropy-weight 100 \
        --target-rise 0.01 --target-start-weight 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/flux_classes.py), not with -m: resolve the relative imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from . import common  # first: sets the offline environment before transformers is imported

# isort: split
import torch

from . import efficacy, mc_eval

LABELS = {"sft": "SFT", "infosteer-gain": "InfoSteer fixed", "infosteer-target": "InfoSteer target"}
CLASSES = ("content", "function", "punctuation", "number", "operator")


def held_out_texts(runner: efficacy.Runner, args: argparse.Namespace, n: int) -> list[Any]:
    """``n`` test documents of the ID tasks, round-robin over tasks, in the layout training used.

    Chat examples (question, gold answer) where the tokenizer has a chat template; otherwise the plain rc layout of
    ``common.tokenize_chat_example`` (``"<question>\nAnswer: <answer>"``), as a text.
    """
    per_task = [runner.splits[t]["test"] for t in args.train_tasks]
    docs = [d for group in zip(*per_task) for d in group][:n]
    if getattr(runner.tokenizer, "chat_template", None) is None:
        return [f"{common.rc_prompt(mc_eval.chat_question(d['query']))} {d['choices'][d['gold']]}" for d in docs]
    return [
        [
            {"role": "user", "content": mc_eval.chat_question(d["query"])},
            {"role": "assistant", "content": d["choices"][d["gold"]]},
        ]
        for d in docs
    ]


def chosen_hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    """The efficacy run's chosen settings, with any given on the command line (e.g. ``--target-rise``) on top."""
    results = json.loads((args.out / args.name / "results.json").read_text())
    chosen = dict(results["chosen_hyperparameters"])
    efficacy.apply_overrides(chosen, args)
    if "target_rise" not in chosen:
        raise SystemExit(f"{args.name}: no flux target was chosen in this efficacy run; pass --target-rise")
    return chosen


def models(runner: efficacy.Runner, args: argparse.Namespace, chosen: dict[str, Any]):
    """(label, model) for the base model and each method's seed-0 adapter, one at a time."""
    yield "base", runner._base().eval()
    for method, label in LABELS.items():
        params = efficacy.method_params(method, chosen)
        model, _ = runner.trained_model(efficacy._point_label(params), params, args.seed, args.steps)
        yield label, model.eval()


def parse_analysis_args(
    description: str | None, argv: list[str] | None, texts: int, quick_texts: int, seed_help: str
) -> argparse.Namespace:
    """Arguments of an analysis of trained adapters: its own options on top of the efficacy benchmark's settings.

    The efficacy settings (data, LoRA, steps, ...) are those whose cached adapters the analysis reuses.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--texts", type=int, default=texts, help="held-out texts (test documents of the ID tasks)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--quick", action="store_true")
    args, rest = p.parse_known_args(argv)
    eff = efficacy.parse_args(["--model", args.model, *(["--quick"] if args.quick else []), *rest])
    for key, value in vars(args).items():
        setattr(eff, key, value)
    if args.quick:
        eff.texts, eff.n_boot = quick_texts, 50
    eff.name_out = ("quick-" if args.quick else "") + eff.name.removeprefix("quick-")
    return eff


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_analysis_args(__doc__, argv, 80, 4, "the efficacy seed whose adapters are compared")


def main(argv: list[str] | None = None) -> int:
    from peft_infosteer.analysis import compare_reports, measure_flux, plot_class_differences

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model_dir = common.resolve_model_dir(args.model)
    splits = efficacy.load_splits(list(args.train_tasks), args)
    runner = efficacy.Runner(args, model_dir, splits, args.out / args.name / "runs")
    # lambdas in the units of peft-infosteer 0.1.0, like every lambda of efficacy.py (converted by the package there)
    chosen = chosen_hyperparameters(args) if not args.quick else {"gain_entropy_weight": 10.0, "target_rise": 0.01}
    texts = held_out_texts(runner, args, args.texts)
    reports = []
    for label, model in models(runner, args, chosen):
        print(f"measuring {label}", flush=True)
        reports.append(measure_flux(model, runner.tokenizer, texts, model_name=label, batch_size=8, progress=False))
        del model
    comparison = compare_reports(reports, reference="SFT", n_boot=args.n_boot)
    out = args.out / "flux-classes" / args.name_out
    out.mkdir(parents=True, exist_ok=True)
    comparison.save_tables(out)
    plot_class_differences(comparison.differences, path=out / "class_differences", title="Flux minus SFT's flux")
    plot_class_differences(
        comparison.residual_differences,
        path=out / "class_differences_residual",
        title="Flux minus SFT's flux, after regressing out surprisal",
    )
    summary = {
        "model": args.model,
        "texts": len(texts),
        "seed": args.seed,
        "adapters": {label: efficacy.method_params(m, chosen) for m, label in LABELS.items()},
        "reference": "SFT",
        "differences": _records(comparison.differences),
        "residual_differences": _records(comparison.residual_differences),
        "content_minus_function": [
            *content_shift(comparison.tokens, "SFT", "flux", args.n_boot),
            *content_shift(comparison.tokens, "SFT", "flux_residual", args.n_boot),
        ],
        "environment": common.environment_info(args.device),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


def content_shift(tokens, reference: str, value: str, n_boot: int) -> list[dict[str, Any]]:
    """Per model: does its flux rise more on content than on function tokens, relative to ``reference``?

    Per text, the mean paired difference on content tokens minus that on function tokens; the mean over texts with a
    bootstrap interval over texts. Positive: the model moved flux toward content tokens, relative to the reference.
    """
    from peft_infosteer.analysis.stats import bootstrap_mean

    keys = ["text_id", "position"]
    ref = tokens.loc[tokens["model"] == reference, [*keys, value]]
    rows = []
    for model in tokens["model"].unique():
        if model == reference:
            continue
        joined = tokens[tokens["model"] == model].merge(ref, on=keys, suffixes=("", "_ref"))
        joined["diff"] = joined[value] - joined[f"{value}_ref"]
        per_class = joined.groupby(["text_id", "token_class"])["diff"].mean().unstack()
        contrast = (per_class["content"] - per_class["function"]).dropna()
        b = bootstrap_mean(contrast.to_numpy(), n_boot=n_boot, seed=0)
        rows.append(dict(model=model, value=value, texts=b.n, mean=b.mean, ci_low=b.low, ci_high=b.high))
    return rows


def _records(frame, classes: tuple[str, ...] = (*CLASSES, "all")) -> list[dict[str, Any]]:
    """The rows of a comparison table for ``classes``, as JSON records."""
    keep = frame[frame["token_class"].isin(list(classes))]
    return json.loads(keep.to_json(orient="records"))


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Flux per token class, against SFT: {summary['model']}",
        "",
        f"{summary['texts']} held-out texts (ID test documents, question and gold answer in the training layout), "
        f"seed-{summary['seed']} adapters of the efficacy benchmark. Paired by token, 95% bootstrap intervals over "
        "texts; `residual`: after regressing out surprisal (per model, linear).",
        "",
        "| model | class | tokens | flux - SFT | residual flux - SFT |",
        "|---|---|---|---|---|",
    ]
    residual = {(r["model"], r["token_class"]): r for r in summary["residual_differences"]}
    for r in summary["differences"]:
        res = residual.get((r["model"], r["token_class"]))
        raw = f"{r['mean_diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        adj = "" if res is None else f"{res['mean_diff']:+.4f} [{res['ci_low']:+.4f}, {res['ci_high']:+.4f}]"
        lines.append(f"| {r['model']} | {r['token_class']} | {r['n_tokens']} | {raw} | {adj} |")
    lines += [
        "",
        "Shift toward content tokens, relative to SFT: per text, (flux - SFT's) on content tokens minus the same on "
        "function tokens; mean over texts, 95% bootstrap interval over texts. Positive: toward content.",
        "",
        "| model | flux | texts | content - function shift |",
        "|---|---|---|---|",
    ]
    for r in summary["content_minus_function"]:
        kind = "raw" if r["value"] == "flux" else "surprisal residual"
        shift = f"{r['mean']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        lines.append(f"| {r['model']} | {kind} | {r['texts']} | {shift} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

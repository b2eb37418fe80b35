"""The paper's memory-specificity analysis, with trained adapters: does InfoSteer shift key usage toward specific or
general memories, compared with SFT?

Each FFN memory ``v_i`` (column ``i`` of the output projection) is read through the unembedding, ``P_i =
softmax(v_i W_U)``; its entropy ``H(P_i)`` (nats) tells a specific memory (low) from a general one (high). A token's
*usage-weighted specificity* in a layer is ``sum_i p_i H(P_i)``, ``p`` the usage distribution of its keys (the flux's
``abs`` usage); averaged over layers it is the token's value (``peft_infosteer.analysis.measure_flux(...,
specificity=True)``). Lower than SFT's: the adapter's keys lean on more specific memories.

Models: the base model, LoRA SFT, InfoSteer ``elevate`` (p = 1%, alpha = 1, the paper's intervention, no
regularizer) and the InfoSteer regularizer alone (lambda = 0.01, the paper's default, in nats summed over layers),
each with the same LoRA, data, order, steps and seed (the efficacy benchmark's recipe and training loop:
``efficacy.Runner``; adapters are cached locally under ``results/<name>/adapters/``, shared with ``efficacy.py``).
The texts are held-out ID test documents (question + gold answer in the training layout, ``flux_classes.py``).
Paired by token against SFT, 95% bootstrap intervals over texts, raw and after regressing out each token's surprisal
(``peft_infosteer.analysis.compare_reports``, the flux-by-class analysis's control).

    python -m benchmarks.specificity --model smollm2     # writes results/specificity/smollm2/
    python -m benchmarks.specificity --quick             # tiny run, for the tests
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/specificity.py), not with -m: resolve the relative imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from . import common  # first: sets the offline environment before transformers is imported

# isort: split
import torch

from . import efficacy, flux_classes

#: label -> (adapter-cache label, InfoSteer params; ``{}`` = plain LoRA SFT)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "SFT": ("sft", {}),
    "InfoSteer elevate": (
        "elevate-p0.01-a1",
        {"intervention": "elevate", "elevate_fraction": 0.01, "elevate_scale": 1.0, "entropy_weight": 0.0},
    ),
    "InfoSteer regularizer": ("entropy-w0.01", {"intervention": "none", "entropy_weight": 0.01}),
}
REFERENCE = "SFT"
CLASSES = flux_classes.CLASSES
_records = flux_classes._records


def models(runner: efficacy.Runner, args: argparse.Namespace):
    """(label, model, training record) for the base model and each method's adapter, one at a time."""
    yield "base", runner._base().eval(), None
    for label, (cache_label, params) in METHODS.items():
        model, record = runner.trained_model(cache_label, params, args.seed, args.steps)
        yield label, model.eval(), record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # the efficacy benchmark's settings, so that a cached SFT adapter of it is reused
    return flux_classes.parse_analysis_args(__doc__, argv, 100, 6, "training seed (LoRA init and data order)")


def main(argv: list[str] | None = None) -> int:
    from peft_infosteer.analysis import compare_reports, measure_flux, memory_specificity

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model_dir = common.resolve_model_dir(args.model)
    splits = efficacy.load_splits(list(args.train_tasks), args)
    runner = efficacy.Runner(args, model_dir, splits, args.out / args.name / "runs")
    texts = flux_classes.held_out_texts(runner, args, args.texts)
    reports, trainings, vocab, spread = [], {}, 0, {}
    for label, model, record in models(runner, args):
        print(f"measuring {label}", flush=True)
        vocab = int(model.get_output_embeddings().weight.shape[0])
        # how far apart memories are: the scale against which a shift of the usage-weighted mean is small or large
        entropy = torch.cat(memory_specificity(model).entropy).double()
        spread[label] = {"std": float(entropy.std()), "p5": float(entropy.quantile(0.05)), "min": float(entropy.min())}
        t0 = time.perf_counter()
        report = measure_flux(model, runner.tokenizer, texts, model_name=label, batch_size=8, specificity=True)
        reports.append(report)
        if record is not None:
            trainings[label] = {
                "train_wall_s": record["wall_s"],
                "final_task_loss": efficacy._tail_loss(record["log"]),
                "reused": record.get("reused_from"),
            }
        print(f"  measured in {time.perf_counter() - t0:.0f}s", flush=True)
        del model
    comparison = compare_reports(reports, reference=REFERENCE, n_boot=args.n_boot)
    out = args.out / "specificity" / args.name_out
    out.mkdir(parents=True, exist_ok=True)
    comparison.save_tables(out)
    summary = {
        "model": args.model,
        "texts": len(texts),
        "tokens_per_model": int((comparison.tokens["model"] == REFERENCE).sum()),
        "seed": args.seed,
        "steps": args.steps,
        "vocab_size": vocab,
        "reference": REFERENCE,
        "adapters": {label: params for label, (_, params) in METHODS.items()},
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "target_modules": "all-linear"},
        "trainings": trainings,
        "per_model": per_model(comparison),
        "memory_entropy_spread": spread,
        "differences": _records(comparison.specificity_differences),
        "residual_differences": _records(comparison.specificity_residual_differences),
        "flux_differences": _records(comparison.differences, classes=("all",)),
        "layers": json.loads(comparison.layers.to_json(orient="records")),
        "environment": common.environment_info(args.device),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(markdown(summary))
    plot(summary, out / "specificity.png")
    print(markdown(summary))
    return 0


def per_model(comparison) -> list[dict[str, Any]]:
    """Per model: mean usage-weighted specificity and mean memory entropy (all layers), and the mean flux."""
    layers = comparison.layers
    rows = []
    for model in layers["model"].unique():
        sub = layers[layers["model"] == model]
        spec = comparison.specificity_summary
        flux = comparison.summary
        rows.append(
            dict(
                model=model,
                usage_weighted_specificity=float(sub["mean_specificity"].mean()),
                memory_entropy=float(sub["memory_entropy"].mean()),
                usage_minus_memory=float((sub["mean_specificity"] - sub["memory_entropy"]).mean()),
                mean_flux=float(sub["mean_flux"].mean()),
                content_specificity=_class_value(spec, model, "content", "mean_specificity"),
                function_specificity=_class_value(spec, model, "function", "mean_specificity"),
                content_flux=_class_value(flux, model, "content", "mean_flux"),
            )
        )
    return rows


def _class_value(frame, model: str, cls: str, column: str) -> float | None:
    row = frame[(frame["model"] == model) & (frame["token_class"] == cls)]
    return float(row[column].iloc[0]) if len(row) else None


def _interval(r: dict[str, Any]) -> str:
    return f"{r['mean_diff']:+.2e} [{r['ci_low']:+.2e}, {r['ci_high']:+.2e}]"


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Memory specificity of key usage, against SFT: {summary['model']}",
        "",
        f"{summary['texts']} held-out texts ({summary['tokens_per_model']} tokens per model; ID test documents, "
        f"question and gold answer in the training layout). Adapters: seed {summary['seed']}, {summary['steps']} "
        "steps, the same LoRA, data and order for every method (efficacy recipe). Specificity: usage-weighted "
        "H(P_i) = sum_i p_i H(softmax(v_i W_U)) in nats, averaged over all layers; lower = more specific memories "
        f"(maximum log |V| = {_log(summary['vocab_size']):.3f}). Paired by token against SFT, 95% bootstrap intervals "
        "over texts; `residual`: after regressing out surprisal (per model, linear).",
        "",
        "| model | usage-weighted H (nats) | mean memory H (nats) | usage - memory | mean flux |",
        "|---|---|---|---|---|",
    ]
    for r in summary["per_model"]:
        lines.append(
            f"| {r['model']} | {r['usage_weighted_specificity']:.4f} | {r['memory_entropy']:.4f} | "
            f"{r['usage_minus_memory']:+.4f} | {r['mean_flux']:.4f} |"
        )
    lines += [
        "",
        "Spread of H(P_i) over all memories of all layers (the scale of the differences below): "
        + "; ".join(
            f"{m}: std {v['std']:.4f}, 5th percentile {v['p5']:.4f}, min {v['min']:.4f}"
            for m, v in summary["memory_entropy_spread"].items()
        )
        + ".",
    ]
    lines += [
        "",
        "| model | class | tokens | specificity - SFT (nats) | residual - SFT (nats) |",
        "|---|---|---|---|---|",
    ]
    residual = {(r["model"], r["token_class"]): r for r in summary["residual_differences"]}
    order = {c: i for i, c in enumerate(("all", *CLASSES))}
    for r in sorted(summary["differences"], key=lambda r: (r["model"], order.get(r["token_class"], 99))):
        res = residual.get((r["model"], r["token_class"]))
        lines.append(
            f"| {r['model']} | {r['token_class']} | {r['n_tokens']} | {_interval(r)} | "
            f"{'' if res is None else _interval(res)} |"
        )
    lines += ["", "Flux (H(p)/log d_ff, all layers) minus SFT's, all tokens, for context:", ""]
    lines += [f"- {r['model']}: {_interval(r)}" for r in summary["flux_differences"]]
    return "\n".join(lines) + "\n"


def _log(n: int | None) -> float:
    import math

    return math.log(n) if n else float("nan")


def plot(summary: dict[str, Any], path) -> None:
    """Left: paired difference to SFT (all tokens), raw and after the surprisal control. Right: per layer."""
    plt = common.pyplot()
    models = [r["model"] for r in summary["differences"] if r["token_class"] == "all"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 3.8), gridspec_kw={"width_ratios": [1, 1.6]})
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(["SFT", *models])}
    for kind, (rows, marker, offset) in {
        "raw": (summary["differences"], "o", -0.12),
        "surprisal residual": (summary["residual_differences"], "s", 0.12),
    }.items():
        for i, model in enumerate(models):
            (r,) = [r for r in rows if r["model"] == model and r["token_class"] == "all"]
            err = [[r["mean_diff"] - r["ci_low"]], [r["ci_high"] - r["mean_diff"]]]
            left.errorbar(i + offset, r["mean_diff"], yerr=err, fmt=marker, color=colors[model], capsize=3, ms=5,
                          label=kind if i == 0 else None, mfc="white" if kind != "raw" else colors[model])  # fmt: skip
    left.axhline(0.0, color="0.5", lw=0.8, ls="--")
    left.set_xticks(range(len(models)), [m.replace("InfoSteer ", "InfoSteer\n") for m in models], fontsize=8)
    left.set_ylabel("usage-weighted H(P_i) − SFT's (nats)", fontsize=8)
    left.set_title("All tokens, paired by token (95% CI)", fontsize=9)
    left.legend(fontsize=7, loc="best")
    left.tick_params(axis="y", labelsize=7)
    left.grid(axis="y", alpha=0.3)
    layers = summary["layers"]
    ref = {r["layer"]: r["mean_specificity"] for r in layers if r["model"] == REFERENCE}
    for model in models:
        rows = sorted((r for r in layers if r["model"] == model), key=lambda r: r["layer"])
        right.plot([r["layer"] for r in rows], [r["mean_specificity"] - ref[r["layer"]] for r in rows], "-o", ms=3,
                   color=colors[model], label=model)  # fmt: skip
    right.axhline(0.0, color="0.5", lw=0.8, ls="--")
    right.set_xlabel("layer", fontsize=8)
    right.set_ylabel("mean usage-weighted H(P_i) − SFT's (nats)", fontsize=8)
    right.set_title("Per layer", fontsize=9)
    right.legend(fontsize=7, loc="best")
    right.tick_params(labelsize=7)
    right.grid(alpha=0.3)
    fig.suptitle(f"Memory specificity of key usage vs SFT ({summary['model']}; lower = more specific)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""``peft-infosteer flux``: measure, compare and plot the information flux of a base model and its adapters.

    peft-infosteer flux --model BASE_DIR [--adapter ADAPTER_DIR ...] --texts texts.jsonl --out flux_report/

The base model is always measured (as ``base``); each ``--adapter`` adds one model, loaded on a freshly loaded base
with ``PeftModel.from_pretrained`` (any PEFT adapter: InfoSteer, LoRA, ...). ``--texts`` is JSONL with one
``{"text": ...}`` or ``{"messages": [...]}`` per line. The output directory gets the report (``report.json`` and
``report.parquet``), the tables (CSV and ``summary.md``), the figures (PNG and SVG) and one HTML page per shown text.
``--specificity`` adds the usage-weighted memory specificity (``sum_i p_i H(softmax(v_i W_U))`` per token and layer,
docs/analysis.md): its tables (``specificity_*.csv``, a section of ``summary.md``), a per-layer figure and, with
adapters, a per-class difference figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..ops import USAGE_MODES

__all__ = ["add_arguments", "run"]

_DTYPES = ("float32", "bfloat16", "float16", "auto")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``flux`` options to ``parser``."""
    parser.add_argument("--model", required=True, metavar="PATH", help="base model directory (transformers format)")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="PATH",
        help="PEFT adapter directory to compare with the base model; repeat for several",
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        default=None,
        metavar="NAME",
        help="model names in the report: one per adapter, or 'base' name first then one per adapter "
        "(default: base + each adapter directory's name)",
    )
    parser.add_argument("--texts", required=True, metavar="FILE", help='JSONL: {"text": ...} or {"messages": [...]}')
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH", help="tokenizer directory (default: --model)")
    parser.add_argument("--max-texts", type=int, default=None, help="use only the first N texts")
    parser.add_argument("--max-length", type=int, default=512, help="truncate each text to this many tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--usage", choices=USAGE_MODES, default="abs", help="usage distribution (see docs/design.md)")
    parser.add_argument("--usage-temperature", type=float, default=1.0, help="softmax temperature for --usage softmax")
    parser.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype to load the model in")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="layers averaged into a token's flux (default: all)"
    )
    parser.add_argument(
        "--show-texts", type=int, nargs="+", default=[0], metavar="ID", help="text ids for the heatmaps and HTML"
    )
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (of texts)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument(
        "--specificity",
        action="store_true",
        help="also measure the usage-weighted memory specificity sum_i p_i H(softmax(v_i W_U)) (nats) per token and "
        "layer: one pass of every memory vector through the unembedding per model",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_names(adapters: list[str], labels: list[str] | None) -> list[str]:
    names = ["base", *[Path(a).resolve().name for a in adapters]]
    if labels is not None:
        if len(labels) == len(adapters) + 1:
            names = list(labels)
        elif len(labels) == len(adapters):
            names = [names[0], *labels]
        else:
            raise ValueError(
                f"--labels needs {len(adapters)} names (one per adapter) or {len(adapters) + 1} (base first), "
                f"got {len(labels)}"
            )
    seen: dict[str, int] = {}
    unique = []
    for name in names:  # two adapters in directories of the same name
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_model_dir(path: Path) -> str:
    """Validate the base model directory and return its ``model_type`` (unsupported types fail here, cheaply)."""
    from transformers import AutoConfig

    from ..architectures import default_target_modules

    if not path.exists():
        raise FileNotFoundError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; --model must be a transformers model directory")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read the model config in {path}: {_one_line(exc)}") from None
    model_type = getattr(config, "model_type", None)
    try:
        default_target_modules(model_type)
    except ValueError as exc:
        raise ValueError(f"unsupported model {path} ({_one_line(exc)})") from None
    return str(model_type)


def _check_adapter_dir(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"adapter directory not found: {path}")
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} has no adapter_config.json; --adapter must be a PEFT adapter directory")


def _device(spec: str):
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"bad --device {spec!r}: {_one_line(exc)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but CUDA is not available")
    return device


def _load(model_dir: Path, adapter: Path | None, dtype: str, device: Any):
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot load a causal LM from {model_dir}: {_one_line(exc)}") from None
    model.to(device)
    if adapter is None:
        return model
    from peft import PeftModel

    import peft_infosteer  # noqa: F401  (registers INFOSTEER so PEFT can load InfoSteer adapters)

    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"cannot load the adapter {adapter} onto {model_dir}: {_one_line(exc)}") from None


def run(args: argparse.Namespace) -> int:
    """Run the ``flux`` subcommand; returns the exit status."""
    from ..analysis import (
        compare_reports,
        flux_html,
        measure_flux,
        plot_class_differences,
        plot_class_flux,
        plot_flux_vs_surprisal,
        plot_layer_profile,
        plot_token_heatmap,
        read_examples,
        save_reports,
    )

    model_dir = Path(args.model)
    adapters = [Path(a) for a in args.adapter]
    _check_model_dir(model_dir)
    for adapter in adapters:
        _check_adapter_dir(adapter)
    names = _model_names([str(a) for a in adapters], args.labels)
    examples = read_examples(args.texts)
    if args.max_texts is not None:
        if args.max_texts < 1:
            raise ValueError(f"--max-texts must be >= 1, got {args.max_texts}")
        examples = examples[: args.max_texts]
    bad = [i for i in args.show_texts if not 0 <= i < len(examples)]
    if bad:
        raise ValueError(f"--show-texts {bad} out of range: {len(examples)} texts, ids 0..{len(examples) - 1}")
    device = _device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else model_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot load a tokenizer from {tokenizer_dir}: {_one_line(exc)}") from None

    reports = []
    candidates: list[Path | None] = [None, *adapters]
    for name, candidate in zip(names, candidates):
        model = _load(model_dir, candidate, args.dtype, device)
        reports.append(
            measure_flux(
                model,
                tokenizer,
                examples,
                model_name=name,
                batch_size=args.batch_size,
                max_length=args.max_length,
                usage=args.usage,
                usage_temperature=args.usage_temperature,
                progress=not args.no_progress,
                specificity=args.specificity,
            )
        )
        adapter_path = str(candidate) if candidate else None
        reports[-1].metadata.update({"model_path": str(model_dir), "adapter_path": adapter_path})
        del model

    comparison = compare_reports(reports, reference=names[0], layers=args.layers, n_boot=args.n_boot, seed=args.seed)
    written = [save_reports(reports, out / "report.json")]
    try:
        written.append(save_reports(reports, out / "report.parquet"))
    except ImportError:
        pass  # pyarrow missing: the JSON report has everything
    written += comparison.save_tables(out)
    figures = {
        "class_flux": lambda p: plot_class_flux(comparison.summary, path=p),
        "class_flux_residual": lambda p: plot_class_flux(
            comparison.residual_summary,
            value="mean_residual",
            title="Flux per class after regressing out surprisal (error bars: bootstrap CI)",
            path=p,
        ),
        "flux_vs_surprisal": lambda p: plot_flux_vs_surprisal(comparison.tokens, seed=args.seed, path=p),
        "layer_profile": lambda p: plot_layer_profile(comparison.layers, path=p),
    }
    if len(reports) > 1:
        figures["class_differences"] = lambda p: plot_class_differences(comparison.differences, path=p)
    if comparison.specificity_differences is not None:
        figures["specificity_layers"] = lambda p: plot_layer_profile(
            comparison.layers, value="mean_specificity", path=p
        )
        if len(reports) > 1:
            figures["specificity_differences"] = lambda p: plot_class_differences(
                comparison.specificity_differences, value="specificity (nats)", path=p
            )
    for stem, make in figures.items():
        make(out / stem)
        written += [out / f"{stem}.png", out / f"{stem}.svg"]
    for text_id in args.show_texts:
        for report in reports:
            heatmap = out / f"heatmap_text{text_id}_{_safe(report.model)}"
            plot_token_heatmap(report, text_id, path=heatmap)
            written += [heatmap.with_suffix(".png"), heatmap.with_suffix(".svg")]
        page = out / f"text{text_id}.html"
        flux_html(reports, text_id, layers=args.layers, path=page)
        written.append(page)

    means = {r.model: round(r.mean_flux(), 4) for r in reports}
    print(f"mean flux (all tokens and layers): {json.dumps(means)}")
    if comparison.specificity_differences is not None:
        layers = comparison.layers
        spec = {m: round(float(layers.loc[layers["model"] == m, "mean_specificity"].mean()), 4) for m in names}
        print(f"usage-weighted memory specificity (nats, mean over layers; lower = more specific): {json.dumps(spec)}")
    print(f"wrote {len(written)} files to {out}/ (summary: {out / 'summary.md'})")
    return 0


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)

"""Compare the flux of the same texts under several models (e.g. base, SFT-LoRA, InfoSteer) in one report.

Differences are paired by token: every model saw the same token ids, so each token contributes
``flux(model) - flux(reference)`` and the bootstrap resamples texts of these paired differences. The predictability
control is in the same report: the correlation of flux with surprisal per model, and class means of the flux left
after regressing out surprisal (:func:`peft_infosteer.analysis.stats.add_surprisal_residuals`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .report import FluxReport, _check_unique_names
from .stats import (
    _class_order,
    add_surprisal_residuals,
    bootstrap_mean,
    class_summary,
    surprisal_correlation,
    token_table,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FluxComparison", "class_differences", "compare_reports"]


def _check_same_tokens(reports: Sequence[FluxReport]) -> None:
    first = reports[0]
    for other in reports[1:]:
        ids_a = [t.token_ids for t in first.texts]
        ids_b = [t.token_ids for t in other.texts]
        if ids_a != ids_b:
            raise ValueError(
                f"models {first.model!r} and {other.model!r} saw different token ids; a paired comparison needs the "
                "same texts and the same tokenizer"
            )


def class_differences(
    tokens: pd.DataFrame,
    reference: str,
    value: str = "flux",
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Per model and class: mean of ``value(model) - value(reference)`` paired by token, with a text bootstrap CI.

    Columns: ``model, reference, token_class, n_tokens, n_texts, mean_diff, ci_low, ci_high``; ``"all"`` rows pool
    every class.

    >>> # class_differences(token_table([base, steered]), reference="base")
    """
    import pandas as pd

    if reference not in set(tokens["model"]):
        models = list(tokens["model"].unique())
        raise ValueError(f"reference model {reference!r} is not in the table (models: {models})")
    keys = ["text_id", "position"]
    ref = tokens.loc[tokens["model"] == reference, [*keys, value, "token_id"]]
    rows = []
    for model in tokens["model"].unique():
        if model == reference:
            continue
        cur = tokens[tokens["model"] == model]
        joined = cur.merge(ref, on=keys, how="inner", suffixes=("", "_ref"))
        if len(joined) != len(cur) or (joined["token_id"] != joined["token_id_ref"]).any():
            raise ValueError(f"models {model!r} and {reference!r} saw different tokens; cannot pair them")
        joined["diff"] = joined[value] - joined[f"{value}_ref"]
        for cls in ["all", *_class_order(joined["token_class"].unique())]:
            part = joined if cls == "all" else joined[joined["token_class"] == cls]
            b = bootstrap_mean(
                part["diff"].to_numpy(), part["text_id"].to_numpy(), n_boot=n_boot, confidence=confidence, seed=seed
            )
            rows.append(
                dict(model=model, reference=reference, token_class=cls, n_tokens=b.n,
                     n_texts=int(part["text_id"].nunique()), mean_diff=b.mean, ci_low=b.low, ci_high=b.high)
            )  # fmt: skip
    return pd.DataFrame(rows)


@dataclass
class FluxComparison:
    """Everything the comparison report shows; each table is a pandas DataFrame.

    - ``tokens``: one row per (model, text, token) with ``flux`` (mean over layers), ``surprisal``, ``flux_residual``.
    - ``summary``: mean flux per model and class with bootstrap CI (and the class's mean surprisal).
    - ``differences``: per class, ``model - reference`` paired by token, with bootstrap CI.
    - ``correlations``: Pearson/Spearman of flux with surprisal per model, and the fitted line.
    - ``residual_summary`` / ``residual_differences``: the same after regressing out surprisal.
    - ``layers``: mean flux per model and layer; with the specificity measured, also ``mean_specificity`` (the
      usage-weighted memory specificity, nats) and ``memory_entropy`` (the unweighted mean ``H(P_i)`` of the layer).
    - ``specificity_summary`` / ``specificity_differences`` / ``specificity_residual_differences``: the class means,
      paired differences, and paired differences after regressing out surprisal, of the usage-weighted memory
      specificity (``None`` unless every report was measured with ``specificity=True``).
    """

    reports: list[FluxReport]
    reference: str
    tokens: pd.DataFrame
    summary: pd.DataFrame
    differences: pd.DataFrame
    correlations: pd.DataFrame
    residual_summary: pd.DataFrame
    residual_differences: pd.DataFrame
    layers: pd.DataFrame
    settings: dict
    specificity_summary: pd.DataFrame | None = None
    specificity_differences: pd.DataFrame | None = None
    specificity_residual_differences: pd.DataFrame | None = None

    def to_markdown(self) -> str:
        """The report as Markdown: settings, then each table."""
        s = self.settings
        n_tokens = int((self.tokens["model"] == self.reference).sum())
        lines = [
            "# Information-flux report",
            "",
            f"Models: {', '.join(r.model for r in self.reports)} (reference: {self.reference}). "
            f"Texts: {len(self.reports[0].texts)}. Tokens per model: {n_tokens}"
            f"{' (position 0 of each text left out)' if s['drop_first'] else ''}.",
            f"Flux: H(p)/log(d_ff) of the FFN key usage distribution (usage={self.reports[0].usage!r}), averaged over "
            f"{s['layers_desc']}; in [0, 1]. Surprisal: -log p(token | prefix) in nats.",
            f"Intervals: {int(s['confidence'] * 100)}% percentile bootstrap, {s['n_boot']} resamples of "
            f"{s['unit']}s, seed {s['seed']}. Residuals: flux minus a degree-{s['degree']} polynomial fit on "
            "surprisal, per model, fitted on all tokens but chat-template scaffolding (class 'special').",
            "",
            "## Mean flux per token class",
            "",
            _markdown_table(self.summary),
        ]
        if len(self.differences):
            lines += ["", f"## Difference to {self.reference} (paired by token)", "", _markdown_table(self.differences)]
        lines += [
            "",
            "## Predictability control: flux vs surprisal (chat-template tokens left out)",
            "",
            _markdown_table(self.correlations),
            "",
            "## Flux residual per class (surprisal regressed out)",
            "",
            _markdown_table(self.residual_summary),
        ]
        if len(self.residual_differences):
            lines += [
                "",
                f"## Residual difference to {self.reference} (paired by token)",
                "",
                _markdown_table(self.residual_differences),
            ]
        if self.specificity_summary is not None:
            lines += [
                "",
                "## Usage-weighted memory specificity per token class",
                "",
                "sum_i p_i H(P_i) in nats, P_i = softmax(v_i W_U) of memory v_i, p the key usage; lower = the keys "
                "lean on more specific memories.",
                "",
                _markdown_table(self.specificity_summary),
            ]
        for title, table in (
            (f"Specificity difference to {self.reference} (paired by token)", self.specificity_differences),
            (
                f"Specificity difference to {self.reference} after regressing out surprisal (paired by token)",
                self.specificity_residual_differences,
            ),
        ):
            if table is not None and len(table):
                lines += ["", f"## {title}", "", _markdown_table(table)]
        return "\n".join(lines) + "\n"

    def save_tables(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write each table as CSV and the whole report as ``summary.md`` into ``out_dir``; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name in ("summary", "differences", "correlations", "residual_summary", "residual_differences", "layers",
                     "specificity_summary", "specificity_differences", "specificity_residual_differences"):  # fmt: skip
            table = getattr(self, name)
            if table is None:
                continue
            path = out / f"{name}.csv"
            table.to_csv(path, index=False)
            written.append(path)
        md = out / "summary.md"
        md.write_text(self.to_markdown(), encoding="utf-8")
        written.append(md)
        return written


def compare_reports(
    reports: FluxReport | Sequence[FluxReport],
    reference: str | None = None,
    *,
    layers: Sequence[int] | None = None,
    drop_first: bool = True,
    unit: str = "text",
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    degree: int = 1,
) -> FluxComparison:
    """Build the comparison report of one or more models measured on the same texts.

    ``reference`` (default: the first report) is what the differences are taken against. ``layers`` selects the
    layers averaged into a token's flux (all by default). See :func:`~peft_infosteer.analysis.stats.token_table`
    for ``drop_first`` and :mod:`peft_infosteer.analysis.stats` for the bootstrap ``unit``.

    >>> # comparison = compare_reports([base, sft, steered], reference="base")
    >>> # print(comparison.to_markdown())
    """
    import pandas as pd

    reports = [reports] if isinstance(reports, FluxReport) else list(reports)
    if not reports:
        raise ValueError("no reports to compare")
    _check_unique_names(reports)
    names = [r.model for r in reports]
    reference = names[0] if reference is None else reference
    if reference not in names:
        raise ValueError(f"reference {reference!r} is not one of the models {names}")
    _check_same_tokens(reports)
    tokens = add_surprisal_residuals(token_table(reports, layers=layers, drop_first=drop_first), degree=degree)
    # every interval of the report uses the same bootstrap
    boot: dict[str, Any] = dict(n_boot=n_boot, confidence=confidence, seed=seed)
    summary = class_summary(tokens, unit=unit, **boot).rename(columns={"mean": "mean_flux"})
    residual = class_summary(tokens, "flux_residual", unit=unit, **boot).rename(columns={"mean": "mean_residual"})
    residual = residual.drop(columns=["mean_surprisal"])
    # paired differences are always resampled by text, whatever `unit` says for the per-model means
    differences = class_differences(tokens, reference, **boot)
    residual_differences = class_differences(tokens, reference, "flux_residual", **boot)
    with_specificity = all(r.has_specificity for r in reports)
    layer_rows = []
    for r in reports:
        start = 1 if drop_first else 0
        means = _layer_means([t.flux[start:] for t in r.texts], r.num_layers)
        spec = _layer_means([t.specificity[start:] for t in r.texts if t.specificity is not None], r.num_layers)
        for i, name in enumerate(r.layer_names):
            row = dict(model=r.model, layer=i, layer_name=name, mean_flux=float(means[i]))
            if with_specificity:
                row["mean_specificity"] = float(spec[i])
                row["memory_entropy"] = float(r.memory_entropy[i]) if r.memory_entropy else np.nan
            layer_rows.append(row)
    spec_tables: dict[str, pd.DataFrame] = {}
    if with_specificity:
        tokens = add_surprisal_residuals(tokens, degree=degree, value="specificity")
        spec_tables["specificity_summary"] = class_summary(tokens, "specificity", unit=unit, **boot).rename(
            columns={"mean": "mean_specificity"}
        )
        spec_tables["specificity_differences"] = class_differences(tokens, reference, "specificity", **boot)
        spec_tables["specificity_residual_differences"] = class_differences(
            tokens, reference, "specificity_residual", **boot
        )
    layer_desc = "all layers" if layers is None else f"layers {list(layers)}"
    return FluxComparison(
        reports=reports,
        reference=reference,
        tokens=tokens,
        summary=summary,
        differences=differences,
        correlations=surprisal_correlation(tokens),
        residual_summary=residual,
        residual_differences=residual_differences,
        layers=pd.DataFrame(layer_rows),
        settings=dict(layers_desc=layer_desc, drop_first=drop_first, unit=unit, degree=degree, **boot),
        specificity_summary=spec_tables.get("specificity_summary"),
        specificity_differences=spec_tables.get("specificity_differences"),
        specificity_residual_differences=spec_tables.get("specificity_residual_differences"),
    )


def _layer_means(arrays: Sequence[np.ndarray], num_layers: int) -> np.ndarray:
    """Mean over the rows of all ``(T, L)`` arrays per layer, NaNs skipped (NaN for a layer without values)."""
    stacked = np.concatenate(list(arrays), axis=0) if arrays else np.empty((0, num_layers))
    with np.errstate(all="ignore"):
        if not stacked.size:
            return np.full(num_layers, np.nan)
        counts = np.isfinite(stacked).sum(axis=0)
        return np.where(counts > 0, np.nansum(stacked, axis=0) / np.maximum(counts, 1), np.nan)


def _format(value: object) -> str:
    if isinstance(value, (float, np.floating)):
        return "nan" if not np.isfinite(value) else f"{value:.4f}"
    return str(value).replace("|", "\\|")


def _markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no ``tabulate`` dependency)."""
    if df.empty:
        return "_(empty)_"
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_format(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])

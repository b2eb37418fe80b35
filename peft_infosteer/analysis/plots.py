"""Matplotlib figures of flux reports, written as PNG and SVG.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``), never ``pyplot``: no GUI backend is
needed or selected, and a notebook's backend is left alone. Every function returns the figure and, with ``path``,
writes it in each of ``formats`` (``path``'s suffix is replaced).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .report import FluxReport
from .tokens import TOKEN_CLASSES, display_token

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "FLUX_LABEL",
    "plot_class_differences",
    "plot_class_flux",
    "plot_flux_vs_surprisal",
    "plot_layer_profile",
    "plot_token_heatmap",
    "save_figure",
]

FLUX_LABEL = "information flux H(p) / log d_ff  (0–1, unitless)"
_FORMATS = ("png", "svg")


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _text(label: str) -> str:
    # a pair of "$" would switch matplotlib into math mode
    return label.replace("$", r"\$")


def _shown_classes(table: pd.DataFrame, min_tokens: int, extra: Sequence[str] = ()) -> tuple[list[str], str]:
    """Classes with at least ``min_tokens`` tokens (for every model), in plot order, and an x-label naming the rest."""
    counts = table.groupby("token_class")["n_tokens"].min()
    present = [*extra, *[c for c in TOKEN_CLASSES if c in counts.index]]
    present += sorted(set(counts.index) - set(present))
    shown = [c for c in present if counts.get(c, min_tokens) >= min_tokens]
    hidden = [f"{c} (n={int(counts[c])})" for c in present if c not in shown]
    label = "token class" + (f"   [fewer than {min_tokens} tokens, not shown: {', '.join(hidden)}]" if hidden else "")
    return shown, label


def _model_colors(models: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(models)}


def save_figure(fig: Figure, path: str | os.PathLike, formats: Sequence[str] = _FORMATS, dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``path`` with each suffix in ``formats``; returns the written paths.

    >>> # save_figure(plot_token_heatmap(report), "out/heatmap")  # out/heatmap.png, out/heatmap.svg
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        target = path.with_suffix("." + fmt.lstrip("."))
        fig.savefig(target, dpi=dpi)
        written.append(target)
    return written


def _maybe_save(fig: Figure, path: str | os.PathLike | None, formats: Sequence[str]) -> Figure:
    if path is not None:
        save_figure(fig, path, formats)
    return fig


def plot_token_heatmap(
    report: FluxReport,
    text_id: int = 0,
    *,
    start: int = 0,
    max_tokens: int = 80,
    path: str | os.PathLike | None = None,
    formats: Sequence[str] = _FORMATS,
) -> Figure:
    """Heatmap of one text's flux: tokens (rows, in reading order) by layers (columns).

    Shows tokens ``start`` to ``start + max_tokens``. The colour range is the 1st to 99th percentile of the shown
    values, leaving out position 0 (an attention sink whose flux is often far from the rest); values outside it
    saturate, as the arrow ends of the colour bar mark.

    >>> # plot_token_heatmap(report, text_id=0, path="out/heatmap")
    """
    text = report.text(text_id)
    stop = min(text.num_tokens, start + max_tokens)
    values = text.flux[start:stop]
    labels = [f"{display_token(tok)[:18]}  {pos:>3}" for pos, tok in zip(range(start, stop), text.tokens[start:stop])]
    n_tok, n_layers = values.shape
    scale_values = text.flux[max(start, 1) : stop] if stop - max(start, 1) > 0 else values
    finite = scale_values[np.isfinite(scale_values)]
    vmin, vmax = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    if vmax <= vmin:
        vmin, vmax = vmin - 1e-3, vmax + 1e-3

    fig = _figure(width=max(5.5, 2.6 + 0.22 * n_layers), height=1.6 + 0.19 * n_tok)
    ax = fig.add_subplot()
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(n_tok), [_text(label) for label in labels], fontsize=7, fontfamily="monospace")
    step = 1 if n_layers <= 16 else 2 if n_layers <= 32 else 4
    ax.set_xticks(range(0, n_layers, step), [str(i) for i in range(0, n_layers, step)], fontsize=7)
    ax.set_xlabel("layer (FFN output projection)", fontsize=8)
    ax.set_ylabel("token (position)", fontsize=8)
    shown = f"tokens {start}–{stop - 1} of {text.num_tokens}"
    ax.set_title(_text(f"{report.model}: flux per token and layer\ntext {text_id}, {shown}"), fontsize=9)
    bar = fig.colorbar(image, ax=ax, extend="both", shrink=min(1.0, 12 / max(n_tok, 1) + 0.3))
    bar.set_label(FLUX_LABEL, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return _maybe_save(fig, path, formats)


def plot_class_flux(
    summary: pd.DataFrame,
    *,
    value: str = "mean_flux",
    ylabel: str | None = None,
    title: str = "Mean flux per token class (error bars: bootstrap CI)",
    min_tokens: int = 5,
    path: str | os.PathLike | None = None,
    formats: Sequence[str] = _FORMATS,
) -> Figure:
    """Dot-and-whisker plot of a class summary: one colour per model, bootstrap intervals as error bars.

    Takes :attr:`FluxComparison.summary` (``value="mean_flux"``) or :attr:`FluxComparison.residual_summary`
    (``value="mean_residual"``). Points, not bars: the flux of all classes is far from zero, and bars would have to
    start at an arbitrary baseline. Classes with fewer than ``min_tokens`` tokens are left out (the x-axis label
    names them): their intervals say nothing and their points would set the scale.

    >>> # plot_class_flux(comparison.summary, path="out/class_flux")
    """
    models = list(dict.fromkeys(summary["model"]))
    classes, xlabel = _shown_classes(summary, min_tokens)
    colors = _model_colors(models)
    fig = _figure(width=max(5.5, 1.0 + 0.9 * len(classes)), height=3.8)
    ax = fig.add_subplot()
    width = 0.7 / max(len(models), 1)
    for m_index, model in enumerate(models):
        sub = summary[summary["model"] == model].set_index("token_class")
        xs, ys, lows, highs = [], [], [], []
        for c_index, cls in enumerate(classes):
            if cls not in sub.index or not np.isfinite(sub.loc[cls, value]):
                continue
            xs.append(c_index + (m_index - (len(models) - 1) / 2) * width)
            ys.append(sub.loc[cls, value])
            lows.append(sub.loc[cls, value] - sub.loc[cls, "ci_low"])
            highs.append(sub.loc[cls, "ci_high"] - sub.loc[cls, value])
        ax.errorbar(xs, ys, yerr=[lows, highs], fmt="o", ms=5, capsize=3, color=colors[model], label=_text(model))
    counts = summary.groupby("token_class")["n_tokens"].max()
    ax.set_xticks(range(len(classes)), [f"{c}\n(n={int(counts.get(c, 0))})" for c in classes], fontsize=8)
    ax.set_xlabel(xlabel, fontsize=8)
    if value == "mean_residual":
        ax.axhline(0.0, color="0.5", lw=0.8, ls="--")
    default_label = "mean " + FLUX_LABEL if value == "mean_flux" else "flux residual after surprisal fit  (unitless)"
    ax.set_ylabel(ylabel or default_label, fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="model", fontsize=8, title_fontsize=8, loc="best")
    return _maybe_save(fig, path, formats)


def plot_class_differences(
    differences: pd.DataFrame,
    *,
    title: str | None = None,
    min_tokens: int = 5,
    value: str = "flux",
    path: str | os.PathLike | None = None,
    formats: Sequence[str] = _FORMATS,
) -> Figure:
    """Per-class flux difference to the reference model (paired by token) with bootstrap intervals.

    Classes with fewer than ``min_tokens`` tokens are left out, as in :func:`plot_class_flux`. ``value`` names the
    quantity in the axis label (e.g. ``"specificity (nats)"`` for :attr:`FluxComparison.specificity_differences`).

    >>> # plot_class_differences(comparison.differences, path="out/differences")
    """
    models = list(dict.fromkeys(differences["model"]))
    reference = differences["reference"].iloc[0] if len(differences) else "reference"
    classes, xlabel = _shown_classes(differences[differences["token_class"] != "all"], min_tokens, extra=["all"])
    colors = _model_colors([reference, *models])
    fig = _figure(width=max(5.5, 1.0 + 0.9 * len(classes)), height=3.6)
    ax = fig.add_subplot()
    width = 0.7 / max(len(models), 1)
    for m_index, model in enumerate(models):
        sub = differences[differences["model"] == model].set_index("token_class")
        xs: list[float] = []
        ys: list[float] = []
        err: list[list[float]] = [[], []]
        for c_index, cls in enumerate(classes):
            if cls not in sub.index or not np.isfinite(sub.loc[cls, "mean_diff"]):
                continue
            xs.append(c_index + (m_index - (len(models) - 1) / 2) * width)
            ys.append(sub.loc[cls, "mean_diff"])
            err[0].append(sub.loc[cls, "mean_diff"] - sub.loc[cls, "ci_low"])
            err[1].append(sub.loc[cls, "ci_high"] - sub.loc[cls, "mean_diff"])
        ax.errorbar(xs, ys, yerr=err, fmt="o", ms=5, capsize=3, color=colors[model], label=_text(model))
    ax.axhline(0.0, color="0.5", lw=0.8, ls="--")
    ax.set_xticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(_text(f"{value} − {value}({reference})  (paired by token)"), fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(
        _text(title or f"{value[:1].upper()}{value[1:]} difference to {reference} per token class"), fontsize=10
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="model", fontsize=8, title_fontsize=8, loc="best")
    return _maybe_save(fig, path, formats)


def plot_flux_vs_surprisal(
    tokens: pd.DataFrame,
    *,
    max_points: int = 3000,
    bins: int = 12,
    seed: int = 0,
    exclude_classes: Sequence[str] = ("special",),
    path: str | os.PathLike | None = None,
    formats: Sequence[str] = _FORMATS,
) -> Figure:
    """Scatter of token flux (mean over layers) against surprisal, one colour per model, with binned means.

    Each model shows at most ``max_points`` randomly drawn tokens (seeded); the line is the mean flux in ``bins``
    equal-count surprisal bins over all its tokens. Tokens of ``exclude_classes`` (chat-template scaffolding, which
    repeats verbatim in every example) are left out, as in the correlation table.

    >>> # plot_flux_vs_surprisal(comparison.tokens, path="out/flux_vs_surprisal")
    """
    data = tokens[
        tokens["flux"].notna() & tokens["surprisal"].notna() & ~tokens["token_class"].isin(list(exclude_classes))
    ]
    models = list(dict.fromkeys(tokens["model"]))
    colors = _model_colors(models)
    rng = np.random.default_rng(seed)
    fig = _figure(width=6.0, height=4.2)
    ax = fig.add_subplot()
    for model in models:
        sub = data[data["model"] == model]
        if sub.empty:
            continue
        shown = sub if len(sub) <= max_points else sub.iloc[rng.choice(len(sub), max_points, replace=False)]
        ax.scatter(shown["surprisal"], shown["flux"], s=6, alpha=0.25, color=colors[model], linewidths=0)
        edges = np.unique(np.quantile(sub["surprisal"], np.linspace(0, 1, bins + 1)))
        if edges.size >= 2:
            which = np.clip(np.searchsorted(edges, sub["surprisal"], side="right") - 1, 0, edges.size - 2)
            grouped = sub.groupby(which)
            ax.plot(grouped["surprisal"].mean(), grouped["flux"].mean(), "-o", ms=3, lw=1.5, color=colors[model],
                    label=_text(f"{model} (n={len(sub)})"))  # fmt: skip
    ax.set_xlabel("surprisal −log p(token | prefix)  (nats)", fontsize=8)
    ax.set_ylabel(FLUX_LABEL + ", mean over layers", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title("Flux vs surprisal (dots: tokens; lines: binned means)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title="model", fontsize=8, title_fontsize=8, loc="best")
    return _maybe_save(fig, path, formats)


def plot_layer_profile(
    layers: pd.DataFrame,
    *,
    value: str = "mean_flux",
    path: str | os.PathLike | None = None,
    formats: Sequence[str] = _FORMATS,
) -> Figure:
    """Mean flux per layer, one line per model (takes :attr:`FluxComparison.layers`).

    ``value="mean_specificity"`` plots the usage-weighted memory specificity instead (reports measured with it).

    >>> # plot_layer_profile(comparison.layers, path="out/layers")
    """
    if value not in layers.columns:
        raise ValueError(f"the layer table has no column {value!r} (columns: {list(layers.columns)})")
    models = list(dict.fromkeys(layers["model"]))
    colors = _model_colors(models)
    fig = _figure(width=6.0, height=3.6)
    ax = fig.add_subplot()
    for model in models:
        sub = layers[layers["model"] == model].sort_values("layer")
        ax.plot(sub["layer"], sub[value], "-o", ms=3, color=colors[model], label=_text(model))
    specificity = value == "mean_specificity"
    ax.set_xlabel("layer (FFN output projection)", fontsize=8)
    ax.set_ylabel(_text("usage-weighted H(P_i) (nats)") if specificity else "mean " + FLUX_LABEL, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title("Usage-weighted memory specificity per layer" if specificity else "Mean flux per layer", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title="model", fontsize=8, title_fontsize=8, loc="best")
    return _maybe_save(fig, path, formats)

"""Statistics on flux reports: per-token tables, class means with bootstrap intervals, the surprisal control.

Resampling unit. Tokens of one text are not independent (they share a topic, a style, a position profile), so by
default the bootstrap resamples *texts* with replacement (a cluster bootstrap) and recomputes the mean over all tokens
of the drawn texts. ``unit="token"`` resamples tokens instead; its intervals are narrower and too optimistic when
texts differ. Intervals are percentile intervals from a seeded ``numpy.random.default_rng``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .report import FluxReport
from .tokens import TOKEN_CLASSES

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "FIT_EXCLUDED_CLASSES",
    "Bootstrap",
    "add_surprisal_residuals",
    "bootstrap_mean",
    "class_summary",
    "surprisal_correlation",
    "token_table",
]


@dataclass(frozen=True)
class Bootstrap:
    """A mean and its bootstrap percentile interval."""

    mean: float
    low: float
    high: float
    n: int
    n_groups: int


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[int] | np.ndarray | None = None,
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Bootstrap:
    """Mean of ``values`` with a bootstrap percentile interval; NaNs are dropped.

    With ``groups`` (e.g. the text id of each token) whole groups are resampled and the mean is taken over all values
    of the drawn groups; without, single values are resampled. The same ``seed`` gives the same interval.

    >>> b = bootstrap_mean([1.0, 2.0, 3.0, 4.0], seed=0)
    >>> b.mean, b.low <= b.mean <= b.high
    (2.5, True)
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    x = np.asarray(values, dtype=np.float64)
    g = np.arange(x.size) if groups is None else np.asarray(groups)
    if g.shape != x.shape:
        raise ValueError(f"groups has shape {g.shape}, values {x.shape}")
    keep = np.isfinite(x)
    x, g = x[keep], g[keep]
    if x.size == 0:
        return Bootstrap(math.nan, math.nan, math.nan, 0, 0)
    _, inverse = np.unique(g, return_inverse=True)
    sums = np.bincount(inverse, weights=x)
    counts = np.bincount(inverse).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, sums.size, size=(n_boot, sums.size))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Bootstrap(float(x.mean()), float(low), float(high), int(x.size), int(sums.size))


def token_table(
    reports: FluxReport | Sequence[FluxReport],
    layers: Sequence[int] | None = None,
    drop_first: bool = True,
) -> pd.DataFrame:
    """One row per (model, text, token): ``flux`` averaged over ``layers`` (all by default), surprisal and class.

    ``specificity`` is the usage-weighted memory specificity averaged over the same layers (NaN when a report was
    measured without it).

    ``drop_first`` leaves out position 0 of every text: it has no surprisal, and the first position of a causal LM
    is an attention sink whose activations are unlike any other token's.

    >>> # token_table([base, steered]).groupby(["model", "token_class"]).flux.mean()
    """
    import pandas as pd

    if isinstance(reports, FluxReport):
        reports = [reports]
    frames = []
    for report in reports:
        bad = [i for i in (layers or []) if not 0 <= i < report.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: {report.model!r} has {report.num_layers} layers")
        for t in report.texts:
            start = 1 if drop_first else 0
            frames.append(
                pd.DataFrame(
                    {
                        "model": report.model,
                        "text_id": t.text_id,
                        "position": np.arange(start, t.num_tokens),
                        "token_id": np.asarray(t.token_ids[start:], dtype=np.int64),
                        "token": t.tokens[start:],
                        "token_class": t.token_classes[start:],
                        "flux": t.token_flux(layers)[start:].astype(np.float64),
                        "surprisal": t.surprisal[start:].astype(np.float64),
                        "specificity": t.token_specificity(layers)[start:].astype(np.float64),
                    }
                )
            )
    if not frames:
        raise ValueError("no tokens to analyse")
    return pd.concat(frames, ignore_index=True)


def _class_order(present: Sequence[str]) -> list[str]:
    known = [c for c in TOKEN_CLASSES if c in set(present)]
    return known + sorted(set(present) - set(known))


def class_summary(
    tokens: pd.DataFrame,
    value: str = "flux",
    *,
    unit: str = "text",
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean of ``value`` per model and token class with a bootstrap interval (see the module docstring for ``unit``).

    Columns: ``model, token_class, n_tokens, n_texts, mean, ci_low, ci_high, mean_surprisal``.

    >>> # class_summary(token_table(report))
    """
    import pandas as pd

    if unit not in ("text", "token"):
        raise ValueError(f"unit must be 'text' or 'token', got {unit!r}")
    rows = []
    for model in tokens["model"].unique():
        sub = tokens[tokens["model"] == model]
        for cls in _class_order(sub["token_class"].unique()):
            part = sub[sub["token_class"] == cls]
            groups = part["text_id"].to_numpy() if unit == "text" else None
            b = bootstrap_mean(part[value].to_numpy(), groups, n_boot=n_boot, confidence=confidence, seed=seed)
            rows.append(
                {
                    "model": model,
                    "token_class": cls,
                    "n_tokens": b.n,
                    "n_texts": int(part["text_id"].nunique()),
                    "mean": b.mean,
                    "ci_low": b.low,
                    "ci_high": b.high,
                    "mean_surprisal": float(part["surprisal"].mean()),  # pandas skips NaN
                }
            )
    return pd.DataFrame(rows)


#: Classes left out of the surprisal fit and correlation: chat-template scaffolding repeats verbatim in every example
#: (often a third or more of all tokens) and would dominate both.
FIT_EXCLUDED_CLASSES: tuple[str, ...] = ("special",)


def _fit_mask(tokens: pd.DataFrame, model: str, exclude_classes: Sequence[str], value: str = "flux") -> pd.Series:
    if value not in tokens.columns:
        raise ValueError(f"the token table has no column {value!r} (columns: {list(tokens.columns)})")
    return (
        (tokens["model"] == model)
        & tokens[value].notna()
        & tokens["surprisal"].notna()
        & ~tokens["token_class"].isin(list(exclude_classes))
    )


def surprisal_correlation(
    tokens: pd.DataFrame, exclude_classes: Sequence[str] = FIT_EXCLUDED_CLASSES, value: str = "flux"
) -> pd.DataFrame:
    """Per model: Pearson and Spearman correlation of token ``value`` (flux) with surprisal, and the least-squares line.

    Columns: ``model, n_tokens, pearson, spearman, slope, intercept`` (slope in ``value`` per nat). Tokens of
    ``exclude_classes`` (chat-template scaffolding by default) are left out.

    >>> # surprisal_correlation(token_table([base, steered]))
    """
    import pandas as pd

    rows = []
    for model in tokens["model"].unique():
        sub = tokens[_fit_mask(tokens, model, exclude_classes, value)]
        x, y = sub["surprisal"].to_numpy(), sub[value].to_numpy()
        if len(sub) < 3 or np.std(x) == 0 or np.std(y) == 0:
            rows.append(dict(model=model, n_tokens=len(sub), pearson=math.nan, spearman=math.nan,
                             slope=math.nan, intercept=math.nan))  # fmt: skip
            continue
        slope, intercept = np.polyfit(x, y, 1)
        rows.append(
            dict(
                model=model,
                n_tokens=len(sub),
                pearson=float(np.corrcoef(x, y)[0, 1]),
                spearman=float(sub["surprisal"].rank().corr(sub[value].rank())),
                slope=float(slope),
                intercept=float(intercept),
            )
        )
    return pd.DataFrame(rows)


def add_surprisal_residuals(
    tokens: pd.DataFrame,
    degree: int = 1,
    exclude_classes: Sequence[str] = FIT_EXCLUDED_CLASSES,
    value: str = "flux",
) -> pd.DataFrame:
    """Add ``<value>_residual``: ``value`` (flux by default) minus a degree-``degree`` polynomial fit of it on
    surprisal, per model.

    The fit is pooled over the token classes of one model (all but ``exclude_classes``, which still get residuals
    from that fit), so a class whose residual mean is above zero gets more flux than its tokens' predictability
    alone would give. Tokens without surprisal get NaN. ``value="specificity"`` gives the same control for the
    usage-weighted memory specificity (``specificity_residual``).

    >>> import pandas as pd
    >>> t = pd.DataFrame(dict(model="m", token_class="content", surprisal=[1.0, 2.0, 3.0], flux=[0.1, 0.3, 0.2]))
    >>> [round(float(r), 3) for r in add_surprisal_residuals(t)["flux_residual"]]
    [-0.05, 0.1, -0.05]
    """
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    column = f"{value}_residual"
    out = tokens.copy()
    out[column] = np.nan
    for model in out["model"].unique():
        fit = _fit_mask(out, model, exclude_classes, value)
        if fit.sum() <= degree:
            continue
        coef = np.polyfit(out.loc[fit, "surprisal"].to_numpy(), out.loc[fit, value].to_numpy(), degree)
        valid = (out["model"] == model) & out[value].notna() & out["surprisal"].notna()
        out.loc[valid, column] = out.loc[valid, value] - np.polyval(coef, out.loc[valid, "surprisal"])
    return out

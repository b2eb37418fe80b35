"""A self-contained HTML view of one text, its tokens coloured by flux (inline CSS; no script, no external files)."""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .report import FluxReport

__all__ = ["flux_html"]

# ColorBrewer YlOrRd, light (low flux) to dark (high flux)
_PALETTE = ((255, 255, 204), (254, 217, 118), (253, 141, 60), (227, 26, 28), (128, 0, 38))

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin-top: 1.6em; }
.text { font-family: ui-monospace, monospace; font-size: 0.95em; line-height: 2.0; white-space: pre-wrap; }
.tok { border-radius: 3px; padding: 1px 0; }
.tok:hover { outline: 2px solid #1f77b4; }
.nan { background: #eee; color: #888; }
.legend { display: flex; align-items: center; gap: 0.6em; font-size: 0.85em; margin: 0.8em 0; }
.bar { width: 14em; height: 0.9em; border: 1px solid #999; background: linear-gradient(to right, %s); }
.note { font-size: 0.85em; color: #555; }
"""


def _color(x: float) -> tuple[int, int, int]:
    x = min(max(x, 0.0), 1.0) * (len(_PALETTE) - 1)
    i = min(int(x), len(_PALETTE) - 2)
    f = x - i
    a, b = _PALETTE[i], _PALETTE[i + 1]
    return tuple(round(a[c] + (b[c] - a[c]) * f) for c in range(3))  # type: ignore[return-value]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def flux_html(
    reports: FluxReport | Sequence[FluxReport],
    text_id: int = 0,
    *,
    layers: Sequence[int] | None = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> str:
    """HTML page showing text ``text_id`` once per model, each token's background coloured by its flux.

    A token's flux is the mean over ``layers`` (all by default). All models share one colour scale: the 2nd to 98th
    percentile of the shown values (position 0, an attention sink, left out), so colours are comparable across models.
    Hovering a token shows its flux, surprisal (nats), class and position. With ``path`` the page is also written.

    >>> # flux_html([base, steered], text_id=3, path="out/text3.html")
    """
    reports = [reports] if isinstance(reports, FluxReport) else list(reports)
    texts = [r.text(text_id) for r in reports]
    token_flux = [t.token_flux(layers) for t in texts]
    scale = np.concatenate([f[1:] if f.size > 1 else f for f in token_flux])
    scale = scale[np.isfinite(scale)]
    low, high = np.percentile(scale, [2, 98]) if scale.size else (0.0, 1.0)
    if high <= low:
        low, high = low - 1e-3, high + 1e-3
    gradient = ", ".join(_hex(c) for c in _PALETTE)
    layer_desc = "all layers" if layers is None else f"layers {', '.join(str(i) for i in layers)}"
    heading = title or f"Information flux, text {text_id}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(heading)}</title>",
        f"<style>{_CSS % gradient}</style></head><body>",
        f"<h1>{html.escape(heading)}</h1>",
        '<div class="legend"><span>flux '
        + _fmt(low, 3)
        + '</span><span class="bar"></span><span>'
        + _fmt(high, 3)
        + "</span></div>",
        '<p class="note">Background: information flux H(p)/log d<sub>ff</sub> of the FFN key vector (0&ndash;1, '
        f"unitless), mean over {html.escape(layer_desc)}; darker = more memories used. Colour scale shared by all "
        "models (2nd&ndash;98th percentile; values outside saturate). Hover a token for its values. "
        "Grey: no value.</p>",
    ]
    for report, text, flux in zip(reports, texts, token_flux):
        parts.append(f"<h2>{html.escape(report.model)}</h2>")
        spans = []
        for pos, (tok, cls, value, surprisal) in enumerate(zip(text.tokens, text.token_classes, flux, text.surprisal)):
            tip = (
                f"pos {pos} | {cls} | flux {_fmt(float(value))} | surprisal {_fmt(float(surprisal), 2)} "
                f"{report.surprisal_unit}"
            )
            shown = html.escape(tok).replace("\n", "↵\n")
            if not math.isfinite(float(value)):
                spans.append(f'<span class="tok nan" title="{html.escape(tip)}">{shown}</span>')
                continue
            x = (float(value) - low) / (high - low)
            rgb = _color(x)
            ink = "#fff" if x > 0.7 else "#000"
            style = f"background:{_hex(rgb)};color:{ink}"
            spans.append(f'<span class="tok" style="{style}" title="{html.escape(tip)}">{shown}</span>')
        parts.append('<div class="text">' + "".join(spans) + "</div>")
    parts.append("</body></html>")
    page = "\n".join(parts) + "\n"
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    return page

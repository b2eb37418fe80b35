"""The result of a flux measurement: per text, per token, per layer flux, token strings, classes and surprisal.

:class:`FluxReport` holds one model's measurement. It converts to a long pandas DataFrame (one row per text, token
position and layer) and saves to / loads from JSON or Parquet; :func:`save_reports` / :func:`load_reports` keep
several models in one file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DATAFRAME_COLUMNS", "FluxReport", "TextFlux", "load_reports", "reports_to_dataframe", "save_reports"]

FORMAT = "peft-infosteer-flux"
FORMAT_VERSION = 1

#: Columns of :meth:`FluxReport.to_dataframe`, one row per (model, text, token position, layer).
DATAFRAME_COLUMNS: tuple[str, ...] = (
    "model",
    "text_id",
    "position",
    "token_id",
    "token",
    "token_class",
    "layer",
    "layer_name",
    "flux",
    "surprisal",
    "specificity",
)


@dataclass
class TextFlux:
    """Flux of one text through one model.

    ``flux[t, l]`` is the information flux (docs/design.md, section 1; in ``[0, 1]``) of the FFN key vector at token
    position ``t`` in layer ``l``; NaN where it is undefined (a key vector of zeros). ``surprisal[t]`` is
    ``-log p(token_t | tokens_<t)`` in nats; NaN at position 0, which has no prefix. ``specificity[t, l]``, when
    measured (``measure_flux(..., specificity=True)``; else ``None``), is the usage-weighted memory specificity
    ``sum_i p_i H(P_i)`` in nats: the entropy ``H(P_i)`` of each memory's vocabulary distribution
    (:func:`~peft_infosteer.analysis.memory_specificity`) averaged with the token's key usage ``p``; lower means
    the token's keys lean on more specific memories. NaN where the flux is.
    """

    text_id: int
    text: str
    token_ids: list[int]
    tokens: list[str]
    token_classes: list[str]
    flux: np.ndarray
    surprisal: np.ndarray
    specificity: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.flux = np.asarray(self.flux, dtype=np.float32)
        self.surprisal = np.asarray(self.surprisal, dtype=np.float32)
        n = len(self.token_ids)
        if self.flux.ndim != 2 or self.flux.shape[0] != n:
            raise ValueError(f"text {self.text_id}: flux must have shape ({n} tokens, layers), got {self.flux.shape}")
        if self.specificity is not None:
            self.specificity = np.asarray(self.specificity, dtype=np.float32)
            if self.specificity.shape != self.flux.shape:
                raise ValueError(
                    f"text {self.text_id}: specificity must have the shape of flux {self.flux.shape}, "
                    f"got {self.specificity.shape}"
                )
        if not (len(self.tokens) == len(self.token_classes) == self.surprisal.shape[0] == n):
            raise ValueError(f"text {self.text_id}: tokens, classes and surprisal must all have {n} entries")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def token_flux(self, layers: Sequence[int] | None = None) -> np.ndarray:
        """Flux per token averaged over ``layers`` (all by default); NaN where no layer has a value.

        >>> t = TextFlux(0, "a b", [5, 6], ["a", " b"], ["content"] * 2, np.array([[0.2, 0.4], [0.6, 0.8]]),
        ...              np.array([np.nan, 1.0]))
        >>> [round(float(x), 2) for x in t.token_flux()]
        [0.3, 0.7]
        """
        return _layer_mean(self.flux, layers)

    def token_specificity(self, layers: Sequence[int] | None = None) -> np.ndarray:
        """Usage-weighted specificity per token averaged over ``layers``; all NaN when it was not measured.

        >>> t = TextFlux(0, "a", [5], ["a"], ["content"], np.array([[0.2, 0.4]]), np.array([np.nan]),
        ...              specificity=np.array([[3.0, 5.0]]))
        >>> [float(x) for x in t.token_specificity()], [float(x) for x in t.token_specificity([1])]
        ([4.0], [5.0])
        """
        if self.specificity is None:
            return np.full(self.num_tokens, np.nan, dtype=np.float32)
        return _layer_mean(self.specificity, layers)


def _layer_mean(array: np.ndarray, layers: Sequence[int] | None) -> np.ndarray:
    values = array if layers is None else array[:, list(layers)]
    with np.errstate(all="ignore"):
        counts = np.isfinite(values).sum(axis=1)
        sums = np.nansum(values, axis=1)
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)


@dataclass
class FluxReport:
    """Flux of a list of texts through one model (see :func:`peft_infosteer.analysis.measure_flux`).

    >>> # report = measure_flux(model, tokenizer, ["The cat sat on the mat."], model_name="base")
    >>> # report.to_dataframe().groupby("token_class").flux.mean()
    """

    model: str
    layer_names: list[str]
    texts: list[TextFlux]
    usage: str = "abs"
    usage_temperature: float = 1.0
    surprisal_unit: str = "nats"
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Per layer, the mean ``H(P_i)`` over all memories (nats), when the specificity was measured; else ``None``.
    memory_entropy: list[float] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def has_specificity(self) -> bool:
        """Whether every text has the usage-weighted memory specificity (``measure_flux(..., specificity=True)``)."""
        return bool(self.texts) and all(t.specificity is not None for t in self.texts)

    def text(self, text_id: int) -> TextFlux:
        """The :class:`TextFlux` with this ``text_id``."""
        for t in self.texts:
            if t.text_id == text_id:
                return t
        raise KeyError(f"no text with text_id={text_id} in report {self.model!r}")

    def mean_flux(self) -> float:
        """Mean flux over all texts, tokens and layers (NaNs skipped)."""
        values = np.concatenate([t.flux.ravel() for t in self.texts]) if self.texts else np.array([])
        return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: one row per (text, token position, layer), columns :data:`DATAFRAME_COLUMNS`."""
        import pandas as pd

        frames = []
        num_layers = self.num_layers
        for t in self.texts:
            n = t.num_tokens
            frames.append(
                pd.DataFrame(
                    {
                        "model": self.model,
                        "text_id": np.full(n * num_layers, t.text_id, dtype=np.int64),
                        "position": np.repeat(np.arange(n, dtype=np.int64), num_layers),
                        "token_id": np.repeat(np.asarray(t.token_ids, dtype=np.int64), num_layers),
                        "token": np.repeat(np.asarray(t.tokens, dtype=object), num_layers),
                        "token_class": np.repeat(np.asarray(t.token_classes, dtype=object), num_layers),
                        "layer": np.tile(np.arange(num_layers, dtype=np.int64), n),
                        "layer_name": np.tile(np.asarray(self.layer_names, dtype=object), n),
                        "flux": t.flux.reshape(-1),
                        "surprisal": np.repeat(t.surprisal, num_layers),
                        "specificity": (
                            np.full(n * num_layers, np.nan, dtype=np.float32)
                            if t.specificity is None
                            else t.specificity.reshape(-1)
                        ),
                    }
                )
            )
        if not frames:
            return pd.DataFrame({c: [] for c in DATAFRAME_COLUMNS})
        return pd.concat(frames, ignore_index=True)[list(DATAFRAME_COLUMNS)]

    # ---- serialisation -------------------------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "layer_names": list(self.layer_names),
            "usage": self.usage,
            "usage_temperature": self.usage_temperature,
            "surprisal_unit": self.surprisal_unit,
            "metadata": self.metadata,
            "memory_entropy": self.memory_entropy,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN written as ``null``)."""
        texts = [
            {
                "text_id": t.text_id,
                "text": t.text,
                "token_ids": list(t.token_ids),
                "tokens": list(t.tokens),
                "token_classes": list(t.token_classes),
                "flux": [[_json_float(v) for v in row] for row in t.flux.tolist()],
                "surprisal": [_json_float(v) for v in t.surprisal.tolist()],
                **(
                    {}
                    if t.specificity is None
                    else {"specificity": [[_json_float(v) for v in row] for row in t.specificity.tolist()]}
                ),
            }
            for t in self.texts
        ]
        return {**self._meta(), "texts": texts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FluxReport:
        """Inverse of :meth:`to_dict`."""
        num_layers = len(data["layer_names"])
        texts = [
            TextFlux(
                text_id=int(t["text_id"]),
                text=t["text"],
                token_ids=[int(i) for i in t["token_ids"]],
                tokens=list(t["tokens"]),
                token_classes=list(t["token_classes"]),
                flux=_layer_array(t["flux"], num_layers),
                surprisal=np.array([math.nan if v is None else v for v in t["surprisal"]], dtype=np.float32),
                specificity=_layer_array(t["specificity"], num_layers) if "specificity" in t else None,
            )
            for t in data["texts"]
        ]
        return cls._from_meta(data, texts)

    @classmethod
    def _from_meta(cls, meta: dict[str, Any], texts: list[TextFlux]) -> FluxReport:
        """Inverse of :meth:`_meta`, given the texts (the JSON and the Parquet form store them differently)."""
        return cls(
            model=meta["model"],
            layer_names=list(meta["layer_names"]),
            texts=texts,
            usage=meta.get("usage", "abs"),
            usage_temperature=float(meta.get("usage_temperature", 1.0)),
            surprisal_unit=meta.get("surprisal_unit", "nats"),
            metadata=dict(meta.get("metadata") or {}),
            memory_entropy=meta.get("memory_entropy"),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write this report to ``path`` (``.json`` or ``.parquet``, chosen by the suffix).

        >>> # report.save("flux/base.parquet"); FluxReport.load("flux/base.parquet")
        """
        return save_reports([self], path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FluxReport:
        """Read a report written by :meth:`save` (a file with exactly one model)."""
        reports = load_reports(path)
        if len(reports) != 1:
            names = [r.model for r in reports]
            raise ValueError(f"{path} holds {len(reports)} models {names}; use load_reports() to read them all")
        return reports[0]


def _layer_array(rows: list[list[float | None]], num_layers: int) -> np.ndarray:
    return np.array([[math.nan if v is None else v for v in row] for row in rows], dtype=np.float32).reshape(
        -1, num_layers
    )


def _json_float(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


def reports_to_dataframe(reports: Sequence[FluxReport]) -> pd.DataFrame:
    """The long DataFrames of several reports, stacked (the ``model`` column tells them apart)."""
    import pandas as pd

    _check_unique_names(reports)
    frames = [r.to_dataframe() for r in reports]
    return pd.concat(frames, ignore_index=True) if frames else FluxReport("", [], []).to_dataframe()


def _check_unique_names(reports: Sequence[FluxReport]) -> None:
    names = [r.model for r in reports]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".parquet"):
        raise ValueError(f"report files must end in .json or .parquet, got {path.name!r}")
    return suffix


def save_reports(reports: Sequence[FluxReport], path: str | os.PathLike) -> Path:
    """Write several reports to one ``.json`` or ``.parquet`` file.

    Parquet stores the long DataFrame, with each report's metadata (layer names, texts, units) in the file's schema
    metadata so that :func:`load_reports` restores the reports exactly.

    >>> # save_reports([base, steered], "flux/report.parquet")
    """
    path = Path(path)
    suffix = _suffix(path)
    _check_unique_names(reports)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        payload = {"format": FORMAT, "version": FORMAT_VERSION, "reports": [r.to_dict() for r in reports]}
        path.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(reports_to_dataframe(reports), preserve_index=False)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "reports": [{**r._meta(), "texts": {str(t.text_id): t.text for t in r.texts}} for r in reports],
    }
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[FORMAT.encode()] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    pq.write_table(table.replace_schema_metadata(schema_meta), path)
    return path


def load_reports(path: str | os.PathLike) -> list[FluxReport]:
    """Read the reports written by :func:`save_reports` or :meth:`FluxReport.save`."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"flux report not found: {path}")
    if suffix == ".json":
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not a peft-infosteer flux report")
        return [FluxReport.from_dict(r) for r in payload["reports"]]
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(FORMAT.encode())
    if raw is None:
        raise ValueError(f"{path} is not a peft-infosteer flux report (no {FORMAT!r} metadata)")
    meta = json.loads(raw.decode("utf-8"))
    df = table.to_pandas()
    return [_report_from_frame(df[df["model"] == m["model"]], m) for m in meta["reports"]]


def _report_from_frame(df: pd.DataFrame, meta: dict[str, Any]) -> FluxReport:
    num_layers = len(meta["layer_names"])
    # measured iff the model's report carried a memory entropy; the column is NaN otherwise (older files: absent)
    has_specificity = meta.get("memory_entropy") is not None and "specificity" in df.columns
    texts = []
    for text_id, group in df.sort_values(["text_id", "position", "layer"]).groupby("text_id", sort=True):
        tokens = group[group["layer"] == 0]
        texts.append(
            TextFlux(
                text_id=int(text_id),
                text=meta["texts"].get(str(int(text_id)), ""),
                token_ids=tokens["token_id"].astype(int).tolist(),
                tokens=tokens["token"].tolist(),
                token_classes=tokens["token_class"].tolist(),
                flux=group["flux"].to_numpy(dtype=np.float32).reshape(-1, num_layers),
                surprisal=tokens["surprisal"].to_numpy(dtype=np.float32),
                specificity=(
                    group["specificity"].to_numpy(dtype=np.float32).reshape(-1, num_layers) if has_specificity else None
                ),
            )
        )
    return FluxReport._from_meta(meta, texts)

"""Statistics of the benchmarks: mean/std over seeds and paired bootstrap differences over test documents (efficacy),
median and interquartile range of per-repeat ratios (overhead)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["bits", "mean_std", "median_iqr", "paired_differences", "paired_ratios"]


def bits(text: str) -> list[int]:
    """Per-document correctness stored as a string of ``0``/``1``.

    >>> bits("0110")
    [0, 1, 1, 0]
    """
    return [int(c) for c in text]


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value) of the values that are not ``None``.

    >>> mean_std([0.5, 0.7])["std"] > 0
    True
    """
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "n": 0, "values": []}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals), "values": vals}


def median_iqr(values: Sequence[float]) -> dict[str, float]:
    """Median, interquartile range, minimum and count of ``values``.

    >>> median_iqr([1.0, 2.0, 3.0, 4.0, 5.0])
    {'median': 3.0, 'q1': 2.0, 'q3': 4.0, 'min': 1.0, 'n': 5}
    """
    q1, med, q3 = np.quantile(values, [0.25, 0.5, 0.75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(min(values)), "n": len(values)}


def paired_ratios(times: dict[str, list[float]], baseline: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per-repeat ratio of each entry of ``times`` to its baseline's time in the same repeat, summarised.

    Entries that are their own baseline (or have none) are left out.

    >>> paired_ratios({"lora": [2.0, 4.0], "gain": [2.2, 4.0]}, {"gain": "lora"})["gain"]["median"]
    1.05
    """
    return {
        name: median_iqr([t / b for t, b in zip(values, times[baseline[name]])])
        for name, values in times.items()
        if baseline.get(name, name) != name
    }


def paired_differences(
    correct: dict[str, tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]]],
    groups: dict[str, Sequence[str]],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Paired accuracy difference (method minus baseline) per task and averaged over task groups, with bootstrap CIs.

    ``correct[task] = (method, baseline)``, each a list over seeds of 0/1 correctness on the *same* test documents in
    the same order. The point estimate is the mean over seeds and documents of ``method - baseline``. The interval
    resamples the test documents of each task with replacement (the same resample for every seed and for both
    methods, i.e. paired over documents and pooled over seeds) and takes percentiles of the resampled mean
    difference. A group value is the unweighted mean of its tasks' differences, resampling each task independently.
    The interval reflects which documents happen to be in the test set; the seed-to-seed spread is reported
    separately as ``seed_std`` (the std of the per-seed differences).

    >>> out = paired_differences({"t": ([[1, 1, 0, 1]], [[1, 0, 0, 1]])}, {"all": ["t"]}, n_boot=200)
    >>> out["t"]["diff"]
    0.25
    """
    rng = np.random.default_rng(seed)
    alpha = (1 - level) / 2
    out: dict[str, dict[str, Any]] = {}
    boots: dict[str, np.ndarray] = {}
    points: dict[str, float] = {}
    seed_diffs: dict[str, np.ndarray] = {}
    for task, (method, baseline) in correct.items():
        m = np.asarray(method, dtype=np.float64)
        b = np.asarray(baseline, dtype=np.float64)
        if m.shape != b.shape or m.ndim != 2:
            raise ValueError(f"{task}: method and baseline must be (seeds, docs) arrays of the same shape")
        d = m - b
        per_doc = d.mean(axis=0)  # averaged over seeds
        idx = rng.integers(0, d.shape[1], size=(n_boot, d.shape[1]))
        boots[task] = per_doc[idx].mean(axis=1)
        points[task] = float(per_doc.mean())
        seed_diffs[task] = d.mean(axis=1)
        out[task] = _entry(points[task], boots[task], seed_diffs[task], alpha)
        out[task]["n_docs"] = int(d.shape[1])
    for name, tasks in groups.items():
        tasks = [t for t in tasks if t in correct]
        if not tasks:
            continue
        point = float(np.mean([points[t] for t in tasks]))
        boot = np.mean([boots[t] for t in tasks], axis=0)
        sd = np.mean([seed_diffs[t] for t in tasks], axis=0)
        out[f"mean_{name}"] = _entry(point, boot, sd, alpha)
    return out


def _entry(point: float, boot: np.ndarray, seed_diffs: np.ndarray, alpha: float) -> dict[str, Any]:
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    # two-sided bootstrap p-value of "no difference" (how often the resampled mean lands on the other side of 0)
    p = 2 * min(float(np.mean(boot <= 0)), float(np.mean(boot >= 0)))
    return {
        "diff": point,
        "ci_low": float(low),
        "ci_high": float(high),
        "p_boot": min(1.0, p),
        "seed_diffs": [float(x) for x in seed_diffs],
        "seed_std": float(np.std(seed_diffs, ddof=1)) if len(seed_diffs) > 1 else 0.0,
    }

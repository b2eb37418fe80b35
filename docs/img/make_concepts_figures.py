"""Make the figure of docs/concepts.md from real key coefficients of SmolLM2-135M-Instruct (offline, CPU, seconds).

    python docs/img/make_concepts_figures.py

It reads the key vector ``k`` that enters ``down_proj`` of one middle layer for one token of a real sentence (the
real model from ``peft_infosteer.assets``; a seeded heavy-tailed synthetic vector if the asset is not installed), and
plots, with the package's own functions:

1. the usage distribution ``p`` (sorted) and what ``flatten`` makes of it for a few strengths ``alpha``;
2. the information flux as ``alpha`` goes from 0 to 1, for that token and for every token of the sentence;
3. the direction of the regularizer's gradient: ``dF/d|k_i| * S log d = -log p_i - H`` against ``p_i``.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from peft_infosteer.ops import flatten_keys, information_flux, usage_distribution

OUT = Path(__file__).resolve().parent / "concepts_flatten_and_gradient.png"
SENTENCE = "Plants absorb water through their roots, and the leaves release it as vapour."
LAYER = 15


def real_keys() -> tuple[torch.Tensor, str]:
    """Key vectors (tokens x d_ff) entering down_proj of layer LAYER, and a label for the figure."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from peft_infosteer.assets import smollm2_model_dir

        path = smollm2_model_dir()
    except Exception:  # the asset package is optional; fall back to a reproducible synthetic vector
        g = torch.Generator().manual_seed(0)
        k = torch.distributions.Laplace(0.0, 1.0).sample((16, 1536)) * torch.rand(16, 1536, generator=g) ** 3
        return k, "synthetic heavy-tailed keys (d_ff = 1536)"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    captured = {}
    proj = model.model.layers[LAYER].mlp.down_proj
    handle = proj.register_forward_pre_hook(lambda _m, args: captured.setdefault("k", args[0][0].detach()))
    with torch.no_grad():
        model(**tok(SENTENCE, return_tensors="pt"))
    handle.remove()
    k = captured["k"][1:]  # position 0 is an attention sink, unlike every other token
    return k, f"SmolLM2-135M-Instruct, layer {LAYER} down_proj input (d_ff = {k.shape[-1]})"


def main() -> None:
    keys, label = real_keys()
    flux = information_flux(keys)
    token = int(flux.argmin())  # the least spread-out token: flatten has the most to do there
    k = keys[token]
    d = k.shape[-1]
    alphas = (0.0, 0.1, 0.3, 0.6)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for alpha in alphas:
        p = usage_distribution(flatten_keys(k, alpha)).sort(descending=True).values
        f = float(information_flux(flatten_keys(k, alpha)))
        ax.plot(range(1, d + 1), p.numpy(), label=f"alpha = {alpha:g}  (F = {f:.3f})")
    ax.axhline(1 / d, color="grey", ls="--", lw=1, label="uniform 1/d_ff (F = 1)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("memory rank (sorted by usage)")
    ax.set_ylabel("usage p_i")
    ax.set_title("flatten: p' = (1 - alpha) p + alpha / d_ff", fontsize=10)
    ax.legend(fontsize=8)

    ax = axes[1]
    grid = torch.linspace(0, 1, 41)
    per_alpha = torch.stack([information_flux(flatten_keys(keys, float(a))) for a in grid])  # alpha x tokens
    ax.plot(grid.numpy(), per_alpha.numpy(), color="tab:blue", alpha=0.25, lw=1)
    ax.plot(grid.numpy(), per_alpha[:, token].numpy(), color="tab:red", lw=2, label="token of the left panel")
    ax.plot([], [], color="tab:blue", alpha=0.5, label="every other token of the sentence")
    ax.set_xlabel("flatten_strength alpha")
    ax.set_ylabel("information flux F = H(p) / log d_ff")
    ax.set_ylim(top=1.005)
    ax.set_title("flatten raises flux for every non-uniform p", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[2]
    p = usage_distribution(k)
    h = -(p[p > 0] * p[p > 0].log()).sum()
    nz = p > 0
    direction = -p[nz].log() - h  # dF/d|k_i| times S log d_ff
    ax.scatter(p[nz].numpy(), direction.numpy(), s=4, alpha=0.5)
    ax.axhline(0, color="grey", lw=1)
    ax.axvline(math.exp(-float(h)), color="tab:red", ls="--", lw=1, label="p_i = exp(-H): no push")
    ax.set_xscale("log")
    ax.set_xlabel("usage p_i")
    ax.set_ylabel("dF/d|k_i| x S log d_ff = -log p_i - H")
    ax.set_title("regularizer: rare memories grow, dominant ones shrink", fontsize=10)
    ax.legend(fontsize=8)

    fig.suptitle(f"InfoSteer on real keys: {label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}; token {token}: flux {float(flux[token]):.4f}, sentence mean {float(flux.mean()):.4f}")


if __name__ == "__main__":
    main()

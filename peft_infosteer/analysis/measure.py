"""Measure per-token, per-layer information flux and surprisal of texts under a causal LM.

Works on any supported causal LM: a plain transformers model, a LoRA ``PeftModel`` or an InfoSteer ``PeftModel``
(the flux is then the flux of ``k'``, the keys after the intervention). The model is left exactly as it was: hooks are
removed and each module's train/eval mode is restored, even when the forward raises.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..ops import USAGE_MODES, fused_information_flux, usage_distribution
from .hooks import find_key_modules, input_device, merged_gain_warning, model_unchanged, read_keys
from .inputs import EncodedText, Example, encode_examples
from .memory import memory_specificity
from .report import FluxReport, TextFlux
from .tokens import classify_tokens, token_strings

__all__ = ["measure_flux", "surprisal_from_logits"]

# log-softmax over the vocabulary is taken in row chunks of about this many float32 elements
_LOGIT_CHUNK = 1 << 24


def surprisal_from_logits(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``-log p(token_t | tokens_<t)`` in nats for one sequence: ``logits`` ``(T, V)``, ``token_ids`` ``(T,)``.

    Position 0 has no prediction and gets NaN. Computed in float32, in chunks of positions.

    >>> surprisal_from_logits(torch.zeros(3, 4), torch.tensor([0, 1, 2]))
    tensor([   nan, 1.3863, 1.3863])
    """
    n = token_ids.shape[0]
    out = torch.full((n,), math.nan, dtype=torch.float32, device=logits.device)
    step = max(1, _LOGIT_CHUNK // max(logits.shape[-1], 1))
    for start in range(0, n - 1, step):
        stop = min(n - 1, start + step)
        rows = logits[start:stop].float()
        targets = token_ids[start + 1 : stop + 1].to(rows.device)
        picked = rows.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        out[start + 1 : stop + 1] = torch.logsumexp(rows, dim=-1) - picked
    return out


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _default_name(model: nn.Module) -> str:
    path = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    return os.path.basename(path.rstrip("/")) or "model"


def measure_flux(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    model_name: str | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    usage: str = "abs",
    usage_temperature: float = 1.0,
    target_modules: str | Sequence[str] | None = None,
    progress: bool = False,
    specificity: bool = False,
) -> FluxReport:
    """Run ``examples`` through ``model`` and record, for every token and FFN layer, the information flux.

    ``examples`` are texts or chat examples (lists of ``{"role", "content"}`` messages, rendered with the tokenizer's
    chat template), or JSONL-style dicts with ``"text"`` or ``"messages"``. They are run in batches of
    ``batch_size``, right-padded, on the device of the model's input embeddings, under ``torch.no_grad`` and in eval
    mode. The flux is ``H(p) / log d_ff`` of the key vector that reaches each FFN output projection, computed with
    :func:`peft_infosteer.ops.fused_information_flux` in float32 with the given ``usage`` mode; each token's surprisal
    under the model is recorded too, in nats.

    With ``specificity=True`` each token and layer also gets the usage-weighted memory specificity
    ``sum_i p_i H(P_i)`` in nats (``TextFlux.specificity``; ``p`` the same usage distribution as the flux, ``H(P_i)``
    from :func:`~peft_infosteer.analysis.memory_specificity`, computed once per call), and the report gets each
    layer's unweighted mean ``H(P_i)`` (``FluxReport.memory_entropy``). It costs one pass of every memory vector
    through the unembedding.

    >>> import peft_infosteer
    >>> from peft_infosteer.analysis import measure_flux
    >>> # report = measure_flux(model, tokenizer, ["The cat sat on the mat."], model_name="base")
    >>> # report.texts[0].flux.shape -> (num_tokens, num_layers)
    """
    if usage not in USAGE_MODES:
        raise ValueError(f"usage must be one of {USAGE_MODES}, got {usage!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    modules = find_key_modules(model, target_modules)
    encoded = encode_examples(tokenizer, examples, max_length=max_length)
    note = merged_gain_warning(model)
    if note:
        warnings.warn(note, UserWarning, stacklevel=2)
    name = model_name or _default_name(model)
    device = input_device(model)
    pad_id = _pad_id(tokenizer)
    entropy: list[torch.Tensor] | None = None
    memory_entropy: list[float] | None = None
    if specificity:
        spec = memory_specificity(model, target_modules=target_modules)
        entropy, memory_entropy = spec.entropy, spec.layer_means()

    # longest first, so that batches hold texts of similar length (less padding); results go back in input order
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].token_ids))
    results: dict[int, TextFlux] = {}
    bar = _progress(len(encoded), name, progress)
    try:
        with model_unchanged(model):
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                flux, surprisal, spec_rows = _run_batch(
                    model, [encoded[i] for i in batch], modules, device, pad_id, usage, usage_temperature, entropy
                )
                for row, index in enumerate(batch):
                    results[index] = _text_flux(
                        tokenizer, index, encoded[index], flux[row], surprisal[row], spec_rows[row]
                    )
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return FluxReport(
        model=name,
        layer_names=[n for n, _ in modules],
        texts=[results[i] for i in range(len(encoded))],
        usage=usage,
        usage_temperature=float(usage_temperature),
        surprisal_unit="nats",
        memory_entropy=memory_entropy,
    )


def _progress(total: int, name: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"flux {name}", unit="text")


def _run_batch(
    model: nn.Module,
    batch: Sequence[EncodedText],
    modules: Sequence[tuple[str, nn.Module]],
    device: torch.device,
    pad_id: int,
    usage: str,
    temperature: float,
    entropy: Sequence[torch.Tensor] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray | None]]:
    """Flux ``(T_i, L)``, surprisal ``(T_i,)`` and (with ``entropy``, the ``H(P_i)`` of each layer) usage-weighted
    specificity ``(T_i, L)`` arrays for each text of one right-padded batch."""
    lengths = [len(e.token_ids) for e in batch]
    width = max(lengths)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        input_ids[row, : lengths[row]] = torch.tensor(e.token_ids, dtype=torch.long)
        attention_mask[row, : lengths[row]] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    per_layer: dict[int, torch.Tensor] = {}
    per_layer_spec: dict[int, torch.Tensor] = {}

    def on_keys(layer: int, k: torch.Tensor) -> None:
        if layer in per_layer:
            raise RuntimeError(f"FFN layer {modules[layer][0]} ran twice in one forward; pass target_modules")
        if k.shape[:-1] != input_ids.shape:
            if k.numel() // k.shape[-1] != input_ids.numel():
                raise RuntimeError(f"unexpected key shape {tuple(k.shape)} in {modules[layer][0]}")
            k = k.reshape(*input_ids.shape, k.shape[-1])
        flux, valid = fused_information_flux(k, usage, temperature)
        per_layer[layer] = torch.where(valid, flux, torch.full_like(flux, math.nan)).cpu()
        if entropy is not None:
            h = entropy[layer].to(k.device)
            if h.shape[0] != k.shape[-1]:
                raise RuntimeError(f"{modules[layer][0]}: {k.shape[-1]} key coefficients but {h.shape[0]} memories")
            weighted = usage_distribution(k, usage, temperature) @ h
            per_layer_spec[layer] = torch.where(valid, weighted, torch.full_like(weighted, math.nan)).cpu()

    with read_keys(modules, on_keys):
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    missing = [modules[i][0] for i in range(len(modules)) if i not in per_layer]
    if missing:
        more = "..." if len(missing) > 3 else ""
        raise RuntimeError(f"these FFN output projections did not run: {missing[:3]}{more}")
    stacked = torch.stack([per_layer[i] for i in range(len(modules))], dim=-1)  # (B, T, L)
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    spec = torch.stack([per_layer_spec[i] for i in range(len(modules))], dim=-1) if entropy is not None else None
    flux_rows, surprisal_rows, spec_rows = [], [], []
    for row, n in enumerate(lengths):
        flux_rows.append(stacked[row, :n].numpy())
        surprisal_rows.append(surprisal_from_logits(logits[row, :n], input_ids[row, :n]).cpu().numpy())
        spec_rows.append(None if spec is None else spec[row, :n].numpy())
    return flux_rows, surprisal_rows, spec_rows


def _text_flux(
    tokenizer: Any,
    text_id: int,
    e: EncodedText,
    flux: np.ndarray,
    surprisal: np.ndarray,
    specificity: np.ndarray | None = None,
) -> TextFlux:
    tokens = token_strings(tokenizer, e.token_ids)
    return TextFlux(
        text_id=text_id,
        text=e.text,
        token_ids=list(e.token_ids),
        tokens=tokens,
        token_classes=classify_tokens(tokens, e.special),
        flux=flux,
        surprisal=surprisal,
        specificity=specificity,
    )

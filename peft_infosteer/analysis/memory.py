"""Memory readout: which FFN memories a token uses in a layer, and what they write into the vocabulary space.

The FFN output at one position is ``sum_i k_i v_i`` (docs/design.md, section 1): ``k`` are the key coefficients, ``v_i``
is column ``i`` of the output projection weight (row ``i`` for GPT-2's ``Conv1D``, which stores ``(in, out)``). A
memory's contribution has norm ``|k_i| * ||v_i||``; the readout ranks memories by it and projects each signed memory
``sign(k_i) * v_i`` (the direction it actually adds) through the unembedding matrix to its top tokens, as in Geva et al.
(2021, 2022), "Transformer Feed-Forward Layers Are Key-Value Memories" / "... Build Predictions by Promoting Concepts".
By default the projection uses the unembedding alone; ``use_final_norm=True`` applies the model's final norm first (a
logit-lens variant; the norm's rescaling does not change the ranking, its learned gain does).

With a LoRA stacked on the projection (a LoRA or InfoSteer+LoRA ``PeftModel``) the memories are the columns of the
effective weight ``W + scale * B A`` of the active adapters; an InfoSteer gain acts on ``k`` and is already in the
keys read by the hook.

Memory specificity (the paper's analysis): ``phi_i = v_i W_U`` (``W_U`` the unembedding), ``P_i = softmax(phi_i)``,
and ``H(P_i)`` in nats; a low entropy marks a *specific* memory (it promotes a few tokens), a high one a *general*
memory (``log |V|`` for a zero vector). :func:`memory_specificity` computes it for every memory, in chunks of memory
vectors, so that only ``chunk_size x |V|`` logits exist at a time. The memories are the vectors that the keys read
by the hook multiply, as in the readout: the effective weight with unmerged LoRA deltas, while an InfoSteer
intervention (gain, elevate, flatten) acts on the keys and so enters through the usage, not through ``v_i``. A
*merged* gain is in the weight instead (and then not in the keys): either way ``sum_i k_i v_i`` is the FFN output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .hooks import _inner_model, find_key_modules, input_device, model_unchanged, read_keys
from .inputs import Example, encode_examples
from .tokens import token_strings

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Memory", "MemoryReadout", "MemorySpecificity", "memory_readout", "memory_specificity", "memory_vectors"]

# logits of memory vectors through the unembedding are taken in row chunks of about this many float32 elements
_SPECIFICITY_CHUNK = 1 << 24


@dataclass
class Memory:
    """One FFN memory as used at one position: its index, key coefficient, value norm and top vocabulary tokens."""

    index: int
    coefficient: float
    value_norm: float
    score: float
    share: float
    top_tokens: list[str]
    top_token_ids: list[int]
    top_logits: list[float]


@dataclass
class MemoryReadout:
    """The top memories of one token in one layer (see :func:`memory_readout`)."""

    layer: int
    layer_name: str
    position: int
    token: str
    memories: list[Memory] = field(default_factory=list)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per memory, best first."""
        import pandas as pd

        return pd.DataFrame(
            [
                dict(rank=r, index=m.index, coefficient=m.coefficient, value_norm=m.value_norm, score=m.score,
                     share=m.share, top_tokens=" | ".join(m.top_tokens))
                for r, m in enumerate(self.memories)
            ]
        )  # fmt: skip


def _dequantized(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    if weight.dtype.is_floating_point:
        return weight.detach()
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).detach()
    raise ValueError(
        f"the memory readout needs a float or bitsandbytes 4-bit weight, got {type(layer).__name__} with dtype "
        f"{weight.dtype}; load the model in float precision (e.g. dtype=torch.bfloat16) for the readout"
    )


def memory_vectors(module: nn.Module) -> torch.Tensor:
    """The memory vectors of an FFN output projection as a ``(d_ff, d_model)`` float32 tensor (row ``i`` = ``v_i``).

    ``module`` is the projection as it sits in the model (a plain layer, or a PEFT tuner layer around one); active,
    unmerged LoRA adapters on it are added to the weight.

    >>> memory_vectors(nn.Linear(4, 3, bias=False)).shape
    torch.Size([4, 3])
    """
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    weight = _dequantized(base).float().clone()
    layer: Any = module
    while isinstance(layer, BaseTunerLayer):
        tuner: Any = layer
        if hasattr(tuner, "lora_A") and not tuner.merged and not tuner.disable_adapters:
            for name in tuner.active_adapters:
                if name in tuner.lora_A:
                    # PEFT returns the delta in the base weight's own layout (fan_in_fan_out for Conv1D)
                    weight += tuner.get_delta_weight(name).detach().float().to(weight.device)
        layer = tuner.base_layer
    # nn.Linear stores (out, in) = (d_model, d_ff); Conv1D stores (in, out) = (d_ff, d_model)
    return weight if isinstance(base, Conv1D) else weight.t().contiguous()


def _final_norm(model: nn.Module) -> nn.Module:
    inner = _inner_model(model)
    for path in ("model.norm", "model.final_layernorm", "transformer.ln_f", "gpt_neox.final_layer_norm",
                 "model.decoder.final_layer_norm", "model.language_model.norm"):  # fmt: skip
        module: Any = inner
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"cannot find the final norm of {type(inner).__name__}; use use_final_norm=False")


def memory_readout(
    model: nn.Module,
    tokenizer: Any,
    example: Example,
    *,
    layer: int,
    position: int = -1,
    top_k: int = 10,
    top_tokens: int = 5,
    use_final_norm: bool = False,
    target_modules: str | Sequence[str] | None = None,
) -> MemoryReadout:
    """The ``top_k`` memories of token ``position`` (negative counts from the end) in FFN layer ``layer``.

    Memories are ranked by ``|k_i| * ||v_i||``; ``share`` is that score over the sum of all memories' scores. Each
    memory's signed vector ``sign(k_i) v_i`` is projected through the unembedding (the LM head weight) and its
    ``top_tokens`` highest-scoring vocabulary tokens are listed. The model is run once under ``torch.no_grad``.

    >>> # readout = memory_readout(model, tokenizer, "The capital of France is Paris", layer=20, position=-1)
    >>> # readout.to_dataframe()[["index", "score", "top_tokens"]]
    """
    modules = find_key_modules(model, target_modules)
    if not -len(modules) <= layer < len(modules):
        raise ValueError(f"layer must be in [0, {len(modules)}), got {layer}")
    layer = layer % len(modules)
    encoded = encode_examples(tokenizer, [example])[0]
    n = len(encoded.token_ids)
    if not -n <= position < n:
        raise ValueError(f"position must be in [-{n}, {n}) for this text of {n} tokens, got {position}")
    position = position % n
    name, hooked = modules[layer]
    outer = dict(_inner_model(model).named_modules())[name]
    captured: list[torch.Tensor] = []
    with model_unchanged(model):
        input_ids = torch.tensor([encoded.token_ids], device=input_device(model))
        with read_keys([(name, hooked)], lambda _i, k: captured.append(k.reshape(-1, k.shape[-1])[position])):
            model(input_ids=input_ids, use_cache=False)
        if not captured:
            raise RuntimeError(f"layer {name} did not run")
        k = captured[-1].float()
        vectors = memory_vectors(outer).to(k.device)
        if vectors.shape[0] != k.shape[0]:
            raise RuntimeError(f"{name}: {k.shape[0]} key coefficients but {vectors.shape[0]} memory vectors")
        norms = vectors.norm(dim=-1)
        scores = k.abs() * norms
        total = scores.sum().clamp_min(torch.finfo(torch.float32).tiny)
        top = torch.topk(scores, min(top_k, scores.numel()))
        signed = vectors[top.indices] * torch.sign(k[top.indices]).unsqueeze(-1)
        if use_final_norm:
            final_norm = _final_norm(model)
            signed = final_norm(signed.to(next(final_norm.parameters()).dtype)).float()
        output_embeddings: Any = getattr(model, "get_output_embeddings")()  # noqa: B009 (nn.Module types it as a tensor)
        unembedding = output_embeddings.weight.detach()
        logits = signed.to(unembedding.device, unembedding.dtype) @ unembedding.t()
        best = torch.topk(logits.float(), min(top_tokens, logits.shape[-1]), dim=-1)
    memories = [
        Memory(
            index=int(i),
            coefficient=float(k[i]),
            value_norm=float(norms[i]),
            score=float(scores[i]),
            share=float(scores[i] / total),
            top_tokens=token_strings(tokenizer, best.indices[row].tolist()),
            top_token_ids=[int(i) for i in best.indices[row]],
            top_logits=[float(v) for v in best.values[row]],
        )
        for row, i in enumerate(top.indices.tolist())
    ]
    token = token_strings(tokenizer, [encoded.token_ids[position]])[0]
    return MemoryReadout(layer=layer, layer_name=name, position=position, token=token, memories=memories)


@dataclass
class MemorySpecificity:
    """``H(P_i)`` in nats of every memory of some FFN layers (see :func:`memory_specificity`).

    ``entropy[j]`` is a float32 CPU tensor of ``d_ff`` values for layer ``layers[j]`` (named ``layer_names[j]``); each
    value is in ``[0, log vocab_size]``.
    """

    layers: list[int]
    layer_names: list[str]
    entropy: list[torch.Tensor]
    vocab_size: int
    use_final_norm: bool = False

    @property
    def max_entropy(self) -> float:
        """``log vocab_size``: the entropy of a uniform ``P_i`` (a zero memory vector)."""
        return math.log(self.vocab_size)

    def layer_means(self) -> list[float]:
        """Mean ``H(P_i)`` over the memories of each layer (what a uniform key usage would weight them to)."""
        return [float(h.double().mean()) for h in self.entropy]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per memory: ``layer, layer_name, memory, entropy`` (nats)."""
        import numpy as np
        import pandas as pd

        frames = [
            pd.DataFrame({"layer": layer, "layer_name": name, "memory": np.arange(h.numel()), "entropy": h.numpy()})
            for layer, name, h in zip(self.layers, self.layer_names, self.entropy)
        ]
        return pd.concat(frames, ignore_index=True)


def _unembedding(model: nn.Module) -> torch.Tensor:
    get_output: Any = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Module) or not isinstance(weight, torch.Tensor):
        raise ValueError(
            f"{type(_inner_model(model)).__name__} has no output embedding (LM head) weight; memory specificity "
            "needs a causal LM (e.g. AutoModelForCausalLM)"
        )
    return _dequantized(head).float()


def _row_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of ``softmax`` over the last dimension of float32 ``logits``, per row."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    p = torch.exp(logits - lse)
    return lse.squeeze(-1) - (p * logits).sum(dim=-1)


def memory_specificity(
    model: nn.Module,
    layers: Sequence[int] | None = None,
    *,
    chunk_size: int | None = None,
    use_final_norm: bool = False,
    target_modules: str | Sequence[str] | None = None,
) -> MemorySpecificity:
    """``H(softmax(v_i W_U))`` in nats for every memory vector ``v_i`` of the FFN layers ``layers`` (all by default).

    ``W_U`` is the LM head weight (a bias, if any, is left out, as in the paper's ``phi_i = v_i W_U``). The memories are
    those of :func:`memory_vectors` (effective weight with active, unmerged LoRA deltas; see the module docstring for
    InfoSteer). ``chunk_size`` memory vectors are projected at a time (default: about 16M logits per chunk), in
    float32 on the LM head's device; one layer's vectors and one chunk's logits are all that is held. With
    ``use_final_norm=True`` each vector goes through the model's final norm first (a logit-lens variant; the norm
    rescales ``v_i``, which changes the softmax temperature and so the entropy). Runs under ``torch.no_grad``.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=50))
    >>> spec = memory_specificity(model, chunk_size=8)
    >>> [tuple(h.shape) for h in spec.entropy], spec.max_entropy == math.log(50)
    ([(32,), (32,)], True)
    >>> bool(all(((h > 0) & (h <= spec.max_entropy + 1e-5)).all() for h in spec.entropy))
    True
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    modules = find_key_modules(model, target_modules)
    chosen = list(range(len(modules))) if layers is None else [int(i) for i in layers]
    bad = [i for i in chosen if not 0 <= i < len(modules)]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {len(modules)} FFN layers")
    named = dict(_inner_model(model).named_modules())
    entropies = []
    with torch.no_grad():
        unembedding = _unembedding(model)
        vocab = unembedding.shape[0]
        step = chunk_size or max(1, _SPECIFICITY_CHUNK // max(vocab, 1))
        final_norm = _final_norm(model) if use_final_norm else None
        for index in chosen:
            vectors = memory_vectors(named[modules[index][0]])
            out = torch.empty(vectors.shape[0], dtype=torch.float32)
            for start in range(0, vectors.shape[0], step):
                chunk = vectors[start : start + step].to(unembedding.device)
                if final_norm is not None:
                    weight = next(final_norm.parameters(), None)
                    chunk = final_norm(chunk if weight is None else chunk.to(weight.dtype)).float()
                out[start : start + chunk.shape[0]] = _row_entropy(chunk @ unembedding.t()).cpu()
            entropies.append(out)
    return MemorySpecificity(
        layers=chosen,
        layer_names=[modules[i][0] for i in chosen],
        entropy=entropies,
        vocab_size=int(vocab),
        use_final_norm=use_final_norm,
    )

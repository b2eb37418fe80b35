"""Find the modules whose input is the FFN key vector ``k``, and read ``k`` with temporary forward pre-hooks.

The hook sits on the *innermost* base layer of each FFN output projection. In an InfoSteer ``PeftModel`` that layer
receives ``k'``, the keys after the adapter's intervention (the InfoSteer wrapper applies gain/flatten and then calls
its base layer; a nested LoRA layer passes its input unchanged to its own base layer). With the adapter disabled it
receives the base model's ``k``. So the hook sees what actually reaches the output projection in every case.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..architectures import default_target_modules
from ..layer import InfoSteerLayer

__all__ = ["KeyModule", "find_key_modules", "input_device", "model_unchanged", "read_keys"]

KeyModule = tuple[str, nn.Module]


def _inner_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (module names are then the same with or without an adapter)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        inner = get_base()
        if isinstance(inner, nn.Module):
            return inner
    return model


def _model_type(model: nn.Module) -> str | None:
    config = getattr(_inner_model(model), "config", None)
    return getattr(config, "model_type", None)


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _innermost(module: Any) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def find_key_modules(model: nn.Module, target_modules: str | Sequence[str] | None = None) -> list[KeyModule]:
    """``(name, module)`` per FFN layer, in model order, where ``module`` receives the key vector ``k`` as input.

    ``target_modules`` names the FFN output projections the PEFT way (a list of exact names or ``.``-suffixes, or a
    regex string matched against the full name); by default the architecture's output projections
    (:data:`peft_infosteer.architectures.FFN_OUTPUT_PROJECTIONS`), or the InfoSteer-wrapped modules of a model whose
    architecture has no default. ``name`` is the projection's name in the transformers model (no ``base_model.``
    prefix), so the names of a base model and of its adapters agree.

    >>> import peft_infosteer
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=50))
    >>> [name for name, _ in find_key_modules(model)]
    ['model.layers.0.mlp.down_proj', 'model.layers.1.mlp.down_proj']
    """
    inner = _inner_model(model)
    named = list(inner.named_modules())
    if target_modules is None:
        try:
            target_modules = default_target_modules(_model_type(model))
        except ValueError:
            steered = [(n, _innermost(m)) for n, m in named if isinstance(m, InfoSteerLayer)]
            if steered:
                return steered
            raise
    found = [(n, _innermost(m)) for n, m in named if n and _matches(n, target_modules)]
    if not found:
        raise ValueError(
            f"no module of this {type(inner).__name__} matches target_modules={target_modules!r}; name the FFN "
            "output projections (e.g. 'mlp.down_proj', 'mlp.c_proj', 'fc2')"
        )
    return found


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise RuntimeError("the FFN output projection was called without a tensor input")


@contextlib.contextmanager
def read_keys(modules: Sequence[KeyModule], callback: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, call ``callback(layer_index, k)`` each time one of ``modules`` runs; hooks removed on exit.

    >>> # with read_keys(find_key_modules(model), lambda i, k: print(i, k.shape)): model(input_ids)
    """
    handles = []
    try:
        for index, (_, module) in enumerate(modules):

            def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], index: int = index) -> None:
                callback(index, _first_tensor(args, kwargs).detach())

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def model_unchanged(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside the block; each module's train/eval flag restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def merged_gain_warning(model: nn.Module) -> str | None:
    """A warning text when an InfoSteer gain is merged into the weights (its keys are then read before the gain)."""
    for module in model.modules():
        if (
            isinstance(module, InfoSteerLayer)
            and module.merged
            and any(name in module.infosteer_gain for name in module.merged_adapters)
        ):
            return (
                "an InfoSteer gain is merged into the output projection weights, so the measured keys are k, not "
                "g * k, and the flux differs from the unmerged adapter's. Call unmerge_adapter() to measure k'."
            )
    return None


def input_device(model: nn.Module) -> torch.device:
    """The device of the model's input embeddings (where token ids must go), else of its first parameter."""
    get_embeddings: Any = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device

"""Checks that turn broken or mismatched adapter files into one clear error.

PEFT only warns about adapter weights missing from a checkpoint and ignores unexpected ones; a truncated safetensors
file fails deep inside the safetensors reader without naming the file; and an adapter loaded onto another
architecture fails with a bare "target modules not found". InfoSteer adapters are strict instead: these helpers are
called by ``InfoSteerConfig.from_pretrained`` and ``InfoSteerModel`` while an adapter is loaded or injected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._compat import filter_state_dict_by_key_prefixes, full_parameter_shape, tuner_state_dict_key_prefixes

__all__ = [
    "check_adapter_dir",
    "check_adapter_state_dict",
    "check_adapter_weights_file",
    "check_config_file",
    "explain_unmatched_targets",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # save_pretrained(safe_serialization=False): a pickle, refused here
_SHOWN = 5  # key names listed per problem; the rest are counted


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN])
    return f"{shown} (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else shown


def check_adapter_weights_file(directory: str | os.PathLike) -> None:
    """Raise a ``ValueError`` naming ``directory/adapter_model.safetensors`` if its header cannot be read.

    A truncated file (for example a save that was interrupted) is caught here, before any model is touched. Reading
    the header is cheap: no tensor is loaded. A missing file is left to PEFT, whose error already names it.

    >>> check_adapter_weights_file("a/directory/without/weights")  # nothing to check: no error
    """
    path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    if not os.path.isfile(path):
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as exc:
        raise ValueError(
            f"{path} cannot be read ({exc}): the file is truncated or corrupt, for example because a save was "
            "interrupted. Use an earlier checkpoint, or save the adapter again."
        ) from exc


def _read_json_object(config_file: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(config_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON ({exc}); the file may be truncated") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(data).__name__}")
    return data


def check_config_file(config_file: str | os.PathLike, known_keys: Iterable[str], version: str) -> None:
    """Raise one ``ValueError`` naming ``config_file`` if it is truncated, not a JSON object, or has unknown keys.

    ``known_keys`` are the fields the loading config class understands; ``version`` is this package's version.
    """
    data = _read_json_object(config_file)
    unknown = sorted(set(data) - set(known_keys))
    if unknown:
        raise ValueError(
            f"{config_file} has keys that peft-infosteer {version} does not know: {unknown}. Fix the file, or "
            f"upgrade peft-infosteer if it was written by a newer version ({data.get('infosteer_version', '?')})."
        )


def check_adapter_dir(directory: str | os.PathLike) -> None:
    """Check a saved InfoSteer adapter directory without loading any model; raise one clear error if it is broken.

    ``PeftModel.from_pretrained`` reads ``adapter_config.json`` in PEFT's own code before any InfoSteer code runs, so
    a truncated config file or a missing weights file fail there with PEFT's less specific messages. This check names
    the file and the problem: use it before serving or merging an adapter, or on a checkpoint of an interrupted run.
    It validates every config field as loading does (the nested ``lora`` config included) and the safetensors
    header, and refuses a pickle weights file (``adapter_model.bin``), which cannot be checked without unpickling it.

    >>> from peft_infosteer.validation import check_adapter_dir
    >>> # check_adapter_dir("out/checkpoint-200")  # raises FileNotFoundError or ValueError if something is wrong
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory")
    config_file = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"{config_file} is missing: {directory} is not a saved adapter, or its save was interrupted"
        )
    peft_type = _read_json_object(config_file).get("peft_type")
    if peft_type != "INFOSTEER":
        raise ValueError(f"{config_file} describes a {peft_type!r} adapter, not an InfoSteer one")
    # the registered config class (InfoSteerConfig): every field (the nested LoRA config as loading builds it),
    # unknown keys, the weights file's header
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_pretrained(directory)
    pickle_file = os.path.join(directory, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(pickle_file):
        # a pickle cannot be checked without unpickling it, and unpickling untrusted files can run code
        raise ValueError(
            f"{pickle_file} is a pickle weights file, which this check refuses: it cannot be validated without "
            "unpickling it. Save the adapter as safetensors (save_pretrained(path), whose default is "
            "safe_serialization=True) and remove the .bin file."
        )
    if not os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
        raise FileNotFoundError(f"{os.path.join(directory, WEIGHTS_NAME)} is missing: the adapter has no weights")


def check_adapter_state_dict(
    model: nn.Module, config: Any, adapter_name: str, state_dict: Mapping[str, torch.Tensor]
) -> None:
    """Raise one ``ValueError`` if the adapter weights in ``state_dict`` do not fit ``model`` exactly.

    ``state_dict`` uses the model's key names (after PEFT's remapping). The adapter's parameters in the model (the
    InfoSteer gains and the stacked LoRA weights of ``adapter_name``) must all be present with the right shapes, and
    no key may be left that the model does not have.
    """
    model_state = model.state_dict(keep_vars=True)  # keep_vars: DeepSpeed ZeRO-3 keeps the real shape on the param
    prefixes = tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    expected = set(filter_state_dict_by_key_prefixes(model_state, prefixes))
    missing = expected - set(state_dict)
    unexpected = set(state_dict) - set(model_state)
    wrong_shape = []
    for key in set(state_dict) & expected:
        have = full_parameter_shape(model_state[key])
        got = tuple(state_dict[key].shape)
        if have != got:
            wrong_shape.append(f"{key}: {got} in the file, {have} in the model")
    if not (missing or unexpected or wrong_shape):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} with the wrong shape: {_listing(wrong_shape)}")
    base = getattr(config, "base_model_name_or_path", None)
    origin = f" (it records its base model as {base!r})" if base else ""
    raise ValueError(
        f"The weights of InfoSteer adapter {adapter_name!r} do not match this model: {'; '.join(problems)}. The "
        f"adapter file is incomplete or edited, or the adapter was saved for a different base model{origin}. Load it "
        "onto the base model it was trained on."
    )


def explain_unmatched_targets(error: Exception, model: nn.Module, config: Any, part: str) -> ValueError:
    """A clearer version of PEFT's "target modules not found" error for an InfoSteer adapter (or its LoRA part)."""
    from .architectures import FFN_OUTPUT_PROJECTIONS

    model_config = getattr(model, "config", None)
    model_type = getattr(model_config, "model_type", None)
    hint = ""
    if model_type in FFN_OUTPUT_PROJECTIONS:
        hint = f" For model_type={model_type!r} the FFN output projection is {FFN_OUTPUT_PROJECTIONS[model_type]}."
    base = getattr(config, "base_model_name_or_path", None)
    origin = f" (recorded base model: {base!r})" if base else ""
    message = (
        f"{part} found none of its target modules in this {model_type or type(model).__name__} model. If you are "
        f"loading a saved adapter, it was probably trained on a different architecture{origin}: load it onto that "
        f"base model. If you are creating one, check `target_modules`.{hint} PEFT says: {error}"
    )
    return type(error)(message) if isinstance(error, ValueError) else ValueError(message)

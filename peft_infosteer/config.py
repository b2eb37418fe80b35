"""``InfoSteerConfig``: the PEFT config of the InfoSteer method."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from peft import LoraConfig, PeftConfig

from ._registration import INFOSTEER
from .validation import check_adapter_weights_file, check_config_file
from .version import __version__

__all__ = ["INTERVENTIONS", "InfoSteerConfig", "Intervention"]

Intervention = Literal["none", "gain", "flatten"]
INTERVENTIONS: tuple[str, ...] = ("none", "gain", "flatten")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _jsonable(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class InfoSteerConfig(PeftConfig):
    """Configuration of an InfoSteer adapter (docs/design.md and docs/concepts.md).

    InfoSteer, as described in Deng, Chang and Chen (arXiv 2507.05158), treats each FFN block as a key-value memory
    and steers post-training towards using more of the stored memory vectors: with a forward intervention on the key
    coefficients ``k`` that enter the FFN output projection (``intervention``), with an entropy regularizer on the
    usage distribution of ``k`` (``entropy_weight``), or both. The formulas are this package's own formulation.

    An InfoSteer adapter may carry a LoRA config (``lora``): PEFT's own LoRA layers are then injected in the same
    adapter, and the steering module wraps the FFN output projection outermost.

    Example:

    >>> from peft import LoraConfig
    >>> from peft_infosteer import InfoSteerConfig
    >>> config = InfoSteerConfig(
    ...     entropy_weight=100.0,
    ...     intervention="gain",
    ...     lora=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    ...     task_type="CAUSAL_LM",
    ... )
    >>> config.peft_type
    <PeftType.INFOSTEER: 'INFOSTEER'>
    """

    target_modules: list[str] | set[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Names (or a regex) of the FFN output projections to steer, e.g. ['down_proj'] or ['mlp.c_proj']. "
                "Their input must be the FFN key vector. Default: the output projection of every decoder layer of "
                "the model's architecture (see peft_infosteer.architectures)."
            )
        },
    )
    exclude_modules: list[str] | set[str] | str | None = field(
        default=None, metadata={"help": "Names (or a regex) of modules not to steer."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Indices of the decoder layers to steer; default: all of them."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the layer list, e.g. 'layers' or 'h'; only used with `layers_to_transform`."},
    )
    entropy_weight: float = field(
        default=100.0,
        metadata={
            "help": (
                "Weight lambda >= 0 of the flux regularizer: the training loss becomes L_task - lambda * mean flux. "
                "0 turns the regularizer off. The flux gradient is small (about 1 / (sum|k| log d_ff) per key), so "
                "useful values are large, and they depend on the model: the dev-set sweeps chose 1000 on "
                "SmolLM2-135M and 10 on Gemma-3-270M, where 1000 collapsed accuracy close to chance. The default 100 "
                "raised flux without that collapse on both, but tested with 3 and 7 seeds against LoRA SFT it was "
                "+0.3 accuracy points on SmolLM2 (no effect) and -1.1 on Gemma-3 (docs/benchmarks.md): sweep it "
                "for your model."
            )
        },
    )
    flux_target_rise: float | None = field(
        default=None,
        metadata={
            "help": (
                "Ask for a mean flux instead of a fixed lambda: this much above the flux of the first optimizer step "
                "(e.g. 0.01). Lambda then starts at `entropy_weight` and follows the target once per optimizer step "
                "(peft_infosteer.target), up to `max_entropy_weight`. Off by default: on the dev splits no single "
                "rise (0.005, 0.01, 0.02, lambda starting at 100 or 10) was at least as good as LoRA SFT on both "
                "SmolLM2-135M (all were above it) and Gemma-3-270M (all were below it); see docs/benchmarks.md."
            )
        },
    )
    flux_target: float | None = field(
        default=None,
        metadata={"help": "An absolute mean-flux target in (0, 1), instead of `flux_target_rise`."},
    )
    flux_target_rate: float = field(
        default=0.2,
        metadata={
            "help": (
                "Largest change of log(lambda) per optimizer step when following a flux target (reached at a gap of "
                "0.01 flux): lambda moves by at most a factor exp(rate) per step."
            )
        },
    )
    max_entropy_weight: float = field(
        default=1e4,
        metadata={"help": "Cap of lambda when following a flux target; reaching it warns once (target out of reach)."},
    )
    usage: Literal["abs", "softmax"] = field(
        default="abs",
        metadata={"help": "Usage distribution over memories: 'abs' (|k_i| / sum |k|) or 'softmax' (softmax(k / tau))."},
    )
    usage_temperature: float = field(
        default=1.0, metadata={"help": "Temperature tau > 0 of the softmax usage distribution."}
    )
    intervention: Intervention = field(
        default="gain",
        metadata={
            "help": (
                "Forward intervention on the key coefficients: 'gain' (default: a trainable float32 per-coefficient "
                "gain, identity at init, mergeable), 'none', or 'flatten' (mixes usage with the uniform distribution; "
                "not mergeable). An adapter with nothing to train ('none' or 'flatten' without `lora`) is valid for "
                "inference-time steering; creating one for training warns."
            )
        },
    )
    flatten_strength: float = field(
        default=0.2,
        metadata={"help": "Mixing strength alpha in [0, 1] of 'flatten' (default from the SmolLM2 dev-set sweep)."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "Initialise the adapter as the identity (gains at 1, a stacked LoRA with its own default init). False "
                "draws the gains from U(0.5, 1.5) and the stacked LoRA with init_lora_weights=False: for tests only, "
                "as PEFT's `init_weights` of other methods."
            )
        },
    )
    lora: LoraConfig | dict | None = field(
        default=None,
        metadata={
            "help": (
                "Optional LoraConfig stacked in the same adapter (its dict form in adapter_config.json). LoRA is "
                "injected first; InfoSteer wraps the FFN output projections outermost."
            )
        },
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train fully and save with the adapter."}
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None, metadata={"help": "Token indices whose embeddings are trained (set by TRL when it adds tokens)."}
    )
    target_parameters: list[str] | None = field(
        default=None, metadata={"help": "Unused by InfoSteer; present because PEFT reads it by attribute."}
    )
    infosteer_version: str = field(
        default=__version__, metadata={"help": "Version of peft-infosteer that wrote this config."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = INFOSTEER
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.lora, dict):
            self.lora = self._lora_from_dict(self.lora)
        self.validate()

    @staticmethod
    def _lora_from_dict(data: dict) -> LoraConfig:
        data = dict(data)
        peft_type = str(data.pop("peft_type", "LORA"))
        if peft_type not in ("LORA", "PeftType.LORA"):
            raise ValueError(f"InfoSteerConfig.lora must describe a LoRA adapter, got peft_type={peft_type!r}")
        valid = {f.name for f in fields(LoraConfig)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(
                f"InfoSteerConfig.lora has keys this PEFT version does not know: {unknown}. Upgrade peft, or remove "
                "them from adapter_config.json."
            )
        return LoraConfig(**data)

    def validate(self) -> None:
        """Check every InfoSteer field; raise ``ValueError`` naming the field and the allowed values."""
        if not _is_number(self.entropy_weight) or not math.isfinite(self.entropy_weight) or self.entropy_weight < 0:
            raise ValueError(f"entropy_weight must be a finite number >= 0, got {self.entropy_weight!r}")
        if self.flux_target_rise is not None and self.flux_target is not None:
            raise ValueError("set flux_target_rise or flux_target, not both")
        rise = self.flux_target_rise
        if rise is not None and (not _is_number(rise) or not math.isfinite(rise) or rise <= 0):
            raise ValueError(f"flux_target_rise must be a finite number > 0, got {rise!r}")
        if self.flux_target is not None and (not _is_number(self.flux_target) or not 0 < self.flux_target < 1):
            raise ValueError(f"flux_target must be a number in (0, 1), got {self.flux_target!r}")
        if not _is_number(self.flux_target_rate) or not 0 < self.flux_target_rate <= 5:
            raise ValueError(f"flux_target_rate must be a number in (0, 5], got {self.flux_target_rate!r}")
        cap = self.max_entropy_weight
        if not _is_number(cap) or not math.isfinite(cap) or cap <= 0:
            raise ValueError(f"max_entropy_weight must be a finite number > 0, got {cap!r}")
        if self.has_flux_target and not 0 < self.entropy_weight <= cap:
            raise ValueError(
                f"with a flux target, entropy_weight is where lambda starts: it must be in (0, max_entropy_weight="
                f"{cap:g}], got {self.entropy_weight!r}"
            )
        if self.usage not in ("abs", "softmax"):
            raise ValueError(f"usage must be one of ('abs', 'softmax'), got {self.usage!r}")
        if (
            not _is_number(self.usage_temperature)
            or not math.isfinite(self.usage_temperature)
            or self.usage_temperature <= 0
        ):
            raise ValueError(f"usage_temperature must be a finite number > 0, got {self.usage_temperature!r}")
        if self.intervention not in INTERVENTIONS:
            raise ValueError(f"intervention must be one of {INTERVENTIONS}, got {self.intervention!r}")
        if not _is_number(self.flatten_strength) or not 0.0 <= self.flatten_strength <= 1.0:
            raise ValueError(f"flatten_strength must be a number in [0, 1], got {self.flatten_strength!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise ValueError(
                f"lora must be a peft.LoraConfig (or its dict form) or None, got {type(self.lora).__name__}"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern is only used together with layers_to_transform; set both or neither")
        if self.target_modules is not None and not isinstance(self.target_modules, (str, set, list, tuple)):
            raise ValueError(
                f"target_modules must be a list of module names, a regex string or None, got {self.target_modules!r}"
            )

    @property
    def has_flux_target(self) -> bool:
        """Whether lambda follows a flux target (``flux_target_rise`` or ``flux_target``) instead of staying fixed."""
        return self.flux_target_rise is not None or self.flux_target is not None

    @property
    def is_mergeable(self) -> bool:
        """Whether the forward intervention is a linear rescaling that can be folded into the weights."""
        return self.intervention in ("none", "gain")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form written to ``adapter_config.json`` (the nested LoRA config as a dict)."""
        lora = self.lora
        self.lora = None
        try:
            out = super().to_dict()
        finally:
            self.lora = lora
        out["lora"] = None if lora is None else _jsonable(lora.to_dict() if isinstance(lora, LoraConfig) else lora)
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load and validate a saved config: a truncated or unknown-key ``adapter_config.json`` or a truncated weights
        file raise one clear ``ValueError`` naming the file."""
        path = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(path):
            config_file = os.path.join(path, "adapter_config.json")
            if os.path.isfile(config_file):
                known = {f.name for f in fields(cls)} | {"auto_mapping", "peft_version", "runtime_config"}
                check_config_file(config_file, known, __version__)
            check_adapter_weights_file(path)  # a truncated weights file fails here, naming the file
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

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

__all__ = ["ELEVATE_RANKS", "INTERVENTIONS", "ElevateRank", "InfoSteerConfig", "Intervention"]

Intervention = Literal["elevate", "none", "gain", "flatten"]
INTERVENTIONS: tuple[str, ...] = ("elevate", "none", "gain", "flatten")
ElevateRank = Literal["magnitude", "value"]
ELEVATE_RANKS: tuple[str, ...] = ("magnitude", "value")
# the fields that only mean something with intervention="elevate", and their defaults (the paper's)
_ELEVATE_DEFAULTS: dict[str, Any] = {
    "elevate_fraction": 0.01,
    "elevate_scale": 1.0,
    "elevate_rank": "magnitude",
    "elevate_at_inference": True,
}
# the first version whose entropy_weight is the paper's lambda (sum over steered layers of the entropy in nats);
# earlier versions weighted the mean normalised flux (see InfoSteerModel: such configs are converted on load)
PAPER_LAMBDA_VERSION = (0, 2, 0)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_lora(lora: LoraConfig) -> None:
    """Check what PEFT's LoRA layers check only when they are created (a saved ``lora.r = "two"`` loads as a
    LoraConfig and fails later, inside the injection), so that a broken nested LoRA config is refused up front."""
    r = lora.r
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"InfoSteerConfig.lora: r must be a positive integer, got {r!r}")
    if not _is_number(lora.lora_alpha) or not math.isfinite(lora.lora_alpha):
        raise ValueError(f"InfoSteerConfig.lora: lora_alpha must be a finite number, got {lora.lora_alpha!r}")
    if not _is_number(lora.lora_dropout) or not 0 <= lora.lora_dropout <= 1:
        raise ValueError(f"InfoSteerConfig.lora: lora_dropout must be a number in [0, 1], got {lora.lora_dropout!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(lora, name, None) or {}
        bad = {k: v for k, v in pattern.items() if not _is_number(v) or (name == "rank_pattern" and v != int(v))}
        if bad:
            raise ValueError(f"InfoSteerConfig.lora: {name} values must be numbers (ranks: integers), got {bad!r}")


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
    """Configuration of an InfoSteer adapter (docs/concepts.md).

    InfoSteer (Deng, Chang and Chen, arXiv 2507.05158) treats each FFN block as a key-value memory and steers
    post-training towards using more of the stored memory vectors. The paper's two mechanisms, with its defaults:

    - the forward intervention ``intervention="elevate"`` (the default): in every steered FFN and token, the bottom
      ``elevate_fraction`` (p = 1%) of the key coefficients ``k`` that enter the FFN output projection are set to
      ``elevate_scale`` (alpha = 1) times the layer's mean key coefficient;
    - the entropy regularizer ``entropy_weight`` (the paper's lambda, off by default; the paper's settings are 0.01 and
      0.05): the loss becomes ``L_task - lambda * sum over steered layers of the mean entropy (in nats)`` of the usage
      distribution of ``k``.

    This package's extensions: ``intervention="gain"`` (a trainable per-coefficient gain), ``"flatten"`` and the flux
    target (``flux_target_rise``). An InfoSteer adapter may carry a LoRA config (``lora``): PEFT's own LoRA layers
    are then injected in the same adapter, and the steering module wraps the FFN output projection outermost.

    Example:

    >>> from peft import LoraConfig
    >>> from peft_infosteer import InfoSteerConfig
    >>> lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    >>> config = InfoSteerConfig(lora=lora, task_type="CAUSAL_LM")
    >>> config.peft_type, config.intervention, config.elevate_fraction, config.elevate_scale, config.entropy_weight
    (<PeftType.INFOSTEER: 'INFOSTEER'>, 'elevate', 0.01, 1.0, 0.0)
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
        metadata={
            "help": (
                "Name of the model's list of decoder layers, e.g. 'layers' or 'h', whose indices "
                "`layers_to_transform` names; only used with `layers_to_transform`. Default: the first numbered part "
                "of a module's name is its layer index."
            )
        },
    )
    entropy_weight: float = field(
        default=0.0,
        metadata={
            "help": (
                "The paper's lambda >= 0: the training loss becomes L_task - lambda * sum over the steered layers of "
                "the mean entropy H(p) (in nats) of the key usage distribution p over the tokens in the loss. 0 (the "
                "default) turns the regularizer off; the paper's settings are 0.01 (its default) and 0.05. Adapters "
                "written before peft-infosteer 0.2.0 weighted the mean normalised flux instead; their value is "
                "converted on load (docs/concepts.md). Evidence per model: docs/benchmarks.md."
            )
        },
    )
    flux_target_rise: float | None = field(
        default=None,
        metadata={
            "help": (
                "An extension of the paper: ask for a mean flux instead of a fixed lambda, this much above the flux of "
                "the first optimizer step (e.g. 0.01). Lambda (in the units of `entropy_weight`) then starts at "
                "`entropy_weight` and follows the target once per optimizer step (peft_infosteer.target), up to "
                "`max_entropy_weight`. Off by default: no single rise was safe on every benchmark model "
                "(docs/benchmarks.md)."
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
        default=100.0,
        metadata={
            "help": "Cap of lambda (units of `entropy_weight`) when following a flux target; reaching it warns once."
        },
    )
    usage: Literal["abs", "softmax"] = field(
        default="abs",
        metadata={"help": "Usage distribution over memories: 'abs' (|k_i| / sum |k|) or 'softmax' (softmax(k / tau))."},
    )
    usage_temperature: float = field(
        default=1.0, metadata={"help": "Temperature tau > 0 of the softmax usage distribution."}
    )
    intervention: Intervention = field(
        default="elevate",
        metadata={
            "help": (
                "Forward intervention on the key coefficients k: 'elevate' (the paper's, the default: the bottom "
                "`elevate_fraction` of k in each token set to `elevate_scale` times the mean), 'none', or this "
                "package's extensions 'gain' (a trainable float32 per-coefficient gain, identity at init, mergeable) "
                "and 'flatten' (mixes usage with the uniform distribution; not mergeable). 'elevate', 'none' and "
                "'flatten' have no weights: stack LoRA (`lora`) to train them; an adapter with nothing to train is "
                "valid for inference-time steering, and creating one for training warns."
            )
        },
    )
    elevate_fraction: float = field(
        default=0.01,
        metadata={
            "help": (
                "The paper's p, as a fraction in (0, 1) of d_ff: 'elevate' replaces the ceil(p * d_ff) smallest key "
                "coefficients of each token. The paper's default is 0.01 (1%)."
            )
        },
    )
    elevate_scale: float = field(
        default=1.0,
        metadata={
            "help": (
                "The paper's alpha >= 0: 'elevate' sets each replaced coefficient to alpha times the layer's mean "
                "key coefficient of that token. The paper's default is 1.0; its ablation also ran 2.0 (p=1%) and 5.0 "
                "(p=2%)."
            )
        },
    )
    elevate_rank: ElevateRank = field(
        default="magnitude",
        metadata={
            "help": (
                "How 'elevate' reads 'bottom' and 'mean' for signed (gated) keys: 'magnitude' (default) replaces the "
                "coefficients of smallest |k_i| by alpha * mean |k| with their own sign (0 counts as +); 'value' is "
                "the literal reading, smallest k_i replaced by alpha * mean k. Both equal the paper's formula for "
                "non-negative (ReLU) keys."
            )
        },
    )
    elevate_at_inference: bool = field(
        default=True,
        metadata={
            "help": (
                "Whether 'elevate' also acts in eval mode (inference, generation), so the adapter reproduces the "
                "forward it was trained with (default). False: it acts only while the module is in training mode, and "
                "the adapter then merges exactly (a stacked LoRA folds in, nothing is left)."
            )
        },
    )
    flatten_strength: float = field(
        default=0.2,
        metadata={"help": "Mixing strength alpha in [0, 1] of 'flatten' (an extension of the paper)."},
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
        self._validate_elevate()
        if not _is_number(self.flatten_strength) or not 0.0 <= self.flatten_strength <= 1.0:
            raise ValueError(f"flatten_strength must be a number in [0, 1], got {self.flatten_strength!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise ValueError(
                f"lora must be a peft.LoraConfig (or its dict form) or None, got {type(self.lora).__name__}"
            )
        if isinstance(self.lora, LoraConfig):
            _validate_lora(self.lora)
        self._validate_layers()
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern is only used together with layers_to_transform; set both or neither")
        if self.target_modules is not None and not isinstance(self.target_modules, (str, set, list, tuple)):
            raise ValueError(
                f"target_modules must be a list of module names, a regex string or None, got {self.target_modules!r}"
            )

    def _validate_layers(self) -> None:
        layers = self.layers_to_transform
        items = layers if isinstance(layers, list) else [layers]
        if layers is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
            # PEFT compares indices with `==` / `in`: a string or float index would match no layer, silently
            raise ValueError(
                "layers_to_transform must be a layer index (an int >= 0), a list of them, or None, got "
                f"{layers!r}: e.g. layers_to_transform=[0, 1]"
            )
        pattern = self.layers_pattern
        patterns = pattern if isinstance(pattern, list) else [pattern]
        if pattern is not None and not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"layers_pattern must be a string, a list of strings, or None, got {pattern!r}")

    def _validate_elevate(self) -> None:
        if self.intervention != "elevate":
            changed = [name for name, default in _ELEVATE_DEFAULTS.items() if getattr(self, name) != default]
            if changed:
                raise ValueError(
                    f"{', '.join(changed)} only apply to intervention='elevate', got intervention="
                    f"{self.intervention!r}: set intervention='elevate' or leave {' and '.join(changed)} at the default"
                )
        p = self.elevate_fraction
        if not _is_number(p) or not 0 < p < 1:
            raise ValueError(f"elevate_fraction must be a number in (0, 1) (a fraction of d_ff, e.g. 0.01), got {p!r}")
        alpha = self.elevate_scale
        if not _is_number(alpha) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"elevate_scale must be a finite number >= 0, got {alpha!r}")
        if self.elevate_rank not in ELEVATE_RANKS:
            raise ValueError(f"elevate_rank must be one of {ELEVATE_RANKS}, got {self.elevate_rank!r}")
        if not isinstance(self.elevate_at_inference, bool):
            raise ValueError(f"elevate_at_inference must be True or False, got {self.elevate_at_inference!r}")

    @property
    def lambda_in_paper_units(self) -> bool:
        """Whether ``entropy_weight`` is the paper's lambda (written by peft-infosteer 0.2.0 or later, or in code)."""
        try:
            written_by = tuple(int(part) for part in str(self.infosteer_version).split(".")[:3])
        except ValueError:
            return True  # a development version string: the current units
        return written_by >= PAPER_LAMBDA_VERSION

    @property
    def has_flux_target(self) -> bool:
        """Whether lambda follows a flux target (``flux_target_rise`` or ``flux_target``) instead of staying fixed."""
        return self.flux_target_rise is not None or self.flux_target is not None

    @property
    def is_mergeable(self) -> bool:
        """Whether the adapter folds into the weights: a linear intervention, or one that acts in training only."""
        if self.intervention == "elevate":
            return not self.elevate_at_inference
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

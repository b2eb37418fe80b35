"""Make ``INFOSTEER`` a real PEFT method.

PEFT 0.21 has no public extension point: ``register_peft_method`` only accepts names that are already members of
the closed ``PeftType`` enum. We add the member in place (idempotently, and only if PEFT does not ship one), then
register the config and tuner classes under the unique prefix ``infosteer_``.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

__all__ = ["INFOSTEER", "ensure_peft_type", "register"]

_NAME = "INFOSTEER"


def ensure_peft_type(name: str = _NAME) -> PeftType:
    """Return ``PeftType[name]``, adding the member to the enum first if it is missing.

    A future PEFT that ships its own member of that name is used as is.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    # EnumType.__setattr__ only forbids re-assigning an existing member, so go through type.
    type.__setattr__(PeftType, name, member)
    return member


INFOSTEER: PeftType = ensure_peft_type()


def register() -> None:
    """Register InfoSteer with PEFT's method mappings; calling it again is harmless."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import InfoSteerConfig
    from .model import InfoSteerModel

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(INFOSTEER) is InfoSteerConfig:
        return
    if INFOSTEER in PEFT_TYPE_TO_CONFIG_MAPPING or INFOSTEER in PEFT_TYPE_TO_TUNER_MAPPING:
        # Another implementation (a future PEFT, or an older copy of this plugin) owns the name: ours wins, so that
        # adapters saved by this package load with this package's classes.
        from peft.mapping import PEFT_TYPE_TO_MIXED_MODEL_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

        PEFT_TYPE_TO_CONFIG_MAPPING[INFOSTEER] = InfoSteerConfig
        PEFT_TYPE_TO_TUNER_MAPPING[INFOSTEER] = InfoSteerModel
        PEFT_TYPE_TO_PREFIX_MAPPING[INFOSTEER] = InfoSteerModel.prefix
        # ours is not mixed-compatible: never leave the other implementation's class there for our configs
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING.pop(INFOSTEER, None)
        return
    register_peft_method(name=_NAME.lower(), config_cls=InfoSteerConfig, model_cls=InfoSteerModel, prefix="infosteer_")

"""Make ``INFOSTEER`` a real PEFT method.

PEFT 0.21 has no public extension point: ``register_peft_method`` only accepts names that are already members of
the closed ``PeftType`` enum. We add the member in place (idempotently, and only if PEFT does not ship one), then
register the config and tuner classes, which the caller passes in, under the unique prefix ``infosteer_``.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

from ._compat import add_enum_member, replace_peft_method

__all__ = ["INFOSTEER", "PREFIX", "ensure_peft_type", "register"]

_NAME = "INFOSTEER"
PREFIX = "infosteer_"


def ensure_peft_type(name: str = _NAME) -> PeftType:
    """Return ``PeftType[name]``, adding the member to the enum first if it is missing.

    A future PEFT that ships its own member of that name is used as is.

    >>> ensure_peft_type().value
    'INFOSTEER'
    """
    return add_enum_member(PeftType, name)  # type: ignore[return-value]


INFOSTEER: PeftType = ensure_peft_type()


def register(config_cls: type, model_cls: type) -> None:
    """Register ``config_cls`` / ``model_cls`` as PEFT's INFOSTEER method; calling it again is harmless."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING  # public (peft.__all__), read only
    from peft.utils import register_peft_method

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(INFOSTEER) is config_cls:
        return
    if INFOSTEER in PEFT_TYPE_TO_CONFIG_MAPPING or INFOSTEER in PEFT_TYPE_TO_TUNER_MAPPING:
        # Another implementation (a future PEFT, or an older copy of this plugin) owns the name: ours wins, so that
        # adapters saved by this package load with this package's classes (not mixed-compatible: never left there)
        replace_peft_method(INFOSTEER, config_cls, model_cls, PREFIX)
        return
    register_peft_method(name=_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)

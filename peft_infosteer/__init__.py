"""peft-infosteer: InfoSteer (FFN key-value memory steering) as a native PEFT method.

Importing this package registers ``PeftType.INFOSTEER`` with PEFT, so that ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` work with ``InfoSteerConfig``. That is all the import
does (the start-up hook imports it whenever ``peft`` is imported): it patches no upstream class and changes no logging.
The model-card wrappers of :mod:`peft_infosteer.hub` are installed when the first InfoSteer model is built.

>>> import peft_infosteer
>>> from peft import PeftType
>>> PeftType.INFOSTEER.value
'INFOSTEER'
"""

from __future__ import annotations

from ._registration import INFOSTEER, register
from .architectures import FFN_OUTPUT_PROJECTIONS, default_target_modules
from .config import InfoSteerConfig
from .layer import InfoSteerLayer
from .loss import bind_flux_target, find_infosteer_model, infosteer_loss, last_flux, step_flux_target, track_flux
from .model import InfoSteerModel
from .ops import fused_information_flux, information_flux, usage_distribution
from .version import __version__

register(InfoSteerConfig, InfoSteerModel)


def __getattr__(name: str):
    # the trainer integration imports transformers.trainer (about a second) and InfoSteerSFTTrainer needs the optional
    # `trl` extra: import them on first use only, so that `import peft` (which imports this plugin) stays fast
    if name in ("InfoSteerCallback", "InfoSteerSFTTrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'peft_infosteer' has no attribute {name!r}")


__all__ = [
    "FFN_OUTPUT_PROJECTIONS",
    "INFOSTEER",
    "InfoSteerConfig",
    "InfoSteerLayer",
    "InfoSteerModel",
    "InfoSteerCallback",
    "InfoSteerSFTTrainer",
    "__version__",
    "bind_flux_target",
    "default_target_modules",
    "find_infosteer_model",
    "fused_information_flux",
    "infosteer_loss",
    "information_flux",
    "last_flux",
    "step_flux_target",
    "track_flux",
    "usage_distribution",
]

"""Trainer integration: InfoSteer's metrics and model card. The regularizer itself needs no trainer code.

Any ``transformers.Trainer`` or TRL trainer trains an InfoSteer adapter's regularizer as it is (it acts in the
backward pass, see :mod:`peft_infosteer.regularizer`). What a trainer integration adds:

- :class:`InfoSteerCallback`: logs ``infosteer/flux`` (mean flux over the logging interval and all ranks) and
  ``infosteer/loss`` (the regularizer's value ``-entropy_weight * sum over layers of H``, ``H = flux * log d_ff``)
  beside the trainer's own metrics, in train and eval. One line for any trainer: ``InfoSteerCallback.attach(trainer)``.
- :class:`InfoSteerSFTTrainer`: ``trl.SFTTrainer`` with that callback, the InfoSteer section in the model card it
  writes, and ``resume_from_checkpoint=True`` that skips a checkpoint whose save was interrupted.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ._compat import add_callback_first, set_trainer_tags
from .checkpoints import last_complete_checkpoint
from .hub import update_model_card
from .loss import find_infosteer_model
from .model import InfoSteerModel

__all__ = [
    "InfoSteerCallback",
    "InfoSteerSFTTrainer",  # noqa: F822 (built lazily by __getattr__: TRL is optional)
]

_TRAIN, _EVAL = "train", "eval"


def _find_tuner(model: Any) -> InfoSteerModel | None:
    try:
        return find_infosteer_model(model)
    except TypeError:
        return None


def _sum_over_ranks(totals: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        totals = totals.clone()
        torch.distributed.all_reduce(totals)
    return totals


class InfoSteerCallback(TrainerCallback, ExportableState):
    """Log ``infosteer/flux`` and ``infosteer/loss`` (and their ``eval_`` forms) for any transformers/TRL trainer.

    With a flux target it also logs ``infosteer/lambda`` and ``infosteer/flux_target``, and keeps lambda and the
    starting flux in the trainer's checkpoints (``trainer_state.json``), so that ``resume_from_checkpoint`` continues
    exactly where the run stopped.

    ``transformers.Trainer`` calls its reporting integrations (TensorBoard, W&B, ...) before the callbacks passed in
    ``callbacks=[...]``, so attach it with :meth:`attach` for them to see the metrics too:

    >>> from peft_infosteer import InfoSteerCallback
    >>> # trainer = DPOTrainer(model=model, args=args, train_dataset=ds, peft_config=InfoSteerConfig(...))
    >>> # InfoSteerCallback.attach(trainer)

    With a trainer it measures the flux of evaluation forwards too (forwards without grad measure only when asked).
    """

    @classmethod
    def attach(cls, trainer: Any) -> InfoSteerCallback:
        """Add a new callback first in ``trainer``'s callbacks, so that every reporter sees the metrics."""
        callback = cls()
        add_callback_first(trainer, callback)
        tuner = _find_tuner(trainer.model)
        if tuner is not None:
            tuner.flux_tracker.measure = True
        return callback

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        tuner = _find_tuner(model)
        if tuner is not None:
            tuner.flux_tracker.measure = True

    def __init__(self) -> None:
        self._model: Any = None  # for state(), which the trainer calls without arguments
        self._resumed = False

    def state(self) -> dict[str, Any]:
        """The flux target's training state (lambda, starting flux), saved with each checkpoint."""
        tuner = _find_tuner(self._model)
        target = tuner.flux_target if tuner is not None else None
        return {"args": {}, "attributes": {"flux_target": None if target is None else target.state_dict()}}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._model = model
        self._resumed = False
        tuner = _find_tuner(model)
        if tuner is not None:
            tuner.flux_tracker.measure = True
            tuner.flux_tracker.take_window(_TRAIN)  # forwards made before training are not part of it

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # Resuming: the trainer loads trainer_state.json after on_train_begin, so the first step of a resumed run is
        # where lambda and the starting flux saved by state() come back
        if self._resumed or state.global_step == 0:
            return
        self._resumed = True
        tuner = _find_tuner(model)
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        saved = saved[-1] if isinstance(saved, list) and saved else saved
        target_state = saved.get("attributes", {}).get("flux_target") if isinstance(saved, dict) else None
        if tuner is not None and tuner.flux_target is not None and target_state is not None:
            tuner.flux_target.load_state_dict(target_state)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        tuner = _find_tuner(model)
        if tuner is not None:
            # forwards without grad during a training step (a generation, a reference model) are not evaluation
            tuner.flux_tracker.take_window(_EVAL)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, model: Any = None, **kw: Any
    ) -> None:
        tuner = _find_tuner(model)
        if tuner is None or logs is None:
            return
        tracker = tuner.flux_tracker
        mode = _EVAL if any(key.startswith("eval_") for key in logs) else _TRAIN
        window = tracker.take_window(mode)
        device = tracker.weight.device if window is None else window.device
        totals = _sum_over_ranks(window if window is not None else torch.zeros(2, device=device))
        flux_sum, count = (float(v) for v in totals.cpu())
        if count == 0:
            return
        prefix = "eval_" if mode == _EVAL else ""
        flux = flux_sum / count
        added = {
            f"{prefix}infosteer/flux": flux,
            f"{prefix}infosteer/loss": -float(tracker.weight) * tracker.flux_scale * flux,
        }
        target = tuner.flux_target
        if target is not None and mode == _TRAIN:
            added["infosteer/lambda"] = target.weight
            if target.target is not None:
                added["infosteer/flux_target"] = target.target
        logs.update(added)
        # Trainer.log stored a copy of `logs` in the history before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)


def _make_sft_trainer() -> type:
    try:
        from trl import SFTTrainer
    except ImportError as exc:  # pragma: no cover - exercised only without the trl extra
        raise ImportError("InfoSteerSFTTrainer needs TRL: pip install 'peft-infosteer[trl]'") from exc

    class InfoSteerSFTTrainer(SFTTrainer):
        """``trl.SFTTrainer`` with InfoSteer's metrics, model card and safe resuming.

        Same arguments as ``SFTTrainer``; pass a base model with ``peft_config=InfoSteerConfig(...)`` or a ready
        InfoSteer ``PeftModel``. A plain ``SFTTrainer`` trains the regularizer just as well; this class adds the
        ``infosteer/flux`` and ``infosteer/loss`` metrics (:class:`InfoSteerCallback`) and the model card.

        >>> from peft_infosteer import InfoSteerConfig, InfoSteerSFTTrainer
        >>> # trainer = InfoSteerSFTTrainer(model=base, train_dataset=ds, args=SFTConfig(...),
        >>> #                               peft_config=InfoSteerConfig(lora=LoraConfig(r=16)))
        >>> # trainer.train()
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if _find_tuner(self.model) is None:
                warnings.warn(
                    "InfoSteerSFTTrainer got a model without an InfoSteer adapter (for example a plain LoraConfig, "
                    "as TRL's get_peft_config builds): nothing InfoSteer-specific will be trained. Pass "
                    "peft_config=InfoSteerConfig(lora=LoraConfig(...)) to train InfoSteer.",
                    UserWarning,
                    stacklevel=2,
                )
            else:
                InfoSteerCallback.attach(self)

        def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
            """``SFTTrainer.train``; ``resume_from_checkpoint=True`` skips a checkpoint whose save was interrupted."""
            if resume_from_checkpoint is True and self.args.output_dir is not None:
                resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir) or True
            return super().train(resume_from_checkpoint, *args, **kwargs)

        def create_model_card(self, *args: Any, **kwargs: Any) -> None:
            """The trainer's card (written by ``save_model``/``push_to_hub``), plus how to load an InfoSteer adapter."""
            super().create_model_card(*args, **kwargs)
            readme = os.path.join(self.args.output_dir or "", "README.md")
            if _find_tuner(self.model) is not None and self.is_world_process_zero() and os.path.isfile(readme):
                update_model_card(readme, self.accelerator.unwrap_model(self.model), self.hub_model_id)

    set_trainer_tags(InfoSteerSFTTrainer, ["trl", "sft", "infosteer", "peft-infosteer"])
    return InfoSteerSFTTrainer


def __getattr__(name: str) -> Any:
    # TRL is an optional extra: build the SFT trainer class on first use
    if name == "InfoSteerSFTTrainer":
        cls = _make_sft_trainer()
        globals()[name] = cls
        return cls
    raise AttributeError(name)

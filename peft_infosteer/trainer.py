"""The InfoSteer loss hook for TRL and transformers trainers.

``InfoSteerTrainerMixin`` wraps any trainer's ``compute_loss``: it keeps the flux of the forward the loss is built
from, adds ``-entropy_weight * mean flux`` normalised exactly like the trainer normalises its own loss (so gradient
accumulation and multi-process training do not change the effective weight), and logs ``infosteer/flux`` and
``infosteer/loss``. ``InfoSteerSFTTrainer`` is ``trl.SFTTrainer`` with the mixin.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .hub import update_model_card
from .layer import InfoSteerLayer
from .model import InfoSteerModel, token_mask
from .regularizer import FluxRecorder, find_infosteer_model

__all__ = [
    "InfoSteerSFTTrainer",  # noqa: F822 (built lazily by __getattr__: TRL is optional)
    "InfoSteerTrainerMixin",
    "check_gradient_checkpointing",
    "last_complete_checkpoint",
]


def _find_tuner(model: Any) -> InfoSteerModel | None:
    try:
        return find_infosteer_model(model)
    except TypeError:
        return None


def check_gradient_checkpointing(args: Any, tuner: InfoSteerModel) -> None:
    """Refuse reentrant gradient checkpointing when the regularizer is on: it would silently get no gradient."""
    if not getattr(args, "gradient_checkpointing", False):
        return
    if not any(config.entropy_weight > 0 for config in tuner.peft_config.values()):
        return
    kwargs = getattr(args, "gradient_checkpointing_kwargs", None) or {}
    if kwargs.get("use_reentrant", False) and getattr(getattr(args, "deepspeed_plugin", None), "zero_stage", 0) == 3:
        # TRL forces use_reentrant=True for PEFT + ZeRO-3, so the generic advice below would not help
        raise ValueError(
            "InfoSteer's regularizer (entropy_weight > 0) cannot train with DeepSpeed ZeRO-3 and gradient "
            "checkpointing: TRL forces reentrant checkpointing for PEFT models under ZeRO-3, and reentrant "
            "checkpointing gives the regularizer no gradient. Use DeepSpeed ZeRO-2 or FSDP, or set "
            "gradient_checkpointing=False."
        )
    if kwargs.get("use_reentrant", False):
        raise ValueError(
            "InfoSteer's regularizer (entropy_weight > 0) gets no gradient under reentrant gradient checkpointing. "
            "Set gradient_checkpointing_kwargs={'use_reentrant': False} (the transformers default), or turn "
            "gradient checkpointing off."
        )


class InfoSteerTrainerMixin:
    """Add the InfoSteer regularizer to a ``transformers.Trainer`` subclass (TRL trainers included).

    Put it first in the bases so that its ``compute_loss`` wraps the trainer's own:

    >>> from trl import DPOTrainer
    >>> from peft_infosteer import InfoSteerTrainerMixin
    >>> class InfoSteerDPOTrainer(InfoSteerTrainerMixin, DPOTrainer):
    ...     pass

    Models without an InfoSteer adapter pass through unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._infosteer_metrics: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        tuner = _find_tuner(self.model)
        if tuner is not None:
            check_gradient_checkpointing(self.args, tuner)
            _keep_infosteer_params_fp32(tuner)

    # ---- resuming ------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``; ``resume_from_checkpoint=True`` skips a checkpoint whose save was interrupted."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir) or True
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- loss ------------------------------------------------------------------------------------------------

    def _infosteer_loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Mirror ``Trainer.training_step``: is the loss already normalised over the whole accumulation window?"""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        tuner = _find_tuner(model)
        if tuner is None or not tuner.active_adapters:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        recorder = tuner.flux_recorder
        with recorder.holding(token_mask(inputs)):
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = result if return_outputs else (result, None)
        try:
            loss = loss + self._infosteer_term(tuner, recorder, loss, num_items_in_batch)
        finally:
            recorder.clear()  # free the graph held by the records as soon as the loss is built
        return (loss, outputs) if return_outputs else loss

    def _infosteer_term(
        self, tuner: InfoSteerModel, recorder: FluxRecorder, loss: torch.Tensor, num_items_in_batch: Any
    ) -> torch.Tensor | float:
        totals = recorder.totals()
        if totals is None:
            return 0.0
        config = tuner.active_infosteer_config()
        flux_sum, count = totals
        training = self.model.training and torch.is_grad_enabled()
        mode = "train" if self.model.training else "eval"

        # metrics: the mean flux over all ranks, and the regularizer it gives. `gather`, not `gather_for_metrics`: the
        # latter truncates the last batch of an epoch to its per-sample remainder, dropping whole ranks' statistics
        gathered = self.accelerator.gather(torch.stack([flux_sum.detach(), count.detach()]).reshape(1, 2))
        gathered = gathered.reshape(-1, 2).sum(0)
        mean_flux = (gathered[0] / gathered[1]).item() if gathered[1] > 0 else float("nan")
        self._infosteer_metrics[mode]["infosteer/flux"].append(mean_flux)
        self._infosteer_metrics[mode]["infosteer/loss"].append(-config.entropy_weight * mean_flux)

        if config.entropy_weight == 0:
            return 0.0
        if training and recorder.lost_grad:
            raise RuntimeError(
                "InfoSteer's regularizer has no gradient: steered layers ran without autograd in a training forward "
                "(reentrant gradient checkpointing). Set gradient_checkpointing_kwargs={'use_reentrant': False}"
            )
        if training and self._infosteer_loss_is_scaled_for_ga(num_items_in_batch) and num_items_in_batch is not None:
            # Like the task loss: a sum over this micro-batch divided by the token count of the whole window (and of
            # every rank), so micro-batches of different sizes weigh what they hold.
            layers = len(recorder.records)
            denom = torch.as_tensor(num_items_in_batch, device=flux_sum.device, dtype=torch.float32) * layers
            term = -config.entropy_weight * flux_sum / denom.clamp_min(1.0)
            if getattr(self.args, "average_tokens_across_devices", False):
                term = term * (self.accelerator.num_processes // self._infosteer_tp_size())
        else:
            # the trainer divides the whole loss by the accumulation steps itself
            term = -config.entropy_weight * flux_sum / count.clamp_min(1.0)
        return term.to(loss.dtype) if torch.is_tensor(loss) else term

    def _infosteer_tp_size(self) -> int:
        get_tp_size = getattr(self, "get_tp_size", None)
        return int(get_tp_size()) if callable(get_tp_size) else 1

    # ---- model card ------------------------------------------------------------------------------------------

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The trainer's card (written by ``save_model``/``push_to_hub``), plus how to load an InfoSteer adapter."""
        super().create_model_card(*args, **kwargs)
        tuner = _find_tuner(self.model)
        readme = os.path.join(self.args.output_dir, "README.md")
        if tuner is not None and self.is_world_process_zero() and os.path.isfile(readme):
            update_model_card(readme, self.accelerator.unwrap_model(self.model), self.hub_model_id)

    # ---- logging ---------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._infosteer_metrics[mode]
        prefix = "eval_" if mode == "eval" else ""
        for key, values in metrics.items():
            if values:
                logs[prefix + key] = sum(values) / len(values)
        metrics.clear()
        super().log(logs, *args, **kwargs)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose save finished, or ``None``.

    The Trainer writes a checkpoint in place and ``trainer_state.json`` last, so a run killed while saving leaves a
    newest directory without it; ``transformers.trainer_utils.get_last_checkpoint`` would pick that one.
    """
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        prefix, _, step = name.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
            steps.append(int(step))
    for step in sorted(steps, reverse=True):
        path = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            return path
        warnings.warn(f"skipping {path}: its save did not finish (no {TRAINER_STATE_NAME})", stacklevel=3)
    return None


def _keep_infosteer_params_fp32(tuner: InfoSteerModel) -> None:
    """TRL casts trainable parameters to bf16 on quantized bases; the gains stay float32 (they are tiny and sit
    close to 1, where bf16 cannot represent small updates)."""
    for module in tuner.modules():
        if isinstance(module, InfoSteerLayer):
            for name, param in module.infosteer_gain.items():
                if param.dtype != torch.float32:
                    module.infosteer_gain[name] = nn.Parameter(
                        param.detach().float(), requires_grad=param.requires_grad
                    )


def _make_sft_trainer() -> type:
    try:
        from trl import SFTTrainer
    except ImportError as exc:  # pragma: no cover - exercised only without the trl extra
        raise ImportError("InfoSteerSFTTrainer needs TRL: pip install 'peft-infosteer[trl]'") from exc

    class InfoSteerSFTTrainer(InfoSteerTrainerMixin, SFTTrainer):
        """``trl.SFTTrainer`` that adds the InfoSteer regularizer and logs ``infosteer/flux`` and ``infosteer/loss``.

        Same arguments as ``SFTTrainer``; pass a ready InfoSteer ``PeftModel``, or a base model with
        ``peft_config=InfoSteerConfig(...)``.

        >>> from peft_infosteer import InfoSteerConfig, InfoSteerSFTTrainer
        >>> # trainer = InfoSteerSFTTrainer(model=base, train_dataset=ds, args=SFTConfig(...),
        >>> #                               peft_config=InfoSteerConfig(intervention="gain", lora=LoraConfig(r=16)))
        >>> # trainer.train()
        """

        _tag_names: ClassVar[list[str]] = ["trl", "sft", "infosteer", "peft-infosteer"]

    return InfoSteerSFTTrainer


def __getattr__(name: str) -> Any:
    # TRL is an optional extra: build the SFT trainer class on first use
    if name == "InfoSteerSFTTrainer":
        cls = _make_sft_trainer()
        globals()[name] = cls
        return cls
    raise AttributeError(name)

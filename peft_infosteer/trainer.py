"""Trainer integration: InfoSteer's metrics, model card, and the normalisation of the regularizer under any loss.

Any ``transformers.Trainer`` or TRL trainer trains an InfoSteer adapter's regularizer as it is (it acts in the
backward pass, see :mod:`peft_infosteer.regularizer`), exactly for a mean NLL. What a trainer integration adds:

- :class:`InfoSteerCallback`: logs ``infosteer/flux`` (mean flux over the logging interval and all ranks) and
  ``infosteer/loss`` (the regularizer's value ``-entropy_weight * sum over layers of H``, ``H = flux * log d_ff``)
  beside the trainer's own metrics, in train and eval. One line for any trainer: ``InfoSteerCallback.attach(trainer)``.
  Attached, it also tells the model how the trainer's ``compute_loss`` normalises its loss and which tokens it uses
  (a :class:`~peft_infosteer.regularizer.LossPlan`), so that lambda means the same under weighted losses (DFT, label
  smoothing, ``compute_loss_func``, DPO, GRPO) as under the NLL.
- :class:`InfoSteerSFTTrainer`: ``trl.SFTTrainer`` with that callback, the InfoSteer section in the model card it
  writes, and ``resume_from_checkpoint=True`` that skips a checkpoint whose save was interrupted.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ._compat import (
    GRPO_TOKEN_LOSS_TYPES,
    add_callback_first,
    add_to_logged_entry,
    compute_loss_kind,
    saved_callback_attributes,
    set_trainer_tags,
    wrap_trainer_method,
)
from .checkpoints import last_complete_checkpoint
from .hub import update_model_card
from .loss import find_infosteer_model
from .model import InfoSteerModel
from .regularizer import _EVAL, _TRAIN, LossPlan
from .state import FluxState

__all__ = [
    "InfoSteerCallback",
    "InfoSteerSFTTrainer",  # noqa: F822 (built lazily by __getattr__: TRL is optional)
]


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

    With a flux target it also logs ``infosteer/lambda`` and ``infosteer/flux_target``, keeps lambda and the starting
    flux in the trainer's checkpoints (``trainer_state.json``), so that ``resume_from_checkpoint`` continues exactly
    where the run stopped, and binds the target to the trainer's optimizer while it trains (no other optimizer of the
    process steps it; ``peft_infosteer.bind_flux_target``).

    ``transformers.Trainer`` calls its reporting integrations (TensorBoard, W&B, ...) before the callbacks passed in
    ``callbacks=[...]``, so attach it with :meth:`attach` for them to see the metrics too:

    >>> from peft_infosteer import InfoSteerCallback
    >>> # trainer = DPOTrainer(model=model, args=args, train_dataset=ds, peft_config=InfoSteerConfig(...))
    >>> # InfoSteerCallback.attach(trainer)

    It measures while the trainer trains and, when attached with :meth:`attach`, while it evaluates (``evaluate``,
    ``predict``); afterwards the model's forwards without grad (``generate``) measure only when asked (``track_flux``).
    """

    @classmethod
    def attach(cls, trainer: Any) -> InfoSteerCallback:
        """Add a new callback first in ``trainer``'s callbacks, so that every reporter sees the metrics.

        It also makes ``trainer``'s evaluation loop (``evaluate``, ``predict``) measure the flux of its forwards.
        Measuring is scoped: after ``train`` or ``evaluate`` the model measures nothing it was not asked to (a later
        ``generate`` does no flux work). And, for the ``compute_loss`` of ``transformers.Trainer``, TRL's
        ``SFTTrainer``, ``DPOTrainer`` and ``GRPOTrainer``, it normalises the regularizer like that loss whatever
        weights the loss gives its tokens, over the loss's own tokens (``_plan_losses``).
        """
        callback = cls()
        add_callback_first(trainer, callback)
        _measure_in_evaluation(trainer)
        _plan_losses(trainer)
        return callback

    def __init__(self) -> None:
        self._model: Any = None  # for state(), which the trainer calls without arguments
        self._resumed = False
        # the tracker whose measuring train() turned on, and its setting before (restored at the end of training)
        self._measuring: tuple[Any, bool] | None = None
        # the flux state that train() bound to the trainer's optimizer, and the optimizer bound before (restored then)
        self._binding: tuple[FluxState, Any] | None = None
        # a flux state to step from on_optimizer_step: the trainer's optimizer has no torch optimizer to bind inside
        self._step_on_event: FluxState | None = None

    def state(self) -> dict[str, Any]:
        """The flux target's training state (lambda, starting flux), saved with each checkpoint."""
        tuner = _find_tuner(self._model)
        target = tuner.flux_target if tuner is not None else None
        return {"args": {}, "attributes": {"flux_target": None if target is None else target.state_dict()}}

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        self._model = model
        self._resumed = False
        tuner = _find_tuner(model)
        if tuner is not None:
            tracker = tuner.flux_tracker
            self._measuring = (tracker, tracker.measure)
            tracker.measure = True  # training forwards without the regularizer, and evaluations during training
            tracker.take_window(_TRAIN)  # forwards made before training are not part of it
            flux = tuner.flux_state
            if flux.active_target is not None and optimizer is not None:
                try:  # the target follows this trainer's optimizer steps, not those of another optimizer
                    self._binding = (flux, flux.bind_optimizer(optimizer))
                except TypeError:  # no torch optimizer inside: the trainer's event after each step will do
                    self._step_on_event = flux

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._step_on_event is not None:
            self._step_on_event.step_target()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # no leftover state: after training, forwards without grad (generate) measure only when asked, and the flux
        # target follows what it followed before
        if self._measuring is not None:
            tracker, before = self._measuring
            tracker.measure = before
            self._measuring = None
        if self._binding is not None:
            flux, previous = self._binding
            flux.bind_optimizer(previous)
            self._binding = None
        self._step_on_event = None

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # Resuming: the trainer loads trainer_state.json after on_train_begin, so the first step of a resumed run is
        # where lambda and the starting flux saved by state() come back
        if self._resumed or state.global_step == 0:
            return
        self._resumed = True
        tuner = _find_tuner(model)
        target_state = saved_callback_attributes(state, type(self).__name__).get("flux_target")
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
        added = {f"{prefix}infosteer/flux": flux}
        if tracker.scale_unknown is None:  # the regularizer's value, logged only when it acted with weight lambda
            added[f"{prefix}infosteer/loss"] = -float(tracker.weight) * tracker.flux_scale * flux + 0.0  # no -0.0
        target = tuner.flux_target
        if target is not None and mode == _TRAIN:
            added["infosteer/lambda"] = target.weight
            if target.target is not None:
                added["infosteer/flux_target"] = target.target
        logs.update(added)
        add_to_logged_entry(state, added)  # Trainer.log stored a copy of `logs` before calling the callbacks


def _measure_in_evaluation(trainer: Any) -> None:
    """Make ``trainer.evaluation_loop`` (behind ``evaluate`` and ``predict``) measure the flux while it runs, and only
    then: transformers has no callback event at the start of an evaluation."""

    def measuring(loop: Any) -> Any:
        def evaluation_loop(*args: Any, **kwargs: Any) -> Any:
            tuner = _find_tuner(trainer.model)
            if tuner is None:
                return loop(*args, **kwargs)
            tracker = tuner.flux_tracker
            before, tracker.measure = tracker.measure, True
            try:
                return loop(*args, **kwargs)
            finally:
                tracker.measure = before

        return evaluation_loop

    wrap_trainer_method(trainer, "evaluation_loop", measuring)


def _loss_plan(kind: str, trainer: Any, inputs: Mapping[str, Any], num_items_in_batch: Any) -> LossPlan | None:
    """How ``trainer``'s ``compute_loss`` of ``kind`` normalises the loss of ``inputs`` (mirrors TRL 1.x and
    transformers 5.x); ``None`` for a path that computes the model's own loss, which the model-output probe reads."""
    args = trainer.args
    if kind == "dpo":  # a mean over the micro-batch's pairs; Trainer divides it by the accumulation steps
        return LossPlan("DPOTrainer")
    if kind == "grpo":
        # the loss's tokens: the completion tokens (without tool outputs), as in GRPOTrainer._compute_loss
        completion = inputs["completion_mask"]
        if "tool_mask" in inputs:
            completion = completion * inputs["tool_mask"]
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        kept = torch.cat([torch.zeros_like(inputs["prompt_mask"]), completion], dim=1)
        labels = ids.masked_fill(kept == 0, -100)
        name = f"GRPOTrainer(loss_type={trainer.loss_type!r})"
        steps = trainer.current_gradient_accumulation_steps
        if trainer.loss_type in GRPO_TOKEN_LOSS_TYPES:
            items = torch.as_tensor(inputs["num_items_in_batch"], dtype=torch.float32).clamp_min(1.0)
            denominator = items / trainer.accelerator.num_processes * steps / args.steps_per_generation
            return LossPlan(name, labels=labels, override=True, denominator=denominator)
        # a per-micro-batch mean, divided by the accumulation steps inside compute_loss (like GRPO's entropy bonus)
        return LossPlan(name, labels=labels, override=True, divisor=float(steps))
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    if parallelism is not None and getattr(parallelism, "sp_enabled", False):
        return None  # sequence parallelism: the model's own loss
    batch_labels = inputs.get("labels")
    sft_labels = batch_labels if isinstance(batch_labels, torch.Tensor) else None
    name = f"SFTTrainer(loss_type={args.loss_type!r})" if kind == "sft" else type(trainer).__name__
    if num_items_in_batch is None:  # a mean over the micro-batch's tokens; Trainer divides it by the steps
        return LossPlan(name, labels=sft_labels)
    # a sum over the tokens divided by num_items_in_batch (the window's, over all processes when averaged), then
    # multiplied by the number of processes that DDP averages over
    averaged = args.average_tokens_across_devices and (
        kind == "sft" or trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None
    )
    tensor_parallel = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
    processes = trainer.accelerator.num_processes // tensor_parallel if averaged else 1
    denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32) / processes
    return LossPlan(name, labels=sft_labels, denominator=denominator)


def _plan_losses(trainer: Any) -> None:
    """Make ``trainer.compute_loss`` tell the tracker how it normalises its loss (a :class:`LossPlan`), so that the
    regularizer of its forwards is normalised like the task loss whatever weights the loss gives its tokens, and
    counts the loss's tokens even when the forward gets no labels. Trainers whose ``compute_loss`` is not one of
    ``peft_infosteer._compat.KNOWN_COMPUTE_LOSSES`` keep the model-output probes (exact for a mean NLL; other
    weightings are detected and warned)."""
    kind = compute_loss_kind(trainer)
    if kind is None:
        return

    def planning(compute_loss: Any) -> Any:
        def planned_compute_loss(
            model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None, **kwargs: Any
        ) -> Any:
            tuner = _find_tuner(trainer.model)
            plan = None
            if tuner is not None and torch.is_grad_enabled() and isinstance(inputs, Mapping):
                plan = _loss_plan(kind, trainer, inputs, num_items_in_batch)
            if tuner is None or plan is None:
                return compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs
                )
            tracker = tuner.flux_tracker
            with tracker.planned(plan):
                result = compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs
                )
            if return_outputs:
                loss, outputs = result
                return tracker.plan_probe(plan, loss), outputs
            return tracker.plan_probe(plan, result)

        return planned_compute_loss

    wrap_trainer_method(trainer, "compute_loss", planning)


def _make_sft_trainer() -> type:
    try:
        from trl import SFTTrainer
    except ImportError as exc:  # pragma: no cover - exercised only without the trl extra
        raise ImportError("InfoSteerSFTTrainer needs TRL: pip install 'peft-infosteer[trl]'") from exc

    class InfoSteerSFTTrainer(SFTTrainer):
        """``trl.SFTTrainer`` with InfoSteer's metrics, model card and safe resuming.

        Same arguments as ``SFTTrainer``; pass a base model with ``peft_config=InfoSteerConfig(...)`` or a ready
        InfoSteer ``PeftModel``. A plain ``SFTTrainer`` trains the regularizer just as well under the NLL; this class
        adds the ``infosteer/flux`` and ``infosteer/loss`` metrics and the normalisation of the regularizer under
        ``loss_type="dft"``, label smoothing and ``compute_loss_func`` (:meth:`InfoSteerCallback.attach`), and the
        model card.

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

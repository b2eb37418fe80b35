"""Trainer checkpoints that are safe to resume from."""

from __future__ import annotations

import os
import warnings

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ._compat import TRAINER_STATE_NAME, checkpoint_save_finished

__all__ = ["last_complete_checkpoint"]


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose save finished, or ``None``.

    The Trainer writes a checkpoint in place and ``trainer_state.json`` last, so a run killed while saving leaves a
    newest directory without it; ``transformers.trainer_utils.get_last_checkpoint`` would pick that one.

    >>> last_complete_checkpoint("a/directory/that/does/not/exist") is None
    True
    """
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        prefix, _, suffix = name.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and suffix.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
            steps.append(int(suffix))
    for step in sorted(steps, reverse=True):
        path = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if checkpoint_save_finished(path):
            return path
        warnings.warn(f"skipping {path}: its save did not finish (no {TRAINER_STATE_NAME})", stacklevel=3)
    return None

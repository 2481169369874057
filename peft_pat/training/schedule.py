"""Driving the mask schedule (``set_step``) and what it records for the logs.

:func:`drive_schedule` advances every adapter's mask to an optimizer step (the callback calls it through
``PATModel.set_step`` after every step) and keeps :class:`TrainingTelemetry` up to date: the last losses of
the training forward, the objective per step around the hardening and the loss change across it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch

from ..axes import AXIS_UNITS
from ..errors import PATStateError

logger = logging.getLogger("peft_pat")

HARDENING_WINDOW = 3  # optimizer steps averaged on each side of the hardening step for the loss-change log


@dataclass
class TrainingTelemetry:
    """What the training side of one tuner remembers between steps (all of it, in one place)."""

    last_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # detached, of the last training forward
    objective_trace: dict[int, float] = field(default_factory=dict)  # step -> training objective
    hardened_at: int | None = None
    hardening_loss_change: float | None = None
    warned_uncalibrated: bool = False
    calibration_summary: dict | None = None

    def logged_losses(self) -> dict[str, float]:
        """The last losses as floats (read only when logged: the forward neither waits for the device nor
        breaks a ``torch.compile`` graph), with the hardening loss change once known."""
        values = {key: float(value) for key, value in self.last_losses.items()}
        if self.hardening_loss_change is not None:
            values["hardening_loss_change"] = float(self.hardening_loss_change)
        return values

    def trace_hardening_loss(self, step: int) -> None:
        """Record the training objective per step; HARDENING_WINDOW steps after the hardening, log its change.

        The objective is the distillation loss when distilling, else the task loss (auxiliary losses
        excluded). ``hardening_loss_change`` = mean over the window after - mean over the window before.
        """
        value = self.last_losses.get("distillation_loss", self.last_losses.get("task_loss"))
        if value is None or step < 1:
            return
        self.objective_trace[step] = float(value)
        hardened = self.hardened_at
        if hardened is None or step != hardened + HARDENING_WINDOW or self.hardening_loss_change is not None:
            return
        trace = self.objective_trace
        before = [trace[s] for s in range(hardened - HARDENING_WINDOW + 1, hardened + 1) if s in trace]
        after = [trace[s] for s in range(hardened + 1, hardened + HARDENING_WINDOW + 1) if s in trace]
        if before and after:
            mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
            self.hardening_loss_change = mean_after - mean_before
            logger.info(
                "PAT: training loss across the hardening at step %d: %.4f before, %.4f after (%+.4f).",
                hardened, mean_before, mean_after, self.hardening_loss_change,
            )  # fmt: skip


def drive_schedule(tuner, step: int, total_steps: int, learning_rate: float | None = None) -> None:
    """Advance every PAT adapter's mask of ``tuner`` to optimizer step ``step`` of ``total_steps``."""
    if "pat_mask" not in tuner._modules or not len(tuner.pat_mask):
        raise PATStateError(
            "set_step: this model has no PAT adapter (all were deleted?); add one with add_adapter(name, "
            "PATConfig(...)) or wrap the base model with get_peft_model(base, PATConfig(...))."
        )
    telemetry: TrainingTelemetry = tuner.telemetry
    telemetry.trace_hardening_loss(step)
    _warn_if_uncalibrated(tuner, telemetry, step)
    for name in tuner.pat_mask:
        for axis, mask in tuner.masks_of(name).items():
            if mask.set_step(step, total_steps, learning_rate=learning_rate):
                telemetry.hardened_at = step
                what = AXIS_UNITS[axis]
                warnings.warn(
                    f"PAT adapter '{name}': mask hardened at step {step}/{total_steps}; {mask.kept_width} of "
                    f"{mask.hidden_size} {what} kept.",
                    stacklevel=3,
                )


def _warn_if_uncalibrated(tuner, telemetry: TrainingTelemetry, step: int) -> None:
    """Once: training started while an adapter still waits for its importance-aware start."""
    if step < 1 or telemetry.warned_uncalibrated:
        return
    waiting = [n for n in tuner.pat_mask if n in tuner.peft_config and tuner.needs_calibration(n)]
    if waiting:
        telemetry.warned_uncalibrated = True
        warnings.warn(
            f"PAT adapter(s) {waiting}: training started without the importance-aware mask start, so the mask "
            "logits start at 0 and massive-activation channels are not protected. Call "
            "model.calibrate(first_training_batches) before the first step (PATCallback does it for "
            "the Trainer), or set PATConfig(calibration_batches=0) to start from 0 on purpose.",
            RuntimeWarning,
            stacklevel=4,
        )

"""The importance-aware mask start: rank the hidden channels on the first training batches, start there.

:func:`calibrate` ranks channels by the activation criterion of :mod:`peft_pat.calibration` on the base
model (PAT bypassed), averaged over the processes of a distributed run, protects massive-activation
channels, orders the mask logits by rank within +-``calibration_margin`` (the mask starts at the activation
top-N) and divides the change of the step-0 gate out of every HSM scale g: the product g ⊙ M, and so
the network, computes exactly what it computed before (the base model, for a fresh adapter).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..calibration import channel_statistics, massive_channels
from ..checks import check_calibration_batches, check_calibration_source
from ..config import DEFAULT_CALIBRATION_BATCHES
from ..errors import PATConfigError, PATStateError
from ..layer import PATLayer
from .objective import teacher_pass

logger = logging.getLogger("peft_pat")


def all_reduce_mean(tensor: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Mean of ``tensor`` over the processes of a running torch.distributed job (itself otherwise)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    device = next(model.parameters()).device if dist.get_backend() == "nccl" else torch.device("cpu")
    reduced = tensor.to(device, torch.float64)
    dist.all_reduce(reduced)
    return (reduced / dist.get_world_size()).cpu()


def needs_calibration(tuner, name: str) -> bool:
    """True while adapter ``name`` asks for the start, has not had it, its mask is soft and training has not
    started (the schedule is at step 0: later, calibrating would discard trained logits)."""
    mask = tuner.pat_mask[name]
    waiting = tuner.peft_config[name].calibration_batches > 0 and not bool(mask.calibrated)
    return waiting and not mask.hardened and int(mask.step) == 0


@torch.no_grad()
def calibrate(tuner, name: str, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict:
    """The importance-aware start of adapter ``name`` from the first ``calibration_batches`` of ``batches``
    (module docstring). Returns a summary (tokens, protected channels and their energy ratio to the median)."""
    config = tuner.peft_config[name]
    mask = tuner.pat_mask[name]
    if mask.hardened:
        raise PATStateError(
            "calibrate: the mask is already hard (training is past the freeze point), so its channels are fixed. "
            "Calibrate a fresh adapter before its first optimizer step."
        )
    if int(mask.step) > 0:
        raise PATStateError(
            f"calibrate: training has started (the mask schedule is at step {int(mask.step)}); the importance-"
            "aware start would overwrite the trained mask logits and change the model's outputs. Call "
            "calibrate(batches) before the first optimizer step (PATCallback does it at the start of training), "
            "or keep training without it."
        )
    check_calibration_source(batches)
    # calibration_batches=0 means no automatic start; called by hand anyway, it still reads a bounded number
    # of batches (an endless iterator must not hang it)
    limit = config.calibration_batches or DEFAULT_CALIBRATION_BATCHES
    chosen = list(itertools.islice(batches, limit))
    if not chosen:
        raise PATConfigError("calibrate: got no batch; pass the first batches of the training data.")
    check_calibration_batches(chosen)
    with teacher_pass(tuner):
        stats = channel_statistics(tuner.model, chosen, tuner.family)
    score, energy = all_reduce_mean(stats.score, tuner.model), all_reduce_mean(stats.energy, tuner.model)
    protected = torch.zeros(mask.hidden_size, dtype=torch.bool)
    if config.protect_massive_activations:
        protected[massive_channels(energy, config.massive_activation_ratio)] = True
    gate_before = mask.gate().detach().float().cpu()
    gate_after = mask.start_from_importance(score, protected, config.calibration_margin)
    ratio = gate_before / gate_after
    for layer in (m for m in tuner.model.modules() if isinstance(m, PATLayer)):
        if layer.has_hsm(name):
            scale = layer.pat_hsm_scale[name]
            scale.data = (scale.data.float() * ratio.to(scale.device)).to(scale.dtype)
    median = float(energy.median())
    summary = {
        "tokens": stats.tokens,
        "batches": len(chosen),
        "protected_channels": protected.nonzero().flatten().tolist(),
        "protected_energy_ratio": [round(float(energy[i]) / median, 1) for i in protected.nonzero().flatten()],
    }
    if summary["protected_channels"]:
        logger.warning(
            "PAT: protected massive-activation channel(s) %s (residual energy %s x the median) from pruning; "
            "set protect_massive_activations=False to allow it.",
            summary["protected_channels"],
            summary["protected_energy_ratio"],
        )
    logger.info("PAT: mask start ranked %d channels on %d calibration tokens.", mask.hidden_size, stats.tokens)
    return summary

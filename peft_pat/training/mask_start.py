"""The importance-aware mask start: rank the hidden channels on the first training batches, start there.

:func:`calibrate` ranks channels by the activation criterion of :mod:`peft_pat.calibration` on the base
model (PAT bypassed), on all processes' batches together in a distributed run, protects massive-activation
channels, orders the mask logits by rank within +-``calibration_margin`` (the mask starts at the activation
top-N) and divides the change of the step-0 gate out of every HSM scale g: the product g ⊙ M, and so
the network, computes exactly what it computed before (the base model, for a fresh adapter). The
per-layer axes start the same way from their own scores (per layer: MLP units; query heads within each KV
head; KV heads by the sum of their query heads' scores), the change divided out of the input scales of the
linear they gate (``down_proj``, ``o_proj``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..axes import column_gate
from ..calibration import channel_statistics, massive_channels
from ..checks import check_calibration_batches, check_calibration_source
from ..config import DEFAULT_CALIBRATION_BATCHES
from ..errors import PATConfigError, PATStateError
from ..layer import PATLayer
from ..sharding import full, reshard, sharded_parameters, write_
from .objective import teacher_pass

logger = logging.getLogger("peft_pat")


def _pruned_masks(tuner, name: str) -> dict:
    """The masks of adapter ``name`` that prune something (the hidden mask of an unpruned hidden axis does not)."""
    axes = tuner.peft_config[name].pruned_axes
    return {axis: mask for axis, mask in tuner.masks_of(name).items() if axis in axes}


def needs_calibration(tuner, name: str) -> bool:
    """True while adapter ``name`` asks for the start, has not had it, its masks are soft and training has not
    started (the schedule is at step 0: later, calibrating would discard trained logits)."""
    if tuner.peft_config[name].calibration_batches <= 0:
        return False
    masks = _pruned_masks(tuner, name).values()
    return any(not bool(m.calibrated) and not m.hardened and int(m.step) == 0 for m in masks)


def _start(mask, scores: torch.Tensor, protected: torch.Tensor, margin: float) -> torch.Tensor:
    """Start ``mask`` from ``scores``; returns gate before / gate after, which the scales the gate multiplies are
    multiplied by, so s ⊙ M (and the network) is unchanged."""
    gate_before = mask.gate().detach().float().cpu()
    return gate_before / mask.start_from_importance(scores, protected, margin)


def _unit_scores(stats, masks: dict) -> dict[str, torch.Tensor]:
    """Each pruned per-layer axis' unit scores in its mask's shape: MLP channels; query heads per (layer, KV
    group); KV heads (layer, group) as the sum of their query heads' scores."""
    scores = {}
    if "mlp" in masks:
        scores["mlp"] = stats.mlp_score
    if "heads" in masks or "kv_heads" in masks:
        head = stats.head_score
        groups = masks["heads"].groups[1] if "heads" in masks else masks["kv_heads"].hidden_size
        grouped = head.view(head.shape[0], groups, -1)  # query head h in group h // (H / G)
        if "heads" in masks:
            scores["heads"] = grouped
        if "kv_heads" in masks:
            scores["kv_heads"] = grouped.sum(-1)
    return scores


def _rescale(scale: torch.nn.Parameter, ratio: torch.Tensor) -> None:
    """s <- s ⊙ ratio, in place (a sharded s takes its own rows; every rank holds the same ratio)."""
    write_(scale, full(scale).float() * ratio.to(scale.device))


def _statistics_forward(tuner, model: nn.Module | None) -> nn.Module:
    """The module to run the calibration forward through: the tuner's base model, or, when ``fully_shard`` has
    sharded the parameters, the sharded ``model`` itself, whose forward gathers them (refused without it)."""
    sharded = sharded_parameters(tuner.model)
    if not sharded:
        return tuner.model
    if model is None or not any(m is tuner for m in model.modules()):
        raise PATStateError(
            f"calibrate: the parameters of this model are sharded by fully_shard (FSDP2; e.g. {sharded[0]}), and "
            "only the sharded model's own forward gathers them, which PATModel.calibrate cannot reach. Call "
            "peft_pat.calibrate(model, batches) on every rank with the model you passed to fully_shard (PATCallback "
            "does this for the Trainer)."
        )
    return model


@torch.no_grad()
def calibrate(tuner, name: str, batches: Iterable[Mapping[str, torch.Tensor]], model: nn.Module | None = None) -> dict:
    """The importance-aware start of adapter ``name`` from the first ``calibration_batches`` of ``batches``
    (module docstring). Returns a summary (tokens, protected channels and their energy ratio to the median).

    In a distributed job every rank calls it with its own batches; the statistics are those of all ranks'
    batches together (:func:`~peft_pat.calibration.channel_statistics` with ``all_ranks``), so every rank starts
    from the same mask. ``model``: the outer module (a ``fully_shard``-ed PeftModel) whose forward runs the
    statistics pass when the parameters are sharded."""
    config = tuner.peft_config[name]
    masks = _pruned_masks(tuner, name)
    mask = masks["hidden"] if "hidden" in masks else next(iter(masks.values()))
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
    forward = _statistics_forward(tuner, model)
    try:
        with teacher_pass(tuner):
            stats = channel_statistics(forward, chosen, tuner.family, mlp="mlp" in masks,
                                       heads=bool({"heads", "kv_heads"} & set(masks)), all_ranks=True)  # fmt: skip
    finally:
        reshard(forward)  # the root keeps its gathered parameters after a forward; the writes below go to shards
    score, energy = stats.score, stats.energy
    protected = torch.zeros(tuner.pat_mask[name].hidden_size, dtype=torch.bool)
    layers = [m for m in tuner.model.modules() if isinstance(m, PATLayer)]
    if "hidden" in masks:
        if config.protect_massive_activations:
            protected[massive_channels(energy, config.massive_activation_ratio)] = True
        ratio = _start(mask, score, protected, config.calibration_margin)
        for layer in layers:
            if layer.has_hsm(name):
                _rescale(layer.pat_hsm_scale[name], ratio)
    ratios = {}  # per-layer axes: the gate s ⊙ M sits on the input of each axis' output linear
    for axis, scores in _unit_scores(stats, masks).items():
        unit_mask = masks[axis]
        ratios[axis] = _start(unit_mask, scores, torch.zeros_like(unit_mask.protected), config.calibration_margin)
    for layer in layers:
        if name in layer.pat_unit_gate and ratios:
            axes, index = layer.pat_unit_gate[name]
            scale = layer.pat_unit_scale[name]
            _rescale(scale, column_gate({axis: ratios[axis][index] for axis in axes}, scale.numel()))
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

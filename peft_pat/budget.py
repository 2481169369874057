"""The widths a parameter budget gives: ``target_sparsity`` split into a kept hidden width and MLP width.

With the hidden axis alone, ``target_sparsity`` is the fraction of hidden channels removed (every weight
matrix has one residual dimension, so the parameter fraction nearly coincides; :mod:`peft_pat.width`).
With the MLP axis it is the fraction of the base's parameters removed, counted by the plan's own shape
rules (:func:`peft_pat.merge.plan.cut_parameter_count`, tied embeddings once): an axis without an explicit
target takes what the budget leaves after the others, rounded to the nearest kernel-friendly width. Two
axes and only ``target_sparsity``: the hidden width loses :data:`HIDDEN_SHARE` of it, the MLP the rest.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from .config import DEFAULT_TARGET_SPARSITY, PATConfig
from .errors import AdapterMismatchError, PATConfigError
from .families import FamilySpec
from .merge.plan import TensorInfo, cut_parameter_count
from .width import kept_width_for

# With both axes and only target_sparsity, the hidden width loses this share of it (as a fraction of its
# channels) and the MLP width takes the rest of the parameter budget. Measured on SmolLM2-135M (the levers loop,
# 72 steps, distillation, WikiText-2 on 40 windows; docs/quality.md, Multi-axis): at -25% parameters hidden -12.5%
# + MLP gave 98.4 PPL against 99.4 for the MLP alone and 129.5 for the hidden width alone; at -50%, hidden -25% +
# MLP gave 306 against 886 and ~550.
HIDDEN_SHARE = 0.5
MLP_MULTIPLE = 8  # the kept MLP width is a multiple of this where the MLP is at least 8 times as wide


def _budget_width(count, full: int, quantum: int, target_params: float, what: str, cfg: PATConfig) -> int:
    """The multiple of ``quantum`` in (0, full) whose cut model's parameter count ``count(width)`` is nearest
    ``target_params`` (``count`` grows with the width, linearly)."""
    per_unit = (count(full) - count(full - quantum)) / quantum
    width = full - (count(full) - target_params) / per_unit
    best = quantum * round(width / quantum)
    if not 0 < best < full:
        raise PATConfigError(
            f"target_sparsity={cfg.target_sparsity} cannot be reached by cutting the {what}: it would keep {width:.0f} "
            f"of {full} (it must keep between {quantum} and {full - quantum}). Lower target_sparsity, or prune more "
            "axes (prune_axes)."
        )
    return best


def resolve_widths(
    cfg: PATConfig, family: FamilySpec, model_config: dict, layout: list[TensorInfo]
) -> tuple[int, int | None]:
    """(kept hidden width N, kept MLP width I' or None) of ``cfg`` on the base of ``model_config``/``layout``."""
    d, heads = int(model_config["hidden_size"]), int(model_config["num_attention_heads"])
    axes = cfg.pruned_axes
    if "mlp" not in axes:
        return kept_width_for(cfg, d, heads), None
    intermediate = int(model_config["intermediate_size"])
    config = SimpleNamespace(**model_config)

    def count(width: int, mlp: int) -> int:
        return cut_parameter_count(family, config, layout, width, {"mlp": mlp})

    sparsity = DEFAULT_TARGET_SPARSITY if cfg.target_sparsity is None else float(cfg.target_sparsity)
    target = (1.0 - sparsity) * count(d, intermediate)
    mlp_quantum = MLP_MULTIPLE if intermediate >= 8 * MLP_MULTIPLE else 1
    if "hidden" in axes:
        if cfg.target_width is None and cfg.target_intermediate_size is None:
            # the split: the hidden width loses HIDDEN_SHARE of target_sparsity, the MLP what the budget leaves
            split = SimpleNamespace(**{**vars(cfg), "target_sparsity": HIDDEN_SHARE * sparsity, "kept_width": None})
            width = kept_width_for(split, d, heads)
        elif cfg.target_width is not None:
            width = kept_width_for(SimpleNamespace(**{**vars(cfg), "target_sparsity": None}), d, heads)
        else:
            quantum = math.lcm(heads, 8) if d >= 8 * math.lcm(heads, 8) else heads
            mlp = _checked_intermediate(cfg.target_intermediate_size, intermediate)
            width = _budget_width(lambda w: count(w, mlp), d, quantum, target, "hidden width", cfg)
    else:
        width = d
    if cfg.target_intermediate_size is not None:
        mlp = _checked_intermediate(cfg.target_intermediate_size, intermediate)
    else:
        mlp = _budget_width(lambda i: count(width, i), intermediate, mlp_quantum, target, "MLP width", cfg)
    if cfg.kept_intermediate_size is not None and cfg.kept_intermediate_size != mlp:
        raise AdapterMismatchError(
            f"kept_intermediate_size={cfg.kept_intermediate_size} recorded in the adapter contradicts what its "
            f"settings give on this base ({mlp}); load the adapter onto the base it was trained from."
        )
    if cfg.kept_width is not None and cfg.kept_width != width:
        raise AdapterMismatchError(
            f"kept_width={cfg.kept_width} recorded in the adapter contradicts what its settings give on this base "
            f"({width}); load the adapter onto the base it was trained from."
        )
    return width, mlp


def _checked_intermediate(kept: int, intermediate: int) -> int:
    if not 0 < kept < intermediate:
        raise PATConfigError(
            f"target_intermediate_size={kept} cannot be reached: it must lie strictly between 0 and the model's "
            f"intermediate_size={intermediate}."
        )
    return kept

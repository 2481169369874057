"""The widths a parameter budget gives: ``target_sparsity`` split into a kept hidden width, MLP width, query
heads and KV heads.

With the hidden axis alone, ``target_sparsity`` is the fraction of hidden channels removed (every weight
matrix has one residual dimension, so the parameter fraction nearly coincides; :mod:`peft_pat.width`).
With any other axis it is the fraction of the base's parameters removed, counted by the plan's own shape
rules (:func:`peft_pat.merge.plan.cut_parameter_count`, tied embeddings once). Explicit targets are kept as
given; the first pruned axis without one in :data:`BUDGET_ORDER` (MLP, hidden, KV heads, query heads) takes
what the budget leaves after the others, rounded to the nearest allowed width. The other axes without a
target: the hidden width loses :data:`HIDDEN_SHARE` of ``target_sparsity`` (of its channels), the head axes
lose ``target_sparsity`` of their units (KV heads; query heads of each KV head), at least one kept and one
removed. The kept hidden width is a multiple of the kept query heads (transformers needs
hidden_size % num_attention_heads == 0).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import NamedTuple

from .config import DEFAULT_TARGET_SPARSITY, HEAD_AXES, PATConfig
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
# The kept MLP width is a multiple of this where the MLP is at least 8 times as wide: the K dimension of down_proj,
# which llama.cpp's AVX-512 float32 GEMM tiles by 16 (SmolLM2 prefill, MLP 1160 vs 1168: 0.99x vs 1.12x dense;
# docs/performance.md, Multi-axis shapes).
MLP_MULTIPLE = 16


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


class KeptWidths(NamedTuple):
    """What a config keeps: the hidden width N, and per layer the MLP width I', the query heads H' and the KV heads
    G' (None for an axis that is not pruned)."""

    hidden: int
    mlp: int | None = None
    heads: int | None = None
    kv_heads: int | None = None


BUDGET_ORDER = ("mlp", "hidden", "kv_heads", "heads")  # the first pruned axis without a target takes the budget


def _budget_taker(cfg: PATConfig) -> str | None:
    """The axis that takes what the parameter budget leaves: the first of :data:`BUDGET_ORDER` that is pruned
    without an explicit target (None when every pruned axis has one)."""
    targets = {"hidden": cfg.target_width, "mlp": cfg.target_intermediate_size,
               "heads": cfg.target_num_attention_heads, "kv_heads": cfg.target_num_key_value_heads}  # fmt: skip
    return next((a for a in BUDGET_ORDER if a in cfg.pruned_axes and targets[a] is None), None)


def _proportional(units: int, sparsity: float, what: str) -> int:
    """The count of ``units`` nearest keeping (1 - sparsity) of them, at least 1 and at most units - 1."""
    if units < 2:
        raise PATConfigError(
            f"Cannot prune the {what}: there is {units} of them, nothing to choose from. Remove the axis from "
            "prune_axes (query heads of a model without grouped-query attention: prune 'kv_heads')."
        )
    return min(max(round((1.0 - sparsity) * units), 1), units - 1)


def unit_widths(widths: KeptWidths, model_config: dict) -> dict[str, int]:
    """The per-layer widths that cut something, as :func:`~peft_pat.merge.plan.cut_parameter_count` takes them."""
    heads = int(model_config["num_attention_heads"])
    groups = int(model_config.get("num_key_value_heads") or heads)
    units = {} if widths.mlp is None else {"mlp": widths.mlp}
    if widths.heads is not None and widths.heads < heads:
        units["heads"] = widths.heads
    if widths.kv_heads is not None and widths.kv_heads < groups:
        units["kv_heads"] = widths.kv_heads
    return units


def recorded_widths(cfg: PATConfig) -> KeptWidths:
    """The widths a resolved config recorded (``kept_*`` fields)."""
    axes = cfg.pruned_axes
    heads = cfg.kept_num_attention_heads if set(axes) & set(HEAD_AXES) else None
    kv = cfg.kept_num_key_value_heads if set(axes) & set(HEAD_AXES) else None
    return KeptWidths(cfg.kept_width, cfg.kept_intermediate_size, heads, kv)


def _kept_kv_heads(cfg: PATConfig, groups: int, sparsity: float, taker: str | None) -> int | None:
    """G': all groups when kv_heads is not pruned, None when it takes the budget, else its target (checked) or the
    fraction ``sparsity`` of the groups removed."""
    if "kv_heads" not in cfg.pruned_axes:
        return groups
    if taker == "kv_heads":
        return None
    kv = cfg.target_num_key_value_heads
    if kv is None:
        return _proportional(groups, sparsity, "KV heads")
    if not 0 < kv < groups:
        raise PATConfigError(
            f"target_num_key_value_heads={kv} cannot be reached: it must lie strictly between 0 and the model's "
            f"num_key_value_heads={groups}."
        )
    return kv


def _kept_query_heads(cfg: PATConfig, kv: int, heads: int, groups: int, sparsity: float, taker) -> int | None:
    """H' with G' = ``kv`` KV heads kept: every query head of each kept group when heads is not pruned, None when
    it takes the budget, else its target (checked: a multiple of G' below G' x H / G) or (1 - sparsity) of each
    group's query heads."""
    per_group = heads // groups
    if "heads" not in cfg.pruned_axes:
        return per_group * kv
    if taker == "heads":
        return None
    target = cfg.target_num_attention_heads
    if target is None:
        return kv * _proportional(per_group, sparsity, f"query heads of each KV head ({per_group} each)")
    if not 0 < target < heads:
        raise PATConfigError(
            f"target_num_attention_heads={target} cannot be reached: it must lie strictly between 0 and the "
            f"model's num_attention_heads={heads}."
        )
    if target % kv:
        raise PATConfigError(
            f"target_num_attention_heads={target} is not a multiple of the {kv} KV heads kept: every KV head keeps "
            f"the same number of its own query heads. Use a multiple of {kv}"
            f"{' (or change target_num_key_value_heads)' if 'kv_heads' in cfg.pruned_axes else ''}."
        )
    if target // kv >= per_group:
        raise PATConfigError(
            f"target_num_attention_heads={target} keeps every query head of the {kv} kept KV heads ({per_group} "
            "each): the 'heads' axis prunes nothing. Remove 'heads' from prune_axes, or keep fewer query heads."
        )
    return target


def _nearest_heads(options: dict[int, KeptWidths], full: tuple[int, KeptWidths], count, target: float, what: str,
                   cfg: PATConfig) -> KeptWidths:  # fmt: skip
    """The option (by kept count) whose parameter count is nearest ``target``; refused, like
    :func:`_budget_width`, when the nearest would keep none or all of the units (``full``: (count, widths) of
    keeping all)."""
    if not options:
        raise PATConfigError(
            f"target_sparsity={cfg.target_sparsity}: no count of {what} fits the other settings (the kept query heads "
            "must divide the hidden width). Give the head targets explicitly, or prune other axes."
        )
    counts = {n: count(w) for n, w in options.items()}
    smallest = min(counts)
    lowest, highest = counts[smallest], count(full[1])
    per_unit = (highest - lowest) / max(1, full[0] - smallest)
    if not lowest - per_unit / 2 <= target <= highest - per_unit / 2:
        raise PATConfigError(
            f"target_sparsity={cfg.target_sparsity} cannot be reached by cutting the {what}: keeping the fewest "
            f"({smallest}) leaves {lowest:,} parameters, keeping all {highest:,}, and the target is {target:,.0f}. "
            "Change target_sparsity, give explicit targets, or prune more axes (prune_axes)."
        )
    return options[min(counts, key=lambda n: (abs(counts[n] - target), n))]


def resolve_widths(cfg: PATConfig, family: FamilySpec, model_config: dict, layout: list[TensorInfo]) -> KeptWidths:
    """What ``cfg`` keeps on the base of ``model_config``/``layout`` (module docstring)."""
    d, heads = int(model_config["hidden_size"]), int(model_config["num_attention_heads"])
    groups = int(model_config.get("num_key_value_heads") or heads)
    axes = cfg.pruned_axes
    if axes == ("hidden",):
        return _checked_record(cfg, KeptWidths(kept_width_for(cfg, d, heads)))
    config = SimpleNamespace(**model_config)
    intermediate = int(model_config["intermediate_size"])

    def count(w: KeptWidths) -> int:
        return cut_parameter_count(family, config, layout, w.hidden, unit_widths(w, model_config))

    sparsity = DEFAULT_TARGET_SPARSITY if cfg.target_sparsity is None else float(cfg.target_sparsity)
    target = (1.0 - sparsity) * count(KeptWidths(d))
    taker = _budget_taker(cfg)
    kept_kv = _kept_kv_heads(cfg, groups, sparsity, taker)
    kept_heads = None if kept_kv is None else _kept_query_heads(cfg, kept_kv, heads, groups, sparsity, taker)
    out_heads = kept_heads or 1  # the width is a multiple of the pruned config's head count (checked at the end)
    mlp = None
    if "mlp" in axes and taker != "mlp":
        mlp = _checked_intermediate(cfg.target_intermediate_size, intermediate)
    mlp_quantum = next((q for q in (MLP_MULTIPLE, 8) if intermediate >= 8 * q), 1)  # 8 on narrow MLPs
    if "hidden" not in axes:
        width = d
    elif taker == "hidden":
        quantum = math.lcm(out_heads, 8) if d >= 8 * math.lcm(out_heads, 8) else out_heads
        width = _budget_width(lambda w: count(KeptWidths(w, mlp, kept_heads, kept_kv)), d, quantum, target,
                              "hidden width", cfg)  # fmt: skip
    elif cfg.target_width is not None:
        width = kept_width_for(SimpleNamespace(**{**vars(cfg), "target_sparsity": None}), d, out_heads)
    else:  # the split: the hidden width loses HIDDEN_SHARE of target_sparsity, the MLP what the budget leaves
        width = _split_width(cfg, d, out_heads, sparsity)
    if taker == "mlp":
        mlp = _budget_width(lambda i: count(KeptWidths(width, i, kept_heads, kept_kv)), intermediate, mlp_quantum,
                            target, "MLP width", cfg)  # fmt: skip
    elif taker == "kv_heads":
        options = {}
        for g in range(1, groups):
            try:
                h = _kept_query_heads(cfg, g, heads, groups, sparsity, taker)
            except PATConfigError:
                continue
            if width % h == 0:
                options[g] = KeptWidths(width, mlp, h, g)
        chosen = _nearest_heads(options, (groups, KeptWidths(width, mlp)), count, target, "KV heads", cfg)
        kept_heads, kept_kv = chosen.heads, chosen.kv_heads
    elif taker == "heads":
        per_group = heads // groups
        _proportional(per_group, sparsity, f"query heads of each KV head ({per_group} each)")  # refuses 1 per group
        options = {h: KeptWidths(width, mlp, h * kept_kv, kept_kv) for h in range(1, per_group)
                   if width % (h * kept_kv) == 0}  # fmt: skip
        full = (per_group, KeptWidths(width, mlp, per_group * kept_kv, kept_kv))
        kept_heads = _nearest_heads(options, full, count, target, "query heads of each KV head", cfg).heads
    if not set(axes) & set(HEAD_AXES):
        kept_heads = kept_kv = None
    widths = KeptWidths(width, mlp, kept_heads, kept_kv)
    _check_heads_divide_width(widths, d, heads)
    return _checked_record(cfg, widths)


def _split_width(cfg: PATConfig, d: int, heads: int, sparsity: float) -> int:
    """The hidden width of the split: ``HIDDEN_SHARE * sparsity`` of the channels removed, rounded as
    :func:`peft_pat.width.resolve_kept_width` rounds; refused with the user's own settings named when the
    rounding (``width_multiple``) leaves no width strictly below d near it."""
    split = SimpleNamespace(**{**vars(cfg), "target_sparsity": HIDDEN_SHARE * sparsity, "kept_width": None})
    try:
        return kept_width_for(split, d, heads)
    except PATConfigError:
        quantum = math.lcm(heads, cfg.width_multiple or 1)
        raise PATConfigError(
            f"target_sparsity={sparsity} splits into a hidden cut of {HIDDEN_SHARE * sparsity:.3f} of its {d} "
            f"channels, and the nearest kept hidden width that is a multiple of {quantum} (num_attention_heads="
            f"{heads}{f', width_multiple={cfg.width_multiple}' if cfg.width_multiple else ''}) is "
            f"{quantum * round((1 - HIDDEN_SHARE * sparsity) * d / quantum)}, not strictly between 0 and {d}. "
            "Choose the widths: "
            f"prune_axes=['mlp'] (the MLP width alone takes the budget), or target_width=<a multiple of {quantum} "
            "below the hidden size> (the MLP takes the rest), or a smaller width_multiple."
        ) from None


def _check_heads_divide_width(widths: KeptWidths, d: int, heads: int) -> None:
    kept_heads = widths.heads or heads
    if widths.hidden % kept_heads:
        raise PATConfigError(
            f"Keeping {kept_heads} query heads does not divide the hidden width {widths.hidden}: transformers needs "
            f"hidden_size % num_attention_heads == 0. Keep a number of query heads that divides {widths.hidden}, "
            "or prune 'hidden' too (its width is then rounded to a multiple of the kept heads)."
        )


def _checked_record(cfg: PATConfig, widths: KeptWidths) -> KeptWidths:
    """Refuse an adapter whose recorded widths (``kept_*``) are not what its settings give on this base."""
    recorded = recorded_widths(cfg)
    names = ("kept_width", "kept_intermediate_size", "kept_num_attention_heads", "kept_num_key_value_heads")
    for name, saved, resolved in zip(names, recorded, widths):
        if saved is not None and resolved is not None and saved != resolved:
            raise AdapterMismatchError(
                f"{name}={saved} recorded in the adapter contradicts what its settings give on this base "
                f"({resolved}); load the adapter onto the base it was trained from."
            )
    return widths


def _checked_intermediate(kept: int, intermediate: int) -> int:
    if not 0 < kept < intermediate:
        raise PATConfigError(
            f"target_intermediate_size={kept} cannot be reached: it must lie strictly between 0 and the model's "
            f"intermediate_size={intermediate}."
        )
    return kept

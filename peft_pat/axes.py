"""The per-layer pruning axes: what each mask row covers, how a layer's gate reaches a linear's input columns,
and which units of each tensor dimension a set of hard masks keeps.

Each axis is one :class:`~peft_pat.mask.PATMask` whose rows keep the same count (G KV groups of H / G query
heads each, query head h in group h // (H / G), as transformers' ``repeat_kv`` pairs them):

* ``mlp``: a row per layer over its I intermediate channels; gates ``down_proj``'s input.
* ``heads``: a row per (layer, KV group) over the group's H / G query heads; gates ``o_proj``'s input, each query
  head's gate on its ``head_dim`` block of columns.
* ``kv_heads``: a row per layer over its G KV groups; gates ``o_proj``'s input, each group's gate on the blocks of
  all its query heads.

Tensors enumerate units of a *space* ("mlp", "heads": query heads, "kv_heads": key/value heads; the family table
says which rows and columns, ``FamilySpec.unit_rows`` / ``unit_columns``); axis ``a`` gates the columns of space
:data:`AXIS_SPACE` [a]. A gated linear computes W (c ⊙ x) with c = s ⊙ prod_a expand(M_a[layer]), one rule for
training (:class:`~peft_pat.layer.PATLayer`), the in-memory merge, the disk merge and the mask start
(:func:`column_gate`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import PATConfigError

if TYPE_CHECKING:
    from .families import FamilySpec

PER_LAYER_AXES = ("mlp", "heads", "kv_heads")  # in the order their gates multiply
AXIS_SPACE = {"mlp": "mlp", "heads": "heads", "kv_heads": "heads"}  # the space whose columns each axis gates
SPACE_FIELDS = {"mlp": "intermediate_size", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads"}
AXIS_UNITS = {  # what one row of each axis' mask counts, for messages
    "hidden": "hidden channels",
    "mlp": "mlp channels in every layer",
    "heads": "query heads of every KV head in every layer",
    "kv_heads": "KV heads in every layer",
}
TARGET_FIELDS = {  # axis -> the PATConfig field of its explicit target, and the field recording the resolved one
    "mlp": ("target_intermediate_size", "kept_intermediate_size"),
    "heads": ("target_num_attention_heads", "kept_num_attention_heads"),
    "kv_heads": ("target_num_key_value_heads", "kept_num_key_value_heads"),
}


def head_dim(config) -> int:
    """The attention head width of a transformers config (``head_dim``, else hidden_size / num_attention_heads)."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def space_units(config, space: str) -> tuple[int, int]:
    """(units per layer, tensor entries per unit) of a unit space in a model of ``config``."""
    units = int(getattr(config, SPACE_FIELDS[space], None) or config.num_attention_heads)  # none: one KV per head
    return units, (1 if space == "mlp" else head_dim(config))


def gating_axes(family: FamilySpec, module_name: str, axes: Sequence[str]) -> tuple[str, ...]:
    """The pruned axes whose gate sits on this module's input columns (``down_proj``: mlp; ``o_proj``: heads and
    kv_heads), in :data:`PER_LAYER_AXES` order; () for any other module."""
    space = family.column_space(module_name)
    return tuple(a for a in PER_LAYER_AXES if a in axes and AXIS_SPACE[a] == space)


def to_columns(row: torch.Tensor, width: int) -> torch.Tensor:
    """One layer's row of an axis' gate (its units in order, any shape) over ``width`` input columns: each unit's
    value repeated over its consecutive block of width / units columns."""
    row = row.reshape(-1)
    repeat = width // row.numel()
    return row if repeat == 1 else row.repeat_interleave(repeat)


def column_gate(rows: Mapping[str, torch.Tensor], width: int) -> torch.Tensor:
    """M over a gated linear's ``width`` input columns from each gating axis' row of this layer (``rows``, in
    :data:`PER_LAYER_AXES` order: a mask's ``gate(layer)``, or any per-unit factor of that shape): the product of
    the rows expanded by :func:`to_columns` (one axis: its row itself)."""
    gate = None
    for row in rows.values():
        expanded = to_columns(row, width)
        gate = expanded if gate is None else gate * expanded
    return gate


@dataclass(frozen=True)
class AxisShape:
    """The mask of one per-layer axis: ``groups`` rows (a shape) of ``units`` units, each row keeping ``kept``."""

    groups: tuple[int, ...]
    units: int
    kept: int


def axis_shapes(config) -> dict[str, AxisShape]:
    """The masks a resolved ``PATConfig`` prunes, by axis (the query-head mask keeps kept heads / kept groups per
    group; with only kv_heads every query head of a kept group stays)."""
    layers = config.base_num_hidden_layers
    shapes = {}
    if "mlp" in config.pruned_axes:
        shapes["mlp"] = AxisShape((layers,), config.base_intermediate_size, config.kept_intermediate_size)
    heads, groups = config.base_num_attention_heads, config.base_num_key_value_heads
    if "heads" in config.pruned_axes:
        per_group = config.kept_num_attention_heads // config.kept_num_key_value_heads
        shapes["heads"] = AxisShape((layers, groups), heads // groups, per_group)
    if "kv_heads" in config.pruned_axes:
        shapes["kv_heads"] = AxisShape((layers,), groups, config.kept_num_key_value_heads)
    return shapes


def space_keeps(axis_keeps: Mapping[str, torch.Tensor], num_heads: int, num_kv_heads: int) -> dict[str, torch.Tensor]:
    """The kept units of each space from the hard masks' kept indices (sorted, per row): "mlp" as it is;
    "kv_heads" the kept groups (layers, G'); "heads" the kept query heads (layers, H'), for each kept group in order
    its kept heads g * (H / G) + j. The merge plan completes and checks them (:func:`complete_head_keeps`)."""
    keeps = {}
    if "mlp" in axis_keeps:
        keeps["mlp"] = axis_keeps["mlp"]
    if "kv_heads" in axis_keeps:
        keeps["kv_heads"] = axis_keeps["kv_heads"]
    if "heads" in axis_keeps:
        per_group = num_heads // num_kv_heads
        local = axis_keeps["heads"]  # (layers, G, h'): each group's kept heads
        query = local + per_group * torch.arange(num_kv_heads).view(1, -1, 1)
        if "kv_heads" in axis_keeps:  # only the kept groups' rows
            groups = axis_keeps["kv_heads"]
            query = torch.gather(query, 1, groups.unsqueeze(-1).expand(-1, -1, query.shape[-1]))
        keeps["heads"] = query.flatten(1)
    return keeps


def complete_head_keeps(keeps: dict[str, torch.Tensor], config, where: str) -> dict[str, torch.Tensor]:
    """``keeps`` (sorted per row) with the head spaces made consistent: kept KV groups without kept query heads
    keep all heads of those groups, kept query heads without kept groups keep every group (a space left whole
    is not listed). Refuses what a stock
    config cannot hold: each kept group the same number of its own query heads, every query head in a kept group."""
    if "heads" not in keeps and "kv_heads" not in keeps:
        return keeps
    heads, groups = space_units(config, "heads")[0], space_units(config, "kv_heads")[0]
    per_group = heads // groups
    layers = next(iter(keeps.values())).shape[0]
    kv = keeps.get("kv_heads", torch.arange(groups).expand(layers, -1))
    if "heads" not in keeps:
        query = (kv.unsqueeze(-1) * per_group + torch.arange(per_group)).flatten(1)
    else:
        query = keeps["heads"]
        kept_heads, kept_groups = query.shape[1], kv.shape[1]
        if kept_heads % kept_groups:
            raise PATConfigError(
                f"Cannot keep {kept_heads} query heads over {kept_groups} KV heads in {where}: the query heads must "
                "be a multiple of the kept KV heads (every KV head keeps the same number of query heads)."
            )
        expected = kv.repeat_interleave(kept_heads // kept_groups, dim=1)
        if not torch.equal(query // per_group, expected):
            raise PATConfigError(
                f"The kept query heads do not fit the kept KV heads in {where}: each kept KV head must keep "
                f"{kept_heads // kept_groups} of its own {per_group} query heads (query head h belongs to KV head "
                f"h // {per_group}), and no query head of a removed KV head may stay."
            )
    completed = {space: keep for space, keep in keeps.items() if space not in ("heads", "kv_heads")}
    for space, keep, units in (("heads", query, heads), ("kv_heads", kv, groups)):
        if keep.shape[1] < units:  # a space that keeps every unit is not cut
            completed[space] = keep
    return completed

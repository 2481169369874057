"""The merge plan: per tensor of the stock checkpoint, what is folded into it and which channels survive.

One plan serves every merge. :func:`build_plan` makes it from the family table, the base model's tensor
layout (names, shapes, dtypes; from a loaded model or from safetensors headers) and the adapter's weights
(:class:`~peft_pat.merge.adapter.AdapterWeights`, from a live tuner or an adapter folder), before any
tensor is touched. Each :class:`TensorOp` then computes one output tensor from one source tensor, a block
of rows at a time; :mod:`peft_pat.merge.in_memory` runs the ops over a model's parameters and
:mod:`peft_pat.merge.checkpoint` over safetensors shards, so both give the same bits by construction.

Per role (K kept channels, g = s ⊙ M of the module's HSM, D = I + L1 L0, factors from
:func:`~peft_pat.merge.fold.pruning_factors`):

* embedding: ``E' = (E D^T diag(g))[:, K] * f_emb``; a tied ``lm_head`` stays tied when the embedding HSM
  is diagonal, ``lm_head`` has no LoRA or saved copy of its own and g can be divided out (the final norm's
  gain is then divided by g); otherwise an ``lm_head`` is written from the old ``E`` (untied);
* producers (``o_proj``, ``down_proj``): ``W' = (diag(g) D (W + dW))[K, :] * c`` (biases likewise);
* consumers and an untied ``lm_head``: ``W' = (W + dW)[:, K]``;
* norms: the gain is sliced to K and rescaled (residual, branch and final norms differ);
* anything else (q/k norms, biases of consumers, ...) is copied, with any LoRA update folded in.
* per-layer unit spaces (MLP channels, query heads, KV heads; ``FamilySpec.unit_rows`` / ``unit_columns``,
  :mod:`peft_pat.axes`), before the fold above: an input linear keeps the rows of its layer's kept units (a head
  is ``head_dim`` rows; fused linears by segments), an output linear the columns, times the folded gate
  c = s ⊙ M of its input; LoRA factors are restricted alike.

Which axis of a tensor a role cuts is data (:data:`CUT_DIMS`): an axis is a set of kept indices, and a
role's tensor keeps its rows or its columns by them. A plan without a cut (``cut=False``) folds at full
width (PEFT's ``merge_and_unload``: pruned channels become zero).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..axes import SPACE_FIELDS, complete_head_keeps, head_dim, space_units
from ..errors import AdapterMismatchError, CheckpointError, PATConfigError
from ..families import FamilySpec
from ..width import check_kept_channels
from . import fold
from .adapter import AdapterWeights

HIDDEN = "hidden"  # the residual-stream axis (the per-layer unit spaces are in peft_pat.axes)

# (role, parameter) -> the dimension of the tensor cut to the hidden axis' kept channels; None: not cut.
CUT_DIMS: dict[tuple[str, str], int | None] = {
    ("embedding", "weight"): 1,
    ("producer", "weight"): 0,
    ("producer", "bias"): 0,
    ("consumer", "weight"): 1,
    ("consumer", "bias"): None,
    ("lm_head", "weight"): 1,
    ("residual_norm", "weight"): 0,
    ("branch_norm", "weight"): 0,
    ("final_norm", "weight"): 0,
}
_NORMS = ("residual_norm", "branch_norm", "final_norm")


class Source(Protocol):
    """One base tensor, read whole or a block of rows of its first dimension at a time."""

    shape: tuple[int, ...]

    def rows(self, rows: slice | None) -> torch.Tensor: ...


class TensorSource:
    """A tensor in memory (a model parameter, or an adapter's saved copy of a module), cast on reading."""

    def __init__(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.dtype = dtype if tensor.dtype.is_floating_point else None

    def rows(self, rows: slice | None) -> torch.Tensor:
        tensor = self.tensor.detach() if rows is None else self.tensor.detach()[rows]
        return tensor if self.dtype is None else tensor.to(self.dtype)


class SelectedSource:
    """A source restricted to kept indices along some of its dimensions (a per-layer axis cut made before the
    fold: the fold mixes neither an MLP input's rows nor an MLP output's columns), its columns times a gate."""

    def __init__(
        self, source: Source, cuts: tuple[tuple[int, torch.Tensor], ...], column_scale: torch.Tensor | None = None
    ) -> None:
        self.source, self.cuts, self.column_scale = source, cuts, column_scale
        shape = list(source.shape)
        for dim, index in cuts:
            shape[dim] = int(index.numel())
        self.shape = tuple(shape)
        self._rows_cut = any(dim == 0 for dim, _ in cuts)
        self._selected: torch.Tensor | None = None  # a row cut reads the tensor once, whole

    def _select(self, tensor: torch.Tensor) -> torch.Tensor:
        for dim, index in self.cuts:
            tensor = tensor.index_select(dim, index.to(tensor.device))
        if self.column_scale is not None:  # W diag(c), float32 math, back in the tensor's dtype
            tensor = (tensor.float() * self.column_scale.to(tensor.device)).to(tensor.dtype)
        return tensor

    def rows(self, rows: slice | None) -> torch.Tensor:
        if not self._rows_cut:
            return self._select(self.source.rows(rows))
        if self._selected is None:
            self._selected = self._select(self.source.rows(None))
        return self._selected if rows is None else self._selected[rows]


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one tensor of the base checkpoint (the plan needs nothing else of it)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class TensorOp:
    """How one output tensor is made from one source tensor: folds, then the cut to the kept channels."""

    name: str  # the output tensor, as named in the stock checkpoint and the model's state dict
    source: str  # the base tensor it is computed from (an untied lm_head: the embedding)
    role: str | None
    param: str
    shape: tuple[int, ...]  # output shape
    dtype: torch.dtype  # output dtype
    lora: fold.LoRAUpdate | None = None
    hsm: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor] | None = None  # (L0, L1, g)
    cut_dim: int | None = None  # the dimension cut to K (None: none)
    factor: float = 1.0
    norm_divisor: torch.Tensor | None = None  # a tied diagonal embedding HSM g divided out of the final norm
    norm_offset: float = 0.0
    unit_cuts: tuple[tuple[int, torch.Tensor], ...] = ()  # per-layer axes: (dim, kept indices) cut before the fold
    column_scale: torch.Tensor | None = None  # a gate s ⊙ M on the input units, folded into the columns

    @property
    def changes(self) -> bool:
        """False for a tensor the merge copies unchanged."""
        folded = self.lora is not None or self.hsm is not None or self.norm_divisor is not None
        return folded or self.cut_dim is not None or bool(self.unit_cuts) or self.column_scale is not None

    def compute(self, source: Source, keep: torch.Tensor | None) -> Iterator[torch.Tensor]:
        """The output tensor, as consecutive blocks of rows (one block for tensors folded whole)."""
        keep = keep if self.cut_dim is not None else None
        role, lora = self.role, self.lora
        if self.unit_cuts or self.column_scale is not None:
            source = SelectedSource(source, self.unit_cuts, self.column_scale)
        if role == "embedding" and self.hsm is not None:
            down, up, g = self.hsm
            for rows in fold.row_chunks(source.shape[0], _row_size(source.shape)):
                yield fold.fold_embedding(source.rows(rows), down, up, g, keep, self.factor)
        elif role == "producer" and self.hsm is not None:
            down, up, g = self.hsm
            tensor = source.rows(None)
            if self.param == "bias":
                folded = fold.fold_bias(tensor, down, up, g).to(tensor.dtype)
                yield folded if keep is None else fold.prune_rows(folded, keep, self.factor)
            else:
                yield fold.fold_producer(tensor, lora, down, up, g, keep, self.factor)
        elif role in _NORMS:
            gain = source.rows(None)
            if self.norm_divisor is not None:
                gain = fold.divide_norm_gain(gain, self.norm_divisor.to(gain.device), self.norm_offset)
            yield gain if keep is None else fold.rescale_norm_gain(gain, keep, self.norm_offset, self.factor)
        elif lora is not None:  # consumers, an untied lm_head, any other LoRA target
            for rows in fold.row_chunks(source.shape[0], _row_size(source.shape)):
                yield fold.merge_lora(source.rows(rows), lora.restricted(rows), keep)
        else:  # no fold: a post-hoc cut (no adapter) or a copy
            tensor = source.rows(None)
            if keep is None:
                yield tensor
            else:
                yield (fold.prune_rows if self.cut_dim == 0 else fold.prune_columns)(tensor, keep, self.factor)


def _row_size(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape[1:]).numel())


@dataclass
class MergePlan:
    """Every decision of one merge, made before any tensor is touched (module docstring)."""

    family: FamilySpec
    hidden_size: int
    keep: torch.Tensor | None  # the kept hidden channels, sorted; None: a full-width fold
    tied_in: bool  # the base ties lm_head to the embedding
    tied_out: bool  # ... and the merged model does too
    ops: dict[str, list[TensorOp]] = field(default_factory=dict)  # base tensor -> the outputs made from it
    unit_keeps: dict[str, torch.Tensor] = field(default_factory=dict)  # unit spaces: (layers, kept) indices

    @property
    def kept(self) -> int:
        return self.hidden_size if self.keep is None else int(self.keep.numel())

    def outputs_of(self, name: str) -> list[TensorOp]:
        """The output tensors made from base tensor ``name``, in writing order."""
        return self.ops.get(name, [])

    def all_ops(self) -> list[TensorOp]:
        return [op for ops in self.ops.values() for op in ops]

    def config_updates(self, config) -> dict:
        """The config fields the merge changes: the kept width, the per-layer widths (intermediate_size,
        num_attention_heads, num_key_value_heads) with ``head_dim`` pinned (hidden_size / heads no longer is it),
        the tie."""
        updates: dict = {"tie_word_embeddings": self.tied_out} if self.tied_in else {}
        if self.keep is not None:
            updates["hidden_size"] = self.kept
        if self.keep is not None or "heads" in self.unit_keeps:
            updates["head_dim"] = head_dim(config)
        for space, keep in self.unit_keeps.items():
            updates[SPACE_FIELDS[space]] = int(keep.shape[1])
        return updates


def harden_for_merge(mask, where: str, stacklevel: int = 3) -> None:
    """Harden a soft mask to its exact top-N channels, with a warning (a merge needs a 0/1 mask).

    ``where`` names the mask in the warning ("PAT adapter 'default'", "The PAT mask in <folder>")."""
    if mask.hardened:
        return
    warnings.warn(
        f"{where}: the mask is still soft (step {int(mask.step)} of {int(mask.total_steps)}, before the freeze "
        "point); hardening it now to the exact top-N channels. The merged model then differs from the "
        "soft-masked model; train past the freeze point for an exact match.",
        stacklevel=stacklevel + 1,
    )
    mask.harden()


def _module_and_param(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def build_plan(
    family: FamilySpec,
    config,
    layout: list[TensorInfo],
    adapter: AdapterWeights | None,
    *,
    keep: torch.Tensor | None,
    dtype: torch.dtype | None = None,
    embedding_scale: float | None = None,
    unit_keeps: Mapping[str, torch.Tensor] | None = None,
    where: str = "the base model",
) -> MergePlan:
    """The plan that merges ``adapter`` (None: no adapter, a plain cut) into the base of ``layout`` and cuts
    the hidden width to ``keep`` (None: fold at full width). ``dtype``: cast floating base tensors to it.
    ``embedding_scale``: the sqrt(hidden_size) a loaded Gemma-style model really multiplies by (a bfloat16
    buffer stays rounded after ``.float()``); default: sqrt(d) as a model loaded in the embedding's dtype has it.
    ``unit_keeps``: per-layer unit spaces cut too, each (layers, kept) indices of every layer: "mlp" intermediate
    channels, "heads" query heads, "kv_heads" KV heads (the two head spaces are completed from each other and
    checked, :func:`peft_pat.axes.complete_head_keeps`).

    Refuses, before anything is written, a base that is not the adapter's (another depth, producers the
    adapter has no HSM for, LoRA or saved copies of tensors the base lacks) or a ``keep`` that a stock
    config cannot hold."""
    d = int(config.hidden_size)
    num_layers = int(config.num_hidden_layers)
    units = _checked_unit_keeps(unit_keeps or {}, config, num_layers, where)
    heads = int(units["heads"].shape[1]) if "heads" in units else int(config.num_attention_heads)
    if keep is not None:
        keep = torch.as_tensor(keep, dtype=torch.long).flatten().sort().values.cpu()
        problem = check_kept_channels(keep, d, heads)
        if problem:
            raise (AdapterMismatchError if adapter is not None else PATConfigError)(
                f"The kept channels do not fit {where}: {problem}"
            )
    elif d % heads:
        raise PATConfigError(
            f"Keeping {heads} query heads in {where} does not divide its hidden_size {d}: transformers needs "
            "hidden_size % num_attention_heads == 0. Keep a number of heads that divides it, or cut the hidden width."
        )
    specs = {s.name: s for s in layout}
    tied_in = bool(getattr(config, "tie_word_embeddings", False))
    roles = family.module_roles(num_layers, tied=tied_in)
    missing = [m for m in roles if f"{m}.weight" not in specs]
    if missing:
        raise CheckpointError(
            f"{where} lacks {len(missing)} tensors a {family.name} model needs, e.g. "
            f"{[m + '.weight' for m in missing[:3]]}; is it a transformers {family.name} model?"
        )
    lm_head, embedding = family.lm_head, family.embedding
    head_name, embedding_name = f"{lm_head}.weight", f"{embedding}.weight"
    replacements = dict(adapter.replacements) if adapter is not None else {}
    if adapter is not None:
        adapter.check_finite()
        _check_adapter_fits(family, roles, specs, adapter, replacements, tied_in, num_layers, where)

    # --- the tie: one rule for both merges
    embedding_hsm = adapter.hsm.get(embedding) if adapter is not None else None
    g_embedding = adapter.gate_scale(embedding) if embedding_hsm is not None else None
    head_has_own = adapter is not None and (lm_head in adapter.lora or head_name in replacements)
    tied_out = (
        tied_in
        and not head_has_own
        and (embedding_hsm is None or ("down" not in embedding_hsm and fold.can_divide_out(g_embedding)))
    )
    compute_dtype = dtype or specs[embedding_name].dtype
    if keep is not None:
        scales = fold.embedding_scales(d, int(keep.numel()), compute_dtype)  # as the model in that dtype multiplies
        if embedding_scale is not None:
            scales = (embedding_scale, scales[1])
        factors = fold.pruning_factors(d, int(keep.numel()), bool(family.embedding_scale_attr), tied_out, scales)
    else:
        factors = dict.fromkeys(("producer", "embedding", *_NORMS), 1.0)

    plan = MergePlan(family, d, keep, tied_in, tied_out, unit_keeps=units)
    for spec in layout:
        module, param = _module_and_param(spec.name)
        role = roles.get(module)
        if tied_in and module == lm_head:
            continue  # a tied lm_head has no tensor of its own; written below if it gets one
        out_dtype = dtype if dtype is not None and spec.dtype.is_floating_point else spec.dtype
        op = _op(family, spec, role, param, out_dtype, adapter, keep, factors)
        _add_unit_gates(op, family, config, units, adapter)
        if role == "final_norm" and tied_out and g_embedding is not None:
            op.norm_divisor = g_embedding
        plan.ops[spec.name] = [op]
        if role == "embedding" and tied_in and not tied_out:  # untie: lm_head gets a tensor of its own
            source = head_name if head_name in replacements else spec.name
            head_spec = TensorInfo(head_name, tuple(replacements[source].shape) if source == head_name else spec.shape,
                                   spec.dtype)  # fmt: skip
            head = _op(family, head_spec, "lm_head", "weight", out_dtype, adapter, keep, factors)
            head.source = source
            plan.ops[spec.name].append(head)
    return plan


def _op(family, spec: TensorInfo, role, param, dtype, adapter, keep, factors) -> TensorOp:
    module = spec.name.rpartition(".")[0]
    if role is not None and (role, param) not in CUT_DIMS:
        raise CheckpointError(f"Unexpected tensor {spec.name!r} for a {family.name} model.")
    cut_dim = CUT_DIMS.get((role, param)) if keep is not None and role is not None else None
    shape = list(spec.shape)
    if cut_dim is not None:
        shape[cut_dim] = int(keep.numel())
    op = TensorOp(spec.name, spec.name, role, param, tuple(shape), dtype, cut_dim=cut_dim,
                  factor=factors[role] if role in factors else 1.0, norm_offset=family.norm_offset)  # fmt: skip
    if adapter is None:
        return op
    if param == "weight":
        op.lora = adapter.lora_update(module)
    if role in ("embedding", "producer") and module in adapter.hsm:  # no HSMs when the hidden axis is not pruned
        hsm = adapter.hsm[module]
        op.hsm = (hsm.get("down"), hsm.get("up"), adapter.gate_scale(module))
    return op


def _checked_unit_keeps(unit_keeps: Mapping[str, torch.Tensor], config, num_layers: int, where: str) -> dict:
    """Each unit space's kept indices as a sorted (layers, kept) long tensor, the head spaces completed from each
    other; a clear error for a shape a stock config cannot hold (every layer keeps the same count, between 1 and
    the width minus 1, query heads grouped as the kept KV heads need)."""
    checked = {}
    for space, keep in unit_keeps.items():
        if space not in SPACE_FIELDS:
            raise PATConfigError(f"Unknown per-layer unit space {space!r}; known: {sorted(SPACE_FIELDS)}.")
        width = space_units(config, space)[0]
        keep = torch.as_tensor(keep, dtype=torch.long).cpu()
        if keep.dim() != 2 or keep.shape[0] != num_layers:
            raise PATConfigError(
                f"The kept {space} units must be one row per decoder layer ({num_layers} rows, the same count in "
                f"each: a stock config holds one {SPACE_FIELDS[space]}), got shape {tuple(keep.shape)}."
            )
        keep = keep.sort(dim=1).values
        if not 0 < keep.shape[1] < width:
            raise PATConfigError(f"Cannot keep {keep.shape[1]} of {width} {space} units per layer in {where}.")
        if int(keep.min()) < 0 or int(keep.max()) >= width or bool((keep[:, 1:] == keep[:, :-1]).any()):
            raise PATConfigError(f"Kept {space} unit indices must be distinct and in [0, {width}) in every layer.")
        checked[space] = keep
    return complete_head_keeps(checked, config, where)


def _unit_index(config, spaces: tuple[str, ...], units: dict[str, torch.Tensor], layer: int) -> torch.Tensor | None:
    """The kept entries of a dimension made of consecutive segments of ``spaces`` units (each unit a block of
    entries: 1 for MLP channels, head_dim for heads), in one layer; None when no segment is cut."""
    if not any(space in units for space in spaces):
        return None
    parts, offset = [], 0
    for space in spaces:
        count, size = space_units(config, space)
        if space in units:
            kept = units[space][layer]
            parts.append(offset + (kept if size == 1 else (kept[:, None] * size + torch.arange(size)).flatten()))
        else:
            parts.append(offset + torch.arange(count * size))
        offset += count * size
    return torch.cat(parts)


def _add_unit_gates(op: TensorOp, family: FamilySpec, config, units: dict[str, torch.Tensor], adapter) -> None:
    """Restrict ``op`` to each unit space's kept units of its layer (its source and its LoRA factors), and fold
    the gate c = s ⊙ M[layer] on a gated module's input units: (W + dW) diag(c), i.e. W's and A's columns times c
    (restricted to the kept units when cutting)."""
    module = op.name.rpartition(".")[0]
    scale = None
    if adapter is not None and op.param == "weight" and module in adapter.unit_scales:
        scale = adapter.unit_column_scale(module, family.layer_index(module), family)
    lora_a, lora_b = (op.lora.lora_a, op.lora.lora_b) if op.lora is not None else (None, None)
    for dim, spaces in family.unit_cuts(module, op.param):
        index = _unit_index(config, spaces, units, family.layer_index(module))
        if index is None:
            continue
        op.unit_cuts = (*op.unit_cuts, (dim, index))
        shape = list(op.shape)
        shape[dim] = int(index.numel())
        op.shape = tuple(shape)
        if dim == 1 and scale is not None:
            scale = scale.index_select(0, index.to(scale.device))
        if lora_a is not None:  # dW = s B A: rows of dW are rows of B, columns are columns of A
            if dim == 0:
                lora_b = lora_b.index_select(0, index.to(lora_b.device))
            else:
                lora_a = lora_a.index_select(1, index.to(lora_a.device))
    if scale is not None:
        op.column_scale = scale
        lora_a = None if lora_a is None else lora_a.float() * scale.to(lora_a.device)
    if lora_a is not None:
        op.lora = fold.LoRAUpdate(lora_a, lora_b, op.lora.scaling)


def _check_adapter_fits(family, roles, specs, adapter: AdapterWeights, replacements, tied_in, num_layers, where):
    producers = {m for m, r in roles.items() if r in ("embedding", "producer")} if adapter.prunes_hidden else set()
    if set(adapter.hsm) != producers:
        odd = sorted(set(adapter.hsm) ^ producers)[:3]
        raise AdapterMismatchError(
            f"The adapter's HSMs do not sit on {where}'s residual-stream producers (they differ at {odd}): "
            f"the base has {num_layers} decoder layers and {len(producers)} producers, the adapter "
            f"{len(adapter.hsm)} HSMs. Merge the adapter into the model it was trained from."
        )
    head_name = f"{family.lm_head}.weight"
    for module in adapter.lora:
        if f"{module}.weight" not in specs and not (tied_in and module == family.lm_head):
            raise AdapterMismatchError(f"The adapter has LoRA on {module!r}, which {where} does not have.")
    for name, tensor in replacements.items():
        expected = specs[f"{family.embedding}.weight"].shape if (tied_in and name == head_name) else None
        if name in specs:
            expected = specs[name].shape
        if expected is None:
            raise AdapterMismatchError(f"The adapter saves a copy of {name!r}; {where} has no such tensor.")
        if tuple(tensor.shape) != tuple(expected):
            raise AdapterMismatchError(
                f"The adapter's saved copy of {name!r} has shape {tuple(tensor.shape)}, {where} {tuple(expected)}."
            )


def cut_parameter_count(
    family: FamilySpec, config, layout: list[TensorInfo], kept_width: int, unit_widths: Mapping[str, int]
) -> int:
    """Parameters (unique: a tied lm_head counted once) of the model ``layout`` describes after a cut to
    ``kept_width`` hidden channels and the per-layer widths ``unit_widths`` ({"mlp": I', "heads": H',
    "kv_heads": G'}: kept units of each space cut); the same shape rules
    the plan applies (:data:`CUT_DIMS`, ``FamilySpec.unit_cuts``)."""
    tied = bool(getattr(config, "tie_word_embeddings", False))
    roles = family.module_roles(int(config.num_hidden_layers), tied=tied)
    total = 0
    for spec in layout:
        module, param = _module_and_param(spec.name)
        if tied and module == family.lm_head:
            continue
        shape = list(spec.shape)
        dim = CUT_DIMS.get((roles.get(module), param))
        if dim is not None:
            shape[dim] = kept_width
        for dim, spaces in family.unit_cuts(module, param):
            sizes = [space_units(config, space) for space in spaces]
            shape[dim] = sum(unit_widths.get(space, count) * size for space, (count, size) in zip(spaces, sizes))
        total += int(torch.Size(shape).numel())
    return total

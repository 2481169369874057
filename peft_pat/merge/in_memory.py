"""The merge plan executed over a loaded model's parameters, in place, one tensor at a time.

:class:`InMemoryMerge` runs the ops of one or more :class:`~peft_pat.merge.plan.MergePlan` over a stock
model (the PAT layers already unloaded): each op reads its source parameter, computes the output with
the same code ``peft-pat merge`` runs over shards, and the module gets the result as a new parameter; the
old one is released once no later op reads it, so the extra memory is about one weight matrix. Every step
is idempotent and remembered, so a run interrupted at any moment (Ctrl-C) finishes when run again, with
the same bits as an uninterrupted run. :func:`prune_model` (and :func:`prune_hidden_channels`) is the plan
without an adapter.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..axes import space_units
from ..families import FamilySpec
from .plan import MergePlan, TensorInfo, TensorOp, TensorSource, build_plan

# Name parts of a wrapped model's parameters that a stock checkpoint does not have (PEFT's wrappers).
_WRAPPER_PARTS = ("base_layer", "original_module")


def stock_layout(model: nn.Module) -> list[TensorInfo]:
    """The stock checkpoint names, shapes and dtypes of ``model``'s parameters, also while PEFT layers wrap
    them (``...o_proj.base_layer.weight`` -> ``...o_proj.weight``; adapter parameters left out)."""
    layout: dict[str, TensorInfo] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        if any(p.startswith("pat_") or p == "modules_to_save" for p in parts):
            continue
        stock = ".".join(p for p in parts if p not in _WRAPPER_PARTS)
        layout.setdefault(stock, TensorInfo(stock, tuple(param.shape), param.dtype))
    return list(layout.values())


def embedding_scale(model: nn.Module, family: FamilySpec) -> float | None:
    """The sqrt(hidden_size) ``model``'s embedding multiplies by, as it computes it (the buffer cast to the
    weight's dtype), for families that scale embeddings; None for the others."""
    if not family.embedding_scale_attr:
        return None
    embedding = model.get_submodule(family.embedding)
    embedding = getattr(embedding, "base_layer", embedding)  # wrapped by a PAT layer while planning
    return float(getattr(embedding, family.embedding_scale_attr).to(embedding.weight.dtype))


def own_config(model: nn.Module):
    """Give ``model`` (and each submodule that shares it) its own copy of its config; returns the copy.

    transformers models keep the config object they were built from, so writing into ``model.config``
    would also change the caller's object (and every model built from it later)."""
    shared = model.config
    config = copy.deepcopy(shared)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = config
    return config


def _assemble(op: TensorOp, source: TensorSource, keep: torch.Tensor | None) -> torch.Tensor:
    """The op's output as one tensor: its blocks of rows copied into place (a single block as it is)."""
    result = None
    start = 0
    for block in op.compute(source, keep):
        if result is None and block.shape == torch.Size(op.shape):
            return block
        if result is None:
            result = torch.empty(op.shape, dtype=op.dtype, device=block.device)
        result[start : start + block.shape[0]] = block
        start += block.shape[0]
    return result


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """The module's parameter ``name`` becomes ``tensor``, trainable as the one it replaces (a frozen lm_head
    sends transformers' ``logits_to_keep`` prefill down a slower matmul path, docs/performance.md)."""
    module_name, _, param = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, param, None)
    trainable = bool(old is not None and old.requires_grad)
    setattr(module, param, nn.Parameter(tensor, requires_grad=trainable))


def _finish(model: nn.Module, plan: MergePlan) -> None:
    """What follows the tensors (idempotent): the tie, the modules' size attributes, the config."""
    family = plan.family
    embedding = model.get_submodule(family.embedding)
    lm_head = model.get_submodule(family.lm_head)
    if plan.tied_out:
        lm_head.weight = embedding.weight
    if plan.keep is not None or plan.unit_keeps:
        for op in plan.all_ops():
            module = model.get_submodule(op.name.rpartition(".")[0])
            if isinstance(module, nn.Linear) and op.param == "weight":
                module.out_features, module.in_features = module.weight.shape
            elif isinstance(module, nn.Embedding):
                module.embedding_dim = module.weight.shape[1]
        if family.embedding_scale_attr and plan.keep is not None:  # the scale a stock model of the kept width uses
            scale = math.sqrt(plan.kept)
            getattr(embedding, family.embedding_scale_attr).fill_(scale)
            if hasattr(embedding, "scalar_embed_scale"):
                embedding.scalar_embed_scale = scale
    keeps = plan.unit_keeps
    if "heads" in keeps:  # the head counts the attention modules computed once (a KV cut cuts query heads too)
        groups = int(keeps["kv_heads"].shape[1]) if "kv_heads" in keeps else space_units(model.config, "kv_heads")[0]
        values = {"num_key_value_groups": int(keeps["heads"].shape[1]) // groups, "num_key_value_heads": groups}
        for layer in model.get_submodule(family.layers):
            attention = layer.get_submodule(family.attention)
            for name in family.attention_count_attributes:
                if hasattr(attention, name):
                    setattr(attention, name, values[name])
    updates = plan.config_updates(model.config)
    if any(getattr(model.config, k, None) != v for k, v in updates.items()):
        config = own_config(model)
        for key, value in updates.items():
            setattr(config, key, value)


@dataclass
class InMemoryMerge:
    """Merge plans executed in order over a model; resumable (module docstring).

    ``plans``: (plan, the adapter's saved copies of modules by tensor name) pairs."""

    plans: list[tuple[MergePlan, dict[str, torch.Tensor]]]
    stage: int = 0
    _sources: dict[str, torch.Tensor] | None = None
    _done: set[str] = field(default_factory=set)

    @torch.no_grad()
    def run(self, model: nn.Module, progressbar: bool = False) -> nn.Module:
        while self.stage < len(self.plans):
            plan, replacements = self.plans[self.stage]
            ops = [op for op in plan.all_ops() if op.changes]
            if self._sources is None:  # the parameters as they are before this plan changes any
                params = dict(model.named_parameters(remove_duplicate=False))
                self._sources = {op.source: replacements.get(op.source, params.get(op.source)) for op in ops}
                self._done = set()
            readers = Counter(op.source for op in ops if op.name not in self._done)
            for op in tqdm(ops, disable=not progressbar, desc="Merging and pruning" if plan.keep is not None else
                           "Merging"):  # fmt: skip
                if op.name in self._done:
                    continue
                _set_parameter(model, op.name, _assemble(op, TensorSource(self._sources[op.source]), plan.keep))
                self._done.add(op.name)
                readers[op.source] -= 1
                if not readers[op.source]:
                    self._sources.pop(op.source, None)  # frees the old tensor once nothing reads it
            _finish(model, plan)
            self.stage, self._sources = self.stage + 1, None
        return model


@torch.no_grad()
def prune_model(
    model: nn.Module,
    family: FamilySpec,
    *,
    hidden: torch.Tensor | None = None,
    mlp: torch.Tensor | None = None,
    heads: torch.Tensor | None = None,
    kv_heads: torch.Tensor | None = None,
    progressbar: bool = False,
) -> nn.Module:
    """Cut ``model`` (a stock ``*ForCausalLM``) in place to the kept hidden channels ``hidden`` (N,), the kept
    MLP intermediate channels ``mlp``, query heads ``heads`` and KV heads ``kv_heads`` (each (layers, kept): the
    same count in every layer; kept query heads in kept KV heads, the same number in each); returns ``model``.

    Exact when what is removed carries nothing (a folded, hardened PAT adapter: the residual stream is zero
    outside ``hidden``, hard per-layer masks zero the other units' inputs to down_proj / o_proj); on any other
    model it is
    plain post-hoc pruning. The model gets its own copy of its config (:func:`own_config`): the config
    object it was built from is left as it was."""
    units = {name: keep for name, keep in (("mlp", mlp), ("heads", heads), ("kv_heads", kv_heads)) if keep is not None}
    plan = build_plan(family, model.config, stock_layout(model), None, keep=hidden, unit_keeps=units,
                      embedding_scale=embedding_scale(model, family))  # fmt: skip
    return InMemoryMerge([(plan, {})]).run(model, progressbar=progressbar)


def prune_hidden_channels(
    model: nn.Module, family: FamilySpec, keep: torch.Tensor, progressbar: bool = False
) -> nn.Module:
    """Keep hidden channels ``keep`` of ``model`` in place (:func:`prune_model` with the hidden axis only)."""
    return prune_model(model, family, hidden=keep, progressbar=progressbar)

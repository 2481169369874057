"""Module surgery: cut the hidden width of a stock transformers model in place.

:func:`prune_hidden_channels` keeps the hidden channels ``keep`` of a model of a supported family. It
is exact when the residual stream is zero outside ``keep`` (which is what a hardened PAT mask
guarantees after folding); applied to any other model it is plain post-hoc channel pruning. The
tensor algebra lives in :mod:`peft_pat.fold`; this module only finds modules, swaps parameters and
rewrites the config. Peak extra memory is about one weight matrix at a time.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from . import fold
from .errors import PATConfigError
from .families import FamilySpec


def get_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)``. Unused by peft_pat; kept only for benchmarks/quality (posthoc.py,
    torch_pruning_peer.py) until they call ``get_submodule`` themselves, then delete."""
    return model.get_submodule(path)


def _set_weight(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(tensor, requires_grad=False))


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


def pruned_config_updates(config, kept: int) -> dict:
    """The config fields a width cut changes: hidden_size, and head_dim pinned to its current value."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"hidden_size": kept, "head_dim": int(head_dim)}


def validate_keep(keep: torch.Tensor, hidden_size: int, num_heads: int) -> torch.Tensor:
    keep = torch.as_tensor(keep, dtype=torch.long).flatten().sort().values
    if keep.numel() == 0 or keep.numel() >= hidden_size:
        raise PATConfigError(f"Cannot keep {keep.numel()} of {hidden_size} hidden channels; keep between 1 and d-1.")
    if keep.unique().numel() != keep.numel() or int(keep[0]) < 0 or int(keep[-1]) >= hidden_size:
        raise PATConfigError(f"Kept channel indices must be distinct and in [0, {hidden_size}).")
    if keep.numel() % num_heads:
        raise PATConfigError(
            f"Keeping {keep.numel()} channels is not a multiple of num_attention_heads={num_heads}; transformers "
            "requires hidden_size % num_attention_heads == 0."
        )
    return keep


@torch.no_grad()
def prune_hidden_channels(
    model: nn.Module, family: FamilySpec, keep: torch.Tensor, progressbar: bool = False
) -> nn.Module:
    """Keep hidden channels ``keep`` of ``model`` (a stock ``*ForCausalLM``), in place; returns ``model``.

    The model gets its own copy of its config (:func:`own_config`): the config object it was built from
    is left as it was."""
    config = model.config
    d = int(config.hidden_size)
    keep = validate_keep(keep, d, int(config.num_attention_heads))
    kept = int(keep.numel())
    embedding = model.get_submodule(family.embedding)
    lm_head = model.get_submodule(family.lm_head)
    tied = lm_head.weight is embedding.weight
    scales = None
    if family.embedding_scale_attr:
        # The scales really multiplied by: a buffer rounded to bfloat16 stays rounded after .float().
        used = getattr(embedding, family.embedding_scale_attr).to(embedding.weight.dtype)
        scales = (float(used), fold.embedding_scales(d, kept, embedding.weight.dtype)[1])
    factors = fold.pruning_factors(d, kept, bool(family.embedding_scale_attr), tied, embedding_scales=scales)
    c, embed_factor = factors["producer"], factors["embedding"]
    dev = embedding.weight.device
    _set_weight(embedding, "weight", fold.prune_columns(embedding.weight, keep.to(dev), embed_factor))
    embedding.embedding_dim = kept
    if family.embedding_scale_attr:
        scale = math.sqrt(kept)
        getattr(embedding, family.embedding_scale_attr).fill_(scale)
        if hasattr(embedding, "scalar_embed_scale"):
            embedding.scalar_embed_scale = scale

    layers = model.get_submodule(family.layers)
    for layer in tqdm(layers, disable=not progressbar, desc="Pruning hidden channels"):
        for path in family.producers:
            linear = layer.get_submodule(path)
            k = keep.to(linear.weight.device)
            _set_weight(linear, "weight", fold.prune_rows(linear.weight, k, c))
            if linear.bias is not None:
                _set_weight(linear, "bias", fold.prune_rows(linear.bias, k, c))
            linear.out_features = kept
        for path in family.consumers:
            linear = layer.get_submodule(path)
            _set_weight(linear, "weight", fold.prune_columns(linear.weight, keep.to(linear.weight.device)))
            linear.in_features = kept
        norms = [(p, factors["residual_norm"]) for p in family.residual_norms]
        for path, factor in norms + [(p, factors["branch_norm"]) for p in family.branch_norms]:
            norm = layer.get_submodule(path)
            k = keep.to(norm.weight.device)
            _set_weight(norm, "weight", fold.rescale_norm_gain(norm.weight, k, family.norm_offset, factor))

    final_norm = model.get_submodule(family.final_norm)
    k = keep.to(final_norm.weight.device)
    final_gain = fold.rescale_norm_gain(final_norm.weight, k, family.norm_offset, factors["final_norm"])
    _set_weight(final_norm, "weight", final_gain)
    if tied:
        lm_head.weight = embedding.weight
    else:
        _set_weight(lm_head, "weight", fold.prune_columns(lm_head.weight, keep.to(lm_head.weight.device)))
    lm_head.in_features = kept

    config = own_config(model)
    for key, value in pruned_config_updates(config, kept).items():
        setattr(config, key, value)
    return model

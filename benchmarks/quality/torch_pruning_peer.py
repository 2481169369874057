"""The external peer: Torch-Pruning (PyPI ``torch-pruning``, DepGraph) hidden-width pruning.

The recipe that reproduces PAT's granularity (only the residual width, uniform over layers) with
Torch-Pruning's own machinery: every consumer linear
(q/k/v, gate/up, lm_head) is an *ignored* root, which leaves exactly one prunable dependency group,
the hidden channels (embedding columns, producer rows, consumer columns, norm gains). Importance is
``GroupTaylorImportance`` (first-order Taylor |w * dL/dw| summed over the group; the gradients come
from the causal-LM loss over all tokens of the calibration batches), the LLM-Pruner "channel"
criterion. ``round_to=8`` and the ratio (d - N) / d give exactly N channels, the width PAT keeps.

Unlike :func:`peft_pat.prune_hidden_channels`, Torch-Pruning only slices: the norm gains are not
rescaled for the smaller RMS, which is this peer's method as published (recovery is left to tuning).
Pruning unties the tied embedding in memory (both copies are pruned identically); they are re-tied
afterwards so the parameter count is comparable.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from peft_pat import FamilySpec


class PeerUnavailable(RuntimeError):
    """Torch-Pruning is not installed or cannot prune this model; the message says why."""


def torch_pruning_available() -> str | None:
    """None if usable, else the reason."""
    if importlib.util.find_spec("torch_pruning") is None:
        return "torch-pruning is not installed (pip install torch-pruning==1.6.1)"
    return None


def _accumulate_lm_gradients(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: str) -> None:
    model.zero_grad(set_to_none=True)
    model.train()
    for batch in batches:
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        labels = ids.masked_fill(mask == 0, -100)
        (model(input_ids=ids, attention_mask=mask, labels=labels).loss / len(batches)).backward()
    model.eval()


def prune_with_torch_pruning(
    model: nn.Module,
    family: FamilySpec,
    batches: list[dict[str, torch.Tensor]],
    kept: int,
    device: str = "cpu",
    round_to: int = 8,
) -> nn.Module:
    """Cut the hidden width of ``model`` to ``kept`` channels with Torch-Pruning; in place, returns it."""
    reason = torch_pruning_available()
    if reason:
        raise PeerUnavailable(reason)
    import torch_pruning as tp

    d = int(model.config.hidden_size)
    if kept % round_to:
        raise PeerUnavailable(f"kept width {kept} is not a multiple of round_to={round_to}")
    layers = model.get_submodule(family.layers)
    ignored = [model.get_submodule(family.lm_head)]
    ignored += [layer.get_submodule(path) for layer in layers for path in family.consumers]
    embedding = model.get_submodule(family.embedding)
    lm_head = model.get_submodule(family.lm_head)
    tied = lm_head.weight is embedding.weight
    for p in model.parameters():
        p.requires_grad_(True)
    _accumulate_lm_gradients(model, batches, device)
    example = batches[0]["input_ids"][:1, :64].to(device)
    layer_norms = [layer.get_submodule(path) for layer in layers for path in family.residual_norms]
    norms = [*layer_norms, model.get_submodule(family.final_norm)]
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs=example,
        importance=tp.importance.GroupTaylorImportance(),
        pruning_ratio=(d - kept) / d,
        ignored_layers=ignored,
        round_to=round_to,
        global_pruning=False,
        output_transform=lambda out: out.logits,
        unwrapped_parameters=[(norm.weight, 0) for norm in norms],
    )
    for group in pruner.step(interactive=True):
        group.prune()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    width = int(model.get_submodule(family.embedding).weight.shape[1])
    if width != kept or lm_head.in_features != kept:
        raise PeerUnavailable(f"Torch-Pruning produced width {width} (lm_head {lm_head.in_features}), not {kept}")
    if tied:
        if not torch.equal(lm_head.weight, embedding.weight):
            raise PeerUnavailable("Torch-Pruning pruned the tied embedding and lm_head differently")
        lm_head.weight = embedding.weight
    embedding.embedding_dim = kept
    model.config.hidden_size = kept
    return model

"""Post-hoc hidden-channel selection by activation magnitude, and the cut.

Criterion (data-driven, forward only; the hidden-dimension importance of Minitron, Muralidharan et
al. 2024, which aggregates norm-layer outputs): for every RMS norm that reads the residual stream
(each layer's ``input_layernorm`` / ``post_attention_layernorm`` and the final norm, from the family
table), take its output y = g * h / rms(h) on the calibration tokens, and score channel j by

    score_j = sum_norms sqrt( mean_tokens y_j^2 )

i.e. the per-channel RMS of what the consumers (q/k/v, gate/up, lm_head) actually read, summed over
the 2L + 1 norms. Normalising per token keeps a few huge-norm tokens from deciding; using the norm
output includes the gain. Padding tokens are excluded. The N highest-scoring channels are kept, with
N from :func:`peft_pat.width.resolve_kept_width` (the same rounding PAT uses), and cut with
:func:`peft_pat.prune_hidden_channels` (slicing plus the sqrt(d'/d) residual rescaling that keeps the
RMS-norm statistics of the kept channels unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from peft_pat import FamilySpec, prune_hidden_channels
from peft_pat.surgery import get_module


def residual_norms(model: nn.Module, family: FamilySpec) -> list[nn.Module]:
    layers = get_module(model, family.layers)
    norms = [layer.get_submodule(path) for layer in layers for path in family.residual_norms]
    return [*norms, get_module(model, family.final_norm)]


@torch.no_grad()
def activation_channel_scores(
    model: nn.Module, family: FamilySpec, batches: list[dict[str, torch.Tensor]], device: str = "cpu"
) -> torch.Tensor:
    """score_j of the module docstring, float64, shape (hidden_size,)."""
    norms = residual_norms(model, family)
    sums = [torch.zeros(model.config.hidden_size, dtype=torch.float64) for _ in norms]
    count = [0]
    current_mask: list[torch.Tensor | None] = [None]

    def hook(index: int):
        def fn(_module, _inputs, output):
            y = output.detach().double().cpu()
            keep = current_mask[0]
            y = y[keep] if keep is not None else y.reshape(-1, y.shape[-1])
            sums[index] += (y * y).sum(dim=0)

        return fn

    handles = [norm.register_forward_hook(hook(i)) for i, norm in enumerate(norms)]
    model.eval()
    try:
        for batch in batches:
            mask = batch["attention_mask"].bool()
            current_mask[0] = mask
            count[0] += int(mask.sum())
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return sum(torch.sqrt(s / max(count[0], 1)) for s in sums)


def top_channels(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Sorted indices of the ``kept`` highest scores (ties broken by channel index)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:kept].sort().values


def cut_by_activation(model: nn.Module, family: FamilySpec, scores: torch.Tensor, kept: int) -> nn.Module:
    """Keep the ``kept`` channels with the highest ``scores``; in place, returns ``model``."""
    return prune_hidden_channels(model, family, top_channels(scores, kept))

"""The post-hoc cut: keep the N channels the activation criterion ranks highest.

The criterion is the package's own, :func:`peft_pat.calibration.activation_channel_scores` (per
channel, the RMS of every residual-reading norm's output over the calibration tokens, summed over
the norms; padding excluded), so the baseline and PAT's mask start rank channels the same way. N
comes from :func:`peft_pat.width.resolve_kept_width` (the rounding PAT uses); the N highest scores
(:func:`peft_pat.calibration.top_channels`) are cut with :func:`peft_pat.prune_hidden_channels`
(slicing plus the sqrt(d'/d) residual rescaling that keeps the RMS-norm statistics of the kept
channels unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from peft_pat import FamilySpec, prune_hidden_channels, prune_model
from peft_pat.axes import space_keeps
from peft_pat.calibration import ChannelStatistics, massive_channels, top_channels


def cut_by_activation(
    model: nn.Module, family: FamilySpec, scores: torch.Tensor, protected: torch.Tensor, kept: int
) -> nn.Module:
    """Keep the ``protected`` (massive-activation) channels and the highest ``scores`` up to ``kept``, as PAT's
    mask start does; in place, returns ``model``."""
    return prune_hidden_channels(model, family, top_channels(scores, kept, protected))


def cut_shape_by_activation(
    model: nn.Module,
    family: FamilySpec,
    stats: ChannelStatistics,
    kept_width: int | None,
    kept_mlp: int | None,
    kept_heads: int | None = None,
    kept_kv_heads: int | None = None,
) -> nn.Module:
    """The post-hoc rival of a multi-axis PAT shape: the hidden channels as :func:`cut_by_activation` keeps
    them (``kept_width`` None: not cut), per layer the ``kept_mlp`` MLP units with the largest RMS input to
    ``down_proj`` (``stats.mlp_score``, Minitron's MLP-neuron importance) and, with ``kept_heads`` /
    ``kept_kv_heads``, the KV heads with the largest summed head score and in each the query heads with the
    largest RMS attention output (``stats.head_score``, Minitron's head importance; the ranking PAT's mask start
    uses); in place, returns ``model``."""
    hidden = None if kept_width is None else top_channels(stats.score, kept_width, massive_channels(stats.energy))
    mlp = None
    if kept_mlp is not None:
        mlp = torch.stack([torch.topk(row, kept_mlp).indices.sort().values for row in stats.mlp_score])
    heads = kv = None
    if kept_heads is not None:
        config = model.config
        groups = int(config.num_key_value_heads)
        score = stats.head_score.view(stats.head_score.shape[0], groups, -1)  # (layers, KV heads, query heads)
        keeps = {}
        if kept_kv_heads is not None and kept_kv_heads < groups:
            keeps["kv_heads"] = torch.topk(score.sum(-1), kept_kv_heads, dim=-1).indices.sort(-1).values
        per_group = kept_heads // (kept_kv_heads or groups)
        if per_group < score.shape[-1]:
            keeps["heads"] = torch.topk(score, per_group, dim=-1).indices.sort(-1).values
        units = space_keeps(keeps, int(config.num_attention_heads), groups)
        heads, kv = units.get("heads"), units.get("kv_heads")
    return prune_model(model, family, hidden=hidden, mlp=mlp, heads=heads, kv_heads=kv)

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

from peft_pat import FamilySpec, prune_hidden_channels
from peft_pat.calibration import top_channels


def cut_by_activation(
    model: nn.Module, family: FamilySpec, scores: torch.Tensor, protected: torch.Tensor, kept: int
) -> nn.Module:
    """Keep the ``protected`` (massive-activation) channels and the highest ``scores`` up to ``kept``, as PAT's
    mask start does; in place, returns ``model``."""
    return prune_hidden_channels(model, family, top_channels(scores, kept, protected))

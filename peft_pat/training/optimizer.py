"""Optimizer parameter groups for plain PyTorch training loops.

Decoupled weight decay (AdamW) moves every decayed parameter by ``-lr * wd * p`` per step. The PAT
mask logits w decide which hidden channels survive through their sign and are pulled towards +-0.5 by
the polarisation loss (docs/method.md §3), so decay would drag all of them towards the undecided
boundary w = 0. :func:`optimizer_param_groups` therefore puts the logits in a group without decay.

The mask's own learning rate needs no group: it is a reparametrisation inside
:class:`~peft_pat.mask.PATMask`, set by ``model.set_step(step, total, learning_rate=peak_lr)``.
Inside transformers' Trainer, :class:`~peft_pat.training.callback.PATCallback` does both jobs instead
(the Trainer builds its own optimizer, so the callback undoes AdamW's decay on the logits).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..errors import PATConfigError, PATStateError, PATTypeError
from ..model import find_pat_tuner


def optimizer_param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Trainable parameters of a PAT model as two param groups for ``torch.optim.AdamW(groups, lr=...)``.

    Group 0: every trainable parameter except the mask logits, with ``weight_decay``.
    Group 1: the mask logits of every PAT adapter, with ``weight_decay=0``.
    Parameters shared between modules appear once.
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise PATTypeError(f"weight_decay must be a number, got {type(weight_decay).__name__} ({weight_decay!r}).")
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise PATConfigError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}.")
    tuner = find_pat_tuner(model)
    if tuner is None:
        raise PATTypeError(
            f"optimizer_param_groups: {type(model).__name__} has no PAT adapter. Wrap the base model first: "
            "model = get_peft_model(base, PATConfig(task_type='CAUSAL_LM'))."
        )
    mask_ids = {id(mask.logits) for mask in tuner.all_masks()}
    decay, no_decay = [], []
    for param in model.parameters():  # de-duplicated by identity
        if param.requires_grad:
            (no_decay if id(param) in mask_ids else decay).append(param)
    if not decay and not no_decay:
        raise PATStateError(
            f"optimizer_param_groups: {type(model).__name__} has no trainable parameter, so an optimizer would "
            "change nothing. An adapter loaded with PeftModel.from_pretrained is frozen for inference: load it "
            "with PeftModel.from_pretrained(base, folder, is_trainable=True) to train it (or make an inactive "
            "adapter the trained one with model.set_adapter(name))."
        )
    return [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]

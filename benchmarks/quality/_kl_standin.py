"""Stand-in for ``peft_pat.distillation.distillation_loss`` until that module lands; delete this file then.

Same signature and definition as the package function: the mean over non-padding tokens
(``attention_mask == 1``; every token when the mask is None) of T^2 * KL(softmax(t / T) || softmax(s / T)),
position by position (no shift: teacher and student see the same inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor | None,
    temperature: float = 1.0,
) -> torch.Tensor:
    if attention_mask is None:
        attention_mask = torch.ones(student_logits.shape[:-1], dtype=torch.long, device=student_logits.device)
    keep = attention_mask.bool()
    student = F.log_softmax(student_logits[keep].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[keep].float() / temperature, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)
    return temperature**2 * kl.mean()

"""Logit distillation from the dense model (the same weights with every PAT piece bypassed).

With teacher logits t and student logits s at one position and temperature T,

    KD = T^2 * KL( softmax(t / T) || softmax(s / T) ),     dKD/ds = T * (softmax(s / T) - softmax(t / T))

averaged over every non-padding position (``attention_mask == 1``). The tuner mixes it with the task
loss as ``(1 - w) * CE + w * KD`` (``PATConfig.distillation_weight`` = w). The loss runs a block of
positions at a time and recomputes the softmaxes in backward, so the extra memory is one block of
``block x vocab`` floats, not the several full ``tokens x vocab`` tensors that autograd would keep.
"""

from __future__ import annotations

import torch

DISTILLATION_BLOCK_TOKENS = 1024  # positions per block: 1024 x 50k vocab x 4 bytes = 200 MB of float32


def _block_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over rows of KL(softmax(t/T) || softmax(s/T)), float32."""
    log_p_s = torch.log_softmax(student.float() / temperature, dim=-1)
    log_p_t = torch.log_softmax(teacher.float() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum()


class _DistillationLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, block: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, student.shape[0], block):
            total += _block_kl(student[start : start + block], teacher[start : start + block], temperature)
        ctx.save_for_backward(student, teacher)
        ctx.temperature, ctx.block = temperature, block
        count = max(student.shape[0], 1)
        return total * (temperature**2 / count)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        student, teacher = ctx.saved_tensors
        temperature, block = ctx.temperature, ctx.block
        scale = grad_out.float() * (temperature / max(student.shape[0], 1))
        grad = torch.empty_like(student)
        for start in range(0, student.shape[0], block):
            s = student[start : start + block].float() / temperature
            t = teacher[start : start + block].float() / temperature
            g = (torch.softmax(s, dim=-1) - torch.softmax(t, dim=-1)).mul_(scale)
            grad[start : start + block] = g.to(grad.dtype)
        return grad, None, None, None


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    block_tokens: int = DISTILLATION_BLOCK_TOKENS,
) -> torch.Tensor:
    """Mean over non-padding positions of T^2 KL(softmax(t/T) || softmax(s/T)) (module docstring); a scalar.

    ``student_logits`` / ``teacher_logits``: (..., vocab) of the same shape; ``attention_mask``: the
    leading shape, 1 for real tokens (None: every position). The teacher gets no gradient.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"distillation_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; both models must see the same inputs and vocabulary."
        )
    if not temperature > 0:
        raise ValueError(f"distillation_loss: temperature must be > 0, got {temperature}.")
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab).to(student.device)
    if attention_mask is not None:
        keep = attention_mask.reshape(-1).to(student.device).bool()
        if not bool(keep.all()):
            student, teacher = student[keep], teacher[keep]
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0
    return _DistillationLoss.apply(student, teacher, float(temperature), int(block_tokens))

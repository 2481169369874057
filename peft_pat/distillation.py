"""Logit distillation from the dense model (the same weights with every PAT piece bypassed).

With teacher logits t and student logits s at one position and temperature T, p = softmax(t / T),
q = softmax(s / T):

    KD = T^2 * KL(p || q) = T^2 * (sum_v p_v (t_v / T) - lse(t / T) - sum_v p_v (s_v / T) + lse(s / T))
    dKD/ds = T * (q - p)

averaged over every non-padding position (``attention_mask == 1``). The tuner mixes it with the task
loss as ``(1 - w) * CE + w * KD`` (``PATConfig.distillation_weight`` = w).

Cost: the loss runs a block of positions at a time through one reused float32 scratch block, so
the extra memory is ``block x vocab`` floats, not the several full ``tokens x vocab`` tensors autograd
would keep. The forward overwrites the teacher logits with p (which is all backward needs besides
lse(s / T)), and the backward writes the gradient into that same storage, so no pass allocates a
new ``tokens x vocab`` tensor (on CPU a fresh 200 MB tensor costs as much as the arithmetic on it).
"""

from __future__ import annotations

import torch

DISTILLATION_BLOCK_TOKENS = 256  # positions per block: 256 x 50k vocab x 4 bytes = 50 MB of float32 scratch


def _scaled_into(out: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in float32: ``logits`` itself when nothing is to be done, else written into ``out``."""
    if logits.dtype == torch.float32:
        return logits if temperature == 1.0 else torch.div(logits, temperature, out=out)
    out.copy_(logits)
    return out if temperature == 1.0 else out.div_(temperature)


class _DistillationLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, block: int) -> torch.Tensor:
        rows, vocab = student.shape
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        lse_student = torch.empty(rows, dtype=torch.float32, device=student.device)
        work = torch.empty(min(block, rows), vocab, dtype=torch.float32, device=student.device)
        scaled = torch.empty_like(work) if (student.dtype != torch.float32 or temperature != 1.0) else None
        teacher_scaled = torch.empty_like(work) if teacher.dtype != torch.float32 else None
        for start in range(0, rows, block):
            end = min(start + block, rows)
            n = end - start
            w = work[:n]
            # student: lse(s / T)
            s = _scaled_into(scaled[:n], student[start:end], temperature) if scaled is not None else student[start:end]
            m_s = s.amax(-1, keepdim=True)
            torch.sub(s, m_s, out=w).exp_()
            lse_s = m_s.squeeze(-1) + w.sum(-1).log()
            lse_student[start:end] = lse_s
            # teacher: t / T - max, exp, normaliser; p written over the teacher logits for backward
            if teacher_scaled is not None:
                t = _scaled_into(teacher_scaled[:n], teacher[start:end], temperature)
            else:
                t = teacher[start:end]
                if temperature != 1.0:
                    t.div_(temperature)
            t.sub_(t.amax(-1, keepdim=True))
            torch.exp(t, out=w)
            z_t = w.sum(-1)
            # KL = (sum e^t' t') / Z - log Z - (sum e^t' s / T) / Z + lse(s / T), with t' = t / T - max
            kl = (torch.einsum("ij,ij->i", w, t) - torch.einsum("ij,ij->i", w, s)) / z_t - z_t.log() + lse_s
            total += kl.sum(dtype=torch.float64)
            torch.div(w, z_t[:, None], out=w)
            teacher[start:end].copy_(w)
        ctx.save_for_backward(student, teacher, lse_student)
        ctx.temperature, ctx.block = temperature, block
        return (total * (temperature**2 / max(rows, 1))).float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        student, probabilities, lse_student = ctx.saved_tensors
        temperature, block = ctx.temperature, ctx.block
        rows, vocab = student.shape
        scale = grad_out.float() * (temperature / max(rows, 1))
        # the gradient goes into p's storage (p is not needed afterwards) when the dtypes allow it
        grad = probabilities if probabilities.dtype == student.dtype else torch.empty_like(student)
        work = torch.empty(min(block, rows), vocab, dtype=torch.float32, device=student.device)
        for start in range(0, rows, block):
            end = min(start + block, rows)
            w = work[: end - start]
            s = _scaled_into(w, student[start:end], temperature)
            torch.sub(s, lse_student[start:end, None], out=w).exp_()  # q = softmax(s / T)
            w.sub_(probabilities[start:end]).mul_(scale)  # T * (q - p) * grad / rows
            grad[start:end].copy_(w)
        return grad, None, None, None


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    block_tokens: int = DISTILLATION_BLOCK_TOKENS,
    *,
    consume_teacher: bool = False,
) -> torch.Tensor:
    """Mean over non-padding positions of T^2 KL(softmax(t/T) || softmax(s/T)) (module docstring); a scalar.

    ``student_logits`` / ``teacher_logits``: (..., vocab) of the same shape; ``attention_mask``: the
    leading shape, 1 for real tokens (None: every position). The teacher gets no gradient.
    ``consume_teacher=True`` lets the loss overwrite ``teacher_logits`` (saves a copy of it; the
    tuner passes its own teacher forward's logits); otherwise the caller's tensor is left untouched.
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
            student, teacher = student[keep], teacher[keep]  # indexing copies the teacher
    if not consume_teacher and teacher.data_ptr() == teacher_logits.data_ptr():
        teacher = teacher.clone()
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0
    return _DistillationLoss.apply(student, teacher.contiguous(), float(temperature), int(block_tokens))

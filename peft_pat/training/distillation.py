"""Logit distillation from the dense model (the same weights with every PAT piece bypassed).

With teacher logits t and student logits s at one position and temperature T, p = softmax(t / T),
q = softmax(s / T):

    KD = T^2 * KL(p || q) = T^2 * (sum_v p_v (t_v / T) - lse(t / T) - sum_v p_v (s_v / T) + lse(s / T))
    dKD/ds = T * (q - p)

averaged over every non-padding position (``attention_mask == 1``). The tuner mixes it with the task
loss as ``(1 - w) * CE + w * KD`` (``PATConfig.distillation_weight`` = w).

Cost: one pass of blocks of positions computes the loss *and* its gradient T (q - p) / rows, which
is written over the teacher logits (they are not needed afterwards); backward only scales it by the
incoming gradient. On CPU the blocks are small (:func:`block_rows`), so the few passes over a block stay
in cache; the extra memory is a few ``block x vocab`` float32 scratch blocks, not the
several full ``tokens x vocab`` tensors autograd would keep (on CPU a fresh 200 MB tensor costs as much
as the arithmetic on it). The pass also yields lse(s / T) per position, from which the task
cross-entropy is one gather (:func:`cross_entropy_from_lse`), so a distilling forward need not run the
model's own loss.
"""

from __future__ import annotations

import torch

DISTILLATION_BLOCK_TOKENS = 256  # positions per block on an accelerator: 256 x 50k vocab x 4 bytes = 50 MB of scratch
IGNORE_INDEX = -100  # label of a position without a target (transformers' convention)
CPU_BLOCK_FLOATS = 2**19  # on CPU a block is ~2 MB of float32 per scratch (4 rows at least), so it stays in cache


def block_rows(device: torch.device, vocab: int) -> int:
    """Positions per block: ``DISTILLATION_BLOCK_TOKENS`` on an accelerator (few, large kernels), on CPU as many
    as fit ``CPU_BLOCK_FLOATS`` (10 rows of a 49k vocabulary: loss and gradient of 1,024 x 49,152 logits on one
    CPU thread took 0.28 s with 8-row blocks, 0.44 s with 64)."""
    if device.type != "cpu":
        return DISTILLATION_BLOCK_TOKENS
    return max(4, CPU_BLOCK_FLOATS // max(vocab, 1))


def _scaled_into(out: torch.Tensor | None, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in float32: ``logits`` itself when nothing is to be done, else written into ``out``."""
    if out is None:
        return logits
    out.copy_(logits)
    return out if temperature == 1.0 else out.div_(temperature)


class _DistillationLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, block: int):
        rows, vocab = student.shape
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        lse_student = torch.empty(rows, dtype=torch.float32, device=student.device)
        q_work = torch.empty(min(block, rows), vocab, dtype=torch.float32, device=student.device)
        p_work = torch.empty_like(q_work)
        plain = temperature == 1.0
        s_scaled = None if (plain and student.dtype == torch.float32) else torch.empty_like(q_work)
        t_scaled = None if (plain and teacher.dtype == torch.float32) else torch.empty_like(q_work)
        # the gradient goes into the teacher's storage (consumed) when the dtypes allow it
        grad = teacher if teacher.dtype == student.dtype else torch.empty_like(student)
        scale = temperature / max(rows, 1)
        for start in range(0, rows, block):
            end = min(start + block, rows)
            n = end - start
            q, p = q_work[:n], p_work[:n]
            s = _scaled_into(None if s_scaled is None else s_scaled[:n], student[start:end], temperature)
            t = _scaled_into(None if t_scaled is None else t_scaled[:n], teacher[start:end], temperature)
            m_s, m_t = s.amax(-1), t.amax(-1)
            torch.sub(s, m_s[:, None], out=q).exp_()  # e^(s/T - max), normaliser z_s
            torch.sub(t, m_t[:, None], out=p).exp_()  # e^(t/T - max), normaliser z_t
            z_s, z_t = q.sum(-1), p.sum(-1)
            lse_s = m_s + z_s.log()
            lse_student[start:end] = lse_s
            # KL = sum p (t/T - s/T) - lse(t/T) + lse(s/T), with p = e / z_t
            kl = (torch.linalg.vecdot(p, t) - torch.linalg.vecdot(p, s)) / z_t - (m_t + z_t.log()) + lse_s
            total += kl.sum(dtype=torch.float64)
            q.mul_((scale / z_s)[:, None])  # T q / rows
            torch.addcmul(q, p, (-scale / z_t)[:, None], out=grad[start:end])  # T (q - p) / rows
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(lse_student)
        ctx.used = False
        return (total * (temperature**2 / max(rows, 1))).float(), lse_student

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None = None):
        if ctx.used:
            raise RuntimeError(
                "distillation_loss: backward ran twice through one loss; its gradient is formed in place in the "
                "forward. Recompute the loss instead of retain_graph=True."
            )
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_out.to(grad.dtype)), None, None, None


def _rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor | None, consume: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(student rows, teacher rows, the kept positions or None for all): flattened, padding dropped."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"distillation_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; both models must see the same inputs and vocabulary."
        )
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab).to(student.device)
    keep = None
    if attention_mask is not None:
        keep = attention_mask.reshape(-1).to(student.device).bool()
        if bool(keep.all()):
            keep = None
        else:
            student, teacher = student[keep], teacher[keep]  # indexing copies the teacher
    if not consume and teacher.data_ptr() == teacher_logits.data_ptr():
        teacher = teacher.clone()
    return student, teacher.contiguous(), keep


def _distil(student_logits, teacher_logits, attention_mask, temperature, block_tokens, consume):
    if not temperature > 0:
        raise ValueError(f"distillation_loss: temperature must be > 0, got {temperature}.")
    student, teacher, keep = _rows(student_logits, teacher_logits, attention_mask, consume)
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0, torch.empty(0, device=student.device), keep
    block = block_rows(student.device, student.shape[-1]) if block_tokens is None else int(block_tokens)
    loss, lse = _DistillationLoss.apply(student, teacher, float(temperature), block)
    return loss, lse, keep


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    block_tokens: int | None = None,
    *,
    consume_teacher: bool = False,
) -> torch.Tensor:
    """Mean over non-padding positions of T^2 KL(softmax(t/T) || softmax(s/T)) (module docstring); a scalar.

    ``student_logits`` / ``teacher_logits``: (..., vocab) of the same shape; ``attention_mask``: the
    leading shape, 1 for real tokens (None: every position). The teacher gets no gradient.
    ``consume_teacher=True`` lets the loss overwrite ``teacher_logits`` (saves a copy of it; the
    tuner passes its own teacher forward's logits); otherwise the caller's tensor is left untouched.
    ``block_tokens``: positions per block (None: :func:`block_rows`).
    """
    return _distil(student_logits, teacher_logits, attention_mask, temperature, block_tokens, consume_teacher)[0]


def distillation_and_task_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    block_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(distillation loss at T = 1 consuming ``teacher_logits``, the task cross-entropy, no grad).

    The cross-entropy is the causal-LM one of transformers (label of position i + 1 scored at i, or
    ``shift_labels`` as given; -100 ignored), as a mean over the labelled positions, computed from the
    distillation pass's lse(s) as lse(s_i) - s_i[y_i] (:func:`cross_entropy_from_lse`).
    """
    loss, lse, keep = _distil(student_logits, teacher_logits, attention_mask, 1.0, block_tokens, True)
    if keep is not None:  # lse of every position; padding rows (if any is labelled) computed apart below
        full = torch.full(keep.shape, float("nan"), dtype=lse.dtype, device=lse.device)
        full[keep] = lse
        lse = full
    return loss, cross_entropy_from_lse(student_logits.detach(), lse, labels, shift_labels)


def next_token_targets(labels: torch.Tensor | None, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The target of every position, as transformers' ``ForCausalLMLoss`` reads it: ``shift_labels`` when given
    (padding-free collators pass them), else ``labels`` shifted left by one with ``IGNORE_INDEX`` at the end."""
    if shift_labels is not None:
        return shift_labels
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def cross_entropy_from_lse(
    logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor | None, shift_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean causal-LM cross-entropy lse(s_i) - s_i[y_i] over labelled positions, given lse per position.

    ``lse``: logsumexp of ``logits`` per flattened position, NaN where unknown (recomputed there).
    Targets: :func:`next_token_targets`; ``IGNORE_INDEX`` is ignored.
    """
    vocab = logits.shape[-1]
    targets = next_token_targets(labels, shift_labels).reshape(-1).to(logits.device)
    rows = (targets != IGNORE_INDEX).nonzero().flatten()
    if rows.numel() == 0:
        return torch.zeros((), device=logits.device)
    flat = logits.reshape(-1, vocab)
    lse_rows = lse[rows]
    unknown = lse_rows.isnan()
    if bool(unknown.any()):
        lse_rows[unknown] = torch.logsumexp(flat[rows[unknown]].float(), -1)
    return (lse_rows - flat[rows, targets[rows]].float()).mean()


@torch.no_grad()
def next_token_statistics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy H = lse(s) - sum_v softmax(s)_v s_v, and whether the target is the argmax) per position, zero
    where the target is ``IGNORE_INDEX``; ``logits`` (..., vocab) and ``targets`` (...) are aligned. Computed in
    blocks of positions (:func:`block_rows`), so no tokens x vocab float32 copy is made."""
    vocab = logits.shape[-1]
    flat, flat_targets = logits.reshape(-1, vocab), targets.reshape(-1)
    entropy = torch.zeros(flat.shape[0], dtype=torch.float32, device=logits.device)
    top1 = torch.zeros(flat.shape[0], dtype=torch.bool, device=logits.device)
    block = block_rows(logits.device, vocab)
    for start in range(0, flat.shape[0], block):
        s = flat[start : start + block].float()
        p = torch.softmax(s, -1)
        entropy[start : start + block] = torch.logsumexp(s, -1) - torch.linalg.vecdot(p, s)
        top1[start : start + block] = s.argmax(-1) == flat_targets[start : start + block]
    labelled = flat_targets != IGNORE_INDEX
    return (entropy * labelled).view(targets.shape), (top1 & labelled).view(targets.shape)

"""The one training loop every tuned method shares, so the budget is equal by construction.

AdamW (no weight decay, so the PAT mask logits are not decayed), gradient clipping at 1.0, peak
learning rate ``lr`` with linear warm-up over ``warmup`` of the steps and cosine decay to 0, the same
pre-built batches for every method. A PAT model gets its schedule driven exactly like
:class:`peft_pat.PATCallback` does for the Trainer: ``set_step(0, T, learning_rate=lr)`` before the
first step (the mask's own learning rate derives from it) and ``set_step(s, T)`` after optimizer step s.
The reported loss is the task loss (PAT's forward adds its auxiliary losses to ``loss``; they are
logged separately).
"""

from __future__ import annotations

import math
import time
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from peft_pat.callbacks import find_pat_tuner


def lr_factor(step: int, total: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at ``total``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    lr: float,
    warmup: float = 0.05,
    max_grad_norm: float = 1.0,
    device: str = "cpu",
    desc: str = "train",
    progress: bool = True,
) -> dict:
    """Train the trainable parameters of ``model`` on ``batches`` (one optimizer step each)."""
    total = len(batches)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{desc}: the model has no trainable parameters.")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup_steps = max(1, round(warmup * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup_steps))
    pat = find_pat_tuner(model)
    if pat is not None:
        pat.set_step(0, total, learning_rate=lr)
    model.train()
    losses, aux_log = [], []
    start = time.perf_counter()
    bar = tqdm(batches, desc=f"  {desc}", disable=not progress, leave=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PAT adapter .* mask hardened")
        for step, batch in enumerate(bar):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if pat is not None:
                task_loss = pat.last_auxiliary_losses.get("task_loss", float(out.loss.detach()))
                pat.set_step(step + 1, total)
                aux_log.append({k: round(v, 5) for k, v in pat.last_auxiliary_losses.items()})
            else:
                task_loss = float(out.loss.detach())
            losses.append(task_loss)
            bar.set_postfix(loss=f"{task_loss:.3f}")
    model.eval()
    seconds = time.perf_counter() - start
    tail = losses[-max(1, total // 10) :]
    result = {
        "steps": total,
        "seconds": seconds,
        "seconds_per_step": seconds / total,
        "first_loss": losses[0],
        "final_loss_mean_last_10pct": sum(tail) / len(tail),
        "loss_curve": [round(x, 4) for x in losses],
        "trainable_parameters": sum(p.numel() for p in params),
    }
    if pat is not None:
        mask = next(iter(pat.pat_mask.values()))
        result["pat_mask"] = {"hard": bool(mask.is_hard), "kept": int(mask.hard_mask.sum()) if mask.is_hard else None}
        result["pat_aux_last"] = aux_log[-1] if aux_log else {}
    return result

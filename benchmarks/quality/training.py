"""The one Trainer setup every tuned method shares, so the budget is equal by construction.

Every tuned method (LoRA, PAT, the LoRA recovery of the post-hoc pipelines) is trained by
``transformers.Trainer`` with the same arguments: the same pre-built batches in the same order (a
dataset of collated batches read sequentially with batch size 1, the collator unwraps them; no
shuffling), one optimizer step per batch, AdamW without weight decay (so PAT's mask logits are not
decayed), peak learning rate ``lr`` with linear warm-up over ``warmup`` of the steps and cosine decay,
gradient clipping at 1.0, the same seed. PAT runs exactly as a user runs it: the same Trainer plus
``peft_pat.PATCallback()``, which drives the mask schedule (and, where the package does it, the
calibration from the first training batches).

The loss (``--loss``):

* ``answer`` / ``full``: the model's own causal-LM cross-entropy on the batch labels (answer tokens
  only, or every token). For PAT that is the package's loss with ``distillation_weight=0``.
* ``distill``: logit distillation from the dense base model on every non-padding token. PAT does it
  inside the package (its default; teacher = its own base weights with every PAT piece bypassed).
  A post-hoc rival gets a frozen copy of the dense base model as teacher and the loss
  :func:`peft_pat.training.distillation.distillation_loss` (the same definition), through
  :class:`QualityTrainer`'s ``compute_loss``; nothing else of the Trainer changes.

Logged per step, for every method: the task cross-entropy on the batch labels (``loss_curve``, computed
from the same forward's logits, no extra pass), the loss that was optimized (``train_loss_curve``),
and for PAT every ``pat/*`` number ``PATCallback`` adds to the Trainer's logs.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments

from peft_pat import PATCallback
from peft_pat.training.distillation import distillation_loss

LOSSES = ("answer", "full", "distill")
IGNORE = -100


class PrebuiltBatches(torch.utils.data.Dataset):
    """Collated batches as dataset items: with batch size 1 and :func:`unwrap` the Trainer steps through them as is."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batches[index]


def unwrap(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    (batch,) = features
    return batch


@torch.no_grad()
def task_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean next-token cross-entropy over the labelled positions (the causal-LM loss, recomputed for the log)."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE))


class QualityTrainer(Trainer):
    """``Trainer`` that records the task cross-entropy of every training step and, given a ``teacher``,
    optimizes the distillation loss from it instead of the model's own loss."""

    def __init__(self, *args, teacher: nn.Module | None = None, temperature: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.temperature = temperature
        self.task_losses: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        if self.teacher is None:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        else:
            forward = {k: v for k, v in inputs.items() if k != "labels"}
            outputs = model(**forward)
            with torch.no_grad():
                teacher_logits = self.teacher(**forward).logits
            loss = distillation_loss(
                outputs.logits, teacher_logits, inputs.get("attention_mask"), self.temperature, consume_teacher=True
            )
        if model.training:
            self.task_losses.append(task_cross_entropy(outputs.logits.detach(), labels))
        return (loss, outputs) if return_outputs else loss


def training_arguments(
    output_dir: str, steps: int, lr: float, warmup: float, seed: int, device: str, progress: bool
) -> TrainingArguments:
    """The arguments every method trains with (module docstring)."""
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=1,  # one pre-collated batch per step
        gradient_accumulation_steps=1,
        train_sampling_strategy="sequential",
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=warmup,  # a float < 1 is a fraction of the steps
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        use_cpu=torch.device(device).type == "cpu",
    )


def train(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    lr: float,
    warmup: float = 0.05,
    seed: int = 0,
    device: str = "cpu",
    pat: bool = False,
    teacher: nn.Module | None = None,
    progress: bool = True,
) -> dict:
    """Train ``model``'s trainable parameters on ``batches`` (one optimizer step each); returns the log."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters.")
    callbacks = [PATCallback()] if pat else []
    with tempfile.TemporaryDirectory(prefix="quality-trainer-") as output_dir, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PAT adapter .* mask hardened")
        trainer = QualityTrainer(
            model=model,
            args=training_arguments(output_dir, len(batches), lr, warmup, seed, device, progress),
            train_dataset=PrebuiltBatches(batches),
            data_collator=unwrap,
            callbacks=callbacks,
            teacher=teacher,
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    model.eval()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]
    losses = trainer.task_losses
    tail = losses[-max(1, len(losses) // 10) :]
    result = {
        "steps": len(losses),
        "seconds": seconds,
        "seconds_per_step": seconds / max(1, len(losses)),
        "first_loss": losses[0],
        "final_loss_mean_last_10pct": sum(tail) / len(tail),
        "loss_curve": [round(x, 4) for x in losses],
        "train_loss_curve": [round(float(e["loss"]), 4) for e in steps],
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    pat_keys = sorted({k for e in steps for k in e if k.startswith("pat/")})
    if pat_keys:
        result["pat_curves"] = {k: [_round(e.get(k)) for e in steps] for k in pat_keys}
        last = steps[-1]
        result["pat_last"] = {k: _round(last[k]) for k in pat_keys if k in last}
        if "pat/hard" in last:
            hard = bool(last["pat/hard"])
            result["pat_mask"] = {"hard": hard, "kept": int(last["pat/kept_channels"]) if hard else None}
    return result


def _round(value):
    if value is None or not isinstance(value, int | float) or not math.isfinite(value):
        return value
    return round(float(value), 5)

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

The trainer (``--trainer``): ``trainer`` is ``transformers.Trainer`` (every method); ``trl`` trains PAT
with TRL's ``SFTTrainer`` instead (the same arguments, batches, collator and callback; SFTTrainer's own
defaults that differ from the Trainer's, bf16 autocast and gradient checkpointing, set back to the
Trainer's), so the two can be compared on the same PATConfig: SFTTrainer calls the model with
``fused_lm_head=True`` and builds its loss from the per-token log-probabilities it gets back.

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
from peft_pat.model import find_pat_tuner
from peft_pat.training.distillation import distillation_loss

LOSSES = ("answer", "full", "distill")
TRAINERS = ("trainer", "trl")
IGNORE = -100


class PrebuiltBatches(torch.utils.data.Dataset):
    """Collated batches as dataset items: with batch size 1 and :func:`unwrap` the Trainer steps through them as is."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batches[index]


class IndexedBatches:
    """Collator of a ``datasets.Dataset`` of batch indices (:meth:`dataset`): row ``{"batch": i}`` -> batch i."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    @staticmethod
    def dataset(batches: list[dict[str, torch.Tensor]]):
        from datasets import Dataset

        return Dataset.from_dict({"batch": list(range(len(batches)))})

    def __call__(self, features: list[dict[str, int]]) -> dict[str, torch.Tensor]:
        (row,) = features
        return self.batches[row["batch"]]


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


def sft_trainer(**kwargs) -> Trainer:
    """TRL's ``SFTTrainer`` over the pre-built batches, recording the task cross-entropy PAT computed in each
    training step (SFTTrainer's forward returns per-token values, not logits, so it cannot be recomputed)."""
    try:
        from trl import SFTTrainer
    except ImportError as error:
        raise SystemExit(f"--trainer trl needs TRL: pip install trl ({error}).") from error

    class RecordingSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.task_losses: list[float] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                self.task_losses.append(float(find_pat_tuner(model).last_auxiliary_losses["task_loss"]))
            return result

    return RecordingSFTTrainer(**kwargs)


def training_arguments(
    output_dir: str,
    steps: int,
    lr: float,
    warmup: float,
    seed: int,
    device: str,
    progress: bool,
    trainer: str = "trainer",
) -> TrainingArguments:
    """The arguments every method trains with (module docstring); ``trainer="trl"``: the same as an ``SFTConfig``."""
    if trainer == "trl":
        from trl import SFTConfig

        config_class, extra = (
            SFTConfig,
            {
                "bf16": False,  # SFTConfig's default is bf16 autocast, the Trainer's float32
                "gradient_checkpointing": False,  # SFTConfig's default is on, the Trainer's off
                "dataset_kwargs": {"skip_prepare_dataset": True},  # the batches are tokenized and collated already
            },
        )
    else:
        config_class, extra = TrainingArguments, {}
    return config_class(
        **extra,
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
    trainer_name: str = "trainer",
    tokenizer=None,
) -> dict:
    """Train ``model``'s trainable parameters on ``batches`` (one optimizer step each); returns the log.
    ``trainer_name``: one of :data:`TRAINERS` (module docstring); ``"trl"`` trains PAT only."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters.")
    if trainer_name not in TRAINERS:
        raise ValueError(f"trainer {trainer_name!r}: expected one of {TRAINERS}.")
    if trainer_name == "trl" and (not pat or teacher is not None):
        raise ValueError("--trainer trl trains the PAT method only (--methods pat).")
    callbacks = [PATCallback()] if pat else []
    with tempfile.TemporaryDirectory(prefix="quality-trainer-") as output_dir, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PAT adapter .* mask hardened")
        arguments = training_arguments(output_dir, len(batches), lr, warmup, seed, device, progress, trainer_name)
        if trainer_name == "trl":  # SFTTrainer takes a datasets.Dataset only: one row per batch, by index
            trainer = sft_trainer(
                model=model,
                args=arguments,
                train_dataset=IndexedBatches.dataset(batches),
                data_collator=IndexedBatches(batches),
                processing_class=tokenizer,
                callbacks=callbacks,
            )
        else:
            trainer = QualityTrainer(
                model=model,
                args=arguments,
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
        "trainer": trainer_name,
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

"""Train PAT with the Trainer on a tiny Llama and save what each process ends with.

Run by tests/test_multiprocess.py, once as ``accelerate launch --num_processes 2 --cpu`` (DDP over gloo)
and once as a single process with the same global batch. Writes ``<out>/rank<i>.pt`` holding the
first optimizer step's gradients (after DDP's all-reduce), the logged losses, every PAT tensor of the
final model and the kept channels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import peft_pat
from peft_pat.testing import VOCAB, tiny_model

from helpers import wrap


class VariableTargets(torch.utils.data.Dataset):
    """Rows with 3..10 target tokens each, so the per-rank token counts differ (token-weighted averaging)."""

    def __init__(self, rows: int = 64, length: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (rows, length), generator=g)
        self.labels = self.ids.clone()
        for i in range(rows):
            self.labels[i, : 1 + i % 8] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class SequentialTrainer(Trainer):
    """Sequential order: rank r takes micro-batches r, r + 2, ..., so 2 x 2 rows = the 1 x 4 rows of one process."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


class FirstStepGradients(TrainerCallback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="per process")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--distillation-weight", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # The paper's schedule (freeze at step 2 of 8), not the 25% default (step 1): one Adam step from the zero start
    # leaves near-tied logits, whose top-N float32 summation order could reorder (the test compares exact masks).
    model = wrap(
        tiny_model("llama"),
        target_sparsity=0.25,
        distillation_weight=args.distillation_weight,
        mask_milestone=1 / 3,
        mask_freeze=0.8 / 3,
    )
    grads = FirstStepGradients()
    training = TrainingArguments(
        output_dir=str(args.out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=5e-3, max_grad_norm=1.0, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = SequentialTrainer(
        model=model, args=training, train_dataset=VariableTargets(), callbacks=[peft_pat.PATCallback(), grads]
    )
    trainer.train()
    tuner = model.base_model
    mask = tuner.pat_mask["default"]
    result = {
        "world_size": training.world_size,
        "first_step_grads": grads.grads,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "pat_state": {k: v.detach().clone() for k, v in model.state_dict().items() if "pat_" in k},
        "kept": mask.kept_indices().clone(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out / f"rank{training.process_index}.pt")


if __name__ == "__main__":
    main()

"""A Trainer run of PAT on a tiny Llama that can be killed (SIGKILL, no clean-up) at a chosen moment.

Run by tests/test_fault_injection.py as a subprocess: ``python fault_train.py OUT [--kill WHERE:STEP]
[--resume]``. ``--kill step:N`` kills the process after optimizer step N; ``--kill save:N`` kills it inside
the save of checkpoint-N, after the adapter weights were half written; ``--kill state:N`` after everything but
``trainer_state.json``. A finished run writes OUT/final (the adapter) and OUT/merged.safetensors.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import safetensors.torch
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_pat import PATCallback

from helpers import TokenDataset, wrap
from tiny_models import tiny_model

TOTAL = 12  # freeze at step 7 with the settings below; checkpoints every 3 steps
PAT_SETTINGS = {"mask_milestone": 2 / 3, "mask_freeze": 0.6, "mask_lr": 0.05, "lora_dropout": 0.1}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAfterStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            die()


def kill_inside_saves(where: str, step: int) -> None:
    """Patch the writers the Trainer's checkpoint save calls, so the process dies part-way through it."""
    if where == "save":  # the adapter file half written, nothing after it
        import peft.peft_model

        original = peft.peft_model.safe_save_file

        def torn(tensors, filename, metadata=None):
            if f"checkpoint-{step}" in str(filename):
                original(tensors, filename, metadata=metadata)
                size = os.path.getsize(filename)
                with open(filename, "r+b") as handle:
                    handle.truncate(size // 2)
                die()
            return original(tensors, filename, metadata=metadata)

        peft.peft_model.safe_save_file = torn
    elif where == "state":  # model, optimizer, scheduler and RNG written; trainer_state.json not yet
        from transformers.trainer_callback import TrainerState

        original_state = TrainerState.save_to_json

        def killed(self, json_path):
            if f"checkpoint-{step}" in str(json_path):
                die()
            return original_state(self, json_path)

        TrainerState.save_to_json = killed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill", default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    callbacks: list[TrainerCallback] = [PATCallback()]
    if args.kill:
        where, step = args.kill.split(":")
        if where == "step":
            callbacks.append(KillAfterStep(int(step)))
        else:
            kill_inside_saves(where, int(step))
    torch.manual_seed(0)
    model = wrap(tiny_model("llama"), **PAT_SETTINGS)
    training = TrainingArguments(
        output_dir=str(args.out / "run"), max_steps=TOTAL, per_device_train_batch_size=4, learning_rate=5e-3,
        weight_decay=0.1, save_strategy="steps", save_steps=3, logging_steps=1, seed=7, report_to=[], use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=training, train_dataset=TokenDataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    model.save_pretrained(args.out / "final")
    merged = model.merge_and_prune()
    state = {k: v.contiguous() for k, v in merged.state_dict().items() if k != "lm_head.weight"}
    safetensors.torch.save_file(state, args.out / "merged.safetensors")


if __name__ == "__main__":
    main()

"""A Trainer run of PAT on a tiny Llama that can be SIGKILLed at a chosen moment (tests/test_fault_injection.py).

``python fault_train.py OUTPUT_DIR RESULT [--kill WHERE]`` trains 12 steps (mask freeze at step 7),
checkpoints every 3 steps with ``save_total_limit=2`` and ``resume_from_checkpoint=True`` when
OUTPUT_DIR holds checkpoints, and at the end writes RESULT (a torch file: every adapter tensor and the
``merge_and_prune()`` state dict). It prints ``START step=N`` when training begins and ``FAULT ...``
just before it kills itself. WHERE is one of

- ``step:S``: after optimizer step S (between two saves);
- ``save:S:FILE``: inside the save of checkpoint-S, while FILE is written (it is left half written);
- ``rotate:S``: inside the rotation after checkpoint-S was saved, half way through deleting the oldest one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
from pathlib import Path

import peft.peft_model
import torch
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

from peft_pat import PATCallback
from peft_pat.testing import tiny_model

from helpers import TokenDataset, wrap

TOTAL, SAVE_EVERY = 12, 3
PAT_SETTINGS = {"mask_milestone": 2 / 3, "mask_freeze": 0.6, "mask_lr": 0.05, "lora_dropout": 0.1}


def die(where: str) -> None:
    print(f"FAULT killed {where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def in_checkpoint(path, step: int, name: str) -> bool:
    path = Path(path)
    return path.name == name and path.parent.name == f"checkpoint-{step}"


def tear(path) -> None:
    """Leave the first half of a file that was just written: what a kill during its write leaves."""
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def install_fault(where: str) -> TrainerCallback | None:
    kind, _, rest = where.partition(":")
    if kind == "step":
        step = int(rest)

        class KillAfterStep(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    die(f"after step {step}")

        return KillAfterStep()
    if kind == "save":
        step_text, _, name = rest.partition(":")
        step = int(step_text)

        def torn(write):
            def wrapper(obj, path, *args, **kwargs):
                result = write(obj, path, *args, **kwargs)
                if isinstance(path, (str, os.PathLike)) and in_checkpoint(path, step, name):
                    tear(path)
                    die(f"while writing checkpoint-{step}/{name}")
                return result

            return wrapper

        torch.save = torn(torch.save)
        peft.peft_model.safe_save_file = torn(peft.peft_model.safe_save_file)
        save_to_json = TrainerState.save_to_json
        TrainerState.save_to_json = lambda self, path: torn(lambda obj, p: save_to_json(obj, p))(self, path)
        return None
    if kind == "rotate":
        step = int(rest)
        rmtree = shutil.rmtree

        def half_rmtree(path, *args, **kwargs):
            files = sorted(p for p in Path(path).iterdir() if p.is_file())
            if files and (Path(path).parent / f"checkpoint-{step}").is_dir():
                for file in files[: len(files) // 2]:
                    file.unlink()
                die(f"while rotation deleted {Path(path).name} after checkpoint-{step}")
            return rmtree(path, *args, **kwargs)

        shutil.rmtree = half_rmtree
        return None
    raise SystemExit(f"unknown fault {where!r}")


class ReportStart(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        print(f"START step={state.global_step}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("result")
    parser.add_argument("--kill", default=None)
    options = parser.parse_args()
    torch.set_num_threads(1)
    callbacks = [PATCallback(), ReportStart()]
    if options.kill:
        fault = install_fault(options.kill)
        if fault is not None:
            callbacks.append(fault)

    torch.manual_seed(0)
    model = wrap(tiny_model("llama"), **PAT_SETTINGS)
    args = TrainingArguments(
        output_dir=options.output_dir,
        max_steps=TOTAL,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        weight_decay=0.1,
        save_strategy="steps",
        save_steps=SAVE_EVERY,
        save_total_limit=2,
        logging_steps=1,
        seed=7,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=24, length=12), callbacks=callbacks)
    resume = any(p.name.startswith("checkpoint-") for p in Path(options.output_dir).glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if resume else None)

    adapter = {k: v.detach().clone() for k, v in model.named_parameters() if "pat_" in k}
    adapter.update({k: v.clone() for k, v in model.named_buffers() if "pat_mask" in k})
    model.eval()
    merged = {k: v.detach().clone() for k, v in model.merge_and_prune().state_dict().items()}
    torch.save({"adapter": adapter, "merged": merged}, options.result)


if __name__ == "__main__":
    main()

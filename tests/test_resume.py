"""A Trainer run killed midway and resumed from its checkpoint ends bit-exactly where an uninterrupted run
ends (CPU, fixed seeds): same mask, same adapter weights. The schedule state lives in the checkpoint's
adapter_model.safetensors, not only in Python attributes.

Schedule over 12 steps: s0 = round(2/3 * 12) = 8, freeze at round(0.6 * 12) = 7. Checkpoints every 3 steps;
the run is killed right after checkpoint 6 (soft mask, before the freeze) or 9 (hard mask). Weight decay
(PATCallback undoes it on the mask logits), the mask's own learning rate and LoRA dropout (RNG state) are on.
"""

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_pat import PATCallback
from peft_pat.mask import milestone_step, offset, temperature
from peft_pat.testing import tiny_model

from helpers import TokenDataset, wrap

TOTAL, FREEZE, S0 = 12, 7, 8
LEARNING_RATE, MASK_LR = 5e-3, 0.05
PAT_SETTINGS = {"mask_milestone": 2 / 3, "mask_freeze": 0.6, "mask_lr": MASK_LR, "lora_dropout": 0.1}
MASK_STATE = ("logits", "step", "total_steps", "is_hard", "hard_mask", "lr_ratio", "base_lr", "bad_grad_events")


class Killed(Exception):
    pass


class KillAfterCheckpoint(TrainerCallback):
    """Simulates the process dying right after checkpoint ``step`` was written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed


def train(output_dir, kill_at=None, resume_from=None):
    """A fresh model and Trainer (as after a restart); returns the PEFT model after training."""
    torch.manual_seed(0)
    model = wrap(tiny_model("llama"), **PAT_SETTINGS)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=TOTAL,
        per_device_train_batch_size=4,
        learning_rate=LEARNING_RATE,
        weight_decay=0.1,
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        seed=7,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    callbacks = [PATCallback()] + ([KillAfterCheckpoint(kill_at)] if kill_at else [])
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=24, length=12), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return model


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Every adapter parameter and every mask buffer (the full trained state), cloned."""
    state = {k: v.detach().clone() for k, v in model.named_parameters() if "pat_" in k}
    state.update({k: v.clone() for k, v in model.named_buffers() if "pat_mask" in k})
    return state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model = train(tmp_path_factory.mktemp("uninterrupted"))
    mask = model.base_model.pat_mask["default"]
    assert mask.hardened and int(mask.step) == TOTAL
    return adapter_state(model)


@pytest.mark.parametrize("kill_at", [6, 9], ids=["before-freeze", "after-freeze"])
def test_killed_and_resumed_run_is_bit_exact(tmp_path, uninterrupted, kill_at):
    with pytest.raises(Killed):
        train(tmp_path, kill_at=kill_at)
    checkpoint = tmp_path / f"checkpoint-{kill_at}"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")) == [
        f"checkpoint-{s}" for s in range(3, kill_at + 1, 3)
    ]

    # The schedule state is in the checkpoint's adapter file.
    saved = load_file(checkpoint / "adapter_model.safetensors")
    mask_state = {k.rsplit(".", 1)[-1]: v for k, v in saved.items() if ".pat_mask." in k}
    assert set(MASK_STATE) <= set(mask_state)
    assert int(mask_state["step"]) == kill_at and int(mask_state["total_steps"]) == TOTAL
    assert bool(mask_state["is_hard"]) == (kill_at >= FREEZE)
    assert float(mask_state["base_lr"]) == LEARNING_RATE
    assert float(mask_state["lr_ratio"]) == pytest.approx(MASK_LR / LEARNING_RATE)

    # ... and a model loaded from it (no Trainer, no callback) has its Python-side mirrors rebuilt from it.
    loaded = PeftModel.from_pretrained(tiny_model("llama"), checkpoint, is_trainable=True).base_model.pat_mask
    mask = loaded["default"]
    assert milestone_step(TOTAL, mask.milestone_fraction) == S0
    assert mask.hardened == (kill_at >= FREEZE) and mask.learning_rate_ratio == float(mask_state["lr_ratio"])
    assert float(mask.tau) == pytest.approx(temperature(kill_at, S0))
    assert float(mask.beta) == pytest.approx(offset(kill_at, S0))

    resumed = adapter_state(train(tmp_path, resume_from=checkpoint))
    assert resumed.keys() == uninterrupted.keys()
    different = [k for k in uninterrupted if not torch.equal(resumed[k], uninterrupted[k])]
    assert not different, f"resumed run differs from the uninterrupted one in {different}"

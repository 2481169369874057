"""PAT inside transformers' Trainer: schedule, exact kept width, logs, optimizer treatment of the mask."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from peft_pat import PATCallback
from peft_pat.testing import tiny_inputs, tiny_model

from helpers import TokenDataset, assert_logits_close, logits, wrap


def make_trainer(model, tmp_path, max_steps=10, **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        **kwargs,
    )
    return Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[PATCallback()])


def test_trainer_run_ends_with_exactly_n_channels(tmp_path):
    model = wrap(tiny_model("llama"), target_sparsity=0.25)
    trainer = make_trainer(model, tmp_path)
    assert trainer.callback_handler.callbacks[0].__class__ is PATCallback  # runs before the reporters
    trainer.train()
    mask = model.base_model.pat_mask["default"]
    assert mask.hardened and int(mask.hard_mask.sum()) == 48 == model.peft_config["default"].kept_width
    assert int(mask.step) == 10
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("pat/kept_channels" in entry for entry in logged)
    assert len(logged) == 10
    for key in ("pat/temperature", "pat/offset", "pat/active_loss", "pat/polarization_loss", "pat/identity_loss"):
        assert key in logged[0]
    assert logged[0]["pat/temperature"] == pytest.approx(1.0) and logged[-1]["pat/kept_channels"] == 48
    model.eval()
    ids = tiny_inputs()
    expected = logits(model, ids)
    assert_logits_close(logits(model.merge_and_prune(), ids), expected)


def test_trainer_with_gradient_accumulation_and_checkpointing(tmp_path):
    base = tiny_model("qwen2")
    model = wrap(base)
    trainer = make_trainer(model, tmp_path, max_steps=6, gradient_accumulation_steps=2, activation_checkpointing=True)
    trainer.train()
    assert model.base_model.pat_mask["default"].hardened


def test_weight_decay_is_undone_for_mask_logits(tmp_path):
    """AdamW's decoupled decay must not pull the mask logits to zero (other parameters still decay)."""
    model = wrap(tiny_model("llama"))
    mask = model.base_model.pat_mask["default"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)
    callback = PATCallback()
    with torch.no_grad():
        mask.logits.fill_(0.3)
    lora = model.base_model.model.model.layers[0].self_attn.q_proj.pat_lora_A["default"].weight
    lora_before = lora.detach().clone()
    for p in params:
        p.grad = torch.zeros_like(p)  # Adam update is exactly 0: only decay would move the weights
    callback.on_pre_optimizer_step(None, None, None, model=model, optimizer=optimizer)
    optimizer.step()
    callback.on_optimizer_step(None, None, None, model=model, optimizer=optimizer)
    assert torch.allclose(mask.logits.detach(), torch.full_like(mask.logits, 0.3), atol=1e-7)
    assert torch.allclose(lora.detach(), lora_before * (1 - 0.1 * 0.5))


def test_nan_gradient_is_zeroed_before_the_optimizer(tmp_path):
    model = wrap(tiny_model("llama"))
    mask = model.base_model.pat_mask["default"]
    mask.logits.grad = torch.full_like(mask.logits, float("nan"))
    PATCallback().on_pre_optimizer_step(None, None, None, model=model, optimizer=None)
    assert torch.equal(mask.logits.grad, torch.zeros_like(mask.logits))
    assert int(mask.bad_grad_events) == 1

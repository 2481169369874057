"""A plain PyTorch loop: optimizer_param_groups keeps the mask logits out of weight decay."""

import pytest
import torch

import peft_pat
from peft_pat import PATConfigError, PATTypeError, optimizer_param_groups
from peft_pat.testing import tiny_inputs, tiny_model

from helpers import wrap


def test_groups_hold_every_trainable_parameter_once_and_the_logits_without_decay():
    model = wrap(tiny_model("llama"))
    groups = optimizer_param_groups(model, weight_decay=0.1)
    mask = model.base_model.pat_mask["default"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert len(groups[1]["params"]) == 1 and groups[1]["params"][0] is mask.logits
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = groups[0]["params"] + groups[1]["params"]
    assert len(grouped) == len(trainable) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in trainable}


def test_adamw_with_the_groups_decays_adapters_but_not_the_mask():
    model = wrap(tiny_model("llama"))
    mask = model.base_model.pat_mask["default"]
    with torch.no_grad():
        mask.logits.fill_(0.3)
    lora = model.base_model.model.model.layers[0].self_attn.q_proj.pat_lora_A["default"].weight
    lora_before = lora.detach().clone()
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, weight_decay=0.5), lr=0.1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)  # the Adam update is exactly 0: only decay could move a weight
    optimizer.step()
    assert torch.equal(mask.logits.detach(), torch.full_like(mask.logits, 0.3))
    assert torch.allclose(lora.detach(), lora_before * (1 - 0.1 * 0.5))


def test_plain_loop_with_accumulation_reaches_the_exact_width():
    model = wrap(tiny_model("llama"), target_sparsity=0.5)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, weight_decay=0.01), lr=5e-3)
    ids = tiny_inputs(batch=4, length=9)
    total = 6
    model.train()
    model.set_step(0, total, learning_rate=5e-3)
    for step in range(1, total + 1):
        for micro in ids.split(2):
            (model(input_ids=micro, labels=micro).loss / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
        model.set_step(step, total)
    mask = model.base_model.pat_mask["default"]
    assert mask.hardened and int(mask.hard_mask.sum()) == 32
    assert model.base_model.pat_stats()["kept_channels"] == 32


def test_bad_arguments_name_the_fix():
    with pytest.raises(PATTypeError, match="has no PAT adapter"):
        optimizer_param_groups(tiny_model("llama"), 0.1)
    model = wrap(tiny_model("llama"))
    with pytest.raises(PATConfigError, match=">= 0"):
        optimizer_param_groups(model, -0.1)
    with pytest.raises(PATTypeError, match="must be a number"):
        optimizer_param_groups(model, "0.1")


def test_exported_at_package_level():
    assert peft_pat.optimizer_param_groups is optimizer_param_groups

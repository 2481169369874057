"""The device-independent core on the test device (the `device` fixture: cpu unless --pat-device or
$PEFT_PAT_TEST_DEVICE names another; benchmarks/gpu_check.py runs ``-m device`` on CUDA): a training step with the
mask hardening to exactly N, merge exactness, bf16 autocast, distillation. The same properties are tested in depth
on the CPU elsewhere (test_merge_exact.py, test_mask.py, test_training_modes.py); these keep everything on one
device and check that nothing falls back to the CPU."""

import pytest
import torch

from peft_pat.testing import tiny_inputs, tiny_model

from helpers import assert_bf16_autocast_step, assert_logits_close, logits, train_steps, wrap


def _on(model, device: torch.device) -> None:
    """Every parameter and buffer of ``model`` (adapters and masks included) lives on ``device``."""
    stray = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != device.type]
    assert not stray, f"not on {device}: {stray[:5]}"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_training_hardens_the_mask_and_merges_exactly(family, device):
    base = tiny_model(family, num_attention_heads=8, num_key_value_heads=2, head_dim=8).to(device)
    ids = tiny_inputs(length=12).to(device)
    model = wrap(base, init_weights=False)
    _on(model, device)
    loss = train_steps(model, ids, steps=8)
    assert torch.isfinite(loss)
    mask = model.base_model.pat_mask["default"]
    assert mask.hardened and int(mask.hard_mask.sum()) == 48
    _on(model, device)
    expected = logits(model, ids)
    small = model.merge_and_prune()
    assert small.config.hidden_size == 48
    _on(small, device)
    assert_logits_close(logits(small, ids), expected)


def test_soft_mask_gradients_reach_every_trainable_tensor(device):
    model = wrap(tiny_model("llama").to(device), init_weights=False)
    model.set_step(2, 30)
    model.train()
    ids = tiny_inputs(length=9).to(device)
    model(input_ids=ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing[:5]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("distillation_weight", [0.0, 1.0])
def test_bf16_autocast_on_the_device(device, distillation_weight):
    model = wrap(tiny_model("llama").to(device), init_weights=False, distillation_weight=distillation_weight)
    assert_bf16_autocast_step(model, tiny_inputs(length=9).to(device), device.type, rel=3e-2)


def test_distillation_starts_at_zero_on_the_device(device):
    """At the identity start the student is the teacher: the distillation loss is 0 and its gradient too."""
    model = wrap(tiny_model("llama").to(device), distillation_weight=1.0, active_loss_weight=0.0,
                 polarization_weight=0.0, identity_loss="none")  # fmt: skip
    model.train()
    ids = tiny_inputs(length=9).to(device)
    loss = model(input_ids=ids, labels=ids).loss
    assert abs(loss.item()) < 1e-5

"""Code paths that decide speed, checked for what they compute (timings live in benchmarks/)."""

import torch

from peft_pat.testing import tiny_inputs, tiny_model

from helpers import wrap


def test_merge_and_prune_returns_trainable_parameters_like_from_pretrained():
    """Frozen weights would make a logits_to_keep prefill copy lm_head per call (bmm path in torch.matmul)."""
    model = wrap(tiny_model("llama"))
    model.base_model.harden_mask()
    pruned = model.base_model.merge_and_prune()
    assert all(p.requires_grad for p in pruned.parameters())


def test_fused_hsm_gradients_equal_with_gradient_checkpointing():
    """The gate is recomputed inside each HSM, so re-running layers in backward gives the same gradients."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        base = tiny_model("llama")
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = wrap(base, init_weights=False)
        model.set_step(2, 30)
        model.train()
        ids = tiny_inputs(length=9)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("pat_hsm_down" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)

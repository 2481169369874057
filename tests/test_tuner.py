"""The PEFT side: identity at start, trainability, PEFT conventions, losses, errors."""

import pytest
import torch
from peft import get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from peft_pat import PATConfig, PATConfigError, PATLinear, PATStateError, UnsupportedModelError
from peft_pat.layer import PATEmbedding
from peft_pat.testing import ALL_FAMILIES, tiny_inputs, tiny_model

from helpers import assert_logits_close, logits, wrap


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_identity_at_start(family):
    base = tiny_model(family, tie_word_embeddings=family == "gemma")
    ids = tiny_inputs()
    expected = logits(base, ids)
    model = wrap(base)
    assert torch.equal(logits(model, ids), expected)


def test_layout_hsm_on_producers_lora_on_linears():
    model = wrap(tiny_model("llama"), hsm_rank=8, r=4)
    inner = model.base_model.model
    assert isinstance(inner.model.embed_tokens, PATEmbedding)
    layer = inner.model.layers[0]
    for name in ("o_proj",):
        m = getattr(layer.self_attn, name)
        assert m.has_hsm("default") and "default" in m.pat_lora_A
    for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj):
        assert isinstance(m, PATLinear) and not m.has_hsm("default")
    assert layer.mlp.down_proj.has_hsm("default")
    hsms = [m for m in inner.modules() if isinstance(m, (PATLinear, PATEmbedding)) and m.has_hsm("default")]
    assert len(hsms) == 2 * 2 + 1  # 2L + 1
    assert not isinstance(inner.lm_head, PATLinear)


def test_trainable_parameters_and_names():
    model = wrap(tiny_model("llama"), hsm_rank=8, r=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.pat_mask.default.logits" in trainable
    assert all("pat_" in n for n in trainable)
    d, r, rank, layers = 64, 4, 8, 2
    # LoRA r * (in + out) on q (64->64), k and v (64->32, GQA), o (64->64), gate and up (64->96), down (96->64)
    lora = layers * r * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 96) + (96 + 64))
    hsm = (2 * layers + 1) * (2 * d * rank + d)  # L0, L1 and s on 2L + 1 HSMs (untied: full embedding HSM)
    count, _ = model.get_nb_trainable_parameters()
    assert count == lora + hsm + d


def test_tied_model_gets_diagonal_embedding_hsm():
    model = wrap(tiny_model("llama", tie_word_embeddings=True))
    emb = model.base_model.model.model.embed_tokens
    assert emb.has_hsm("default") and "default" not in emb.pat_hsm_down
    assert model.peft_config["default"].embedding_hsm == "diagonal"


def test_aux_loss_added_only_when_training_with_labels():
    model = wrap(tiny_model("llama"))
    ids = tiny_inputs()
    model.eval()
    eval_loss = model(input_ids=ids, labels=ids).loss
    model.train()
    out = model(input_ids=ids, labels=ids)
    aux = model.base_model.last_auxiliary_losses
    assert set(aux) == {"active_loss", "polarization_loss", "identity_loss", "task_loss"}
    assert aux["active_loss"] == pytest.approx(10 * (64 - 48) / 48)
    assert out.loss.item() == pytest.approx(
        aux["task_loss"] + aux["active_loss"] + aux["polarization_loss"] + aux["identity_loss"], rel=1e-5
    )
    assert aux["task_loss"] == pytest.approx(eval_loss.item(), rel=1e-5)
    out.loss.backward()
    assert model.base_model.pat_mask["default"].logits.grad.abs().sum() > 0


def test_identity_loss_sums_over_all_hsms():
    model = wrap(tiny_model("llama", num_hidden_layers=3))
    _, parts = model.base_model.auxiliary_loss()
    layers = [m for m in model.modules() if isinstance(m, (PATLinear, PATEmbedding))]
    per_layer = [m.identity_loss("default") for m in layers]
    per_layer = [x for x in per_layer if x is not None]
    assert len(per_layer) == 2 * 3 + 1
    assert parts["identity_loss"].item() == pytest.approx(sum(x.item() for x in per_layer), rel=1e-6)


def test_gradient_checkpointing_gives_same_gradients():
    ids = tiny_inputs(length=9)
    grads = []
    for checkpointing in (False, True):
        base = tiny_model("llama")
        if checkpointing:
            base.activation_checkpointing_enable()
        model = wrap(base, init_weights=False)
        model.set_step(3, 30)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_init_weights_false_is_not_identity():
    base = tiny_model("llama")
    ids = tiny_inputs()
    expected = logits(base, ids)
    model = wrap(base, init_weights=False)
    assert (logits(model, ids) - expected).abs().max() > 1e-3


def test_disable_adapter_gives_base_outputs():
    base = tiny_model("mistral")
    ids = tiny_inputs()
    expected = logits(base, ids)
    model = wrap(base, init_weights=False)
    adapted = logits(model, ids)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), expected)
        assert not model.base_model.pat_mask["default"].logits.requires_grad
    assert torch.equal(logits(model, ids), adapted)
    assert model.base_model.pat_mask["default"].logits.requires_grad


def test_multiple_named_adapters_switch_and_delete():
    base = tiny_model("qwen2")
    ids = tiny_inputs()
    model = wrap(base, init_weights=False)
    first = logits(model, ids)
    model.add_adapter("other", PATConfig(target_sparsity=0.5, hsm_rank=4, r=2, init_weights=False))
    masks = model.base_model.pat_mask
    assert set(masks) == {"default", "other"}
    assert not masks["other"].logits.requires_grad  # a new adapter starts inactive and frozen
    model.set_adapter("other")
    assert masks["other"].logits.requires_grad and not masks["default"].logits.requires_grad
    second = logits(model, ids)
    assert (second - first).abs().max() > 1e-3
    model.set_adapter("default")
    assert torch.equal(logits(model, ids), first)
    model.delete_adapter("other")
    assert set(masks) == {"default"}
    assert not any("other" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model, ids), first)


def test_inference_mode_has_no_trainable_parameters():
    model = get_peft_model(tiny_model("llama"), PATConfig(inference_mode=True, hsm_rank=8, r=4))
    assert model.get_nb_trainable_parameters()[0] == 0


def test_generate_runs():
    model = wrap(tiny_model("llama"), init_weights=False)
    ids = tiny_inputs()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 4)


def test_set_step_on_peft_model_drives_every_mask():
    model = wrap(tiny_model("llama"))
    model.set_step(1, 30)
    mask = model.base_model.pat_mask["default"]
    assert not mask.hardened
    model.set_step(8, 30)
    assert mask.hardened and int(mask.hard_mask.sum()) == 48


def test_merge_and_prune_hardens_soft_mask_with_warning():
    model = wrap(tiny_model("llama"), init_weights=False)
    with pytest.warns(UserWarning, match="still soft"):
        small = model.merge_and_prune()
    assert small.config.hidden_size == 48


def test_merge_and_prune_twice_is_an_error():
    model = wrap(tiny_model("llama"))
    model.base_model.harden_mask()
    model.merge_and_prune()
    with pytest.raises(PATStateError, match="already merged and pruned"):
        model.merge_and_prune()


def test_bf16_base_keeps_float32_adapters_and_merges():
    base = tiny_model("llama", dtype=torch.bfloat16)
    model = wrap(base, init_weights=False)
    assert model.base_model.pat_mask["default"].logits.dtype == torch.float32
    assert model.base_model.model.model.layers[0].self_attn.o_proj.pat_hsm_down["default"].weight.dtype == torch.float32
    ids = tiny_inputs()
    model.base_model.harden_mask()
    expected = logits(model, ids)
    small = model.merge_and_prune()
    assert small.model.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16
    diff = (logits(small, ids) - expected).abs().max()
    assert diff < 0.1 * max(1.0, float(expected.abs().max()))  # bf16 rounding, not a bug-sized error


def test_unsupported_family_names_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="LayerNorm.*Supported families: Llama"):
        get_peft_model(gpt2, PATConfig())


def test_rank_not_below_hidden_size():
    with pytest.raises(PATConfigError, match="hsm_rank=64 must be smaller than the hidden size"):
        wrap(tiny_model("llama"), hsm_rank=64)


def test_default_schedule_lasts_in_proportion_to_the_pruned_fraction():
    """mask_milestone/mask_freeze=None: the paper's 1/3 and 0.8/3 at 50%, scaled by the pruned fraction; one
    given fixes the other through the paper's freeze = 0.8 s0; explicit values are kept."""
    from peft_pat.mask import default_schedule, resolve_schedule

    assert default_schedule(0.5) == pytest.approx((1 / 3, 0.8 / 3))
    assert default_schedule(0.25) == pytest.approx((1 / 6, 0.8 / 6))
    assert resolve_schedule(None, 0.4, 0.25) == pytest.approx((0.5, 0.4))
    assert resolve_schedule(0.5, None, 0.25) == pytest.approx((0.5, 0.4))
    assert resolve_schedule(None, 0.9, 0.25) == pytest.approx((1.0, 0.9))  # s0 capped at the end of the run
    assert resolve_schedule(0.3, 0.2, 0.9) == (0.3, 0.2)
    for sparsity, pruned in ((0.25, 16), (0.5, 32)):
        config = wrap(tiny_model("llama"), target_sparsity=sparsity).peft_config["default"]
        assert (config.mask_milestone, config.mask_freeze) == pytest.approx(default_schedule(pruned / 64))
    config = wrap(tiny_model("llama"), mask_milestone=0.6, mask_freeze=0.3).peft_config["default"]
    assert (config.mask_milestone, config.mask_freeze) == (0.6, 0.3)


def test_width_that_cannot_be_reached():
    with pytest.raises(PATConfigError, match="not a multiple of 4"):
        wrap(tiny_model("llama"), target_sparsity=None, target_width=50)


def test_embedding_in_target_modules_is_rejected():
    with pytest.raises(PATConfigError, match="embedding"):
        wrap(tiny_model("llama"), target_modules=["q_proj", "embed_tokens"])


def test_producer_in_modules_to_save_is_rejected():
    with pytest.raises(PATConfigError, match="modules_to_save contains 'o_proj'"):
        wrap(tiny_model("llama"), modules_to_save=["o_proj"])


def test_lm_head_in_modules_to_save_is_trained_and_pruned():
    base = tiny_model("llama")
    ids = tiny_inputs()
    model = wrap(base, init_weights=False, modules_to_save=["lm_head"])
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)
    model.base_model.harden_mask()
    expected = logits(model, ids)
    assert_logits_close(logits(model.merge_and_prune(), ids), expected)


def test_hsm_only_without_lora():
    base = tiny_model("llama")
    model = wrap(base, r=0, init_weights=False)
    assert not any("pat_lora" in n for n, _ in model.named_parameters())
    ids = tiny_inputs()
    model.base_model.harden_mask()
    expected = logits(model, ids)
    assert_logits_close(logits(model.merge_and_prune(), ids), expected)

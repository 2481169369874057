"""Every supported decoder family end to end: train, save/load, exact merge, stock reload, generate.

Also the model forms users bring: ``device_map`` placement, float16/bfloat16 bases with float32
adapters, and the errors for families PAT cannot prune.
"""

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, GraniteConfig, GraniteForCausalLM, OPTConfig, OPTForCausalLM

from peft_pat import PATConfig, PATLayer, UnsupportedModelError
from peft_pat.testing import ALL_FAMILIES, FAMILY_BUILDERS, tiny_inputs, tiny_model

from helpers import assert_logits_close, logits, train_steps, wrap

# Parts that must get a non-zero gradient at the first step (LoRA A does not: B starts at zero, as in LoRA).
LEARNING_PARTS = ("pat_hsm_down", "pat_hsm_up", "pat_hsm_scale", "pat_lora_B")


def _one_training_step(model, ids):
    """One AdamW step through PeftModel.forward with labels; returns the loss and the gradients seen."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    optimizer.step()
    optimizer.zero_grad()
    model.set_step(1, 6)
    return loss.detach(), grads, params


def _assert_every_pat_part_learns(grads, params):
    assert set(grads) == set(params), f"no gradient for {sorted(set(params) - set(grads))[:3]}"
    assert all(torch.isfinite(g).all() for g in grads.values())
    mask = [g for n, g in grads.items() if "pat_mask" in n]
    assert len(mask) == 1 and mask[0].abs().sum() > 0
    units = [g for n, g in grads.items() if "pat_unit_masks" in n]  # the MLP masks of the default axes
    assert len(units) == 1 and units[0].abs().sum() > 0
    for part in LEARNING_PARTS:
        got = [g for n, g in grads.items() if f".{part}." in n or n.endswith(f".{part}")]
        assert got, f"no trainable {part}"
        assert sum(float(g.abs().sum()) for g in got) > 0, f"{part} gets only zero gradients"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_family_end_to_end(family, tied, tmp_path):
    """Train step -> train past the freeze -> adapter round trip -> exact merge -> stock reload -> generate,
    with the package's default axes (hidden + MLP width)."""
    ids = tiny_inputs(length=10)
    model = wrap(tiny_model(family, tie_word_embeddings=tied), prune_axes=None)
    config = model.peft_config["default"]
    width, mlp = config.kept_width, config.kept_intermediate_size
    assert config.prune_axes == ["hidden", "mlp"] and 0 < width < 64 and mlp is not None

    loss, grads, params = _one_training_step(model, ids)
    assert torch.isfinite(loss)
    _assert_every_pat_part_learns(grads, params)
    train_steps(model, ids, steps=5, total=6)
    mask = model.base_model.pat_mask["default"]
    assert mask.hardened and int(mask.hard_mask.sum()) == width
    unit_mask = model.base_model.pat_unit_masks["default"]["mlp"]
    assert unit_mask.hardened and (unit_mask.hard_mask.sum(-1) == mlp).all()
    expected = logits(model, ids)

    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_model(family, tie_word_embeddings=tied), tmp_path / "adapter")
    assert torch.equal(logits(loaded, ids), expected)

    small = loaded.merge_and_prune()
    assert type(small) is FAMILY_BUILDERS[family][1]
    assert small.config.hidden_size == width and small.config.intermediate_size == mlp
    assert not any(isinstance(m, PATLayer) for m in small.modules())
    merge_diff = assert_logits_close(logits(small, ids), expected)

    small.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert type(reloaded) is type(small) and reloaded.config.tie_word_embeddings == tied
    assert torch.equal(logits(reloaded, ids), logits(small, ids))
    reload_diff = assert_logits_close(logits(reloaded, ids), expected)
    print(
        f"\n[families] {family:12s} {'tied' if tied else 'untied':6s} merge {merge_diff:.2e} reload {reload_diff:.2e}"
    )

    prompt = ids[:, :4]
    kwargs = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 5, "do_sample": False}
    generated = reloaded.generate(prompt, **kwargs)
    assert generated.shape == (2, 9)
    assert torch.equal(generated, model.generate(input_ids=prompt, **kwargs))  # the PAT model says the same


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_merge_and_unload_keeps_full_width_with_zero_channels(family):
    """PEFT's meaning: fold everything, keep hidden_size; the pruned channels are zero rows of producers."""
    base = tiny_model(family, tie_word_embeddings=family.startswith("gemma"))
    ids = tiny_inputs()
    model = wrap(base, init_weights=False)
    model.base_model.harden_mask()
    pruned = (model.base_model.pat_mask["default"].hard_mask == 0).nonzero().flatten()
    expected = logits(model, ids)
    merged = model.merge_and_unload()
    assert type(merged) is FAMILY_BUILDERS[family][1] and merged.config.hidden_size == 64
    assert_logits_close(logits(merged, ids), expected)
    assert merged.get_input_embeddings().weight[:, pruned].abs().max() == 0
    for layer in merged.model.layers:
        assert layer.self_attn.o_proj.weight[pruned].abs().max() == 0
        assert layer.mlp.down_proj.weight[pruned].abs().max() == 0


# ---------------------------------------------------------------------------------------------- unsupported
def test_unknown_family_names_supported_families():
    config = GraniteConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(UnsupportedModelError, match=r"does not know the model family 'granite'") as info:
        get_peft_model(GraniteForCausalLM(config), PATConfig())
    message = str(info.value)
    for name in ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Gemma 2", "Gemma 3 (text)", "Phi-3"):
        assert name in message
    assert "peft_pat/families.py" in message  # how to add one


def test_layernorm_family_is_refused_with_the_reason():
    config = OPTConfig(
        vocab_size=50, hidden_size=32, ffn_dim=48, num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=32
    )
    with pytest.raises(UnsupportedModelError, match=r"'opt'.*LayerNorm subtracts the mean.*Supported families: Llama"):
        get_peft_model(OPTForCausalLM(config), PATConfig())


# ---------------------------------------------------------------------------------------------- placement, dtypes
@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map_loaded_model_trains_and_merges(device_map, tmp_path):
    tiny_model("qwen2", tie_word_embeddings=True).save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map)
    assert {p.device.type for p in base.parameters()} == {"cpu"}
    ids = tiny_inputs()
    model = wrap(base, init_weights=False)
    loss, grads, params = _one_training_step(model, ids)
    assert torch.isfinite(loss) and set(grads) == set(params)
    model.base_model.harden_mask()
    model.eval()
    expected = logits(model, ids)
    small = model.merge_and_prune()
    assert small.config.hidden_size == 48 and small.config.tie_word_embeddings
    assert_logits_close(logits(small, ids), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_half_precision_base_with_float32_adapters(family, dtype):
    """Forward, train step and merge on a half-precision base; the merge error is rounding-sized.

    Reference: the same weights (upcast) and adapter in float32, where the merge is exact. The merged
    half model may not be further from it than a few times the half PAT model's own rounding error.
    """
    tied = family == "gemma2"
    ids = tiny_inputs(length=10)
    model = wrap(tiny_model(family, tie_word_embeddings=tied, dtype=dtype), init_weights=False)
    adapter_dtypes = {p.dtype for n, p in model.named_parameters() if "pat_" in n}
    assert adapter_dtypes == {torch.float32}

    loss, grads, params = _one_training_step(model, ids)
    assert torch.isfinite(loss) and set(grads) == set(params)
    assert all(torch.isfinite(p).all() for p in params.values())
    model.base_model.harden_mask()
    model.eval()
    half_pat = logits(model, ids)

    reference = wrap(tiny_model(family, tie_word_embeddings=tied, dtype=dtype).float(), init_weights=False)
    reference.load_state_dict(model.state_dict(), strict=False)  # same adapter values, float32 base
    reference.base_model.pat_mask["default"].load_state_dict(model.base_model.pat_mask["default"].state_dict())
    exact = logits(reference.eval(), ids)
    assert_logits_close(logits(reference.merge_and_prune(), ids), exact)

    small = model.merge_and_prune()
    assert {p.dtype for p in small.parameters()} == {dtype}
    merged = logits(small, ids)
    rounding = float((half_pat - exact).abs().max())
    error = float((merged - exact).abs().max())
    scale = float(exact.abs().max())
    print(f"\n[half] {family} {dtype}: PAT model {rounding:.2e}, merged {error:.2e} (logit scale {scale:.2f})")
    assert 0 < rounding < 0.05 * scale
    assert error <= 4 * rounding, f"merged {error:.3e} vs half-precision rounding {rounding:.3e}"

"""merge_and_prune is exact on every family (the merged model computes what the hardened PAT model does)
and its output is a stock model (saves, reloads with AutoModelForCausalLM, generates)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from peft_pat.testing import ALL_FAMILIES, FAMILY_BUILDERS, tiny_config, tiny_inputs, tiny_model

from helpers import assert_logits_close, logits, train_steps, wrap


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_merge_and_prune_is_exact_and_reloads_stock(family, tied, tmp_path):
    base = tiny_model(family, tie_word_embeddings=tied)
    params_before = sum(p.numel() for p in base.parameters())
    ids = tiny_inputs()
    # random non-identity adapters and mask logits, the package's default axes (hidden + MLP width)
    model = wrap(base, init_weights=False, prune_axes=None)
    config = model.peft_config["default"]
    model.base_model.harden_mask()
    expected = logits(model, ids)

    small = model.merge_and_prune()
    assert type(small) is FAMILY_BUILDERS[family][1] and config.prune_axes == ["hidden", "mlp"]
    assert small.config.hidden_size == config.kept_width < 64 and small.config.head_dim == 16
    assert small.config.intermediate_size == config.kept_intermediate_size < config.base_intermediate_size
    assert small.config.tie_word_embeddings == tied  # tied models stay tied (diagonal embedding HSM)
    assert sum(p.numel() for p in small.parameters()) < params_before
    assert_logits_close(logits(small, ids), expected)

    small.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(small)
    assert torch.equal(logits(reloaded, ids), logits(small, ids))
    generated = reloaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, ids.shape[1] + 3)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_trained_adapter_merges_exactly(family):
    """A real training run (AdamW + schedule) past the freeze point merges to the same logits."""
    base = tiny_model(family, num_attention_heads=8, num_key_value_heads=2, head_dim=8)  # GQA 4:1
    ids = tiny_inputs(length=12)
    model = wrap(base)
    train_steps(model, ids, steps=8)
    mask = model.base_model.pat_mask["default"]
    assert mask.hardened and int(mask.hard_mask.sum()) == 48
    expected = logits(model, ids)
    small = model.merge_and_prune()
    assert_logits_close(logits(small, ids), expected)


def test_full_embedding_hsm_unties_tied_model():
    base = tiny_model("llama", tie_word_embeddings=True)
    ids = tiny_inputs()
    model = wrap(base, init_weights=False, embedding_hsm="full")
    model.base_model.harden_mask()
    expected = logits(model, ids)
    small = model.merge_and_prune()
    assert small.config.tie_word_embeddings is False
    assert small.lm_head.weight is not small.model.embed_tokens.weight
    assert_logits_close(logits(small, ids), expected)


def test_attention_and_mlp_biases_are_folded():
    base = tiny_model("llama", attention_bias=True, mlp_bias=True)
    ids = tiny_inputs()
    model = wrap(base, init_weights=False)
    model.base_model.harden_mask()
    expected = logits(model, ids)
    assert_logits_close(logits(model.merge_and_prune(), ids), expected)


def test_merge_and_unload_keeps_width_with_zero_channels():
    base = tiny_model("qwen2", tie_word_embeddings=True)
    ids = tiny_inputs()
    model = wrap(base, init_weights=False)
    mask = model.base_model.pat_mask["default"]
    mask.harden()
    pruned = (mask.hard_mask == 0).nonzero().flatten()
    expected = logits(model, ids)
    merged = model.merge_and_unload()
    assert merged.config.hidden_size == 64
    assert_logits_close(logits(merged, ids), expected)
    for layer in merged.model.layers:
        assert layer.self_attn.o_proj.weight[pruned].abs().max() == 0
        assert layer.mlp.down_proj.weight[pruned].abs().max() == 0


def test_merge_and_unload_of_soft_mask_is_exact_too():
    base = tiny_model("llama")
    ids = tiny_inputs()
    model = wrap(base, init_weights=False)
    model.set_step(2, 30)  # soft gate, temperature > 1
    expected = logits(model, ids)
    assert_logits_close(logits(model.merge_and_unload(), ids), expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(ALL_FAMILIES),
    heads=st.sampled_from([1, 2, 3, 4, 6]),
    kv_div=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([4, 6, 8, 16]),
    layers=st.integers(1, 3),
    sparsity=st.floats(0.1, 0.8),
    rank_frac=st.floats(0.05, 0.9),
    tied=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_merge_exactness_property(family, heads, kv_div, head_dim, layers, sparsity, rank_frac, tied, seed):
    """Exact merge over random widths, head layouts (GQA), depths, sparsities, HSM ranks and tying."""
    kv = heads // kv_div if heads % kv_div == 0 else heads
    hidden = heads * head_dim * 2
    base = tiny_model(
        family,
        seed=seed,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        num_hidden_layers=layers,
        intermediate_size=hidden + 8,
        tie_word_embeddings=tied,
    )
    ids = tiny_inputs(seed=seed)
    rank = max(1, min(hidden - 1, int(rank_frac * hidden)))
    torch.manual_seed(seed)
    model = wrap(base, target_sparsity=sparsity, hsm_rank=rank, init_weights=False)
    model.base_model.harden_mask()
    kept = model.peft_config["default"].kept_width
    expected = logits(model, ids)
    small = model.merge_and_prune()
    assert small.config.hidden_size == kept and kept % heads == 0
    assert_logits_close(logits(small, ids), expected)


@pytest.mark.parametrize("embedding_hsm", ["diagonal", "full"], ids=["stays-tied", "unties"])
def test_merging_leaves_the_callers_config_alone(embedding_hsm):
    """The config object the base was built from is the caller's: merging gives the pruned model its own."""
    _, model_cls, _ = FAMILY_BUILDERS["llama"]
    config = tiny_config("llama", tie_word_embeddings=True)
    before = config.to_dict()
    model = wrap(model_cls(config), init_weights=False, embedding_hsm=embedding_hsm)
    model.base_model.harden_mask()
    small = model.merge_and_prune()
    assert small.config.hidden_size == 48 and small.config is not config
    assert all(m.config is small.config for m in small.modules() if hasattr(m, "config"))
    assert config.to_dict() == before
    assert model_cls(config).config.hidden_size == 64

    unloaded = wrap(model_cls(config), init_weights=False, embedding_hsm=embedding_hsm).merge_and_unload()
    assert unloaded.config.hidden_size == 64 and config.to_dict() == before

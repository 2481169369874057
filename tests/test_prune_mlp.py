"""The merge plan's per-layer MLP axis: intermediate channels cut by rows of the MLP inputs and columns of the
MLP output, the same count in every layer, on every family (Phi-3's fused gate_up_proj included)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from peft_pat import PATConfigError, family_for_model, prune_model
from peft_pat.merge import fold
from peft_pat.testing import ALL_FAMILIES, tiny_inputs, tiny_model

from helpers import assert_logits_close, logits

IDS = tiny_inputs(length=9)


def _mlp_keep(model, kept: int, seed: int = 0) -> torch.Tensor:
    """A different random set of ``kept`` intermediate channels in every layer."""
    generator = torch.Generator().manual_seed(seed)
    width, layers = model.config.intermediate_size, model.config.num_hidden_layers
    return torch.stack([torch.randperm(width, generator=generator)[:kept] for _ in range(layers)])


@torch.no_grad()
def _silence_other_channels(model, keep: torch.Tensor) -> None:
    """Zero the down_proj columns of the channels ``keep`` drops: cutting them is then exact."""
    family = family_for_model(model)
    for layer, kept in zip(model.get_submodule(family.layers), keep):
        down = layer.get_submodule(family.unit_output("mlp")).weight
        drop = torch.ones(down.shape[1], dtype=torch.bool)
        drop[kept] = False
        down[:, drop] = 0.0


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_mlp_cut_is_exact_when_the_cut_channels_carry_nothing(family, tmp_path, monkeypatch):
    monkeypatch.setattr(fold, "CHUNK_BYTES", 4096)  # many row chunks through the cut source
    model = tiny_model(family, seed=1, mlp_bias=True) if family == "llama" else tiny_model(family, seed=1)
    width = model.config.intermediate_size
    keep = _mlp_keep(model, width // 2)
    _silence_other_channels(model, keep)
    expected = logits(model, IDS)
    small = prune_model(model, family_for_model(model), mlp=keep)
    assert small.config.intermediate_size == width // 2
    for module in small.modules():  # PEFT (LoRA on the pruned model) reads these, not the weights
        if isinstance(module, torch.nn.Linear):
            assert (module.out_features, module.in_features) == tuple(module.weight.shape)
    assert_logits_close(logits(small, IDS), expected)
    small.save_pretrained(tmp_path / "small")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    assert_logits_close(logits(reloaded, IDS), expected)


def test_hidden_and_mlp_cut_together_equal_the_two_cuts_in_turn():
    base = tiny_model("llama", seed=2)
    keep_mlp = _mlp_keep(base, 40)
    keep_hidden = torch.arange(0, 64, 2)[:48] if base.config.hidden_size > 48 else torch.arange(32)
    keep_hidden = torch.sort(
        torch.randperm(base.config.hidden_size, generator=torch.Generator().manual_seed(0))[:32]
    ).values
    family = family_for_model(base)
    both = prune_model(tiny_model("llama", seed=2), family, hidden=keep_hidden, mlp=keep_mlp)
    in_turn = prune_model(prune_model(tiny_model("llama", seed=2), family, mlp=keep_mlp), family, hidden=keep_hidden)
    assert both.config.hidden_size == 32 and both.config.intermediate_size == 40
    for name, tensor in in_turn.state_dict().items():
        assert torch.equal(both.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    ("keep", "match"),
    [
        (lambda m: _mlp_keep(m, 8)[:1], "one row per decoder layer"),
        (lambda m: torch.zeros(m.config.num_hidden_layers, 0, dtype=torch.long), "Cannot keep 0"),
        (lambda m: torch.full((m.config.num_hidden_layers, 2), 3), "distinct"),
        (lambda m: torch.full((m.config.num_hidden_layers, 1), m.config.intermediate_size), "distinct and in"),
    ],
    ids=["layers", "empty", "duplicates", "range"],
)
def test_mlp_keep_a_stock_config_cannot_hold_is_refused_before_anything_changes(keep, match):
    model = tiny_model("llama", seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PATConfigError, match=match):
        prune_model(model, family_for_model(model), mlp=keep(model))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_posthoc_rival_of_a_multi_axis_shape_keeps_the_loudest_mlp_units_per_layer():
    from benchmarks.quality.posthoc import cut_shape_by_activation
    from peft_pat.calibration import channel_statistics

    model = tiny_model("llama", seed=4)
    stats = channel_statistics(model, [{"input_ids": IDS}], mlp=True)
    layers, width = stats.mlp_score.shape
    assert (layers, width) == (model.config.num_hidden_layers, model.config.intermediate_size)
    down = [layer.mlp.down_proj.weight.detach().clone() for layer in model.model.layers]
    small = cut_shape_by_activation(model, family_for_model(model), stats, None, 40)
    assert small.config.intermediate_size == 40 and small.config.hidden_size == 64
    for layer, (weight, scores) in enumerate(zip(down, stats.mlp_score)):
        kept = torch.topk(scores, 40).indices.sort().values
        assert torch.equal(small.model.layers[layer].mlp.down_proj.weight, weight[:, kept])

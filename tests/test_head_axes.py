"""The head axes: query heads per KV group ("heads") and whole KV groups ("kv_heads"), each a per-layer mask on
o_proj's input blocks; importance from the heads' attention outputs, the budget, and the refusals. The merges of
every family are in tests/test_mlp_axis.py's matrix."""

from __future__ import annotations

import pytest
import torch

from peft_pat import PATConfig, PATConfigError, family_for_model, prune_model
from peft_pat.calibration import channel_statistics
from peft_pat.testing import ALL_FAMILIES, tiny_inputs, tiny_model

from helpers import assert_logits_close, logits, train_steps, wrap

IDS = tiny_inputs(length=9)
SHAPE = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8}  # 4 query heads per KV group


def _head_outputs(model, ids, attention_mask) -> list[torch.Tensor]:
    """Each layer's o_proj input on the non-padding tokens, (tokens, heads * head_dim)."""
    seen = []
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
             for layer in model.model.layers]  # fmt: skip
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention_mask)
    for hook in hooks:
        hook.remove()
    return [x[attention_mask.bool()] for x in seen]


def test_head_score_is_the_rms_of_each_heads_attention_output_over_real_tokens():
    model = tiny_model("llama", seed=2, **SHAPE)
    mask = torch.ones_like(IDS)
    mask[0, 6:] = 0  # padding is left out
    stats = channel_statistics(model, [{"input_ids": IDS, "attention_mask": mask}], heads=True)
    for layer, x in enumerate(_head_outputs(model, IDS, mask)):
        per_head = x.double().view(x.shape[0], 8, 8)  # (tokens, heads, head_dim)
        expected = per_head.pow(2).mean(dim=(0, 2)).sqrt()
        assert torch.allclose(stats.head_score[layer], expected, rtol=1e-6)


@pytest.mark.parametrize("axes", [["heads"], ["kv_heads"], ["hidden", "heads", "kv_heads"]])
def test_importance_start_keeps_the_loudest_heads_and_the_network_unchanged(axes):
    base = tiny_model("llama", seed=2, **SHAPE)
    expected = logits(base, IDS)
    targets = {"heads": {"target_num_attention_heads": 4}, "kv_heads": {"target_num_key_value_heads": 1}}
    kwargs = {k: v for a in axes if a in targets for k, v in targets[a].items()}
    if axes == ["hidden", "heads", "kv_heads"]:
        kwargs = {"target_num_attention_heads": 2, "target_num_key_value_heads": 1, "target_width": 48}
    model = wrap(base, prune_axes=axes, calibration_batches=1, **kwargs)
    model.base_model.calibrate([{"input_ids": IDS}])
    assert_logits_close(logits(model, IDS), expected)  # the gate change is divided out of o_proj's input scales
    score = channel_statistics(base, [{"input_ids": IDS}], heads=True).head_score.view(2, 2, 4)  # (layer, group, q)
    masks = model.base_model.pat_unit_masks["default"]
    if "kv_heads" in masks:
        kv = masks["kv_heads"].fade_target  # (layers, groups): the group with the larger summed score
        assert torch.equal(kv.argmax(-1), score.sum(-1).argmax(-1))
    if "heads" in masks:
        heads = masks["heads"]
        kept = heads.kept_width
        top = torch.topk(score, kept, dim=-1).indices.sort(-1).values
        assert torch.equal(heads.fade_target.nonzero()[:, -1].view(2, 2, kept), top)


def test_heads_with_only_target_sparsity_take_the_documented_share():
    """Untargeted head axes next to a budget-taking width lose target_sparsity of their units; alone, the KV heads
    take the budget."""
    base = tiny_model("llama", seed=1, **SHAPE)
    config = wrap(base, prune_axes=["mlp", "heads", "kv_heads"], target_sparsity=0.5).peft_config["default"]
    assert (config.kept_num_key_value_heads, config.kept_num_attention_heads) == (1, 2)  # half the groups, 2 of 4
    params = sum(p.numel() for p in tiny_model("llama", seed=1, **SHAPE).parameters())
    model = wrap(tiny_model("llama", seed=1, **SHAPE), prune_axes=["kv_heads"], target_sparsity=0.15)
    config = model.peft_config["default"]
    assert config.kept_num_key_value_heads == 1 and config.kept_num_attention_heads == 4
    model.base_model.harden_mask()
    small = model.merge_and_prune()
    assert sum(p.numel() for p in small.parameters()) / params == pytest.approx(0.85, abs=0.03)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prune_axes": ["heads"], "target_num_attention_heads": 3}, "not a multiple of the 2 KV heads"),
        ({"prune_axes": ["heads", "kv_heads"], "target_num_attention_heads": 4, "target_num_key_value_heads": 1},
         "keeps every query head"),
        ({"prune_axes": ["heads"], "target_num_attention_heads": 8}, "strictly between 0 and the model's"),
        ({"prune_axes": ["kv_heads"], "target_num_key_value_heads": 2}, "strictly between 0 and the model's"),
        ({"prune_axes": ["heads"], "target_num_attention_heads": 6}, "does not divide the hidden width 64"),
        ({"prune_axes": ["heads"], "target_sparsity": 0.25}, "cannot be reached by cutting the query heads"),
        ({"prune_axes": ["kv_heads"], "target_sparsity": 0.6}, "cannot be reached by cutting the KV heads"),
    ],
    ids=["not-a-multiple", "nothing-pruned", "heads-above", "kv-above", "width", "budget-heads", "budget-kv"],
)  # fmt: skip
def test_head_requests_a_model_cannot_hold_are_refused_before_it_changes(kwargs, match):
    base = tiny_model("llama", seed=1, **SHAPE)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(PATConfigError, match=match):
        wrap(base, **kwargs)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())
    assert not any("pat_" in name for name, _ in base.named_modules())


def test_query_heads_of_a_model_without_grouping_are_refused_with_the_fix():
    base = tiny_model("llama", seed=1, num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(PATConfigError, match="nothing to choose from.*prune 'kv_heads'"):
        wrap(base, prune_axes=["heads", "mlp"], target_sparsity=0.3)


def test_head_target_without_its_axis_is_refused_at_the_config():
    with pytest.raises(PATConfigError, match="add 'heads' to prune_axes"):
        PATConfig(prune_axes=["hidden"], target_num_attention_heads=4)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "match"),
    [
        ([[0, 1, 4, 5]] * 2, [[0]] * 2, "do not fit the kept KV heads"),  # heads 4, 5 are KV head 1's
        ([[0, 1, 2]] * 2, None, "must be a multiple of the kept KV heads"),
        ([[0, 1, 2, 4]] * 2, None, "do not fit the kept KV heads"),  # 3 of group 0, 1 of group 1
    ],
)
def test_a_post_hoc_head_cut_a_stock_config_cannot_hold_is_refused(heads, kv_heads, match):
    model = tiny_model("llama", seed=1, **SHAPE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PATConfigError, match=match):
        prune_model(model, family_for_model(model), heads=torch.tensor(heads),
                    kv_heads=None if kv_heads is None else torch.tensor(kv_heads))  # fmt: skip
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_post_hoc_head_cut_keeps_the_chosen_blocks():
    """q rows and o columns of the kept query heads, k/v rows of the kept KV heads, in order."""
    model = tiny_model("qwen2", seed=1, **SHAPE)
    attention = model.model.layers[1].self_attn
    q, o, k, kb = (t.detach().clone() for t in (attention.q_proj.weight, attention.o_proj.weight,
                                                attention.k_proj.weight, attention.k_proj.bias))  # fmt: skip
    heads, kv = torch.tensor([[0, 2], [5, 7]]), torch.tensor([[0], [1]])
    small = prune_model(model, family_for_model(model), heads=heads, kv_heads=kv)
    cut = small.model.layers[1].self_attn
    rows = torch.cat([torch.arange(40, 48), torch.arange(56, 64)])  # heads 5 and 7, head_dim 8
    assert torch.equal(cut.q_proj.weight, q[rows]) and torch.equal(cut.o_proj.weight, o[:, rows])
    assert torch.equal(cut.k_proj.weight, k[8:16]) and torch.equal(cut.k_proj.bias, kb[8:16])
    assert (small.config.num_attention_heads, small.config.num_key_value_heads, small.config.head_dim) == (2, 1, 8)


def test_soft_head_masks_fold_at_full_width_with_merge_and_unload():
    torch.manual_seed(0)
    model = wrap(tiny_model("mistral", seed=3, **SHAPE), init_weights=False, prune_axes=["heads", "kv_heads"],
                 target_num_attention_heads=2, target_num_key_value_heads=1)  # fmt: skip
    train_steps(model, IDS, steps=1, total=20)  # still soft
    expected = logits(model, IDS)
    merged = model.merge_and_unload()
    assert merged.config.num_attention_heads == 8
    assert_logits_close(logits(merged, IDS), expected)


def test_a_head_pruning_adapter_is_refused_on_a_base_with_other_head_counts(tmp_path):
    from peft import PeftModel

    from peft_pat import AdapterMismatchError
    from peft_pat.merge.checkpoint import merge_checkpoint

    from helpers import save_checkpoint

    model = wrap(tiny_model("llama", seed=1, **SHAPE), prune_axes=["heads"], target_num_attention_heads=4)
    model.save_pretrained(tmp_path / "adapter")
    other = tiny_model("llama", seed=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with pytest.raises(AdapterMismatchError, match="num_attention_heads=8, but .* has num_attention_heads=4"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")
    save_checkpoint(other, tmp_path / "base")
    with pytest.raises(AdapterMismatchError, match="num_attention_heads=8, but the base checkpoint has"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progressbar=False)


def test_posthoc_rival_of_a_head_shape_keeps_the_loudest_kv_heads_and_query_heads():
    from benchmarks.quality.posthoc import cut_shape_by_activation

    model = tiny_model("llama", seed=4, **SHAPE)
    stats = channel_statistics(model, [{"input_ids": IDS}], mlp=True, heads=True)
    q = [layer.self_attn.q_proj.weight.detach().clone() for layer in model.model.layers]
    small = cut_shape_by_activation(model, family_for_model(model), stats, None, None, 2, 1)
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
    for layer, (weight, scores) in enumerate(zip(q, stats.head_score.view(2, 2, 4))):
        group = int(scores.sum(-1).argmax())
        heads = group * 4 + torch.topk(scores[group], 2).indices.sort().values
        rows = (heads[:, None] * 8 + torch.arange(8)).flatten()
        assert torch.equal(small.model.layers[layer].self_attn.q_proj.weight, weight[rows])


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_head_cut_is_exact_when_the_cut_heads_carry_nothing(family, tmp_path):
    """A different random choice in every layer: 1 of 2 KV heads, 2 of its 4 query heads; the other heads' blocks of
    o_proj's input zeroed, so the cut (q/k/v rows and biases, Phi-3's fused qkv_proj, o_proj columns) is exact."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, seed=5, **SHAPE)
    generator = torch.Generator().manual_seed(0)
    kv = torch.randint(0, 2, (2, 1), generator=generator)
    heads = torch.stack([g * 4 + torch.randperm(4, generator=generator)[:2].sort().values for g in kv[:, 0]])
    fam = family_for_model(model)
    with torch.no_grad():
        for layer, kept in zip(model.get_submodule(fam.layers), heads):
            o = layer.get_submodule(fam.unit_output("heads")).weight.view(-1, 8, 8)  # (out, heads, head_dim)
            drop = torch.ones(8, dtype=torch.bool)
            drop[kept] = False
            o[:, drop] = 0.0
    expected = logits(model, IDS)
    small = prune_model(model, fam, heads=heads, kv_heads=kv)
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
    assert_logits_close(logits(small, IDS), expected)
    small.save_pretrained(tmp_path / "small")
    assert_logits_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "small"), IDS), expected)

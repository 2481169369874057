"""The MLP axis: a per-layer mask on each MLP output linear's input units, trained, saved and merged like the
hidden mask, under one parameter budget."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from peft_pat import PATConfig, PATConfigError, family_for_model
from peft_pat.budget import recorded_widths, unit_widths
from peft_pat.merge import fold
from peft_pat.merge.checkpoint import merge_checkpoint
from peft_pat.merge.in_memory import stock_layout
from peft_pat.merge.plan import cut_parameter_count
from peft_pat.testing import ALL_FAMILIES, tiny_inputs, tiny_model

from helpers import assert_logits_close, logits, save_checkpoint, train_steps, wrap

IDS = tiny_inputs(length=9)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("axes", [{"prune_axes": ["mlp"]}, {"prune_axes": ["hidden", "mlp"], "target_width": 48}])
def test_identity_at_start_also_after_the_importance_start(axes):
    base = tiny_model("llama", seed=1)
    expected = logits(base, IDS)
    model = wrap(base, target_sparsity=0.3, calibration_batches=2, **axes)
    assert_logits_close(logits(model, IDS), expected)
    model.base_model.calibrate([{"input_ids": IDS}, {"input_ids": IDS.flip(1)}])
    assert_logits_close(logits(model, IDS), expected)  # the gate change is divided out of the unit scales
    mlp = model.base_model.pat_unit_masks["default"]["mlp"]
    assert bool(mlp.calibrated) and mlp.logits.shape == (base.config.num_hidden_layers, base.config.intermediate_size)


# axes -> (PATConfig kwargs on the tiny model: 4 query heads in 2 KV groups, 96 MLP units; the pruned config)
AXIS_CASES = {
    "mlp": ({"prune_axes": ["mlp"], "target_sparsity": 0.3}, {"hidden_size": 64, "num_attention_heads": 4}),
    "hidden+mlp": ({"prune_axes": ["hidden", "mlp"], "target_width": 48, "target_sparsity": 0.3}, {"hidden_size": 48}),
    "heads": ({"prune_axes": ["heads"], "target_num_attention_heads": 2},
              {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16}),
    "kv_heads": ({"prune_axes": ["kv_heads"], "target_num_key_value_heads": 1},
                 {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}),
    "hidden+mlp+heads": ({"prune_axes": ["hidden", "mlp", "heads"], "target_width": 48, "target_sparsity": 0.4,
                          "target_num_attention_heads": 2}, {"hidden_size": 48, "num_attention_heads": 2}),
    "heads+kv_heads": ({"prune_axes": ["heads", "kv_heads"], "target_num_attention_heads": 1,
                        "target_num_key_value_heads": 1}, {"num_attention_heads": 1, "num_key_value_heads": 1}),
}  # fmt: skip


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("axes", list(AXIS_CASES))
def test_trained_unit_cut_merges_exactly_in_memory_and_from_disk(family, axes, tmp_path, monkeypatch):
    """Every per-layer axis alone and combined, every family: the trained PAT model, its reloaded adapter, the
    in-memory merge and the stock reload of the disk merge compute the same logits; both merges agree bit for bit."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(fold, "CHUNK_BYTES", 4096)
    base = tiny_model(family, seed=3, attention_bias=True) if family == "llama" else tiny_model(family, seed=3)
    full, layout = _params(base), stock_layout(base)
    save_checkpoint(base, tmp_path / "base")
    pat, expected_config = AXIS_CASES[axes]
    torch.manual_seed(0)
    model = wrap(base, init_weights=False, **pat)
    train_steps(model, IDS, steps=4, total=4)  # the masks harden at the freeze step
    masks = model.base_model.masks_of("default")
    assert all(m.hardened for m in masks.values())
    config = model.peft_config["default"]
    expected = logits(model, IDS)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_model(family, seed=3, **({"attention_bias": True} if family == "llama"
                                         else {})), tmp_path / "adapter")  # fmt: skip
    assert torch.equal(logits(reloaded, IDS), expected)

    small = model.merge_and_prune()
    for key, value in expected_config.items():
        assert getattr(small.config, key) == value, key
    base_config = tiny_model(family).config  # the base's shape (the merge rewrote base.config in place)
    units = unit_widths(recorded_widths(config), base_config.to_dict())
    predicted = cut_parameter_count(family_for_model(small), base_config, layout, config.kept_width, units)
    assert _params(small) == predicted  # the budget's count is the merged model's
    if "mlp" in axes:
        assert small.config.intermediate_size == config.kept_intermediate_size
        assert _params(small) / full == pytest.approx(1 - pat["target_sparsity"], abs=0.05)  # the parameter budget
    assert_logits_close(logits(small, IDS), expected)

    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progressbar=False)
    disk = load_file(tmp_path / "out" / "model.safetensors")
    memory = dict(small.state_dict())
    if small.config.tie_word_embeddings:
        del memory["lm_head.weight"]
    assert set(disk) == set(memory)
    for name, tensor in memory.items():
        assert torch.equal(disk[name], tensor), name
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # no peft_pat, no custom code
    assert_logits_close(logits(stock, IDS), expected)


def test_merge_and_unload_folds_the_soft_mlp_gate_at_full_width():
    torch.manual_seed(0)
    model = wrap(tiny_model("llama", seed=3), init_weights=False, prune_axes=["mlp"], target_sparsity=0.3)
    train_steps(model, IDS, steps=1, total=20)  # still soft
    expected = logits(model, IDS)
    merged = model.merge_and_unload()
    assert merged.config.intermediate_size == tiny_model("llama").config.intermediate_size
    assert_logits_close(logits(merged, IDS), expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prune_axes": ["mlp"], "target_num_attention_heads": 2}, "add 'heads' to prune_axes"),
        ({"target_sparsity": 0.25, "target_num_key_value_heads": 1}, "add 'kv_heads' to prune_axes"),
        ({"prune_axes": ["width"]}, "unknown axes"),
        ({"prune_axes": "mlp"}, "must be a list of axis names"),
        ({"prune_axes": ["hidden"], "target_intermediate_size": 64}, "add 'mlp' to prune_axes"),
        ({"prune_axes": ["mlp"], "target_width": 48}, "add 'hidden' to prune_axes"),
    ],
)
def test_impossible_axis_requests_are_refused_at_the_config(kwargs, match):
    with pytest.raises(PATConfigError if "list" not in match else TypeError, match=match):
        PATConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prune_axes": ["mlp"], "target_intermediate_size": 10_000}, "strictly between 0"),
        ({"prune_axes": ["mlp"], "target_sparsity": 0.9}, "cannot be reached by cutting the MLP width"),
    ],
)
def test_budgets_the_axes_cannot_reach_are_refused_before_the_model_changes(kwargs, match):
    base = tiny_model("llama", seed=1)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(PATConfigError, match=match):
        wrap(base, **kwargs)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())


def test_adapter_saved_and_loaded_under_another_name_keeps_its_mlp_mask(tmp_path):
    torch.manual_seed(0)
    model = wrap(tiny_model("qwen2", seed=3), init_weights=False, prune_axes=["mlp"], target_sparsity=0.3)
    train_steps(model, IDS, steps=2, total=10)  # soft: the logits matter
    expected = logits(model, IDS)
    model.save_pretrained(tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.pat_unit_masks.mlp.logits" in keys  # the checkpoint keys hold no adapter name
    other = PeftModel.from_pretrained(tiny_model("qwen2", seed=3), tmp_path / "adapter", adapter_name="small")
    assert torch.equal(other.base_model.pat_unit_masks["small"]["mlp"].logits, model.base_model.pat_unit_masks[
        "default"]["mlp"].logits)  # fmt: skip
    assert torch.equal(logits(other, IDS), expected)


@pytest.mark.parametrize(
    ("axis", "pat"),
    [
        ("mlp", {"prune_axes": ["mlp"], "target_sparsity": 0.3}),
        ("heads", {"prune_axes": ["heads", "kv_heads"], "target_num_attention_heads": 2,
                   "target_num_key_value_heads": 1}),
    ],
)  # fmt: skip
def test_trainer_with_patcallback_trains_calibrates_logs_and_merges_a_per_layer_axis(tmp_path, axis, pat):
    from transformers import Trainer, TrainingArguments

    from peft_pat import PATCallback

    from helpers import TokenDataset

    model = wrap(tiny_model("llama", seed=3, num_attention_heads=8, head_dim=16), calibration_batches=2,
                 distillation_weight=1.0, **pat)  # fmt: skip
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, weight_decay=0.1,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[PATCallback()]).train()
    mask = model.base_model.pat_unit_masks["default"][axis]
    assert bool(mask.calibrated) and mask.hardened
    assert torch.equal(mask.hard_mask, mask.fade_target)  # it hardened to the calibrated set it faded to
    assert set(mask.hard_mask.sum(-1).flatten().tolist()) == {float(mask.kept_width)}  # every row keeps N
    assert model.base_model.pat_stats()[f"{axis}_kept_channels"] == mask.kept_width
    model.eval()
    expected = logits(model, IDS)
    small = model.merge_and_prune()
    config = model.peft_config["default"]
    if axis == "mlp":
        assert small.config.intermediate_size == config.kept_intermediate_size
    else:
        assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
    assert_logits_close(logits(small, IDS), expected)


@pytest.mark.parametrize(
    ("shape", "sparsity", "expected"),
    [
        ("smollm2", 0.25, (504, 1168)),
        ("smollm2", 0.5, (432, 672)),
        ("llama3-8b", 0.25, (3584, 11424)),
        ("llama3-8b", 0.5, (3072, 7536)),
    ],
)
def test_both_axes_and_only_target_sparsity_split_the_budget(shape, sparsity, expected):
    """The hidden width loses half of target_sparsity, the MLP the rest of the parameter budget; the model is
    built on the meta device at full depth (a layer slice would let the embedding dominate the count)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from peft_pat import family_for_model
    from peft_pat.budget import resolve_widths
    from peft_pat.merge.in_memory import stock_layout
    from peft_pat.merge.plan import cut_parameter_count

    shapes = {
        "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                    "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True},
        "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    }  # fmt: skip
    config = LlamaConfig(**shapes[shape])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    family, layout = family_for_model(model), stock_layout(model)
    cfg = PATConfig(prune_axes=["hidden", "mlp"], target_sparsity=sparsity)
    width, mlp, _, _ = resolve_widths(cfg, family, config.to_dict(), layout)
    assert (width, mlp) == expected
    assert mlp % 16 == 0  # the K dimension of down_proj, which llama.cpp's AVX-512 float32 GEMM tiles by 16
    if shape == "smollm2" and sparsity == 0.25:  # 9 heads x 16: no multiple of 144 near 504; the error says so
        strict = PATConfig(prune_axes=["hidden", "mlp"], target_sparsity=sparsity, width_multiple=16)
        with pytest.raises(PATConfigError, match=r"target_sparsity=0\.25 splits into a hidden cut of 0\.125 .*"
                           r"multiple of 144 .* is 576, .*prune_axes=\['mlp'\]"):  # fmt: skip
            resolve_widths(strict, family, config.to_dict(), layout)
    full = cut_parameter_count(family, config, layout, config.hidden_size, {})
    assert cut_parameter_count(family, config, layout, width, {"mlp": mlp}) / full == pytest.approx(
        1 - sparsity, abs=0.002
    )

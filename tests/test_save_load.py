"""Adapters round-trip exactly through save_pretrained / from_pretrained, schedule state included;
mismatched bases are refused."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from peft_pat import AdapterMismatchError, PATConfig, UnsupportedModelError
from peft_pat.testing import tiny_inputs, tiny_model

from helpers import logits, wrap


def test_adapter_roundtrip_is_exact(tmp_path):
    ids = tiny_inputs()
    model = wrap(tiny_model("llama", tie_word_embeddings=True), init_weights=False)
    model.set_step(3, 30)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {"base_model.pat_mask.logits", "base_model.pat_mask.step", "base_model.pat_mask.hard_mask"} <= set(saved)
    assert not any("embed_tokens.weight" in k or "base_layer" in k for k in saved)  # no base weights on disk
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["kept_width"] == 48 and config["base_hidden_size"] == 64 and config["embedding_hsm"] == "diagonal"

    loaded = PeftModel.from_pretrained(tiny_model("llama", tie_word_embeddings=True), tmp_path)
    assert torch.equal(logits(loaded, ids), expected)
    mask = loaded.base_model.pat_mask["default"]
    assert int(mask.step) == 3 and int(mask.total_steps) == 30
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode by default
    assert not mask.logits.requires_grad


def test_hard_mask_state_roundtrips(tmp_path):
    model = wrap(tiny_model("qwen2"), init_weights=False)
    model.set_step(9, 30)
    kept = model.base_model.pat_mask["default"].kept_indices()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path, is_trainable=True)
    mask = loaded.base_model.pat_mask["default"]
    assert mask.hardened and torch.equal(mask.kept_indices(), kept)
    assert mask.logits.requires_grad


def test_multiple_adapters_roundtrip(tmp_path):
    ids = tiny_inputs()
    model = wrap(tiny_model("llama"), init_weights=False)
    model.add_adapter("narrow", PATConfig(target_sparsity=0.5, hsm_rank=4, r=2, init_weights=False))
    model.set_adapter("narrow")
    expected_narrow = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    result = loaded.load_adapter(tmp_path / "narrow", adapter_name="narrow")
    assert not result.missing_keys
    loaded.set_adapter("narrow")
    assert torch.equal(logits(loaded, ids), expected_narrow)


@pytest.mark.parametrize(
    ("other", "what"),
    [
        (
            {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48},
            "hidden_size=64",
        ),
        ({"vocab_size": 120}, "vocab_size=97"),
    ],
)
def test_loading_onto_another_base_is_refused(tmp_path, other, what):
    wrap(tiny_model("llama")).save_pretrained(tmp_path)
    with pytest.raises(AdapterMismatchError, match=f"trained on a base model with {what}"):
        PeftModel.from_pretrained(tiny_model("llama", **other), tmp_path)


def test_loading_onto_another_family_is_refused(tmp_path):
    wrap(tiny_model("llama")).save_pretrained(tmp_path)
    with pytest.raises(AdapterMismatchError, match="model family='llama'"):
        PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path)


def test_quantized_config_is_refused():
    base = tiny_model("llama")
    base.config.quantization_config = {"quant_method": "gguf"}
    with pytest.raises(UnsupportedModelError, match="quantized base model"):
        wrap(base)


def test_adapter_saved_before_prune_axes_existed_stays_hidden_only(tmp_path):
    """A peft-pat 0.4 adapter_config.json (kept_width recorded; no prune_axes, no MLP fields) loads, merges in
    memory and from disk to the hidden-only model it was trained for, whatever the default axes are now."""
    from peft_pat import merge_checkpoint

    ids = tiny_inputs()
    model = wrap(tiny_model("llama"), init_weights=False)  # hidden width alone, as 0.4 trained
    model.base_model.harden_mask()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    for field in ("prune_axes", "target_intermediate_size", "base_intermediate_size", "kept_intermediate_size"):
        config.pop(field)
    path.write_text(json.dumps(config))

    assert PATConfig.from_pretrained(tmp_path / "adapter").pruned_axes == ("hidden",)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    assert loaded.peft_config["default"].prune_axes == ["hidden"]
    assert not loaded.base_model.masks_of("default").keys() - {"hidden"}  # no MLP mask
    assert torch.equal(logits(loaded, ids), expected)
    small = loaded.merge_and_prune()
    assert small.config.hidden_size == 48 and small.config.intermediate_size == 96
    tiny_model("llama").save_pretrained(tmp_path / "base")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progressbar=False)
    from_disk = type(small).from_pretrained(tmp_path / "out")
    assert torch.equal(logits(from_disk, ids), logits(small, ids))

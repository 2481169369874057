"""One test per row of the misuse table in docs/errors.md: every mistake gets a clear error (or, where
the table says so, a warning and a safe outcome), and a refused adapter leaves the base model unchanged.

Each ``match=`` names the part of the message that tells the user the fix.
"""

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    OPTConfig,
    OPTForCausalLM,
    Trainer,
    TrainingArguments,
)

import peft_pat
from peft_pat import (
    AdapterMismatchError,
    PATCallback,
    PATConfig,
    PATConfigError,
    PATLayer,
    PATStateError,
    PATTypeError,
    UnsupportedModelError,
    save_pruned,
)
from peft_pat.families import family_for_model_type
from peft_pat.testing import tiny_config, tiny_inputs, tiny_model

from helpers import TokenDataset, assert_logits_close, logits, wrap


def has_pat_layers(model: nn.Module) -> bool:
    return any(isinstance(m, PATLayer) for m in model.modules())


def hardened(model):
    model.base_model.harden_mask()
    return model


def trainer_for(model, tmp_path, trainer_cls=Trainer, **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        **kwargs,
    )
    return trainer_cls(model=model, args=args, train_dataset=TokenDataset(n=16, length=10), callbacks=[PATCallback()])


# ---------------------------------------------------------------------------------------------- the base model
class ToyDecoderConfig(LlamaConfig):
    model_type = "toy_decoder"  # an RMSNorm decoder PAT has no family entry for


def test_unknown_family():
    base = LlamaForCausalLM(ToyDecoderConfig(**tiny_config("llama").to_dict() | {"model_type": "toy_decoder"}))
    with pytest.raises(UnsupportedModelError, match="adding one is an entry in peft_pat/families.py"):
        wrap(base)
    assert not has_pat_layers(base)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_layernorm_family(family):
    if family == "gpt2":
        base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    else:
        base = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64))
    with pytest.raises(UnsupportedModelError, match="Convert LayerNorm to RMSNorm first"):
        wrap(base)


def test_multimodal_gemma3_wrapper():
    with pytest.raises(UnsupportedModelError, match="load the text model with Gemma3ForCausalLM"):
        family_for_model_type("gemma3")


@pytest.mark.parametrize("kind", ["backbone", "sequence_classification"])
def test_model_without_lm_head(kind):
    config = tiny_config("llama")
    base = LlamaForCausalLM(config).model if kind == "backbone" else LlamaForSequenceClassification(config)
    with pytest.raises(UnsupportedModelError, match="Load the Llama model with AutoModelForCausalLM"):
        get_peft_model(base, PATConfig(hsm_rank=8, r=4))
    assert not has_pat_layers(base)


def test_task_type_other_than_causal_lm():
    with pytest.raises(PATConfigError, match="Use task_type='CAUSAL_LM'"):
        PATConfig(task_type="SEQ_CLS")


def test_missing_task_type_defaults_to_causal_lm():
    """Without task_type PEFT would build a plain PeftModel whose forward skips the auxiliary loss."""
    model = get_peft_model(tiny_model("llama"), PATConfig(hsm_rank=8, r=4))
    assert type(model).__name__ == "PeftModelForCausalLM"
    model.train()
    ids = tiny_inputs()
    model(input_ids=ids, labels=ids)
    assert "active_loss" in model.base_model.last_auxiliary_losses


def test_bitsandbytes_quantization_config():
    base = tiny_model("llama")
    base.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(UnsupportedModelError, match="Load the base model in bfloat16 or float32 without a"):
        wrap(base)


class Linear4bit(nn.Linear):
    """Stand-in for bitsandbytes.nn.Linear4bit (bitsandbytes has no CPU wheel here): an nn.Linear subclass."""


Linear4bit.__module__ = "bitsandbytes.nn.modules"


class QuantLinear(nn.Module):
    """Stand-in for a GPTQ/AWQ layer: packed integer weights, not an nn.Linear at all."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.zeros(linear.out_features, linear.in_features // 8, dtype=torch.int32))


@pytest.mark.parametrize("layer", ["bitsandbytes", "gptq"])
@pytest.mark.parametrize("where", ["self_attn.o_proj", "self_attn.q_proj"])  # an HSM producer / a LoRA target
def test_quantized_layers(layer, where):
    base = tiny_model("llama")
    attention = base.model.layers[1].self_attn
    name = where.rsplit(".", 1)[-1]
    original = getattr(attention, name)
    if layer == "bitsandbytes":
        quantized = Linear4bit(original.in_features, original.out_features, bias=False)
    else:
        quantized = QuantLinear(original)
    setattr(attention, name, quantized)
    with pytest.raises(UnsupportedModelError, match="load the base model in bfloat16 or float32 without quantization"):
        wrap(base)
    assert not has_pat_layers(base)  # refused before the first module was replaced


def test_gguf_quantization_config():
    base = tiny_model("llama")
    base.config.quantization_config = {"quant_method": "gguf"}
    with pytest.raises(UnsupportedModelError, match=r"del config.quantization_config; plain = type\(model\)\(config\)"):
        wrap(base)


def test_model_already_wrapped_by_another_peft_method():
    base = tiny_model("llama")
    get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules=["o_proj"]))
    with pytest.raises(UnsupportedModelError, match=r"merge the other adapter into the base first"):
        wrap(base)


def test_adding_pat_to_a_lora_model():
    lora = get_peft_model(tiny_model("llama"), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        lora.add_adapter("sparse", PATConfig(hsm_rank=8, r=4))


# ---------------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize("sparsity", [0, 0.0, -0.1, 1, 1.0, 1.5])
def test_sparsity_outside_open_interval(sparsity):
    with pytest.raises(PATConfigError, match="must lie strictly between 0 and 1"):
        PATConfig(target_sparsity=sparsity)


def test_sparsity_and_width_both_given():
    """With the hidden width alone both fix the same number; with the default axes the width is fixed and the
    MLP width takes what the parameter budget leaves."""
    with pytest.raises(PATConfigError, match="Give either target_sparsity .* or target_width .*, not both"):
        PATConfig(target_sparsity=0.25, target_width=48, prune_axes=["hidden"])
    model = get_peft_model(tiny_model("llama"), PATConfig(target_sparsity=0.25, target_width=56))
    config = model.peft_config["default"]
    assert config.prune_axes == ["hidden", "mlp"] and config.kept_width == 56
    assert config.kept_intermediate_size < config.base_intermediate_size


def test_kept_width_contradicts_target_width():
    with pytest.raises(PATConfigError, match="do not set it yourself"):
        PATConfig(target_width=48, kept_width=32)


def test_kept_width_contradicts_target_sparsity():
    base = tiny_model("llama")
    with pytest.raises(PATConfigError, match="give target_width=32 instead of target_sparsity"):
        wrap(base, target_sparsity=0.25, kept_width=32)
    assert not has_pat_layers(base)


def test_width_the_heads_cannot_divide():
    with pytest.raises(PATConfigError, match=r"Use one of \[44, 48\]"):
        wrap(tiny_model("llama"), target_sparsity=None, target_width=46)


@pytest.mark.parametrize(
    ("kwargs", "model_kwargs", "match"),
    [
        ({"target_sparsity": None, "target_width": 64}, {}, "strictly between 0 and the model's hidden_size=64"),
        (
            {"target_sparsity": 0.05},
            {"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4},
            r"Choose a sparsity between 0.250 and 0.750",
        ),
    ],
)
def test_width_that_cannot_be_reached(kwargs, model_kwargs, match):
    with pytest.raises(PATConfigError, match=match):
        wrap(tiny_model("llama", **model_kwargs), **kwargs)


def test_hsm_rank_zero():
    with pytest.raises(PATConfigError, match="hsm_rank must be a positive integer"):
        PATConfig(hsm_rank=0)


def test_hsm_rank_not_below_the_width():
    with pytest.raises(PATConfigError, match=r"The default is the number of pruned channels \(here 16\)"):
        wrap(tiny_model("llama"), hsm_rank=64)


def test_lora_rank_negative():
    with pytest.raises(PATConfigError, match=r"r must be >= 0 \(0 disables LoRA\)"):
        PATConfig(r=-1)


def test_lora_rank_above_the_layer_width():
    base = tiny_model("llama")  # k_proj/v_proj: 64 -> 32
    with pytest.raises(PATConfigError, match="Use r <= 32, or exclude the narrow layers"):
        wrap(base, r=40)
    assert not has_pat_layers(base)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_sparsity": "0.25"}, "target_sparsity must be int or float"),
        ({"hsm_rank": 8.0}, "hsm_rank must be int"),
        ({"r": True}, "r must be int"),
        ({"init_weights": "yes"}, "init_weights must be True or False"),
        ({"target_modules": 5}, r"target_modules must be a str \(regex\), a list of str or None"),
        ({"modules_to_save": "lm_head"}, r"modules_to_save must be a list of str or None, e.g. \['lm_head'\]"),
        ({"layers_to_transform": "0"}, "layers_to_transform must be an int, a list of int or None"),
        ({"base_num_hidden_layers": "2"}, "base_num_hidden_layers must be int"),
    ],
)
def test_wrong_types(kwargs, match):
    with pytest.raises(PATTypeError, match=match):
        PATConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"identity_loss": "orthogonal"}, r"choose one of \('l0_gram', 'none'\)"),
        ({"embedding_hsm": "lowrank"}, r"choose one of \('auto', 'full', 'diagonal'\)"),
        ({"bias": "all"}, "PAT trains no biases, use 'none'"),
    ],
)
def test_unknown_option_values(kwargs, match):
    with pytest.raises(PATConfigError, match=match):
        PATConfig(**kwargs)


@pytest.mark.parametrize("field", ["target_sparsity", "lora_alpha", "mask_lr", "active_loss_weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers(field, value):
    with pytest.raises(PATConfigError, match="must be finite"):
        PATConfig(**{field: value})


@pytest.mark.parametrize("kwargs", [{"mask_milestone": 0.0}, {"mask_freeze": 1.5}, {"mask_lr": -1.0}])
def test_schedule_fractions_and_mask_lr(kwargs):
    with pytest.raises(PATConfigError, match=r"must be a fraction of the run in \(0, 1\]|or None for automatic"):
        PATConfig(**kwargs)


def test_target_parameters():
    with pytest.raises(PATConfigError, match="use target_modules"):
        PATConfig(target_parameters=["mlp.experts.gate_up_proj"])


# ---------------------------------------------------------------------------------------------- LoRA targets
def test_target_modules_that_match_nothing():
    base = tiny_model("llama")
    with pytest.raises(PATConfigError, match=r"Its LoRA targets are named \['q_proj'"):
        wrap(base, target_modules=["query", "value"])
    assert not has_pat_layers(base)


def test_layers_to_transform_outside_the_model():
    with pytest.raises(PATConfigError, match=r"with layers_to_transform=\[7\] matched no linear layer"):
        wrap(tiny_model("llama"), target_modules=["q_proj"], layers_to_transform=[7])


def test_exclude_modules_that_exclude_every_target():
    with pytest.raises(PATConfigError, match="narrow exclude_modules, or use r=0 for HSMs only"):
        wrap(tiny_model("llama"), target_modules=["q_proj", "v_proj"], exclude_modules=["q_proj", "v_proj"])


def test_target_modules_matching_a_non_linear_module():
    with pytest.raises(PATConfigError, match="LoRA goes on nn.Linear modules"):
        wrap(tiny_model("llama"), target_modules=["mlp"])


def test_lora_on_the_embedding():
    with pytest.raises(PATConfigError, match="no LoRA on embeddings"):
        wrap(tiny_model("llama"), target_modules=["embed_tokens", "q_proj"])


def test_producer_in_modules_to_save():
    with pytest.raises(PATConfigError, match="remove it from modules_to_save"):
        wrap(tiny_model("llama"), modules_to_save=["o_proj"])


def test_hsm_only_with_target_modules_is_allowed():
    """r=0 disables LoRA, so target_modules that match nothing are not an error there."""
    model = wrap(tiny_model("llama"), r=0, target_modules=["nothing"])
    assert has_pat_layers(model)


# ---------------------------------------------------------------------------------------------- adapter names
@pytest.mark.parametrize("name", ["training", "to", "a.b", "pat"])
def test_adapter_name_that_clashes(name):
    base = tiny_model("llama")
    with pytest.raises(PATConfigError, match="Choose a plain name such as 'default'"):
        get_peft_model(base, PATConfig(hsm_rank=8, r=4), adapter_name=name)
    assert not has_pat_layers(base)
    model = wrap(tiny_model("llama"))
    with pytest.raises(PATConfigError, match="Choose a plain name such as 'default'"):
        model.add_adapter(name, PATConfig(hsm_rank=8, r=4))


def test_adapter_name_already_used():
    model = wrap(tiny_model("llama"))
    with pytest.raises(ValueError, match="Adapter with name 'default' already exists"):
        model.add_adapter("default", PATConfig(hsm_rank=8, r=4))


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize(
    ("other", "what"),
    [
        ({"family": "qwen2"}, "model family='llama'"),
        (
            {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48},
            "hidden_size=64",
        ),
        ({"vocab_size": 120}, "vocab_size=97"),
    ],
)
def test_adapter_onto_another_base(tmp_path, other, what):
    wrap(tiny_model("llama")).save_pretrained(tmp_path)
    with pytest.raises(AdapterMismatchError, match=f"{what}.*Load it onto the model it was trained from"):
        PeftModel.from_pretrained(tiny_model(**other), tmp_path)


def test_adapter_with_an_edited_kept_width(tmp_path):
    wrap(tiny_model("llama")).save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"kept_width": 50}))
    with pytest.raises(AdapterMismatchError, match="remove kept_width from adapter_config.json"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_loading_without_import_peft_pat(tmp_path):
    """PEFT looks the type up before any peft-pat code can run: a bare KeyError 'PAT'; importing peft_pat fixes it."""
    wrap(tiny_model("llama")).save_pretrained(tmp_path)
    mappings = (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING)
    saved = [mapping.pop("PAT") for mapping in mappings]
    try:
        with pytest.raises(KeyError, match="PAT"):
            PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    finally:
        for mapping, value in zip(mappings, saved):
            mapping["PAT"] = value
    peft_pat.register(peft_pat.PATConfig, peft_pat.PATModel)
    assert has_pat_layers(PeftModel.from_pretrained(tiny_model("llama"), tmp_path))


def test_transformers_side_injection_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not support PAT because it uses shared state.*use `get_peft_model`"):
        inject_adapter_in_model(PATConfig(hsm_rank=8, r=4), tiny_model("llama"))
    base = tiny_model("llama")
    with pytest.raises(ValueError, match="PEFT"):  # transformers' integration refuses first (asks for PEFT >= 0.22)
        base.add_adapter(PATConfig(hsm_rank=8, r=4))
    assert not has_pat_layers(base)


# ---------------------------------------------------------------------------------------------- schedule and training
@pytest.mark.parametrize(("step", "total"), [(-1, 10), (11, 10)])
def test_set_step_outside_the_run(step, total):
    model = wrap(tiny_model("llama"))
    with pytest.raises(PATConfigError, match="Call it once per optimizer step"):
        model.set_step(step, total)


@pytest.mark.parametrize(("step", "total"), [(1.0, 10), (1, "10"), (True, 10)])
def test_set_step_types(step, total):
    with pytest.raises(PATTypeError, match="must be an int"):
        wrap(tiny_model("llama")).set_step(step, total)


def test_set_step_without_a_run_length():
    with pytest.raises(PATConfigError, match="total_steps must be >= 1"):
        wrap(tiny_model("llama")).set_step(0, 0)


@pytest.mark.parametrize("lr", [0.0, -1e-3, float("nan"), True])
def test_set_step_with_a_bad_learning_rate(lr):
    with pytest.raises(PATConfigError, match="learning_rate must be a positive number"):
        wrap(tiny_model("llama")).set_step(0, 10, learning_rate=lr)


def test_resuming_with_a_different_run_length():
    model = wrap(tiny_model("llama"), mask_milestone=1 / 3, mask_freeze=0.8 / 3)
    model.set_step(2, 12)
    with pytest.warns(RuntimeWarning, match="freeze step 3 -> 6. Resume with the original max_steps"):
        model.set_step(3, 24)


def test_set_step_without_a_pat_adapter():
    model = wrap(tiny_model("llama"))
    model.delete_adapter("default")
    with pytest.raises(PATStateError, match=r"add one with add_adapter\(name, PATConfig"):
        model.set_step(1, 10)


def test_set_step_on_a_lora_model():
    lora = get_peft_model(tiny_model("llama"), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    with pytest.raises(AttributeError, match="set_step"):
        lora.set_step(1, 10)


def test_pat_callback_on_a_non_pat_model(tmp_path):
    lora = get_peft_model(tiny_model("llama"), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    with pytest.raises(PATTypeError, match=r"Wrap the base model with get_peft_model\(base, PATConfig"):
        trainer_for(lora, tmp_path).train()
    assert all(torch.equal(before[k], v) for k, v in lora.state_dict().items())  # refused before the first step


def test_training_without_the_auxiliary_loss():
    model = wrap(tiny_model("llama"))
    model.train()
    ids = tiny_inputs()
    loss = nn.functional.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    with pytest.warns(RuntimeWarning, match=r"Pass labels= .* or add model.base_model.auxiliary_loss\(\)\[0\]"):
        model.set_step(1, 10)
    model(input_ids=ids, labels=ids).loss.backward()  # with labels the loss is added: no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model.set_step(2, 10)


def test_weight_decay_with_an_optimizer_that_cannot_be_undone():
    model = wrap(tiny_model("llama"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1, weight_decay=0.01)
    with pytest.warns(UserWarning, match=r"use AdamW .* or a param group with weight_decay=0 for the mask"):
        PATCallback().on_pre_optimizer_step(None, None, None, model=model, optimizer=optimizer)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_in_a_plain_loop(bad):
    model = wrap(tiny_model("llama"))
    mask = model.base_model.pat_mask["default"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tiny_inputs()
    model.train()
    for step in range(1, 4):
        loss = model(input_ids=ids, labels=ids).loss
        if step == 2:
            loss = loss * bad
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.set_step(step, 30)
        if step == 2:
            assert any("non-finite gradients" in str(w.message) for w in caught)
    assert torch.isfinite(mask.logits).all()
    assert int(mask.bad_grad_events) >= 1


class NaNLossTrainer(Trainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == 1 else loss


def test_non_finite_loss_in_the_trainer(tmp_path):
    model = wrap(tiny_model("llama"))
    mask = model.base_model.pat_mask["default"]
    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        trainer_for(model, tmp_path, trainer_cls=NaNLossTrainer, max_grad_norm=1.0).train()
    assert torch.isfinite(mask.logits).all() and int(mask.bad_grad_events) >= 1
    assert mask.hardened and int(mask.hard_mask.sum()) == model.peft_config["default"].kept_width


# ---------------------------------------------------------------------------------------------- merging and saving
def test_merge_and_prune_twice():
    model = hardened(wrap(tiny_model("llama")))
    model.merge_and_prune()
    with pytest.raises(PATStateError, match="Use that returned model"):
        model.merge_and_prune()


@pytest.mark.parametrize("use", ["forward", "save_pretrained", "set_step"])
def test_using_the_consumed_peft_model(tmp_path, use):
    model = hardened(wrap(tiny_model("llama")))
    model.merge_and_prune()
    ids = tiny_inputs()
    calls = {
        "forward": lambda: model(input_ids=ids),
        "save_pretrained": lambda: model.save_pretrained(tmp_path / "adapter"),
        "set_step": lambda: model.set_step(1, 10),
    }
    with pytest.raises(PATStateError, match="Use that returned model"):
        calls[use]()
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_merge_and_prune_before_the_mask_is_hard():
    """Decision: harden to the exact top-N channels with a warning (the merged model is the hardened one)."""
    model = wrap(tiny_model("llama"), init_weights=False)
    model.set_step(1, 30)  # soft
    mask = model.base_model.pat_mask["default"]
    top = torch.sort(mask.logits.detach(), descending=True, stable=True).indices[:48].sort().values
    with pytest.warns(UserWarning, match="hardening it now to the exact top-N channels"):
        small = model.merge_and_prune()
    assert torch.equal(mask.kept_indices(), top)
    assert small.config.hidden_size == 48

    reference = hardened(wrap(tiny_model("llama"), init_weights=False))  # same seed: same adapter, hardened first
    ids = tiny_inputs()
    assert_logits_close(logits(small, ids), logits(reference, ids))


def test_multiple_active_adapters_at_merge():
    model = wrap(tiny_model("llama"))
    model.add_adapter("other", PATConfig(hsm_rank=8, r=4))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(PATStateError, match=r"pass adapter_name= or call set_adapter\(\)"):
        model.merge_and_prune()


def test_unknown_adapter_at_merge():
    with pytest.raises(PATConfigError, match=r"Unknown PAT adapter 'typo'; known: \['default'\]"):
        wrap(tiny_model("llama")).merge_and_prune(adapter_name="typo")


def test_kept_indices_of_a_soft_mask():
    with pytest.raises(PATStateError, match=r"call harden\(\) \(or train past the freeze step\) first"):
        wrap(tiny_model("llama")).base_model.pat_mask["default"].kept_indices()


def test_safe_merge_with_non_finite_adapter_weights():
    model = hardened(wrap(tiny_model("llama")))
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.pat_lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(PATStateError, match="produced non-finite weights; not merged"):
        model.merge_and_unload(safe_merge=True)


def test_save_pruned_into_an_existing_folder(tmp_path):
    small = hardened(wrap(tiny_model("llama"))).merge_and_prune()
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        save_pruned(small, tmp_path / "out")


def test_save_pruned_of_an_unmerged_model(tmp_path):
    with pytest.raises(PATTypeError, match=r"Call merge_and_prune\(\) and save what it returns"):
        save_pruned(wrap(tiny_model("llama")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ more misuse: loading, re-wrapping, NaN, calibrate
def _train_one_step(model, ids):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without the importance-aware mask start")
        model.set_step(1, 30)  # still soft
    model.eval()


@pytest.mark.parametrize("layers", [3, 1])
def test_adapter_onto_a_base_with_another_depth(tmp_path, layers):
    """More layers: an untrained layer would run under the trained mask; fewer: trained layers dropped silently."""
    wrap(tiny_model("llama")).save_pretrained(tmp_path)
    base = tiny_model("llama", num_hidden_layers=layers)
    with pytest.raises(AdapterMismatchError, match="num_hidden_layers=2.*Load it onto the model it was trained from"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not has_pat_layers(base)


def test_adapter_saved_without_the_layer_count_loads_as_before(tmp_path):
    model = wrap(tiny_model("llama"), init_weights=False)
    assert model.peft_config["default"].base_num_hidden_layers == 2
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    del saved["base_num_hidden_layers"]  # as peft-pat 0.4.0 wrote it
    config_file.write_text(json.dumps(saved))
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert loaded.peft_config["default"].base_num_hidden_layers == 2  # recorded again at injection
    ids = tiny_inputs()
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    # the disk merge's call passes no layer count: nothing is compared then
    peft_pat.checks.check_adapter_matches_base(
        loaded.peft_config["default"], "llama", 64, 97, adapter="a", base="b", action="c"
    )


def test_get_peft_model_twice_on_the_same_base(tmp_path):
    """A notebook cell run twice: the second call must not re-initialise the first PeftModel's layers."""
    base = tiny_model("llama")
    first = wrap(base, init_weights=False)
    ids = tiny_inputs()
    _train_one_step(first, ids)
    before_logits = logits(first, ids)
    before_state = {k: v.clone() for k, v in first.state_dict().items()}
    with pytest.raises(PATStateError, match=r"Keep using the existing PeftModel \(peft_model.add_adapter"):
        wrap(base)
    assert torch.equal(logits(first, ids), before_logits)
    assert before_state.keys() == first.state_dict().keys()
    assert all(torch.equal(before_state[k], v) for k, v in first.state_dict().items())
    # PEFT's own ways to put a second adapter on the same base still work
    first.add_adapter("second", PATConfig(hsm_rank=8, r=4))
    wrap(tiny_model("llama")).save_pretrained(tmp_path)
    first.load_adapter(tmp_path, "loaded")
    assert set(first.base_model.pat_mask) == {"default", "second", "loaded"}
    assert torch.equal(logits(first, ids), before_logits)


@pytest.mark.parametrize("kind", ["pat", "lora"])
def test_get_peft_model_on_a_peft_model(kind):
    if kind == "pat":
        peft_model = wrap(tiny_model("llama"))
    else:
        peft_model = get_peft_model(tiny_model("llama"), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    with pytest.raises(PATTypeError, match=r"For a second PAT adapter use peft_model.add_adapter\(name, PATConfig"):
        wrap(peft_model)


def test_one_config_object_for_two_bases():
    config = PATConfig(hsm_rank=8, r=4, calibration_batches=0)
    get_peft_model(tiny_model("llama"), config)
    narrow = tiny_model("llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)
    with pytest.raises(AdapterMismatchError, match=r"build a new PATConfig\(\.\.\.\) for each base"):
        get_peft_model(narrow, config)
    assert not has_pat_layers(narrow)


def test_non_finite_loss_after_the_mask_hardened():
    """The zero that keeps a hard mask's logits in the graph goes through the same NaN guard as the soft gate."""
    model = hardened(wrap(tiny_model("llama")))
    mask = model.base_model.pat_mask["default"]
    kept = mask.kept_indices().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tiny_inputs()
    model.train()
    (model(input_ids=ids, labels=ids).loss * float("nan")).backward()
    assert torch.equal(mask.logits.grad, torch.zeros_like(mask.logits))
    optimizer.step()
    optimizer.zero_grad()
    assert torch.isfinite(mask.logits).all()
    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        model.set_step(5, 10)
    assert torch.isfinite(mask.logits).all()
    assert torch.equal(mask.kept_indices(), kept)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_loading_with_low_cpu_mem_usage(tmp_path, is_trainable):
    """PEFT builds the adapter on the meta device, then loads it with assign=True: the same model as without."""
    model = wrap(tiny_model("llama"), init_weights=False)
    ids = tiny_inputs()
    _train_one_step(model, ids)
    model.base_model.harden_mask()
    model.save_pretrained(tmp_path)
    plain = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=is_trainable)
    light = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=is_trainable, low_cpu_mem_usage=True)
    assert torch.equal(logits(light, ids), logits(plain, ids))
    mask, reference = light.base_model.pat_mask["default"], plain.base_model.pat_mask["default"]
    assert all(not t.is_meta for t in [*mask.parameters(), *mask.buffers()])
    assert mask.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in mask.state_dict().items())
    assert mask.hardened and torch.equal(mask.kept_indices(), reference.kept_indices())
    assert mask.logits.requires_grad is is_trainable
    assert not any(p.is_meta for p in light.parameters())


def test_low_cpu_mem_usage_adapter_used_before_loading():
    model = get_peft_model(tiny_model("llama"), PATConfig(hsm_rank=8, r=4), low_cpu_mem_usage=True)
    with pytest.raises(PATStateError, match="create an adapter to train without low_cpu_mem_usage"):
        model(input_ids=tiny_inputs())


def test_pat_config_from_a_lora_folder(tmp_path):
    get_peft_model(tiny_model("llama"), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"])).save_pretrained(
        tmp_path
    )
    with pytest.raises(PATConfigError, match="holds a LORA adapter .*, not a PAT adapter"):
        PATConfig.from_pretrained(tmp_path)


def test_optimizer_groups_of_an_adapter_loaded_for_inference(tmp_path):
    wrap(tiny_model("llama")).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)  # is_trainable=False: everything frozen
    with pytest.raises(PATStateError, match=r"PeftModel.from_pretrained\(base, folder, is_trainable=True\)"):
        peft_pat.optimizer_param_groups(loaded)


@pytest.mark.parametrize(
    ("batches", "error", "match"),
    [
        ({"input_ids": "ids"}, PATTypeError, r"got a single batch .* calibrate\(\[batch\]\)"),
        ("tensor", PATTypeError, r"wrap the token ids: calibrate\(\[\{'input_ids': ids\}\]\)"),
        ([{"labels": "ids"}], PATConfigError, r"batch 0 has no 'input_ids' \(keys: \['labels'\]\)"),
        (["ids"], PATTypeError, "batch 0 is a Tensor, not a dict"),
        ([{"input_ids": "list"}], PATTypeError, "has 'input_ids' as list"),
        ([{"input_ids": "row"}], PATTypeError, r"has 'input_ids' as a \(7,\) torch.int64 tensor"),
        ([{"input_ids": "ids", "attention_mask": "row"}], PATTypeError, r"'attention_mask' of shape \(7,\)"),
        ([{"input_ids": "ids", "attention_mask": "zeros"}], PATConfigError, "the batches hold no token"),
    ],
)
def test_calibrate_with_malformed_batches(batches, error, match):
    ids = tiny_inputs()
    values = {"ids": ids, "list": ids.tolist(), "row": ids[0], "zeros": torch.zeros_like(ids), "tensor": ids}

    def resolve(item):
        if isinstance(item, str):
            return values[item]
        if isinstance(item, dict):
            return {k: resolve(v) for k, v in item.items()}
        return [resolve(v) for v in item]

    model = wrap(tiny_model("llama"), calibration_batches=2)
    mask = model.base_model.pat_mask["default"]
    with pytest.raises(error, match=match):
        model.calibrate(resolve(batches))
    assert not bool(mask.calibrated) and torch.equal(mask.logits, torch.zeros_like(mask.logits))


def test_calibrate_after_training_started():
    model = wrap(tiny_model("llama"), calibration_batches=2, init_weights=False)
    ids = tiny_inputs()
    _train_one_step(model, ids)
    before = logits(model, ids)
    assert not model.base_model.needs_calibration()  # PATCallback does not calibrate a resumed, started run either
    with pytest.raises(PATStateError, match=r"Call calibrate\(batches\) before the first optimizer step"):
        model.calibrate([{"input_ids": ids}])
    assert torch.equal(logits(model, ids), before)


def test_calibrate_after_hardening():
    model = hardened(wrap(tiny_model("llama"), calibration_batches=2))
    with pytest.raises(PATStateError, match="Calibrate a fresh adapter before its first optimizer step"):
        model.calibrate([{"input_ids": tiny_inputs()}])


def test_calibrate_twice_before_training():
    """Decision: allowed before the first step; the second call re-ranks and the model still computes the same."""
    model = wrap(tiny_model("llama"), calibration_batches=2)
    ids = tiny_inputs()
    before = logits(model, ids)
    model.calibrate([{"input_ids": ids}])
    model.calibrate([{"input_ids": ids[:, :4]}])
    assert bool(model.base_model.pat_mask["default"].calibrated)
    assert_logits_close(logits(model, ids), before)

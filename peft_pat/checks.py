"""Checks that run before PAT touches a model.

Everything that can be refused is refused while the base model is still unchanged, so a failed
``get_peft_model`` / ``add_adapter`` leaves no half-wrapped model behind, and every refusal names the
problem and the fix (docs/errors.md lists them all). :class:`~peft_pat.model.PATModel` calls
:func:`check_adapter_name`, :func:`check_causal_lm_layout` and :func:`check_injection_targets` from
its ``inject_adapter``, and :func:`check_not_quantized` while preparing the adapter config.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ._registry import PREFIX
from .errors import AdapterMismatchError, PATConfigError, PATStateError, PATTypeError, UnsupportedModelError
from .families import FamilySpec
from .layer import PATLayer

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer except the output layer


def check_adapter_name(adapter_name: Any) -> None:
    """Adapter names become keys of ``nn.ModuleDict``/``nn.ParameterDict`` and of the saved state dict."""
    if not isinstance(adapter_name, str) or not adapter_name:
        raise PATTypeError(f"The adapter name must be a non-empty str such as 'default', got {adapter_name!r}.")
    reason = None
    if "." in adapter_name:
        reason = "it contains '.', which separates module names in PyTorch"
    elif hasattr(nn.ModuleDict(), adapter_name) or hasattr(nn.ParameterDict(), adapter_name):
        reason = "it is an attribute of torch's nn.ModuleDict / nn.ParameterDict, which hold the adapter weights"
    elif adapter_name in PREFIX:
        reason = f"it is part of the parameter prefix {PREFIX!r}, which makes PEFT reload the adapter wrongly"
    if reason:
        raise PATConfigError(
            f"The adapter name {adapter_name!r} cannot be used: {reason}. Choose a plain name such as 'default', "
            "'pat_small' or 'sparse25'."
        )


def check_adapter_matches_base(
    pat_config: Any,
    model_type: str | None,
    hidden_size: int | None,
    vocab_size: int | None,
    *,
    adapter: str,
    base: str,
    action: str,
    num_hidden_layers: int | None = None,
    heads: tuple[int, int | None] | None = None,
    note: str = "",
) -> None:
    """Refuse an adapter whose recorded base (family, ``hidden_size``, ``vocab_size``, number of decoder
    layers, and with a head axis pruned ``heads`` = (num_attention_heads, num_key_value_heads)) is not this base.

    ``adapter`` names the adapter, ``base`` the base it meets and ``action`` what to do with it instead
    ("Load it onto", "Merge it into"); ``note`` is appended to the message. Values not recorded (older
    adapters lack ``base_num_hidden_layers``) or not given are not compared.
    """
    recorded = (
        ("model family", pat_config.base_model_type, model_type),
        ("hidden_size", pat_config.base_hidden_size, hidden_size),
        ("vocab_size", pat_config.base_vocab_size, vocab_size),
        ("num_hidden_layers", getattr(pat_config, "base_num_hidden_layers", None), num_hidden_layers),
    )
    if heads is not None:
        recorded += (
            ("num_attention_heads", getattr(pat_config, "base_num_attention_heads", None), heads[0]),
            ("num_key_value_heads", getattr(pat_config, "base_num_key_value_heads", None), heads[1] or heads[0]),
        )
    for what, saved, actual in recorded:
        if saved is not None and actual is not None and saved != actual:
            raise AdapterMismatchError(
                f"{adapter} was trained on a base model with {what}={saved!r}, but {base} has {what}={actual!r}. "
                f"{action} the model it was trained from "
                f"(adapter_config.json: base_model_name_or_path={pat_config.base_model_name_or_path!r}).{note}"
            )


def check_not_quantized(model_config: dict) -> None:
    """PAT folds adapters into the weights and cuts them: it needs float weights and a saveable model."""
    quantization = model_config.get("quantization_config")
    if not quantization:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    method = getattr(method, "value", method)
    if method == "gguf":
        raise UnsupportedModelError(
            "PAT cannot wrap this quantized base model as it is: it was loaded from a GGUF file "
            "(quantization_config.quant_method='gguf'). transformers dequantises GGUF weights to float but keeps "
            "the model marked as quantized, so the merged and pruned model could not be saved. Rebuild a plain "
            "float model first: config = model.config; del "
            "config.quantization_config; plain = type(model)(config); plain.load_state_dict(model.state_dict()); "
            "or load SmolLM2 with peft_pat.offline_models.load_causal_lm('smollm2-135m'), which does this once."
        )
    raise UnsupportedModelError(
        f"PAT cannot wrap a quantized base model (quantization_config.quant_method={method!r}): merging and pruning "
        "fold the adapters into the weights and cut them, which needs exact float weights (QLoRA-style training on "
        "a quantized base is not supported). Load the base model in bfloat16 or float32 without a "
        "quantization_config (e.g. no BitsAndBytesConfig / load_in_4bit)."
    )


def check_causal_lm_layout(model: nn.Module, family: FamilySpec) -> None:
    """The embedding, decoder layers, final norm and LM head must sit where the family table says."""
    for what, path in (
        ("token embedding", family.embedding),
        ("decoder layers", family.layers),
        ("final norm", family.final_norm),
        ("LM head", family.lm_head),
    ):
        try:
            model.get_submodule(path)
        except AttributeError:
            raise UnsupportedModelError(
                f"PAT needs a causal language model with an LM head; this {type(model).__name__} has no {what} at "
                f"'{path}'. Load the {family.name} model with AutoModelForCausalLM (task_type='CAUSAL_LM')."
            ) from None


def plain_float_layer_error(key: str, module: nn.Module, kind: type[nn.Module]) -> UnsupportedModelError | None:
    """None if ``module`` is a plain float torch ``kind`` (``nn.Linear`` / ``nn.Embedding``) PAT can wrap and
    merge exactly, else the error that says why not. The one rule for what PAT wraps."""
    plain = isinstance(module, kind) and (type(module) is kind or type(module).__module__.startswith("torch"))
    if kind is nn.Embedding:  # transformers' scaled embeddings (Gemma) subclass nn.Embedding and are plain float
        plain = isinstance(module, nn.Embedding)
    weight = getattr(module, "weight", None)
    if plain and isinstance(weight, torch.Tensor) and weight.dtype in FLOAT_DTYPES:
        return None
    dtype = getattr(weight, "dtype", None)
    return UnsupportedModelError(
        f"PAT cannot wrap '{key}': it is a {type(module).__module__}.{type(module).__name__} with weight dtype "
        f"{dtype}, not a plain float torch {kind.__name__}. Quantized layers (bitsandbytes, GPTQ, AWQ, HQQ, ...) look "
        "like this; merging and pruning need float weights, so load the base model in bfloat16 or float32 without "
        "quantization."
    )


def check_injection_targets(model: nn.Module, config: Any, family: FamilySpec, explicit_targets: bool) -> None:
    """Walk the modules PEFT will wrap and refuse what cannot be wrapped, before anything is replaced.

    Producers (embedding, ``o_proj``, ``down_proj``) must be plain float layers; LoRA targets must be plain
    float ``nn.Linear`` layers other than the embedding, with ``r`` at most their smaller dimension; and
    ``target_modules`` given explicitly must match at least one of them.
    """
    all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR
    inside_adapter: list[str] = []
    lora_layers: list[tuple[str, int]] = []
    excluded: list[str] = []  # layers the targets match that exclude_modules removes
    without_exclusions = copy.copy(config)
    without_exclusions.exclude_modules = None
    for key, module in model.named_modules():
        if not key or any(key.startswith(prefix) for prefix in inside_adapter):
            continue
        if isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save copies of an earlier adapter
            inside_adapter.append(key + ".")
            continue
        base = module
        if isinstance(module, BaseTunerLayer):
            inside_adapter.append(key + ".")
            if not isinstance(module, PATLayer):
                raise UnsupportedModelError(
                    f"'{key}' is already wrapped by another PEFT method ({type(module).__name__}). PAT has to be the "
                    "only adapter type on the model: merge the other adapter into the base first "
                    "(merged = peft_model.merge_and_unload()) or start from the plain base model."
                )
            base = module.get_base_layer()
        embedding = family.is_embedding(key)
        if family.is_producer(key):
            error = plain_float_layer_error(key, base, nn.Embedding if embedding else nn.Linear)
            if error is not None:
                raise error
        if config.r == 0:
            continue
        if all_linear:
            wants_lora = isinstance(base, nn.Linear) and key != family.lm_head
        else:
            match = check_target_module_exists(config, key)
            if isinstance(match, _ExcludedModule) and check_target_module_exists(without_exclusions, key):
                excluded.append(key)
            wants_lora = bool(match)
        if not wants_lora:
            continue
        if embedding:
            raise PATConfigError(
                f"target_modules={config.target_modules!r} matches the embedding '{key}', which PAT already adapts "
                "with an HSM (no LoRA on embeddings); remove it from target_modules."
            )
        if not isinstance(base, nn.Linear) and not hasattr(base, "in_features"):  # in_features: a linear-like layer
            raise PATConfigError(
                f"target_modules={config.target_modules!r} matches '{key}', a {type(base).__name__} and not a "
                f"linear layer; LoRA goes on nn.Linear modules. In {family.name} models they are named "
                f"{list(family.lora_targets)}: list those names (or a regex that matches only linear layers)."
            )
        error = plain_float_layer_error(key, base, nn.Linear)
        if error is not None:
            raise error
        lora_layers.append((key, min(base.in_features, base.out_features)))
    if explicit_targets and config.r > 0 and not lora_layers and excluded:
        raise PATConfigError(
            f"exclude_modules={config.exclude_modules!r} excludes every layer target_modules="
            f"{config.target_modules!r} would put LoRA on; narrow exclude_modules, or use r=0 for HSMs only."
        )
    if explicit_targets and config.r > 0 and not lora_layers:
        extra = ""
        if config.layers_to_transform is not None:
            extra = f" with layers_to_transform={config.layers_to_transform!r}"
        raise PATConfigError(
            f"target_modules={config.target_modules!r}{extra} matched no linear layer of this {family.name} model. "
            f"Its LoRA targets are named {list(family.lora_targets)}: use those names, a regex, or "
            "target_modules=None for all of them (r=0 trains the HSMs only)."
        )
    if lora_layers:
        key, limit = min(lora_layers, key=lambda item: item[1])
        if config.r > limit:
            raise PATConfigError(
                f"r={config.r} is larger than the smaller dimension ({limit}) of the LoRA target '{key}': a LoRA "
                f"update B A cannot have rank above min(in_features, out_features). Use r <= {limit}, or exclude "
                "the narrow layers with exclude_modules."
            )


CALIBRATION_BATCH_FORM = (
    "calibrate takes an iterable of batches, each a dict {'input_ids': LongTensor (batch, tokens), 'attention_mask': "
    "optional tensor of the same shape}, e.g. the training DataLoader or [tokenizer(texts, return_tensors='pt', "
    "padding=True)]"
)


def check_calibration_source(batches: Any) -> None:
    """``calibrate(batches)``: refuse one batch passed where an iterable of batches is expected."""
    if isinstance(batches, Mapping):
        raise PATTypeError(
            f"calibrate got a single batch (a {type(batches).__name__}); pass a list of batches, "
            f"e.g. calibrate([batch]). {CALIBRATION_BATCH_FORM}."
        )
    if isinstance(batches, torch.Tensor):
        raise PATTypeError(
            f"calibrate got a tensor; wrap the token ids: calibrate([{{'input_ids': ids}}]). {CALIBRATION_BATCH_FORM}."
        )


def check_calibration_batches(batches: list) -> None:
    """Every batch ``calibrate`` will run: a mapping with 2-D integer ``input_ids`` (and an ``attention_mask``
    of the same shape, if any), and at least one non-padding token in all of them. Runs before any forward."""
    tokens = 0
    for index, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise PATTypeError(
                f"calibrate: batch {index} is a {type(batch).__name__}, not a dict. {CALIBRATION_BATCH_FORM}."
            )
        ids = batch.get("input_ids")
        if ids is None:
            raise PATConfigError(
                f"calibrate: batch {index} has no 'input_ids' (keys: {sorted(map(str, batch))}). "
                f"{CALIBRATION_BATCH_FORM}."
            )
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
            form = f"a {tuple(ids.shape)} {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise PATTypeError(f"calibrate: batch {index} has 'input_ids' as {form}. {CALIBRATION_BATCH_FORM}.")
        attention = batch.get("attention_mask")
        if attention is None:
            tokens += ids.numel()
            continue
        if not isinstance(attention, torch.Tensor) or attention.shape != ids.shape:
            form = tuple(attention.shape) if isinstance(attention, torch.Tensor) else type(attention).__name__
            raise PATTypeError(
                f"calibrate: batch {index} has an 'attention_mask' of shape {form}, input_ids "
                f"{tuple(ids.shape)}. {CALIBRATION_BATCH_FORM}."
            )
        tokens += int(attention.bool().sum())
    if tokens == 0:
        raise PATConfigError(
            "calibrate: the batches hold no token (every attention_mask is all zeros); pass the "
            "first batches of the training data."
        )


def check_no_foreign_pat_layers(model: nn.Module, own_masks: nn.Module | None) -> None:
    """Refuse a model that is a PEFT model, or whose modules are PAT layers of another PATModel.

    A second ``get_peft_model(base, cfg)`` on the same ``base`` (a notebook cell run twice) would
    otherwise re-initialise the first PeftModel's adapter in its layers and point them at a new
    mask, changing the first model's outputs. ``add_adapter`` / ``load_adapter`` inject into
    layers of this tuner, which hold a reference to this tuner's ``pat_mask``, and pass.
    """
    if isinstance(model, (PeftModel, BaseTuner)):
        raise PATTypeError(
            f"get_peft_model got a {type(model).__name__}, which is already a PEFT model; PAT wraps the base "
            "transformers model. For a second PAT adapter use peft_model.add_adapter(name, PATConfig(...)); to "
            "start over, load the base model again (or take peft_model.unload(), the base without adapters)."
        )
    for key, module in model.named_modules():
        if isinstance(module, PATLayer) and module._pat_masks is not own_masks:
            raise PATStateError(
                f"This base model already holds the PAT layers of an existing PeftModel (e.g. '{key}'): "
                "get_peft_model was called on it before, and wrapping it again would re-initialise that "
                "PeftModel's adapter in place. Keep using the existing PeftModel (peft_model.add_adapter(name, "
                "PATConfig(...)) adds a second adapter), or load the base model again to start over "
                "(peft_model.unload() returns the base without PAT layers)."
            )

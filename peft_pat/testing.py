"""Tiny random models of every supported family, built in memory (no downloads, no files).

The test suite's model fixtures and the shapes ``python -m benchmarks.family_merge`` scales up, so the
tests and that benchmark agree on what each family's config looks like. Adding a family to
``peft_pat.families`` means adding it to ``FAMILY_BUILDERS`` here (docs/families.md). Importing this
module imports every family's transformers classes; ``import peft_pat`` does not import it.

    from peft_pat.testing import ALL_FAMILIES, tiny_inputs, tiny_model

    model = tiny_model("qwen3", hidden_size=64)        # a 2-layer random Qwen3ForCausalLM in eval mode
    logits = model(input_ids=tiny_inputs()).logits     # (2, 7, VOCAB)
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 97

# family name -> (config class, model class, family-specific config kwargs)
FAMILY_BUILDERS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {}),
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        {
            "sliding_window": 4,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 8,
        },
    ),
    "gemma3_text": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        {"sliding_window": 4, "query_pre_attn_scalar": 8, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "phi3": (Phi3Config, Phi3ForCausalLM, {}),
}
ALL_FAMILIES = tuple(FAMILY_BUILDERS)
CORE_FAMILIES = ("llama", "mistral", "qwen2")


def tiny_config(
    family: str = "llama",
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    num_hidden_layers: int = 2,
    intermediate_size: int = 96,
    tie_word_embeddings: bool = False,
    **overrides,
):
    config_cls, _, extra = FAMILY_BUILDERS[family]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    elif family in ("qwen3", "gemma", "gemma2", "gemma3_text"):
        kwargs["head_dim"] = hidden_size // num_attention_heads
    if family == "gemma3_text":
        kwargs["layer_types"] = ["sliding_attention", "full_attention"] * (num_hidden_layers // 2) + (
            ["sliding_attention"] * (num_hidden_layers % 2)
        )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised tiny ``*ForCausalLM`` in eval mode, with non-trivial norm gains and biases."""
    _, model_cls, _ = FAMILY_BUILDERS[family]
    config = tiny_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    gain_offset = 0.0 if family.startswith("gemma") else 1.0  # Gemma norms compute x * (1 + w)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # non-trivial gains, so norm-rescaling bugs show up
                param.copy_(gain_offset + torch.rand_like(param) - 0.5)
            elif name.endswith(".bias"):
                param.normal_(0, 0.1)
    return model.to(dtype).eval()


def tiny_inputs(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)

"""What a ``PATConfig`` leaves to the base model, filled in once at injection (PEFT's ``_prepare_adapter_config``).

:func:`resolve_for_base` checks the config against the base (family, quantization, the base an adapter was
trained on) and records the base it is applied to, then resolves the kept width, the HSM rank, the mask
schedule, the embedding HSM kind and the LoRA targets. A saved adapter carries the resolved values, so
loading it resolves to the same ones (or is refused).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from .budget import recorded_widths, resolve_widths, unit_widths
from .checks import check_adapter_matches_base, check_not_quantized
from .config import PATConfig
from .errors import PATConfigError
from .families import family_for_model_type
from .mask import resolve_schedule
from .merge.plan import TensorInfo, cut_parameter_count

PAPER_HSM_RANK_FRACTION = 0.05  # paper: "r ≈ 5% of d" (r = 200 for d = 4096)
# The default rank stops growing here. Per decoder layer the two HSMs train 4 r d parameters and LoRA r_LoRA times
# the sum of (in + out) over the decoder linears (19 d at Llama-2-7B shapes, 20 d at Llama-3-8B): both grow as d, so
# a constant cap holds PAT at a constant multiple of LoRA r=20's trainable parameters (2.2-2.4x at d = 2048-8192,
# uncapped d - N at -25% gives 6.5x at d = 4096), while the HSMs' optimizer state next to the bfloat16 base falls
# as r / d (docs/performance.md, Training cost at 7B).
HSM_RANK_CAP = 128
REUSED_CONFIG_NOTE = (  # the same refusal meets a PATConfig object reused for a second, different base
    " (A PATConfig you built and already passed to get_peft_model recorded that first base: build a new "
    "PATConfig(...) for each base.)"
)


def default_hsm_rank(hidden_size: int, kept_width: int, cap: int | None = HSM_RANK_CAP) -> int:
    """min(d - N, ``cap``) with d - N raised to the paper's ~5% of d and rounded up to a multiple of 8; always
    below d. ``cap=None``: the rule before the cap (peft-pat 0.3-0.4), kept for the benchmarks' comparison.

    With rank d - N the operator I + L1 L0 can write the content of every channel the mask removes into the
    kept ones; on SmolLM2-135M it beat the paper's rank at 25% and 50% (docs/quality.md, Levers). The cap keeps
    the HSMs' parameters a fixed multiple of LoRA's as d grows: d = 576 at -25% (504 kept) 72, at -50% (432
    kept) 128; d = 4096 (Llama-2-7B, Llama-3-8B) 128 at any cut.
    """
    rank = 8 * math.ceil(max(hidden_size - kept_width, PAPER_HSM_RANK_FRACTION * hidden_size) / 8)
    if cap is not None:
        rank = min(rank, cap)
    return max(1, min(rank, hidden_size - 1))


def pruned_fraction(cfg: PATConfig, family, model_config: dict, layout: list[TensorInfo]) -> float:
    """What the cut removes, which sets the length of the soft phase: the fraction of hidden channels for a
    hidden cut alone (as before the MLP axis), else the fraction of parameters."""
    d = int(model_config["hidden_size"])
    if cfg.pruned_axes == ("hidden",):
        return (d - cfg.kept_width) / d
    config = SimpleNamespace(**model_config)
    full = cut_parameter_count(family, config, layout, d, {})
    units = unit_widths(recorded_widths(cfg), model_config)
    return 1.0 - cut_parameter_count(family, config, layout, cfg.kept_width, units) / full


def resolve_for_base(peft_config: PATConfig, model_config: dict, layout: list[TensorInfo]) -> PATConfig:
    """``peft_config`` with every value the base decides filled in (module docstring); refuses a base it does
    not fit before the model is touched. ``layout``: the base's tensors (names, shapes), for the budget."""
    if not isinstance(peft_config, PATConfig):
        raise PATConfigError(f"PATModel needs a PATConfig, got {type(peft_config).__name__}.")
    model_type = model_config.get("model_type")
    family = family_for_model_type(model_type)
    check_not_quantized(model_config)
    hidden = int(model_config["hidden_size"])
    vocab = model_config.get("vocab_size")
    layers = model_config.get("num_hidden_layers")
    layers = int(layers) if layers is not None else None
    check_adapter_matches_base(
        peft_config, model_type, hidden, vocab,
        adapter="This PAT adapter", base="the base model it is being applied to", action="Load it onto",
        num_hidden_layers=layers, note=REUSED_CONFIG_NOTE,
        heads=(int(model_config["num_attention_heads"]), model_config.get("num_key_value_heads")),
    )  # fmt: skip
    peft_config.base_model_type, peft_config.base_hidden_size, peft_config.base_vocab_size = (
        model_type,
        hidden,
        vocab,
    )
    peft_config.base_num_hidden_layers = layers
    peft_config.prune_axes = list(peft_config.pruned_axes)  # recorded: a later default does not change this adapter
    widths = resolve_widths(peft_config, family, model_config, layout)
    peft_config.kept_width, peft_config.kept_intermediate_size = widths.hidden, widths.mlp
    if "mlp" in peft_config.pruned_axes:
        peft_config.base_intermediate_size = int(model_config["intermediate_size"])
    if widths.heads is not None:  # a head axis is pruned
        peft_config.base_num_attention_heads = int(model_config["num_attention_heads"])
        peft_config.base_num_key_value_heads = int(
            model_config.get("num_key_value_heads") or model_config["num_attention_heads"]
        )
        peft_config.kept_num_attention_heads, peft_config.kept_num_key_value_heads = widths.heads, widths.kv_heads
    if "hidden" not in peft_config.pruned_axes:  # no hidden cut, no HSMs: the rank is unused
        peft_config.hsm_rank = None
    elif peft_config.hsm_rank is None:
        peft_config.hsm_rank = default_hsm_rank(hidden, peft_config.kept_width)
    elif peft_config.hsm_rank >= hidden:
        raise PATConfigError(
            f"hsm_rank={peft_config.hsm_rank} must be smaller than the hidden size ({hidden}); the HSM operator "
            f"is identity plus a low-rank term. The default is the number of pruned channels (here "
            f"{default_hsm_rank(hidden, peft_config.kept_width)}); the paper uses about 5% of hidden_size."
        )
    peft_config.mask_milestone, peft_config.mask_freeze = resolve_schedule(
        peft_config.mask_milestone, peft_config.mask_freeze, pruned_fraction(peft_config, family, model_config, layout)
    )
    if peft_config.embedding_hsm == "auto":
        tied = bool(model_config.get("tie_word_embeddings", False))
        peft_config.embedding_hsm = "diagonal" if tied else "full"
    for name in peft_config.modules_to_save or []:
        if any(name == p.rsplit(".", 1)[-1] for p in (family.embedding, *family.producers)):
            raise PATConfigError(
                f"modules_to_save contains {name!r}, a producer of the residual stream that PAT already adapts "
                "with an HSM; remove it from modules_to_save."
            )
    if peft_config.target_modules is None:
        peft_config.target_modules = list(family.lora_targets)
    return peft_config

"""Where the residual stream of each supported decoder family is written, read and normalised.

Hidden-width pruning needs to know, per family, three kinds of modules (docs/method.md §1):

* **producers** write into the residual stream: the token embedding and, in every decoder layer, the
  last linear of each branch (``o_proj``, ``down_proj``). PAT puts an HSM on each of their outputs
  and, at merge time, keeps only their rows (embedding: columns) in the kept channel set K.
* **consumers** read the normalised residual stream: ``q/k/v_proj``, ``gate/up_proj`` (or the fused
  ``qkv_proj`` / ``gate_up_proj``) and ``lm_head``. At merge time they keep only their input columns K.
* **norms**: RMS norms that read the residual stream (``input_layernorm``, the final ``norm``, ...)
  and, in Gemma 2/3, norms that sit on a branch output before the residual add. Their gains are
  sliced to K and rescaled (see :mod:`peft_pat.merge.fold`).

Everything here is data: one :class:`FamilySpec` per family in :data:`FAMILIES`. Adding a family is
one entry plus its tests. Per-head norms (Qwen3 / Gemma3 ``q_norm``/``k_norm``) act on ``head_dim``,
which neither hidden-width nor head pruning changes, so they are simply not listed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .errors import UnsupportedModelError

_LLAMA_CONSUMERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_LLAMA_PRODUCERS = ("self_attn.o_proj", "mlp.down_proj")
_LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FamilySpec:
    """Facts about one decoder family; module paths are relative to the ``*ForCausalLM`` model.

    ``norm_offset`` is the constant in the norm's gain: 0 for ``x/rms * g`` (Llama), 1 for
    ``x/rms * (1 + g)`` (Gemma). ``embedding_scale_attr`` names the embedding module's buffer that
    holds ``sqrt(hidden_size)`` for families that scale embeddings by the width (Gemma).
    """

    name: str
    model_types: tuple[str, ...]
    embedding: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    producers: tuple[str, ...] = _LLAMA_PRODUCERS
    consumers: tuple[str, ...] = _LLAMA_CONSUMERS
    residual_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    branch_norms: tuple[str, ...] = ()
    norm_offset: float = 0.0
    embedding_scale_attr: str | None = None
    lora_targets: tuple[str, ...] = _LLAMA_LORA
    # Per-layer unit spaces (the per-layer axes, :mod:`peft_pat.axes`): "mlp" (intermediate channels), "heads"
    # (query heads), "kv_heads" (key/value heads). ``unit_rows``: a layer linear whose rows (and bias) are
    # consecutive segments of those units (Phi-3's fused qkv_proj: query, key, value heads); ``unit_columns``: the
    # linear whose input columns are one space's units, the module the axes of that space gate.
    unit_rows: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("self_attn.q_proj", ("heads",)),
        ("self_attn.k_proj", ("kv_heads",)),
        ("self_attn.v_proj", ("kv_heads",)),
        ("mlp.gate_proj", ("mlp",)),
        ("mlp.up_proj", ("mlp",)),
    )
    unit_columns: tuple[tuple[str, str], ...] = (("self_attn.o_proj", "heads"), ("mlp.down_proj", "mlp"))
    # A layer's attention module: what transformers derived from the head counts when it built it
    # (num_key_value_groups, and num_key_value_heads where kept) an in-memory head cut sets anew.
    attention: str = "self_attn"
    attention_count_attributes: tuple[str, ...] = ("num_key_value_groups", "num_key_value_heads")

    def layer_module_names(self, num_layers: int, relative: tuple[str, ...]) -> list[str]:
        """Full module names of ``relative`` paths in every decoder layer."""
        return [f"{self.layers}.{i}.{rel}" for i in range(num_layers) for rel in relative]

    def is_producer(self, module_name: str) -> bool:
        """True for the embedding and for every layer's producer linears (accepts PEFT-prefixed names)."""
        if module_name == self.embedding or module_name.endswith("." + self.embedding):
            return True
        return self._layer_relative(module_name) in self.producers

    def is_embedding(self, module_name: str) -> bool:
        return module_name == self.embedding or module_name.endswith("." + self.embedding)

    def _layer_relative(self, module_name: str) -> str | None:
        match = re.search(re.escape(self.layers) + r"\.(\d+)\.(.+)$", module_name)
        return match.group(2) if match else None

    def layer_index(self, module_name: str) -> int | None:
        """The decoder layer a module belongs to (None outside the layers)."""
        match = re.search(re.escape(self.layers) + r"\.(\d+)\.", module_name + ".")
        return int(match.group(1)) if match else None

    def unit_output(self, space: str) -> str:
        """The layer-relative linear whose input columns are the units of ``space`` (``mlp.down_proj``, ``o_proj``)."""
        return dict((space_, module) for module, space_ in self.unit_columns)[space]

    def column_space(self, module_name: str) -> str | None:
        """The unit space a layer linear's input columns enumerate (None: the hidden width or not a layer linear;
        accepts PEFT-prefixed names)."""
        return dict(self.unit_columns).get(self._layer_relative(module_name))

    def unit_cuts(self, module_name: str, param: str) -> list[tuple[int, tuple[str, ...]]]:
        """(dimension, unit-space segments) of each per-layer cut of this parameter: a ``unit_rows`` linear keeps
        rows (weight and bias), a ``unit_columns`` linear columns (weight)."""
        relative = self._layer_relative(module_name)
        rows = dict(self.unit_rows).get(relative)
        if rows is not None and param in ("weight", "bias"):
            return [(0, rows)]
        space = self.column_space(module_name)
        if space is not None and param == "weight":
            return [(1, (space,))]
        return []

    def module_roles(self, num_layers: int, tied: bool) -> dict[str, str]:
        """Every module that touches the residual stream, by full path, with its role: ``embedding``,
        ``producer``, ``consumer``, ``residual_norm``, ``branch_norm``, ``final_norm`` or ``lm_head``.

        Used to transform a checkpoint tensor by tensor (``peft-pat merge``). A tied ``lm_head`` is
        not listed: it has no tensor of its own.
        """
        roles = {self.embedding: "embedding", self.final_norm: "final_norm"}
        if not tied:
            roles[self.lm_head] = "lm_head"
        for role, relative in (
            ("producer", self.producers),
            ("consumer", self.consumers),
            ("residual_norm", self.residual_norms),
            ("branch_norm", self.branch_norms),
        ):
            roles.update(dict.fromkeys(self.layer_module_names(num_layers, relative), role))
        return roles


_GEMMA2 = FamilySpec(
    name="Gemma 2",
    model_types=("gemma2",),
    residual_norms=("input_layernorm", "pre_feedforward_layernorm"),
    branch_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    norm_offset=1.0,
    embedding_scale_attr="embed_scale",
)

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(name="Llama", model_types=("llama",)),
    FamilySpec(name="Mistral", model_types=("mistral",)),
    FamilySpec(name="Qwen2", model_types=("qwen2",)),
    FamilySpec(name="Qwen3", model_types=("qwen3",)),
    FamilySpec(name="Gemma", model_types=("gemma",), norm_offset=1.0, embedding_scale_attr="embed_scale"),
    _GEMMA2,
    replace(_GEMMA2, name="Gemma 3 (text)", model_types=("gemma3_text",)),
    FamilySpec(
        name="Phi-3",
        model_types=("phi3",),
        consumers=("self_attn.qkv_proj", "mlp.gate_up_proj"),
        lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        unit_rows=(("self_attn.qkv_proj", ("heads", "kv_heads", "kv_heads")), ("mlp.gate_up_proj", ("mlp", "mlp"))),
    ),
)

# Families we know and cannot prune exactly, with the reason and what to do instead.
_LAYERNORM = (
    "its LayerNorm subtracts the mean over all hidden channels, so channels that PAT holds at zero do not "
    "stay zero after the norm and the residual width cannot be cut exactly. Convert LayerNorm to RMSNorm "
    "first (SliceGPT-style) or use an RMSNorm family"
)
UNSUPPORTED_FAMILIES: dict[str, str] = {
    **{
        t: _LAYERNORM
        for t in (
            "gpt2",
            "opt",
            "gpt_neox",
            "gptj",
            "gpt_bigcode",
            "bloom",
            "falcon",
            "phi",
            "stablelm",
            "starcoder2",
            "mpt",
            "codegen",
            "gpt_neo",
            "bert",
            "roberta",
        )
    },
    "olmo": "its non-parametric LayerNorm subtracts the mean; " + _LAYERNORM.split("; ", 1)[-1],
    "gemma3": "this is the multimodal Gemma 3 wrapper; load the text model with "
    "Gemma3ForCausalLM (model_type 'gemma3_text') and wrap that",
}


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def supported_families_text() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


def family_for_model_type(model_type: str | None) -> FamilySpec:
    """The :class:`FamilySpec` for a ``config.model_type``; a clear error for anything else."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    if model_type in UNSUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"PAT cannot prune model_type '{model_type}': {UNSUPPORTED_FAMILIES[model_type]}. "
            f"Supported families: {supported_families_text()}."
        )
    raise UnsupportedModelError(
        f"PAT does not know the model family '{model_type}'. Supported families: {supported_families_text()}. "
        "A family needs RMS-style norms on the residual stream and known producer/consumer module names; "
        "adding one is an entry in peft_pat/families.py."
    )


def family_for_model(model) -> FamilySpec:
    """The family of a transformers ``*ForCausalLM`` model (or a PEFT model wrapping one)."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"PAT needs a transformers causal-LM model with a `config`; got {type(model).__name__}. "
            f"Supported families: {supported_families_text()}."
        )
    return family_for_model_type(getattr(config, "model_type", None))

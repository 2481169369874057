"""Hidden-channel importance from a few calibration batches (forward only, no gradients).

For every RMS norm that reads the residual stream (each layer's two norms and the final norm, from
the family table) a hook sees the norm's input h (the residual stream) and its output
y = g * h / rms(h) on every non-padding token. Two per-channel statistics come out of one pass:

    score_j  = sum_norms sqrt( mean_tokens y_j^2 )     (importance: what the consumers read)
    energy_j = max_norms mean_tokens h_j^2              (how large the residual stream itself is)

``score`` is the Minitron-style hidden-dimension importance (norm outputs aggregated over layers);
normalising per token keeps a few huge-norm tokens from deciding. ``energy`` finds *massive
activations* (Sun et al. 2024): a handful of channels whose residual values are hundreds of times
the median and act as attention-sink biases; zeroing one destroys the model, so
:func:`massive_channels` marks them for protection. The post-hoc baseline of the benchmark and the
PAT mask start both use :func:`channel_statistics`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .errors import PATConfigError
from .families import FamilySpec, family_for_model

MASSIVE_ENERGY_RATIO = 100.0  # a channel whose residual mean square exceeds 100x the median is "massive"


@dataclass
class ChannelStatistics:
    """Per-channel calibration statistics (float64, shape (hidden_size,)) and the token count."""

    score: torch.Tensor
    energy: torch.Tensor
    tokens: int
    mlp_score: torch.Tensor | None = None  # (layers, intermediate): RMS of each MLP output linear's input channel
    head_score: torch.Tensor | None = None  # (layers, query heads): RMS of each head's block of o_proj's input


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a PeftModel, a PATModel or itself."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def residual_norms(model: nn.Module, family: FamilySpec) -> list[nn.Module]:
    """Every norm that reads the residual stream: 2 (or the family's count) per layer, then the final norm."""
    lm = causal_lm(model)
    layers = lm.get_submodule(family.layers)
    norms = [layer.get_submodule(path) for layer in layers for path in family.residual_norms]
    return [*norms, lm.get_submodule(family.final_norm)]


def unit_output_linears(model: nn.Module, family: FamilySpec, space: str) -> list[nn.Linear]:
    """Each layer's linear whose input columns are the units of ``space`` (``down_proj`` for "mlp", ``o_proj``
    for "heads"), unwrapped from an adapter layer."""
    layers = causal_lm(model).get_submodule(family.layers)
    linears = [layer.get_submodule(family.unit_output(space)) for layer in layers]
    return [m.get_base_layer() if isinstance(m, BaseTunerLayer) else m for m in linears]


def _sum_over_ranks(sums: list[torch.Tensor], tokens: int, device) -> tuple[list[torch.Tensor], int]:
    """Every per-norm and per-unit sum and the token count, each summed over the processes of a running
    torch.distributed job in one all-reduce (float64; on the model's device for nccl); unchanged without one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums, tokens
    parts = [*sums, torch.tensor([float(tokens)], dtype=torch.float64)]
    flat = torch.cat([p.flatten() for p in parts]).to(device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flat)
    pieces = list(torch.split(flat.cpu(), [p.numel() for p in parts]))
    return pieces[:-1], round(float(pieces[-1]))


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def channel_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    family: FamilySpec | None = None,
    mlp: bool = False,
    heads: bool = False,
    all_ranks: bool = False,
) -> ChannelStatistics:
    """``score`` and ``energy`` of the module docstring, from a forward pass over ``batches``; with ``mlp``
    also ``mlp_score``: per layer, the RMS over tokens of each input channel of the MLP's output linear
    (``down_proj``: act(gate) * up), Minitron's MLP-neuron importance; with ``heads`` also ``head_score``: per
    layer and query head, the RMS over tokens and the head's ``head_dim`` entries of its block of ``o_proj``'s
    input (the head's attention output), Minitron's head importance (a KV head's is the sum over its query heads).

    Each batch needs ``input_ids`` and may have ``attention_mask`` (padding is excluded); other keys
    (``labels``, ...) are ignored. The model runs in eval mode and is put back in its previous mode.
    With ``all_ranks`` in a running torch.distributed job, the sums over tokens and the token count are
    summed over the processes before the roots and maxima: the statistics of all ranks' batches together,
    as one process given every batch would compute them (every rank must call it).
    """
    family = family or family_for_model(causal_lm(model))
    norms = residual_norms(model, family)
    hidden = causal_lm(model).config.hidden_size
    y_sums = [torch.zeros(hidden, dtype=torch.float64) for _ in norms]
    h_sums = [torch.zeros(hidden, dtype=torch.float64) for _ in norms]
    outputs = {space: unit_output_linears(model, family, space) for space, wanted in (("mlp", mlp), ("heads", heads))
               if wanted}  # fmt: skip
    u_sums = {space: [torch.zeros(m.in_features, dtype=torch.float64) for m in ms] for space, ms in outputs.items()}
    tokens = 0
    keep: list[torch.Tensor | None] = [None]

    def squares(source: torch.Tensor) -> torch.Tensor:
        rows = keep[0]
        values = source.detach().double().cpu()
        values = values[rows] if rows is not None else values.reshape(-1, values.shape[-1])
        return (values * values).sum(dim=0)

    def hook(index: int):
        def fn(_module, inputs, output):
            y_sums[index] += squares(output)
            h_sums[index] += squares(inputs[0])

        return fn

    def unit_hook(sums: list[torch.Tensor], index: int):
        def fn(_module, inputs):
            sums[index] += squares(inputs[0])

        return fn

    device = _model_device(model)
    handles = [norm.register_forward_hook(hook(i)) for i, norm in enumerate(norms)]
    for space, linears in outputs.items():
        handles += [linear.register_forward_pre_hook(unit_hook(u_sums[space], i)) for i, linear in enumerate(linears)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            input_ids = batch["input_ids"]
            attention = batch.get("attention_mask")
            if attention is None:
                attention = torch.ones_like(input_ids)
            keep[0] = attention.bool().cpu()
            tokens += int(attention.sum())
            model(input_ids=input_ids.to(device), attention_mask=attention.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if all_ranks:
        spaces = list(u_sums)
        flat, tokens = _sum_over_ranks([*y_sums, *h_sums, *(t for sp in spaces for t in u_sums[sp])], tokens, device)
        n = len(y_sums)
        y_sums, h_sums, rest = flat[:n], flat[n : 2 * n], flat[2 * n :]
        for space in spaces:
            u_sums[space], rest = rest[: len(u_sums[space])], rest[len(u_sums[space]) :]
    if tokens == 0:
        raise PATConfigError(
            "channel_statistics: the calibration batches hold no (non-padding) token; pass batches whose "
            "attention_mask marks real tokens."
        )
    score = sum(torch.sqrt(s / tokens) for s in y_sums)
    energy = torch.stack([s / tokens for s in h_sums]).max(dim=0).values
    mlp_score = torch.stack([torch.sqrt(s / tokens) for s in u_sums["mlp"]]) if mlp else None
    head_score = None
    if heads:
        count = int(causal_lm(model).config.num_attention_heads)
        head_score = torch.stack([torch.sqrt(s.view(count, -1).mean(-1) / tokens) for s in u_sums["heads"]])
    return ChannelStatistics(score=score, energy=energy, tokens=tokens, mlp_score=mlp_score, head_score=head_score)


def activation_channel_scores(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    family: FamilySpec | None = None,
) -> torch.Tensor:
    """score_j of the module docstring (float64, shape (hidden_size,))."""
    return channel_statistics(model, batches, family).score


def massive_channels(energy: torch.Tensor, ratio: float = MASSIVE_ENERGY_RATIO) -> torch.Tensor:
    """Sorted indices of channels whose residual mean square exceeds ``ratio`` x the median channel's."""
    median = energy.median().clamp(min=torch.finfo(torch.float64).tiny)
    return torch.nonzero(energy > ratio * median, as_tuple=False).flatten()


def top_channels(scores: torch.Tensor, kept: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices of the ``kept`` highest scores, ``protected`` channels first (ties by channel index)."""
    ranking = scores.double().clone()
    if protected is not None and protected.numel():
        ranking[protected] = float("inf")
    order = torch.sort(ranking, descending=True, stable=True).indices
    return order[:kept].sort().values

"""The decisions of a merge, made in one place for both merges (in memory and ``peft-pat merge``).

A merge folds the adapter into the base weights and cuts the hidden width. Before any tensor is
touched it decides: which channels are kept (a soft mask is hardened first, with a warning), the
LoRA scaling, each HSM's per-channel scale g = s ⊙ M, whether tied embeddings stay tied (the
diagonal embedding HSM moved into the final norm) and which axis of each tensor is cut.
:meth:`peft_pat.model.PATModel.merge_and_prune` and :mod:`peft_pat.disk_merge` both take these
answers from here; the tensor algebra that carries them out is :mod:`peft_pat.fold`.
"""

from __future__ import annotations

import warnings

import torch

from . import fold

# (role, parameter) -> the axis cut to the kept channels; None: the tensor keeps its shape.
PRUNED_AXIS: dict[tuple[str, str], int | None] = {
    ("embedding", "weight"): 1,
    ("producer", "weight"): 0,
    ("producer", "bias"): 0,
    ("consumer", "weight"): 1,
    ("consumer", "bias"): None,
    ("lm_head", "weight"): 1,
    ("residual_norm", "weight"): 0,
    ("branch_norm", "weight"): 0,
    ("final_norm", "weight"): 0,
}


def lora_scaling(lora_alpha: float, r: int) -> float:
    """alpha / r: the factor of the LoRA update dW = (alpha / r) B A."""
    return lora_alpha / r


def gate_scale(scale: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """g = s ⊙ M of one HSM, float32, on the scale's device."""
    return scale.float() * gate.to(scale.device, torch.float32)


def harden_for_merge(mask, where: str, stacklevel: int = 3) -> None:
    """Harden a soft mask to its exact top-N channels, with a warning (a merge needs a 0/1 mask).

    ``where`` names the mask in the warning ("PAT adapter 'default'", "The PAT mask in <folder>")."""
    if mask.hardened:
        return
    warnings.warn(
        f"{where}: the mask is still soft (step {int(mask.step)} of {int(mask.total_steps)}, before the freeze "
        "point); hardening it now to the exact top-N channels. The merged model then differs from the "
        "soft-masked model; train past the freeze point for an exact match.",
        stacklevel=stacklevel + 1,
    )
    mask.harden()


def keeps_tie(tied: bool, low_rank_embedding_hsm: bool, lm_head_has_lora: bool, embedding_gate: torch.Tensor) -> bool:
    """Whether a tied ``lm_head`` stays tied to the embedding after merging.

    It does when the embedding HSM is diagonal (E <- E diag(g) then serves both ends, and the final norm's
    gain is divided by g to undo it at the head), ``lm_head`` has no LoRA of its own (its update is not
    scaled by g) and g can be divided out without losing precision; otherwise the merge unties them."""
    return tied and not low_rank_embedding_hsm and not lm_head_has_lora and fold.can_divide_out(embedding_gate)

"""What the mask and the HSMs look like while training: snapshots of the mask, per-layer HSM norms.

* :class:`MaskHistory` records the shared mask of one adapter every time :meth:`MaskHistory.record`
  is called (``PATCallback(record_mask_every=N)`` calls it every N optimizer steps; a plain loop calls
  it itself): the effective logits w, the gate M, the top-N set that hardening would keep now, and the
  schedule (temperature tau, offset beta, hard flag) of paper Eqs. 8-10.
* :func:`hsm_norms` measures every HSM ``s ⊙ M ⊙ (I + L1 L0)`` (paper Eqs. 4-5): the Frobenius norm
  ``||L1 L0||_F`` of its low-rank part (0 at initialisation; the identity part has norm sqrt(d)) and the
  mean ``|s|`` of its per-channel scale over all channels and over the kept channels.

:mod:`peft_pat.plotting` turns both into PNGs. Nothing here needs matplotlib.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from .errors import PATConfigError, PATStateError, PATTypeError
from .layer import PATLayer
from .mask import PATMask
from .model import find_pat_tuner
from .sharding import full


def _tuner_and_adapter(model: nn.Module, adapter_name: str | None):
    tuner = find_pat_tuner(model)
    if tuner is None:
        raise PATTypeError(
            f"{type(model).__name__} has no PAT adapter; pass the model returned by get_peft_model(base, PATConfig())."
        )
    return tuner, tuner._single_adapter(adapter_name)


@dataclass(frozen=True)
class MaskSnapshot:
    """The mask of one adapter at one optimizer step (tensors are float32 / bool on the CPU, shape (d,))."""

    step: int
    logits: torch.Tensor  # effective logits w = kappa * theta
    gate: torch.Tensor  # M: soft gate, or the exact 0/1 mask once hard
    kept: torch.Tensor  # bool: the top-N channels of w, i.e. what hardening keeps (the hard mask once hard)
    temperature: float
    offset: float
    hard: bool

    @property
    def positive(self) -> int:
        """#{w >= 0}: the count the active-channel loss (Eq. 11) drives towards N."""
        return int((self.logits >= 0).sum())


@dataclass
class MaskHistory:
    """Snapshots of one adapter's mask over training (``adapter_name=None``: the single active adapter)."""

    adapter_name: str | None = None
    snapshots: list[MaskSnapshot] = field(default_factory=list)
    kept_width: int | None = None

    @torch.no_grad()
    def record(self, model: nn.Module) -> MaskSnapshot:
        """Append the current state of the mask of ``model`` (a PeftModel, PATModel, DDP- or compile-wrapped)."""
        tuner, name = _tuner_and_adapter(model, self.adapter_name)
        self.adapter_name = name
        mask: PATMask = tuner.pat_mask[name]
        self.kept_width = mask.kept_width
        logits = (full(mask.logits).float() * mask.learning_rate_ratio).cpu()  # gathered if fully_shard sharded it
        snapshot = MaskSnapshot(
            step=int(mask.step),
            logits=logits,
            gate=mask.gate().detach().float().cpu(),
            kept=mask.kept_set().cpu(),
            temperature=float(mask.tau),
            offset=float(mask.beta),
            hard=mask.hardened,
        )
        if self.snapshots and self.snapshots[-1].step == snapshot.step:
            self.snapshots[-1] = snapshot  # recording the same step twice keeps the latest state
        else:
            self.snapshots.append(snapshot)
        return snapshot

    def __len__(self) -> int:
        return len(self.snapshots)

    @property
    def steps(self) -> list[int]:
        return [s.step for s in self.snapshots]

    def stacked(self, attribute: str) -> torch.Tensor:
        """(snapshots, d) tensor of ``"logits"``, ``"gate"`` or ``"kept"``."""
        if attribute not in ("logits", "gate", "kept"):
            raise PATConfigError(f"MaskHistory.stacked: unknown attribute {attribute!r}; use logits, gate or kept.")
        if not self.snapshots:
            raise PATStateError("MaskHistory is empty: call record(model) (or train with PATCallback) first.")
        return torch.stack([getattr(s, attribute) for s in self.snapshots])

    def kept_set_changes(self) -> list[int]:
        """Channels that entered the top-N set since the previous snapshot (0 for the first)."""
        kept = [s.kept for s in self.snapshots]
        return [0] + [int((now & ~before).sum()) for before, now in pairwise(kept)]

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers, for ``torch.save``; :meth:`from_state_dict` restores it."""
        return {
            "adapter_name": self.adapter_name,
            "kept_width": self.kept_width,
            "snapshots": [vars(s).copy() for s in self.snapshots],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> MaskHistory:
        snapshots = [MaskSnapshot(**s) for s in state["snapshots"]]
        return cls(adapter_name=state["adapter_name"], snapshots=snapshots, kept_width=state["kept_width"])


@dataclass(frozen=True)
class HSMNorm:
    """Size of one HSM ``s ⊙ M ⊙ (I + L1 L0)``.

    ``branch`` is ``"embedding"`` or the producer's path inside a decoder layer (``"self_attn.o_proj"``,
    ``"mlp.down_proj"``, ...); ``layer`` is the decoder layer index (None for the embedding).
    """

    module: str
    layer: int | None
    branch: str
    lowrank_norm: float  # ||L1 L0||_F; 0.0 for a diagonal HSM (no L0/L1)
    scale_mean_abs: float  # mean |s| over all channels
    scale_mean_abs_kept: float  # mean |s| over the channels the mask keeps (top-N of w while soft)


def lowrank_frobenius_norm(down: torch.Tensor, up: torch.Tensor) -> float:
    """||L1 L0||_F from the r x r Gram matrices: ||L1 L0||_F^2 = trace((L1^T L1)(L0 L0^T)) (no d x d product)."""
    down, up = down.detach().float(), up.detach().float()
    squared = torch.sum((up.T @ up) * (down @ down.T))
    return float(squared.clamp(min=0.0).sqrt())


@torch.no_grad()
def hsm_norms(model: nn.Module, adapter_name: str | None = None) -> list[HSMNorm]:
    """One :class:`HSMNorm` per HSM of ``adapter_name`` (default: the active adapter), embedding first."""
    tuner, name = _tuner_and_adapter(model, adapter_name)
    mask: PATMask = tuner.pat_mask[name]
    kept = mask.kept_set()
    layer_pattern = re.compile(re.escape(tuner.family.layers) + r"\.(\d+)\.(.+)$")
    rows = []
    for module_name, module in tuner.model.named_modules():
        if not isinstance(module, PATLayer) or not module.has_hsm(name):
            continue
        match = layer_pattern.search(module_name)
        down, up = module.hsm_factors(name)
        scale = module.pat_hsm_scale[name].detach().float().abs()
        rows.append(
            HSMNorm(
                module=module_name,
                layer=int(match.group(1)) if match else None,
                branch=match.group(2) if match else "embedding",
                lowrank_norm=0.0 if down is None else lowrank_frobenius_norm(down, up),
                scale_mean_abs=float(scale.mean()),
                scale_mean_abs_kept=float(scale[kept.to(scale.device)].mean()),
            )
        )
    rows.sort(key=lambda row: (-1 if row.layer is None else row.layer, row.branch))
    return rows

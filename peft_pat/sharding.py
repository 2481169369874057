"""Reading and writing parameters that torch's ``fully_shard`` (FSDP2) has sharded.

``fully_shard`` replaces each parameter by a DTensor holding this rank's rows (``Shard(0)``) and swaps the
full tensor in only inside its module's forward. PAT reads some parameters outside that forward: the mask
logits (hardening, logging, calibration) and every HSM's L0 (the identity loss, summed after the model's
forward). These helpers give such reads the full tensor and route writes to the local shard; on ordinary
tensors they are the identity, so single-process, DDP and FSDP runs share one code path.

Reading a sharded tensor in full is an all-gather: every rank must make the same calls in the same order
(they do when every rank runs the same training loop).
"""

from __future__ import annotations

import torch
from torch import nn

try:  # torch >= 2.4 ships DTensor publicly; without it nothing can be sharded
    from torch.distributed.tensor import DTensor, Partial, distribute_tensor
except ImportError:  # pragma: no cover - builds without torch.distributed
    DTensor = None


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter ``fully_shard`` manages, outside its module's forward)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def sharded_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters of ``module`` that are sharded now (empty for a model nobody sharded)."""
    return [name for name, p in module.named_parameters() if is_sharded(p)]


@torch.no_grad()
def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached: all-gathered from the ranks if sharded, else ``tensor`` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def replicated(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor inside autograd: y = all-gather(shards) forward; backward hands each rank's shard the
    rank-average of the gradients of y (``Partial("avg")``, what FSDP's reduce-scatter gives every other
    gradient), so a loss each rank computes from y trains the shard as DDP would. The identity if not sharded."""
    if not is_sharded(tensor):
        return tensor
    return tensor.full_tensor(grad_placements=[Partial("avg")] * len(tensor.placements))


@torch.no_grad()
def write_(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)`` for a full ``value`` that every rank holds identically: a sharded ``param``
    takes its own rows of it (no communication)."""
    if is_sharded(param):
        value = distribute_tensor(
            value.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
    param.copy_(value)


def reshard(model: nn.Module) -> None:
    """Put every ``fully_shard`` module inside ``model`` back to its sharded parameters (after a forward that
    kept the root's unsharded, which later writes must not land in). A no-op for unsharded models."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()

"""The low-rank Hybrid Sparsification Module as one fused autograd function (paper Eqs. 4-5).

For a branch output y in R^{T x d} (T tokens), L0 in R^{r x d}, L1 in R^{d x r} and the per-channel
gate g = s ⊙ M in R^d:

    z   = y L0^T                       (T x r)
    out = (y + z L1^T) diag(g)         one GEMM with the add fused (addmm), then one in-place scale

Backward, with G = d(loss)/d(out) and u = y + z L1^T (never stored):

    Gg        = G diag(g)
    dL/dg     = sum_t G ⊙ u = sum_t G ⊙ y + rowsum(L1 ⊙ (G^T z))       (u rebuilt from y, z, L1)
    dL/dL1    = Gg^T z = diag(g) (G^T z)                                (reuses G^T z: no extra GEMM)
    dL/dz     = Gg L1
    dL/dL0    = (dL/dz)^T y
    dL/dy     = Gg + (dL/dz) L0                                         (addmm into Gg, in place)

Compared with composing the same ops in autograd this keeps only y and z for backward (autograd also
saves the T x d tensor u for the scale's gradient), runs four GEMMs instead of five and fuses both
residual adds into GEMMs. Everything runs in the activation dtype; the reduction over tokens for
dL/dg accumulates in float32. The gate is an input like any other, so it is recomputed from the
mask logits on every call and gradient checkpointing can re-run the layer.
"""

from __future__ import annotations

import torch


class _LowRankHSM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, down: torch.Tensor, up: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        shape = y.shape
        y2 = y.reshape(-1, shape[-1])
        z = y2 @ down.t()
        out = torch.addmm(y2, z, up.t()).mul_(gate)
        ctx.save_for_backward(y2, z, down, up, gate)
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        y2, z, down, up, gate = ctx.saved_tensors
        need_y, need_down, need_up, need_gate = ctx.needs_input_grad
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_y = grad_down = grad_up = grad_gate = None
        gz = grad.t() @ z if (need_up or need_gate) else None  # G^T z, (d x r)
        if need_gate:
            direct = (grad * y2).sum(0, dtype=torch.float32)
            grad_gate = (direct + (up.float() * gz.float()).sum(1)).to(gate.dtype)
        if need_up:
            grad_up = gz * gate[:, None]
        if need_y or need_down:
            grad_scaled = grad * gate
            grad_z = grad_scaled @ up
            if need_down:
                grad_down = grad_z.t() @ y2
            if need_y:
                grad_y = grad_scaled.addmm_(grad_z, down).view(grad_out.shape)
        return grad_y, grad_down, grad_up, grad_gate


def low_rank_hsm(y: torch.Tensor, down: torch.Tensor, up: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """(y + y L0^T L1^T) ⊙ g over the last dimension; ``down`` = L0 (r, d), ``up`` = L1 (d, r), ``gate`` (d,).

    All four must share y's dtype and device (the caller casts the float32 adapter weights).
    """
    return _LowRankHSM.apply(y, down, up, gate)

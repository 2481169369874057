"""Pure tensor algebra of folding and pruning (pat-method.md §5, §9.1). No modules, no training code.

Notation: d hidden width, K the kept channels (|K| = d'), D = I + L1 L0 the HSM operator (Eq. 5),
g = s ⊙ M the HSM's per-channel scale times the mask gate, c = sqrt(d'/d).

Folding (full width, exact for any gate):
    producer  W <- diag(g) D (W + dW),  b <- diag(g) D b         (HSM on the producer's output)
    embedding E <- E D^T diag(g)                                  (HSM on the embedding output)
    LoRA      W <- W + scaling * B A

Pruning a model whose residual stream is zero outside K (exact):
    producers keep rows K and are multiplied by c, the embedding keeps columns K (times c, and times
    sqrt(d/d') where the family scales embeddings by sqrt(hidden_size)), consumers keep columns K.
    RMS norms on the residual stream: gain' = gain[K] / c = gain[K] * sqrt(d/d'); norms on a branch
    output (Gemma 2/3): gain' = gain[K]; epsilons unchanged.

Why c: RMSNorm over d' channels of c*x_K equals RMSNorm over d channels of x exactly, *including*
epsilon, because c^2/d' = 1/d: (c x_K) / sqrt(c^2 |x_K|^2 / d' + eps) = c x / sqrt(|x|^2 / d + eps).
This is the paper's "gain * sqrt(d/d'), eps * d/d'" with the epsilon change moved into the weights,
which keeps ``config.rms_norm_eps`` untouched; Qwen3 and Gemma 3 share that epsilon with their
per-head q/k norms, which hidden pruning must not change. All folds run in float32.
"""

from __future__ import annotations

import math

import torch


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float()


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """dW = scaling * B A, shape (out, in), float32."""
    return scaling * (_f32(lora_b) @ _f32(lora_a))


def apply_hsm_to_rows(
    matrix: torch.Tensor,
    down: torch.Tensor | None,
    up: torch.Tensor | None,
    row_scale: torch.Tensor,
) -> torch.Tensor:
    """diag(row_scale) (I + up @ down) matrix, for ``matrix`` of shape (d, n); float32.

    ``down`` is L0 (r, d), ``up`` is L1 (d, r); both None for a diagonal HSM. The product is formed
    in low-rank form, never as a d x d matrix.
    """
    m = _f32(matrix)
    if down is not None:
        m = m + _f32(up) @ (_f32(down) @ m)
    return _f32(row_scale)[:, None] * m


def fold_producer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor | None,
    down: torch.Tensor | None,
    up: torch.Tensor | None,
    gate_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W', b') = (diag(g) D (W + dW), diag(g) D b) for a producer linear; float32."""
    w = _f32(weight)
    if delta is not None:
        w = w + delta.float()
    new_w = apply_hsm_to_rows(w, down, up, gate_scale)
    new_b = None if bias is None else apply_hsm_to_rows(bias[:, None], down, up, gate_scale)[:, 0]
    return new_w, new_b


def fold_embedding(
    embedding: torch.Tensor, down: torch.Tensor | None, up: torch.Tensor | None, gate_scale: torch.Tensor
) -> torch.Tensor:
    """E' = E D^T diag(g), shape (vocab, d); float32. Done in row chunks to bound peak memory."""
    out = torch.empty(embedding.shape, dtype=torch.float32, device=embedding.device)
    chunk = max(1, (1 << 26) // max(1, embedding.shape[1] * 4))
    for start in range(0, embedding.shape[0], chunk):
        rows = _f32(embedding[start : start + chunk])
        out[start : start + chunk] = apply_hsm_to_rows(rows.T, down, up, gate_scale).T
    return out


def width_factor(hidden_size: int, kept: int) -> float:
    """c = sqrt(d'/d): the factor the pruned residual stream carries (module docstring)."""
    return math.sqrt(kept / hidden_size)


def prune_rows(weight: torch.Tensor, keep: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """factor * W[K, :] in the input's dtype (producers, biases)."""
    return (_f32(weight.index_select(0, keep)) * factor).to(weight.dtype)


def prune_columns(weight: torch.Tensor, keep: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """factor * W[:, K] in the input's dtype (consumers; the embedding with ``factor`` = c or 1)."""
    sliced = weight.index_select(1, keep)
    return sliced if factor == 1.0 else (_f32(sliced) * factor).to(weight.dtype)


def rescale_norm_gain(weight: torch.Tensor, keep: torch.Tensor, offset: float, factor: float) -> torch.Tensor:
    """Gain of a norm computing x/rms * (offset + w): (offset + w[K]) * factor - offset."""
    kept = _f32(weight.index_select(0, keep))
    return ((offset + kept) * factor - offset).to(weight.dtype)


def divide_norm_gain(weight: torch.Tensor, divisor: torch.Tensor, offset: float) -> torch.Tensor:
    """Gain with (offset + w) / divisor where divisor != 0 (unchanged where it is 0); full width."""
    w = _f32(weight)
    div = _f32(divisor)
    scaled = (offset + w) / torch.where(div == 0, torch.ones_like(div), div) - offset
    return torch.where(div == 0, w, scaled).to(weight.dtype)

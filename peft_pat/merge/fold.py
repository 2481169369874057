"""Pure tensor algebra of folding and pruning (docs/method.md §5). No modules, no I/O, no training code.

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

Memory: no function here forms a full float32 copy of a weight. Folds run on column (or row) chunks of
about ``CHUNK_BYTES`` and write straight into the output dtype: in place (``out=weight``), or keeping
only the channels K (``keep=``), so merging a weight needs a few chunk-sized temporaries
beyond its input and output. Elementwise steps give bit-identical results however they are chunked.
Each role has one fold; ``keep`` (the kept channels K, or None for a full-width fold) decides whether it
also cuts, and :mod:`peft_pat.merge.plan` decides which fold and which K each tensor gets.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

CHUNK_BYTES = 1 << 24  # float32 bytes per chunk of a fold (16 MiB)
TIED_FOLD_MIN_RATIO = 1e-4  # smallest |g| / max |g| that may be divided out of a norm gain (tied embeddings)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float()


def _chunks(total: int, other: int) -> Iterator[slice]:
    """Slices of ``total`` rows (or columns) so that one float32 chunk of ``other`` wide is ~CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // max(1, 4 * other))
    for start in range(0, total, step):
        yield slice(start, min(start + step, total))


def row_chunks(rows: int, cols: int) -> list[slice]:
    """Row chunks of the row-wise folds (embedding, LoRA merges) of a (rows, cols) weight. Feeding such a
    fold one of these chunks at a time gives the same bits as folding the whole weight."""
    return list(_chunks(rows, cols))


@dataclass(frozen=True)
class LoRAUpdate:
    """dW = scaling * B A with A (r, in) and B (out, r); formed a chunk at a time, never whole."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float

    def columns(self, cols: slice) -> torch.Tensor:
        """dW[:, cols], float32."""
        return self.scaling * (_f32(self.lora_b) @ _f32(self.lora_a[:, cols]))

    def rows(self, rows: slice) -> torch.Tensor:
        """dW[rows, :], float32."""
        return self.scaling * (_f32(self.lora_b[rows]) @ _f32(self.lora_a))

    def restricted(self, rows: slice) -> LoRAUpdate:
        """The update of the output rows ``rows`` only (for a weight processed a block of rows at a time)."""
        return LoRAUpdate(self.lora_a, self.lora_b[rows], self.scaling)


Delta = torch.Tensor | LoRAUpdate  # dW given whole (tests, small layers) or as LoRA factors


def _delta_columns(delta: Delta, cols: slice) -> torch.Tensor:
    return delta.columns(cols) if isinstance(delta, LoRAUpdate) else _f32(delta[:, cols])


def _delta_rows(delta: Delta, rows: slice) -> torch.Tensor:
    return delta.rows(rows) if isinstance(delta, LoRAUpdate) else _f32(delta[rows])


def _output(like: torch.Tensor, shape, dtype: torch.dtype | None, out: torch.Tensor | None) -> torch.Tensor:
    """``out`` (e.g. the weight itself, for an in-place fold) or a new tensor of ``shape`` and ``dtype``."""
    if out is not None:
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
        return out
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _select(chunk: torch.Tensor, dim: int, keep: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """factor * chunk.to(dtype) restricted to ``keep`` along ``dim``: the same bits as folding into ``dtype`` first
    and then calling :func:`prune_rows` / :func:`prune_columns` on the whole weight."""
    kept = chunk.to(dtype).index_select(dim, keep.to(chunk.device))
    return kept if factor == 1.0 else (_f32(kept) * factor).to(dtype)


# Every fold below is a loop over chunks computed in float32. With ``keep`` None a fold writes the chunks
# at full width (into ``out`` when given: ``out=weight`` folds in place, each chunk is read whole before it
# is written); with ``keep`` it keeps only the channels K of each chunk (times ``factor``), so the
# full-width result is never held. One loop serves both, so a fold-then-cut and a cut fold give the same bits.


def _write(result: torch.Tensor, index, chunk: torch.Tensor, dim: int, keep, factor: float) -> None:
    """result[index] = the chunk, cast to the result's dtype, restricted to K along ``dim`` when cutting."""
    result[index] = chunk if keep is None else _select(chunk, dim, keep, factor, result.dtype)


def _cut_shape(shape, dim: int, keep: torch.Tensor | None) -> tuple[int, ...]:
    shape = list(shape)
    if keep is not None:
        shape[dim] = keep.numel()
    return tuple(shape)


def _lora_chunks(weight: torch.Tensor, delta: Delta) -> Iterator[tuple[slice, torch.Tensor]]:
    for rows in _chunks(weight.shape[0], weight.shape[1]):
        yield rows, _f32(weight[rows]) + _delta_rows(delta, rows).to(weight.device)


def merge_lora(
    weight: torch.Tensor,
    delta: Delta,
    keep: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(W + dW)[:, K] (all columns for ``keep`` None) in ``dtype`` (default: the weight's), float32 math in
    row chunks (consumers, an untied ``lm_head``, any other LoRA target)."""
    result = _output(weight, _cut_shape(weight.shape, 1, keep), dtype, out)
    for rows, chunk in _lora_chunks(weight, delta):
        _write(result, rows, chunk, 1, keep, 1.0)
    return result


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


def fold_bias(
    bias: torch.Tensor, down: torch.Tensor | None, up: torch.Tensor | None, gate_scale: torch.Tensor
) -> torch.Tensor:
    """b' = diag(g) D b for a producer's bias; float32."""
    return apply_hsm_to_rows(bias[:, None], down, up, gate_scale)[:, 0]


def _producer_chunks(weight, delta, down, up, gate_scale) -> Iterator[tuple[slice, torch.Tensor]]:
    """Column chunks of diag(g) D (W + dW): each column of W folds independently."""
    for cols in _chunks(weight.shape[1], weight.shape[0]):
        w = _f32(weight[:, cols])
        if delta is not None:
            w = w + _delta_columns(delta, cols).to(w.device)
        yield cols, apply_hsm_to_rows(w, down, up, gate_scale)


def fold_producer(
    weight: torch.Tensor,
    delta: Delta | None,
    down: torch.Tensor | None,
    up: torch.Tensor | None,
    gate_scale: torch.Tensor,
    keep: torch.Tensor | None = None,
    factor: float = 1.0,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """W' = factor * (diag(g) D (W + dW))[K, :] for a producer linear (all rows and no factor for ``keep``
    None), in ``dtype`` (default: the weight's) or into ``out``. ``delta`` is dW as a tensor or a
    :class:`LoRAUpdate`."""
    result = _output(weight, _cut_shape(weight.shape, 0, keep), dtype, out)
    for cols, chunk in _producer_chunks(weight, delta, down, up, gate_scale):
        _write(result, (slice(None), cols), chunk, 0, keep, factor)
    return result


def fold_embedding(
    embedding: torch.Tensor,
    down: torch.Tensor | None,
    up: torch.Tensor | None,
    gate_scale: torch.Tensor,
    keep: torch.Tensor | None = None,
    factor: float = 1.0,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """E' = factor * (E D^T diag(g))[:, K], shape (vocab, |K|) (all columns, no factor for ``keep`` None), in
    ``dtype`` (default: the embedding's) or into ``out``. Each token's row folds independently, so E may be
    given a block of rows at a time."""
    result = _output(embedding, _cut_shape(embedding.shape, 1, keep), dtype, out)
    for rows in _chunks(embedding.shape[0], embedding.shape[1]):
        chunk = apply_hsm_to_rows(_f32(embedding[rows]).T, down, up, gate_scale).T
        _write(result, rows, chunk, 1, keep, factor)
    return result


def scale_columns(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W diag(scale) in the weight's dtype, float32 math in row chunks (a gate on a linear's input units)."""
    result = torch.empty_like(weight)
    s = _f32(scale).to(weight.device)
    for rows in _chunks(weight.shape[0], weight.shape[1]):
        result[rows] = _f32(weight[rows]) * s
    return result


def can_divide_out(gate_scale: torch.Tensor) -> bool:
    """Whether a diagonal embedding HSM g may be moved into the final norm as gain / g (tied embeddings).

    Channels with g = 0 are pruned anyway; the kept ones must not be tiny next to the largest, or
    dividing by them loses precision (then the embeddings are untied instead).
    """
    live = gate_scale.detach()[gate_scale.detach() != 0].abs()  # read only: no autograd warning on a parameter
    return not (live.numel() and float(live.min()) < TIED_FOLD_MIN_RATIO * float(live.max()))


def width_factor(hidden_size: int, kept: int) -> float:
    """c = sqrt(d'/d): the factor the pruned residual stream carries (module docstring)."""
    return math.sqrt(kept / hidden_size)


def embedding_scales(hidden_size: int, kept: int, dtype: torch.dtype) -> tuple[float, float]:
    """(sqrt(d), sqrt(d')) as a model computing in ``dtype`` multiplies by them: transformers casts the
    embedding scale to the weight dtype, so in bfloat16 sqrt(48) is 6.9375, not 6.9282."""
    return (float(torch.tensor(math.sqrt(hidden_size)).to(dtype)), float(torch.tensor(math.sqrt(kept)).to(dtype)))


def pruning_factors(
    hidden_size: int,
    kept: int,
    scales_embedding: bool,
    tied: bool,
    embedding_scales: tuple[float, float] | None = None,
) -> dict[str, float]:
    """The scalar factors of a width cut (module docstring), by the role of the tensor they apply to.

    ``scales_embedding``: the family multiplies embeddings by sqrt(hidden_size) (Gemma). ``tied``: the
    pruned model keeps ``lm_head`` tied to the embedding, so the final norm undoes the embedding factor.
    ``embedding_scales``: (scale the model multiplies by now, scale it will multiply by after the cut),
    default (sqrt(d), sqrt(d')); pass the values actually used when they were rounded (a bfloat16 buffer).
    """
    c = width_factor(hidden_size, kept)
    before, after = embedding_scales or (math.sqrt(hidden_size), math.sqrt(kept))
    embedding = c * (before / after if scales_embedding else 1.0)
    return {
        "producer": c,
        "embedding": embedding,
        "residual_norm": 1.0 / c,
        "branch_norm": 1.0,
        "final_norm": 1.0 / (c * (embedding if tied else 1.0)),
    }


def _scale_in_place(t: torch.Tensor, factor: float) -> torch.Tensor:
    """t <- factor * t in float32 math, row chunks (elementwise: same bits as one pass)."""
    if factor != 1.0:
        flat = t.view(t.shape[0], -1)
        for rows in _chunks(flat.shape[0], flat.shape[1]):
            flat[rows] = _f32(flat[rows]) * factor
    return t


def prune_rows(weight: torch.Tensor, keep: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """factor * W[K, :] in the input's dtype (producers, biases)."""
    return _scale_in_place(weight.detach().index_select(0, keep.to(weight.device)), factor)


def prune_columns(weight: torch.Tensor, keep: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """factor * W[:, K] in the input's dtype (consumers; the embedding with ``factor`` = c or 1)."""
    return _scale_in_place(weight.detach().index_select(1, keep.to(weight.device)), factor)


def rescale_norm_gain(weight: torch.Tensor, keep: torch.Tensor, offset: float, factor: float) -> torch.Tensor:
    """Gain of a norm computing x/rms * (offset + w): (offset + w[K]) * factor - offset."""
    kept = _f32(weight.index_select(0, keep.to(weight.device)))
    return ((offset + kept) * factor - offset).to(weight.dtype)


def divide_norm_gain(weight: torch.Tensor, divisor: torch.Tensor, offset: float) -> torch.Tensor:
    """Gain with (offset + w) / divisor where divisor != 0 (unchanged where it is 0); full width."""
    w = _f32(weight)
    div = _f32(divisor)
    scaled = (offset + w) / torch.where(div == 0, torch.ones_like(div), div) - offset
    return torch.where(div == 0, w, scaled).to(weight.dtype)

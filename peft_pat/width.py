"""Choosing the kept hidden width N (docs/method.md §6): :func:`kept_width_for` decides it once per injection.

transformers refuses to save a config whose ``hidden_size`` is not a multiple of
``num_attention_heads``, and GPU tensor-core kernels prefer widths that are multiples of 64/128. N is
therefore a multiple of ``lcm(num_attention_heads, m)``: with ``width_multiple=None`` the largest
``m`` in (128, 64, ..., 1) whose rounding stays within ``AUTO_TOLERANCE`` of the requested width.

Measured (docs/performance.md, ``benchmarks/inference.py --width-sweep``): on CPU (oneDNN/MKL, float32
and bfloat16) the linears of a Llama-2-7B layer cost the same per FLOP at odd widths and at multiples
of 8, 32, 64 and 128 (within 1%), so this preference costs nothing there; its benefit is the GPU one,
which the same script measures with ``--device cuda``.
"""

from __future__ import annotations

import math

from .config import DEFAULT_TARGET_SPARSITY
from .errors import AdapterMismatchError, PATConfigError

AUTO_MULTIPLES = (128, 64, 32, 16, 8, 4, 2, 1)
AUTO_TOLERANCE = 1 / 32  # largest |N - (1 - p) d| accepted for a kernel-friendly multiple, as a fraction of d


def _round_to(target: float, quantum: int) -> int:
    return round(target / quantum) * quantum


def resolve_kept_width(
    hidden_size: int,
    num_attention_heads: int,
    target_sparsity: float | None,
    target_width: int | None,
    width_multiple: int | None = None,
) -> int:
    """Kept width N for a model of width ``hidden_size`` (exactly one of sparsity / width given)."""
    d, heads = int(hidden_size), int(num_attention_heads)
    if target_width is not None:
        if not 0 < target_width < d:
            raise PATConfigError(
                f"target_width={target_width} cannot be reached: it must lie strictly between 0 and the "
                f"model's hidden_size={d}."
            )
        quantum = heads if width_multiple is None else math.lcm(heads, width_multiple)
        if target_width % quantum:
            below, above = (target_width // quantum) * quantum, (target_width // quantum + 1) * quantum
            options = [w for w in (below, above) if 0 < w < d]
            raise PATConfigError(
                f"target_width={target_width} is not a multiple of {quantum} (lcm of num_attention_heads={heads}"
                f"{'' if width_multiple is None else f' and width_multiple={width_multiple}'}); transformers "
                f"needs hidden_size % num_attention_heads == 0. Use one of {options}."
            )
        return target_width

    sparsity = DEFAULT_TARGET_SPARSITY if target_sparsity is None else float(target_sparsity)
    target = (1.0 - sparsity) * d
    multiples = AUTO_MULTIPLES if width_multiple is None else (width_multiple,)
    for m in multiples:
        quantum = math.lcm(heads, m)
        width = _round_to(target, quantum)
        if not 0 < width < d:
            continue
        last = m == multiples[-1]  # the plain head-count quantum is always acceptable
        if last or abs(width - target) <= AUTO_TOLERANCE * d:
            return width
    quantum = math.lcm(heads, width_multiple or 1)
    raise PATConfigError(
        f"target_sparsity={sparsity} cannot be reached on hidden_size={d}: the kept width must be a multiple of "
        f"{quantum} (num_attention_heads={heads}"
        f"{'' if width_multiple is None else f', width_multiple={width_multiple}'}) strictly between 0 and {d}, "
        f"and the nearest is {_round_to(target, quantum)}. Choose a sparsity between {quantum / d:.3f} and "
        f"{1 - quantum / d:.3f}{' or a smaller width_multiple' if width_multiple else ''}."
    )


def kept_width_problem(kept: int, hidden_size: int, num_attention_heads: int) -> str | None:
    """Why a stock config cannot hold ``kept`` hidden channels (None if it can): 0 < N < d, and N a multiple of
    the head count (transformers needs hidden_size % num_attention_heads == 0). The one rule for a kept width."""
    if not 0 < kept < hidden_size:
        return f"cannot keep {kept} of {hidden_size} hidden channels; keep between 1 and {hidden_size - 1}."
    if kept % num_attention_heads:
        return (
            f"keeping {kept} channels is not a multiple of num_attention_heads={num_attention_heads}; transformers "
            "requires hidden_size % num_attention_heads == 0."
        )
    return None


def check_kept_channels(keep, hidden_size: int, num_attention_heads: int) -> str | None:
    """Why the sorted channel indices ``keep`` cannot be a kept set (None if they can): a valid width
    (:func:`kept_width_problem`), distinct indices in [0, d)."""
    problem = kept_width_problem(int(keep.numel()), hidden_size, num_attention_heads)
    if problem:
        return problem
    if keep.unique().numel() != keep.numel() or int(keep[0]) < 0 or int(keep[-1]) >= hidden_size:
        return f"kept channel indices must be distinct and in [0, {hidden_size})."
    return None


def kept_width_for(config, hidden_size: int, num_attention_heads: int) -> int:
    """The kept width N of a ``PATConfig`` on a base of ``hidden_size`` / ``num_attention_heads``: resolved from
    ``target_width`` or ``target_sparsity``, or, for an adapter that recorded ``kept_width``, that value checked
    against the base and against what the config resolves to. The one place the width is decided."""
    d, heads = int(hidden_size), int(num_attention_heads)
    resolve = (config.target_sparsity, config.target_width, config.width_multiple)
    if config.kept_width is None:
        return resolve_kept_width(d, heads, *resolve)
    kept = config.kept_width
    if kept_width_problem(kept, d, heads):
        raise AdapterMismatchError(
            f"kept_width={kept} recorded in the adapter does not fit this base model "
            f"(hidden_size={d}, num_attention_heads={heads}): it must lie strictly between 0 and hidden_size "
            "and be a multiple of the head count. Load the adapter onto the base it was trained from, or remove "
            "kept_width from adapter_config.json so it is recomputed from target_sparsity / target_width."
        )
    resolved = resolve_kept_width(d, heads, *resolve)  # target_width == kept_width is checked by PATConfig
    if resolved != kept:
        raise PATConfigError(
            f"kept_width={kept} contradicts target_sparsity={config.target_sparsity} "
            f"on hidden_size={d}, which gives {resolved}. kept_width is filled in automatically; to "
            f"choose the width yourself give target_width={kept} instead of target_sparsity."
        )
    return kept

"""PNG plots of a PAT run: the mask's evolution, per-layer HSM norms and the training curves.

Every function returns a matplotlib ``Figure`` (shown inline in a notebook) and, given ``path``,
writes it as a PNG. matplotlib is imported only when a plot is drawn (``pip install matplotlib``);
pyplot is never used, so nothing here touches the global backend. The numbers come from
:mod:`peft_pat.diagnostics` and from the Trainer's ``state.log_history`` (where
:class:`~peft_pat.training.callback.PATCallback` puts the ``pat/*`` entries).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .diagnostics import HSMNorm, MaskHistory, hsm_norms
from .errors import PATStateError, PATTypeError

DPI = 120
LOSS_KEYS = (
    ("loss", "total loss (Trainer)"),
    ("pat/task_loss", "task loss"),
    ("pat/active_loss", "active-channel loss (Eq. 11)"),
    ("pat/polarization_loss", "polarisation loss"),
    ("pat/identity_loss", "identity loss"),
)


def _new_figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "peft_pat.plotting needs matplotlib: pip install matplotlib (or pip install 'peft-pat[examples]')."
        ) from error
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _finish(figure, path: str | Path | None):
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=DPI)
    return figure


def _freeze_step(history: MaskHistory) -> int | None:
    return next((s.step for s in history.snapshots if s.hard), None)


def plot_mask_evolution(history: MaskHistory, path: str | Path | None = None, max_channels: int = 1024):
    """Four panels: the logits w of every channel over the steps (channels sorted by their final w, kept
    ones on top), #{w >= 0} against the target N, how many channels entered the top-N set since the last
    snapshot, and the schedule (temperature tau, offset beta; Eqs. 9-10). A dashed line marks the freeze.

    ``max_channels``: wider masks are shown through an evenly spaced subset of the sorted channels.
    """
    if not isinstance(history, MaskHistory):
        raise PATTypeError(f"plot_mask_evolution needs a MaskHistory, got {type(history).__name__}.")
    if len(history) < 2:
        raise PATStateError(
            f"plot_mask_evolution needs at least 2 snapshots, the history has {len(history)}: train with "
            "PATCallback(record_mask_every=N) for more than N steps, or call history.record(model) in your loop."
        )
    steps = history.steps
    logits = history.stacked("logits")  # (snapshots, d)
    d, n = logits.shape[1], history.kept_width
    order = torch.argsort(logits[-1], descending=True, stable=True)
    shown = order[torch.linspace(0, d - 1, min(d, max_channels)).round().long()]
    limit = max(float(logits.abs().quantile(0.99)), 1e-6)
    freeze = _freeze_step(history)

    figure = _new_figure(12, 6.5)
    grid = figure.add_gridspec(3, 2, width_ratios=(1.35, 1))
    heat = figure.add_subplot(grid[:, 0])
    image = heat.imshow(
        logits[:, shown].T.numpy(),
        aspect="auto",
        cmap="RdBu",
        vmin=-limit,
        vmax=limit,
        interpolation="nearest",
        extent=(steps[0], steps[-1], len(shown), 0),
    )
    heat.axhline(len(shown) * n / d, color="black", linewidth=1.2, linestyle="--")
    heat.text(steps[0], len(shown) * n / d, f" kept above (N = {n} of {d})", va="bottom", fontsize=9)
    heat.set(
        xlabel="optimizer step",
        ylabel="hidden channel (sorted by final logit)",
        title="mask logits w per channel",
    )
    figure.colorbar(image, ax=heat, label="w (blue: kept side, red: pruned side)", shrink=0.8)

    positive = [s.positive for s in history.snapshots]
    count = figure.add_subplot(grid[0, 1])
    count.plot(steps, positive, marker="o", markersize=3, label="#{w >= 0}")
    count.axhline(n, color="black", linestyle=":", label=f"target N = {n}")
    count.set(ylabel="channels", title="channels on the kept side")
    count.legend(fontsize=8, loc="best")

    churn = figure.add_subplot(grid[1, 1], sharex=count)
    churn.bar(steps, history.kept_set_changes(), width=max(1.0, (steps[-1] - steps[0]) / (3 * len(steps))))
    churn.set(ylabel="channels", title="channels entering the top-N set since the previous snapshot")

    schedule = figure.add_subplot(grid[2, 1], sharex=count)
    schedule.plot(steps, [s.offset for s in history.snapshots], color="tab:orange", label="offset beta")
    schedule.set(xlabel="optimizer step", ylabel="beta", title="schedule")
    temperature = schedule.twinx()
    temperature.plot(steps, [s.temperature for s in history.snapshots], color="tab:purple", label="temperature tau")
    temperature.set_yscale("log")
    temperature.set_ylabel("tau (log)")
    lines = schedule.get_lines() + temperature.get_lines()
    schedule.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    if freeze is not None:
        for axis in (heat, count, churn, schedule):
            axis.axvline(freeze, color="gray", linestyle="--", linewidth=1)
        count.text(freeze, n, " freeze", color="gray", fontsize=8, va="bottom")
    return _finish(figure, path)


def plot_hsm_norms(
    model_or_norms: nn.Module | Sequence[HSMNorm], path: str | Path | None = None, adapter_name: str | None = None
):
    """Per decoder layer: ``||L1 L0||_F`` of each HSM and the mean ``|s|`` over the kept channels, one line
    per producer (attention ``o_proj``, MLP ``down_proj``, ...); the embedding's HSM is a separate marker
    at layer -1."""
    norms = hsm_norms(model_or_norms, adapter_name) if isinstance(model_or_norms, nn.Module) else model_or_norms
    norms = list(norms)
    if not norms:
        raise PATStateError("plot_hsm_norms: there are no HSMs to plot.")
    figure = _new_figure(11, 4)
    lowrank, scale = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    branches = sorted({row.branch for row in norms if row.layer is not None})
    for branch in branches:
        rows = [row for row in norms if row.branch == branch]
        layers = [row.layer for row in rows]
        lowrank.plot(layers, [row.lowrank_norm for row in rows], marker="o", markersize=3, label=branch)
        scale.plot(layers, [row.scale_mean_abs_kept for row in rows], marker="o", markersize=3, label=branch)
    for row in (row for row in norms if row.layer is None):
        lowrank.scatter([-1], [row.lowrank_norm], marker="s", color="black", label="embedding", zorder=3)
        scale.scatter([-1], [row.scale_mean_abs_kept], marker="s", color="black", label="embedding", zorder=3)
    lowrank.set(xlabel="decoder layer (-1: embedding)", ylabel="||L1 L0||_F", title="low-rank part of each HSM")
    scale.set(xlabel="decoder layer (-1: embedding)", ylabel="mean |s|", title="per-channel scale s (kept channels)")
    scale.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    for axis in (lowrank, scale):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    return _finish(figure, path)


def plot_training_curves(log_history: Sequence[dict[str, Any]], path: str | Path | None = None):
    """Losses (total, task and each auxiliary loss, log scale) and the kept-side channel count over the
    steps, from ``trainer.state.log_history`` (or any list of dicts with ``step`` and ``pat/*`` keys)."""
    entries = [entry for entry in log_history if "step" in entry and any(k in entry for k, _ in LOSS_KEYS)]
    if not entries:
        raise PATStateError(
            "plot_training_curves: no training log entries with losses; pass trainer.state.log_history after "
            "training with logging_steps set and PATCallback in the callbacks."
        )
    figure = _new_figure(11, 4)
    losses, channels = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for key, label in LOSS_KEYS:
        points = [(e["step"], e[key]) for e in entries if key in e and e[key] > 0]
        if points:
            losses.plot(*zip(*points), marker="o", markersize=2, label=label)
    losses.set(xlabel="optimizer step", ylabel="loss", yscale="log", title="losses")
    losses.legend(fontsize=8)
    points = [(e["step"], e["pat/kept_channels"]) for e in entries if "pat/kept_channels" in e]
    if points:
        channels.plot(*zip(*points), marker="o", markersize=2, label="kept channels (#{w >= 0}, then hard N)")
    gate = [(e["step"], e["pat/gate_mean"]) for e in entries if "pat/gate_mean" in e]
    if gate:
        twin = channels.twinx()
        twin.plot(*zip(*gate), color="tab:green", marker="o", markersize=2, label="mean gate M")
        twin.set_ylabel("mean gate M")
        lines = channels.get_lines() + twin.get_lines()
        channels.legend(lines, [line.get_label() for line in lines], fontsize=8)
    channels.set(xlabel="optimizer step", ylabel="channels", title="mask")
    for axis in (losses, channels):
        axis.grid(alpha=0.3)
    return _finish(figure, path)

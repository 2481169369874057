"""The Unified Sparsification Mask shared by every HSM of one adapter (paper §3, Eqs. 8-11).

One logit vector w in R^d per adapter. Before the freeze step the gate is soft,

    M = sigmoid(tau(s) * w) + beta(s),   tau(s) = 1 / (1 - ln s / ln s0),   beta(s) = max(0.5 - s / s0, 0)

(Eqs. 8-10, s = optimizer step, s0 = milestone step). At the freeze step the gate becomes the exact
top-N indicator of w and stays fixed (docs/method.md §8), so the rest of training runs on the
network that ships. With ``fade_to_hard`` (the default through PATConfig) and a calibrated start, the
soft gate is interpolated towards the calibrated kept set T, M <- (1 - f) M + f T with f = s / freeze
step, so the channels that go fade out linearly, the freeze changes nothing, and the mask hardens to T.
The schedule state (step, total steps, hard mask, T) lives in buffers and is saved with the adapter,
so a resumed run continues exactly where it stopped.

The mask's own learning rate is a reparametrisation: the stored parameter is theta, the logits are
w = kappa * theta, and the backward pass hands theta the gradient of w unchanged. An Adam-type
optimizer with learning rate lr then moves w like Adam with learning rate kappa * lr, while gradient
clipping sees the true gradient of w. No param groups, so resuming a Trainer checkpoint and DDP/FSDP
work unchanged. kappa = mask_lr / lr is set by :meth:`PATMask.configure_learning_rate` (the callback
passes the Trainer's learning rate); the automatic mask_lr = 2 / s0 lets the logits travel to the
polarisation targets +-0.5 in the first half of the soft phase, so the gate is nearly binary when it
freezes, whatever the run length. The same backward zeroes non-finite gradients, so a NaN loss
cannot turn the logits into NaN; every use of the logits that carries a gradient (the soft gate,
the auxiliary losses, and the zero that keeps a hard mask's logits in the graph) goes through it.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .axes import TARGET_FIELDS, axis_shapes
from .errors import AdapterMismatchError, PATConfigError, PATStateError, PATTypeError
from .sharding import full, replicated, write_

MASK_TRAVEL = 2.0  # automatic mask_lr = MASK_TRAVEL / s0 (logit units per soft phase)
HARD_TEMPERATURE = 1e4  # temperature after the milestone if the freeze is configured later than it
POLAR_TARGET = 0.5  # the polarisation loss pulls logits to +-0.5; hardening writes these values


class _ScaledLogits(torch.autograd.Function):
    """w = kappa * theta with d(loss)/d(theta) := d(loss)/d(w), non-finite entries zeroed and counted."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, kappa: float, bad_grad_counter: torch.Tensor) -> torch.Tensor:
        ctx.counter = bad_grad_counter
        return theta * kappa

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        finite = torch.isfinite(grad)
        ctx.counter.add_((~finite).any().to(ctx.counter.dtype))
        return torch.where(finite, grad, torch.zeros_like(grad)), None, None


PAPER_MILESTONE = 1 / 3  # the paper's s0, as a fraction of the run
FREEZE_PER_MILESTONE = 0.8  # the paper's freeze step, 0.8 s0
PAPER_SCHEDULE_SPARSITY = 0.5  # the pruned fraction at which the default schedule is the paper's


def default_schedule(pruned_fraction: float) -> tuple[float, float]:
    """(mask_milestone, mask_freeze) for a cut of ``pruned_fraction`` = (d - N) / d of the hidden channels.

    The soft phase lasts in proportion to how many channels it removes, so they fade at the same rate
    per step at every width: the paper's s0 = 1/3 and freeze 0.8 s0 at 50%, half of that at 25%
    (fade over 10 of 72 steps). On SmolLM2 a shorter fade won at 25% and lost at 50%
    (docs/quality.md, Levers).
    """
    milestone = PAPER_MILESTONE * pruned_fraction / PAPER_SCHEDULE_SPARSITY
    return milestone, FREEZE_PER_MILESTONE * milestone


def resolve_schedule(milestone: float | None, freeze: float | None, pruned_fraction: float) -> tuple[float, float]:
    """PATConfig's (mask_milestone, mask_freeze) with None filled in: from the other one (freeze = 0.8 s0,
    the paper's ratio) when one is given, from :func:`default_schedule` when neither is."""
    if milestone is None and freeze is None:
        return default_schedule(pruned_fraction)
    if milestone is None:
        milestone = min(freeze / FREEZE_PER_MILESTONE, 1.0)
    if freeze is None:
        freeze = FREEZE_PER_MILESTONE * milestone
    return milestone, freeze


def milestone_step(total_steps: int, fraction: float) -> int:
    """s0 in Eqs. 8-9: ``fraction`` of the run, at least 2 so that ln s0 > 0."""
    return max(2, round(fraction * total_steps))


def freeze_step(total_steps: int, fraction: float) -> int:
    return max(1, round(fraction * total_steps))


def temperature(step: int, s0: int) -> float:
    """tau(s) = 1 / (1 - ln max(s, 1) / ln s0) for s < s0 (Eq. 9)."""
    if step >= s0:
        return HARD_TEMPERATURE
    return 1.0 / (1.0 - math.log(max(step, 1)) / math.log(s0))


def offset(step: int, s0: int) -> float:
    """beta(s) = max(0.5 - s / s0, 0) (Eq. 10)."""
    return max(0.5 - step / s0, 0.0)


def top_n_indicator(logits: torch.Tensor, n: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """0/1 float tensor marking the ``n`` largest logits of each row (the last dimension), ``protected``
    units (bool) first; ties go to the lower unit index."""
    ranking = logits.detach().float()
    if protected is not None:
        ranking = torch.where(protected.to(ranking.device), torch.inf, ranking)
    order = torch.sort(ranking, dim=-1, descending=True, stable=True).indices
    indicator = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    return indicator.scatter_(-1, order[..., :n], 1.0)


def _schedule_kwargs(config, random_init: bool) -> dict:
    return {
        "milestone": config.mask_milestone,
        "freeze": config.mask_freeze,
        "mask_lr": config.mask_lr,
        "random_init": random_init,
        "fade_to_hard": getattr(config, "mask_fade_to_hard", False),
    }


def _width_setting(config) -> str | None:
    """'target_sparsity=0.5' or 'target_width=32': the PATConfig field the kept width N was resolved from."""
    for name in ("target_width", "target_sparsity"):
        value = getattr(config, name, None)
        if value is not None:
            return f"{name}={value}"
    return "the default target_sparsity" if hasattr(config, "target_sparsity") else None


class PATMask(nn.Module):
    """Mask logits and schedule of one adapter; every HSM of that adapter reads :meth:`gate`."""

    def __init__(
        self,
        hidden_size: int,
        kept_width: int,
        *,
        groups: int | tuple[int, ...] | None = None,
        milestone: float,
        freeze: float,
        mask_lr: float | None = None,
        random_init: bool = False,
        fade_to_hard: bool = False,
        width_setting: str | None = None,
        restore_setting: tuple[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size = int(hidden_size)  # units per group (the hidden width for the hidden axis)
        self.kept_width = int(kept_width)  # units each group keeps
        # None: one vector (the hidden axis); else the rows' shape: (layers,) or (layers, KV groups)
        rows = (groups,) if isinstance(groups, int) else groups
        self.groups = None if groups is None else tuple(int(g) for g in rows)
        self.width_setting = width_setting  # the PATConfig field N came from, for error messages
        # (field, factor): the PATConfig setting that keeps n units per row is field=n * factor (error messages)
        self.restore_setting = restore_setting or ("target_width", 1)
        shape = (hidden_size,) if groups is None else (*self.groups, hidden_size)
        self.milestone_fraction = float(milestone)
        self.freeze_fraction = float(freeze)
        self.mask_lr = mask_lr
        self.fade_to_hard = bool(fade_to_hard)
        self.logits = nn.Parameter(torch.randn(shape) if random_init else torch.zeros(shape))
        self.register_buffer("lr_ratio", torch.ones((), dtype=torch.float64))  # kappa
        self.register_buffer("base_lr", torch.zeros((), dtype=torch.float64))  # optimizer lr kappa was set for
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("is_hard", torch.zeros((), dtype=torch.bool))
        self.register_buffer("hard_mask", torch.ones(shape))
        self.register_buffer("bad_grad_events", torch.zeros((), dtype=torch.long))
        # Importance-aware start (calibrate): done once, saved with the adapter so a resumed run skips it.
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.register_buffer("protected", torch.zeros(shape, dtype=torch.bool))  # never pruned
        self.register_buffer("tau", torch.ones(()), persistent=False)
        self.register_buffer("beta", torch.full((), 0.5), persistent=False)
        self.register_buffer("fade", torch.zeros(()), persistent=False)  # f(s) of fade_to_hard
        # The 0/1 set fade_to_hard fades to: the set calibrate chose (saved, so a resumed run fades to the same set).
        self.register_buffer("fade_target", torch.ones(shape))
        # N itself, saved so that loading these weights into a mask built for another width is refused.
        self.register_buffer("kept_target", torch.tensor(self.kept_width, dtype=torch.long))
        self._hard = False
        self._fading = False  # fade_to_hard and calibrated and still soft (a Python flag: gate() must not sync)
        self._kappa = 1.0
        self._last_finite_logits: torch.Tensor | None = None
        self._reported_bad_events = 0
        self._soft_training_gates = 0  # gate() calls in training since the last set_step ...
        self._auxiliary_loss_seen = False  # ... and whether mask_losses() ran among them
        self._warned_no_auxiliary_loss = False
        self.register_load_state_dict_post_hook(lambda module, _keys: module._refresh())
        if self.kept_width >= self.hidden_size:  # an axis that is not pruned: the all-ones hard mask from the start
            self.harden()

    # added in 0.2 (calibrated, protected, fade_target) and 0.5 (kept_target): older adapters load without them
    OPTIONAL_STATE = ("calibrated", "protected", "fade_target", "kept_target")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._check_saved_width(state_dict, prefix)
        for name in self.OPTIONAL_STATE:
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _saved_width(state_dict, prefix: str) -> int | None:
        """The kept count N the weights about to be loaded were trained for: ``kept_target`` where saved, else
        read from the hard mask (hard) or the calibrated fade target (per row: -1 if the rows disagree); None when
        nothing records it."""

        def value(name):
            tensor = state_dict.get(prefix + name)
            return None if tensor is None or tensor.is_meta else tensor

        def count(mask):
            counts = {int(c) for c in (mask > 0.5).sum(-1).flatten().tolist()}
            return counts.pop() if len(counts) == 1 else -1

        if (saved := value("kept_target")) is not None:
            return int(saved)
        if (hard := value("is_hard")) is not None and bool(hard) and (mask := value("hard_mask")) is not None:
            return count(mask)
        calibrated, target = value("calibrated"), value("fade_target")
        if calibrated is not None and bool(calibrated) and target is not None:
            return count(target)
        return None

    def _check_saved_width(self, state_dict, prefix: str) -> None:
        """Refuse mask state saved for another width than this mask's (e.g. target_sparsity edited before a resume)."""
        saved = self._saved_width(state_dict, prefix)
        if saved is None or saved == self.kept_width:
            return
        setting = f" ({self.width_setting})" if self.width_setting else ""
        units = "hidden channels" if self.groups is None else "units in each row"
        field, factor = self.restore_setting
        raise AdapterMismatchError(
            f"The saved PAT mask being loaded keeps {saved} of {self.hidden_size} {units}, but this model's "
            f"PATConfig{setting} keeps {self.kept_width}: the width setting was changed after the checkpoint was "
            f"written, and the restored mask would disagree with the config. To resume, restore the original setting "
            f"({field}={saved * factor}, or the settings in "
            "the checkpoint's adapter_config.json); to train the new width, start a new run in another output_dir "
            "(without resume_from_checkpoint)."
        )

    @classmethod
    def from_config(cls, config, random_init: bool = False) -> PATMask:
        """The hidden mask a resolved ``PATConfig`` describes (``base_hidden_size`` and ``kept_width`` filled in;
        keeping every channel when the hidden axis is not pruned)."""
        return cls(config.base_hidden_size, config.kept_width, **_schedule_kwargs(config, random_init),
                   width_setting=_width_setting(config))  # fmt: skip

    @classmethod
    def unit_masks_from_config(cls, config, random_init: bool = False) -> dict[str, PATMask]:
        """The per-layer axis masks a resolved ``PATConfig`` prunes (:func:`peft_pat.axes.axis_shapes`): "mlp"
        (layers, intermediate), "heads" (layers, KV groups, query heads per group), "kv_heads" (layers, KV groups)."""
        masks = {}
        for axis, shape in axis_shapes(config).items():
            target_field = TARGET_FIELDS[axis][0]
            target = getattr(config, target_field)
            setting = f"{target_field}={target}" if target is not None else _width_setting(config)
            factor = config.kept_num_key_value_heads if axis == "heads" else 1  # heads: kept per group x groups
            masks[axis] = cls(
                shape.units, shape.kept, groups=shape.groups, **_schedule_kwargs(config, random_init),
                width_setting=setting, restore_setting=(target_field, factor),
            )  # fmt: skip
        return masks

    # ------------------------------------------------------------------ schedule
    def _refresh(self) -> None:
        """Recompute tau, beta and the Python-side hard flag from the persistent buffers."""
        step, total = int(self.step), int(self.total_steps)
        self._hard = bool(self.is_hard)
        self._kappa = float(self.lr_ratio)
        if total > 0:
            s0 = milestone_step(total, self.milestone_fraction)
            self.tau.fill_(temperature(step, s0))
            self.beta.fill_(offset(step, s0))
        else:
            self.tau.fill_(1.0)
            self.beta.fill_(0.5)
        self._fading = self._fades_to_calibrated_set() and not self._hard
        fade = min(1.0, step / freeze_step(total, self.freeze_fraction)) if self._fading and total > 0 else 0.0
        self.fade.fill_(fade)

    def configure_learning_rate(self, learning_rate: float, total_steps: int) -> float:
        """Set kappa = mask_lr / learning_rate for an optimizer whose peak learning rate is ``learning_rate``.

        The logits w = kappa * theta keep their values (theta is rescaled), so this can be called again,
        e.g. when resuming; calling it with the same arguments changes nothing. Returns kappa.
        """
        if isinstance(learning_rate, bool) or not (
            isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0
        ):
            raise PATConfigError(f"learning_rate must be a positive number, got {learning_rate!r}.")
        target = self.mask_lr or MASK_TRAVEL / milestone_step(total_steps, self.milestone_fraction)
        kappa = target / learning_rate
        if float(self.base_lr) == learning_rate and math.isclose(kappa, float(self.lr_ratio), rel_tol=1e-12):
            return kappa
        with torch.no_grad():
            self.logits.mul_(float(self.lr_ratio) / kappa)
            if self._last_finite_logits is not None:
                self._last_finite_logits.mul_(float(self.lr_ratio) / kappa)
        self.lr_ratio.fill_(kappa)
        self.base_lr.fill_(learning_rate)
        self._kappa = kappa
        return kappa

    def set_step(self, step: int, total_steps: int, learning_rate: float | None = None) -> bool:
        """Move the schedule to optimizer step ``step`` of ``total_steps``; returns True if it hardened now.

        Pass the optimizer's peak ``learning_rate`` (once is enough) to give the mask its own learning
        rate (see :meth:`configure_learning_rate`); without it the mask learns at the optimizer's rate.
        """
        for name, value in (("step", step), ("total_steps", total_steps)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise PATTypeError(f"set_step: {name} must be an int, got {type(value).__name__} ({value!r}).")
        if total_steps < 1:
            raise PATConfigError(f"set_step: total_steps must be >= 1, got {total_steps}.")
        if not 0 <= step <= total_steps:
            raise PATConfigError(
                f"set_step: step={step} is outside the run [0, total_steps={total_steps}]. Call it once per "
                "optimizer step with the number of steps taken so far and the planned total."
            )
        previous_total = int(self.total_steps)
        if previous_total and previous_total != total_steps and not self._hard:
            s0_before = milestone_step(previous_total, self.milestone_fraction)
            s0_now = milestone_step(total_steps, self.milestone_fraction)
            warnings.warn(
                f"PAT: total_steps changed from {previous_total} to {total_steps} while the mask is soft (resumed "
                f"with a different max_steps?). The schedule is stretched to the new run: milestone s0 "
                f"{s0_before} -> {s0_now}, freeze step {freeze_step(previous_total, self.freeze_fraction)} -> "
                f"{freeze_step(total_steps, self.freeze_fraction)}. Resume with the original max_steps to continue "
                "the same schedule.",
                RuntimeWarning,
                stacklevel=3,
            )
        if learning_rate is not None:
            self.configure_learning_rate(learning_rate, total_steps)
        self._check_auxiliary_loss_was_used()
        self._guard_finite_logits()
        self.step.fill_(step)
        self.total_steps.fill_(total_steps)
        self._refresh()
        if self._hard:
            self._pin_logits_to_hard_mask()  # Adam's momentum keeps moving the (now unused) logits otherwise
            return False
        if step >= freeze_step(total_steps, self.freeze_fraction):
            self.harden()
            return True
        return False

    def _check_auxiliary_loss_was_used(self) -> None:
        """Warn once if the soft mask was trained without the auxiliary losses (Eq. 11) since the last step."""
        if self._soft_training_gates and not self._auxiliary_loss_seen and not self._warned_no_auxiliary_loss:
            warnings.warn(
                "PAT: the model ran in training mode but the PAT auxiliary loss (active-channel Eq. 11, polarisation, "
                "identity) was never added, so the mask is not pushed towards the target width. The forward got no "
                "labels=, or the model is a plain PeftModel that bypasses PATModel.forward. Pass labels= (PATModel "
                "then adds it to output.loss) or add model.base_model.auxiliary_loss()[0] to your own loss.",
                RuntimeWarning,
                stacklevel=4,
            )
            self._warned_no_auxiliary_loss = True
        self._soft_training_gates = 0
        self._auxiliary_loss_seen = False

    def _guard_finite_logits(self) -> None:
        """Undo a non-finite optimizer update of the logits (e.g. NaN loss through gradient clipping)."""
        with torch.no_grad():
            logits = full(self.logits)  # the whole vector on every rank, also when sharded
            if torch.isfinite(logits).all():
                self._last_finite_logits = logits.detach().clone()
            else:
                restore = self._last_finite_logits
                write_(self.logits, restore if restore is not None else torch.zeros_like(logits))
                self.bad_grad_events.add_(1)
        events = int(self.bad_grad_events)
        if events > self._reported_bad_events:
            warnings.warn(
                f"PAT: the mask logits received non-finite gradients or updates {events} time(s) so far (NaN/inf "
                "loss?). They were zeroed or restored so the mask stays valid; check the learning rate, the data "
                "and mixed-precision settings.",
                RuntimeWarning,
                stacklevel=3,
            )
            self._reported_bad_events = events

    # ------------------------------------------------------------------ gate
    def effective_logits(self, row: int | None = None) -> torch.Tensor:
        """w = kappa * theta (see module docstring); of one group only with ``row``."""
        theta = replicated(self.logits)  # sharded (fully_shard) outside the forward: gathered, grad averaged
        theta = theta if row is None else theta[row]
        return _ScaledLogits.apply(theta, self._kappa, self.bad_grad_events)

    def gate(self, row: int | None = None) -> torch.Tensor:
        """M in Eq. 10 (soft phase) or the exact 0/1 top-N mask (after the freeze); shape (d,), or (*groups, d).
        ``row``: one layer's rows of a per-layer mask only ((d,), or (KV groups, d) for the query heads), computed
        from those rows' logits."""
        pick = (lambda t: t) if row is None else (lambda t: t[row])
        if self._hard:
            return pick(self.hard_mask)
        training = self.training and self.logits.requires_grad and torch.is_grad_enabled()
        if training and not torch.compiler.is_compiling():  # eager only: compiled graphs must not recompile
            self._soft_training_gates += 1
        soft = torch.sigmoid(self.tau * self.effective_logits(row).float()) + self.beta
        if self._fading:  # M <- (1 - f) M + f * target: exactly the hard mask at the freeze step
            soft = torch.lerp(soft, pick(self.fade_target), self.fade)
        protected = pick(self.protected)
        return torch.where(protected, torch.ones_like(soft), soft)  # protected channels never fade

    def _fades_to_calibrated_set(self) -> bool:
        """fade_to_hard acts once calibrate has fixed the target; an uncalibrated mask keeps the paper's gate."""
        return self.fade_to_hard and bool(self.calibrated)

    @torch.no_grad()
    def harden(self) -> None:
        """Fix the gate to the exact top-N of w (ties broken by channel index), or to the set a calibrated
        fade_to_hard mask faded to, and polarise w to +-0.5."""
        if self._fades_to_calibrated_set():
            hard = self.fade_target.clone()  # the gate already equals it at the freeze step: no cliff
        else:
            hard = top_n_indicator(full(self.logits), self.kept_width, self.protected)  # order of w = kappa theta
        self.hard_mask.copy_(hard)
        self.is_hard.fill_(True)
        self._hard = True
        self._pin_logits_to_hard_mask()

    @torch.no_grad()
    def _pin_logits_to_hard_mask(self) -> None:
        """w = +-0.5 on kept / pruned channels, so the stored logits always agree with the hard mask."""
        polar = torch.where(self.hard_mask > 0, POLAR_TARGET, -POLAR_TARGET) / self._kappa
        write_(self.logits, polar)

    @torch.no_grad()
    def start_from_importance(self, scores: torch.Tensor, protected: torch.Tensor, margin: float) -> torch.Tensor:
        """Importance-aware start: logits ordered by ``scores`` around the kept/pruned boundary.

        The channel of importance rank k (0 = most important; ``protected`` channels rank first) gets
        w = margin * (N - 1/2 - k) / d, so exactly the top-N start with w > 0 (the active-channel loss is
        0 at step 0) and |w| <= margin. Returns the step-0 gate M(w) (Eq. 10 at s = 0) that the HSM
        scales divide out, so the network still equals the base model at step 0.
        """
        if self._hard:
            raise PATStateError("start_from_importance: the mask is already hard; calibrate before training.")
        protected = protected.to(self.protected.device, torch.bool)
        most = int(protected.sum(-1).max()) if protected.numel() else 0
        if most > self.kept_width:
            raise PATConfigError(
                f"{most} channels are protected as massive activations but only {self.kept_width} are "
                "kept; lower target_sparsity, or raise massive_activation_ratio / set protect_massive_activations="
                "False to allow pruning them."
            )
        ranking = torch.where(protected.cpu(), torch.inf, scores.detach().double().cpu().reshape(protected.shape))
        order = torch.sort(ranking, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order).contiguous())
        w = margin * (self.kept_width - 0.5 - rank.double()) / self.hidden_size
        write_(self.logits, w / self._kappa)
        self.protected.copy_(protected)
        self.fade_target.copy_(top_n_indicator(full(self.logits), self.kept_width, self.protected))
        self.calibrated.fill_(True)
        self._fading = self._fades_to_calibrated_set() and not self._hard
        self._last_finite_logits = None
        gate = torch.sigmoid(w) + offset(0, 2)  # tau = 1 and beta = 1/2 at step 0
        return torch.where(protected.cpu(), torch.ones_like(gate), gate).float()

    @property
    def hardened(self) -> bool:
        """Whether the gate is the frozen exact top-N 0/1 mask (no device sync; the ``is_hard`` buffer holds it)."""
        return self._hard

    @property
    def learning_rate_ratio(self) -> float:
        """kappa = mask_lr / optimizer learning rate: the logits are w = kappa * theta (module docstring)."""
        return self._kappa

    @torch.no_grad()
    def kept_set(self) -> torch.Tensor:
        """Bool (d,): the channels hardening keeps: the hard mask once hard, the top-N of the logits while soft."""
        if self._hard:
            return self.hard_mask > 0.5
        if self._fades_to_calibrated_set():
            return self.fade_target > 0.5
        return top_n_indicator(full(self.logits), self.kept_width, self.protected) > 0.5

    def kept_indices(self) -> torch.Tensor:
        """Sorted indices of the kept units (the mask must be hard): shape (N,), or (*groups, N) per row."""
        if not self._hard:
            raise PATStateError("The mask is still soft; call harden() (or train past the freeze step) first.")
        kept = torch.nonzero(self.hard_mask > 0.5, as_tuple=False)
        if self.groups is None:
            return kept.flatten()
        return kept[:, -1].reshape(*self.groups, -1)  # nonzero walks row by row, each row holds N

    # ------------------------------------------------------------------ losses
    def mask_losses(self) -> dict[str, torch.Tensor]:
        """Active-channel loss |#{w >= 0} - N| / N (Eq. 11, straight-through count) and polarisation."""
        self._auxiliary_loss_seen = True
        if self._hard:
            # Keep the logits in the graph with zero gradient so DDP sees every parameter used. Through
            # effective_logits, like every other path: a NaN loss times 0 is NaN, and its backward zeroes it.
            zero = self.effective_logits().sum() * 0.0 + 0.0  # + 0.0: a log shows 0, never -0
            return {"active": zero, "polarization": zero}
        w = self.effective_logits().float()
        binary = ((w >= 0) | self.protected).float()  # protected channels count as kept whatever their logit
        count = (binary + w - w.detach()).sum(-1)  # forward: #kept per group; backward: d count / d w_i = 1
        active = ((count - self.kept_width).abs() / self.kept_width).mean()
        pos = (w > 0).float()
        neg = 1.0 - pos
        polar = ((w - POLAR_TARGET) ** 2 * pos).sum() / pos.sum().clamp(min=1.0)
        polar = polar + ((w + POLAR_TARGET) ** 2 * neg).sum() / neg.sum().clamp(min=1.0)
        return {"active": active, "polarization": polar}

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Numbers for logs: kept channels (hard count, or #{w >= 0} while soft), temperature, offset."""
        kept = float(self.hard_mask.sum()) if self._hard else float(((full(self.logits) >= 0) | self.protected).sum())
        kept /= math.prod(self.groups or (1,))  # per group
        return {
            "kept_channels": kept,
            "gate_mean": float(self.gate().mean()),
            "mask_lr_ratio": self._kappa,
            "temperature": float(self.tau),
            "offset": float(self.beta),
            "hard": float(self._hard),
            "protected_channels": float(self.protected.sum()),
            "step": float(self.step),
        }

    def extra_repr(self) -> str:
        groups = "" if self.groups is None else f"groups={self.groups}, "
        return f"{groups}hidden_size={self.hidden_size}, kept_width={self.kept_width}, hard={self._hard}"

"""The training objective the tuner's forward returns as ``outputs.loss``.

loss = (1 - w) * task + w * KD  +  share * (active + polarisation + identity losses), where KD is the
distillation loss from the base model (PAT bypassed, :func:`teacher_pass`), w the distillation weight
(default 1: distillation alone), and ``share`` this micro-batch's share of the optimizer step when the
Trainer normalises by the step's token count (so the auxiliary losses count once per step under
gradient accumulation and several processes). The parts are recorded, detached, for the logs.

TRL's trainers call the model with ``fused_lm_head=True`` and build their loss from the per-token
``log_probs`` they get back, as -sum(log_probs) / (the step's label tokens), never reading
``outputs.loss``. In a training step the tuner answers that call with the objective above in sum form
(``num_items_in_batch = 1``, so each term is weighted by this micro-batch's token count), spread evenly
over the labelled positions as -objective_sum / labelled tokens: TRL's division by the step's label tokens then
gives exactly the Trainer's loss, value and gradient (:func:`fused_objective_output`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from peft.utils.other import AuxiliaryTrainingWrapper
from transformers.utils import ModelOutput

from ..layer import PATLayer
from .distillation import (
    IGNORE_INDEX,
    distillation_and_task_loss,
    distillation_loss,
    next_token_statistics,
    next_token_targets,
)

LABEL_KWARGS = ("labels", "shift_labels")  # the forward arguments a causal LM computes its own loss from
FUSED_KWARG = "fused_lm_head"  # TRL's request for per-token log-probabilities instead of logits


@dataclasses.dataclass
class FusedObjectiveOutput(ModelOutput):
    """What a ``fused_lm_head=True`` training call returns: the fields TRL's ``FusedCausalLMOutput`` has and
    its trainers read, on TRL's shapes ((batch, seq_len - 1), or (batch, seq_len) with ``shift_labels``).

    ``log_probs`` carries the PAT objective, not log-probabilities: -objective_sum / n at each of the n
    labelled positions (0 elsewhere), so -sum(log_probs) / num_items_in_batch is the Trainer's loss.
    ``loss``: objective_sum / n. ``entropy`` and ``is_top1`` are the student's own, without gradient.
    """

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def routes_fused_call(tuner, kwargs: dict[str, Any]) -> bool:
    """True for a ``fused_lm_head=True`` call in a training step of a PAT adapter with labels: the call whose
    ``log_probs`` TRL turns into the loss it backpropagates."""
    return (
        bool(kwargs.get(FUSED_KWARG))
        and tuner.training
        and torch.is_grad_enabled()
        and "pat_mask" in tuner._modules
        and len(tuner.pat_mask) > 0
        and any(kwargs.get(k) is not None for k in LABEL_KWARGS)
    )


UNROUTED_FUSED_WARNING = (
    "PAT: a fused_lm_head=True call in training mode without gradients: TRL builds this step's loss elsewhere "
    "(SFTTrainer with compute_loss_func or label smoothing computes it from a plain forward's logits; DPO, KTO "
    "and GRPO use log-probabilities as such), and PAT's distillation and auxiliary losses are not in it. PAT "
    "under TRL supports SFTTrainer's default loss: remove compute_loss_func / label_smoothing_factor, or train "
    "with the Trainer."
)


def fused_objective_output(
    objective_sum: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None,
) -> FusedObjectiveOutput:
    """The objective in sum form (``num_items_in_batch = 1``) as :class:`FusedObjectiveOutput`.

    Targets as TRL's fused head reads them: ``shift_labels`` as given, else ``labels[:, 1:]`` scored at the
    positions before. A micro-batch without a labelled position spreads the objective over every position
    (the distillation term still counts there, as it does under the Trainer).
    """
    if shift_labels is not None:
        targets, scored = shift_labels, logits
    else:
        targets, scored = labels[:, 1:], logits[:, :-1]
    targets = targets.to(logits.device)
    label_mask = targets != IGNORE_INDEX
    count = label_mask.sum()
    spread = label_mask if bool(count > 0) else torch.ones_like(label_mask)
    weights = spread.to(objective_sum.dtype) / spread.sum().to(objective_sum.dtype)
    entropy, is_top1 = next_token_statistics(scored, targets)
    return FusedObjectiveOutput(
        loss=objective_sum / count.clamp(min=1).to(objective_sum.dtype),
        log_probs=-objective_sum * weights,
        entropy=entropy,
        is_top1=is_top1,
        label_mask=label_mask,
    )


@contextlib.contextmanager
def teacher_pass(tuner) -> Iterator[None]:
    """Run the base model: every PAT piece (HSMs, mask, LoRA, modules_to_save copies) bypassed.

    A flag read by the PAT layers' forward; unlike PEFT's ``disable_adapter()`` it leaves
    ``requires_grad`` alone, so it is safe inside a training step (DDP, optimizers, compile).
    """
    wrappers = [m for m in tuner.model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    previous = [m._disable_adapters for m in wrappers]
    tuner.pat_mask.teacher_pass = True
    for module in wrappers:
        module._disable_adapters = True
    try:
        yield
    finally:
        tuner.pat_mask.teacher_pass = False
        for module, value in zip(wrappers, previous):
            module._disable_adapters = value


def auxiliary_loss(tuner) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the active-channel, polarisation and identity losses of the active adapters."""
    parts: dict[str, torch.Tensor] = {}
    total = None
    layers = None
    for name in tuner.active_adapters:
        if name not in tuner.pat_mask:
            continue
        config = tuner.peft_config[name]
        terms = {}
        for axis, mask in tuner.masks_of(name).items():
            mask_losses = mask.mask_losses()
            prefix = "" if axis == "hidden" else f"{axis}_"
            terms[f"{prefix}active_loss"] = mask_losses["active"] * config.active_loss_weight
            terms[f"{prefix}polarization_loss"] = mask_losses["polarization"] * config.polarization_weight
        if config.identity_loss == "l0_gram" and config.identity_loss_weight > 0:
            layers = [m for m in tuner.model.modules() if isinstance(m, PATLayer)] if layers is None else layers
            identity = [m.identity_loss(name) for m in layers if m.has_hsm(name)]  # no walrus: compiles
            identity = [loss for loss in identity if loss is not None]
            if identity:
                device = terms["active_loss"].device
                terms["identity_loss"] = torch.stack([x.to(device) for x in identity]).sum() * (
                    config.identity_loss_weight
                )
        for key, value in terms.items():
            parts[key] = parts[key] + value if key in parts else value
            total = value if total is None else total + value
    if total is None:
        total = torch.zeros(())
    return total, parts


def distillation_settings(tuner) -> tuple[float, float] | None:
    """(weight, temperature) of the active adapter when this forward should distil, else None."""
    if not (tuner.training and torch.is_grad_enabled()) or "pat_mask" not in tuner._modules:
        return None
    active = [a for a in tuner.active_adapters if a in tuner.pat_mask]
    if len(active) != 1:
        return None
    config = tuner.peft_config[active[0]]
    if config.distillation_weight <= 0:
        return None
    return float(config.distillation_weight), float(config.distillation_temperature)


def step_share(kwargs: dict[str, Any]) -> float | torch.Tensor:
    """Share of this micro-batch in the optimizer step when the Trainer normalises by token count.

    With ``num_items_in_batch`` the task loss is sum / (tokens in the whole accumulated, possibly
    multi-process, batch) and the Trainer does not divide by the accumulation steps, so the
    auxiliary loss is weighted by this micro-batch's token share to count once per step.
    """
    num_items = kwargs.get("num_items_in_batch")
    labels, shifted = (kwargs.get(k) for k in LABEL_KWARGS)
    if num_items is None or (labels is None and shifted is None):
        return 1.0
    local = (next_token_targets(labels, shifted) != IGNORE_INDEX).sum()
    total = torch.as_tensor(num_items, dtype=torch.float32, device=local.device).clamp(min=1.0)
    return local.to(torch.float32) / total


def distillation_share(kwargs: dict[str, Any], logits: torch.Tensor, fraction) -> torch.Tensor:
    """Weight of this micro-batch's mean KL in the step: 1, or, when the Trainer normalises the task loss by
    the label tokens of the whole step (``num_items_in_batch``), (this micro-batch's distilled tokens) /
    (the step's label tokens), so the sum over micro-batches is the same for any accumulation split."""
    if not isinstance(fraction, torch.Tensor):
        return torch.as_tensor(float(fraction))
    attention = kwargs.get("attention_mask")
    tokens = attention.sum() if attention is not None else torch.tensor(logits.shape[:-1].numel())
    total = torch.as_tensor(kwargs["num_items_in_batch"], dtype=torch.float32, device=fraction.device)
    return tokens.to(fraction.device, torch.float32) / total.clamp(min=1.0)


def training_forward(tuner, args: tuple, kwargs: dict[str, Any]):
    """The tuner's forward: the model's outputs with ``loss`` replaced by the training objective (module
    docstring) in training mode; the model's own outputs otherwise. A ``fused_lm_head=True`` training call
    (TRL) runs the full forward and returns the objective as :class:`FusedObjectiveOutput`."""
    fused = routes_fused_call(tuner, kwargs)
    if kwargs.get(FUSED_KWARG) and tuner.training and not torch.is_grad_enabled() and "pat_mask" in tuner._modules:
        warnings.warn(UNROUTED_FUSED_WARNING, stacklevel=3)
    if fused:  # sum form: TRL divides by the step's label tokens itself
        kwargs = {**{k: v for k, v in kwargs.items() if k != FUSED_KWARG}, "num_items_in_batch": 1}
    # any other fused call (evaluation, no_grad metrics) goes to TRL's head, which builds no logits to distil from
    distill = None if kwargs.get(FUSED_KWARG) else distillation_settings(tuner)
    teacher_logits = None
    student_kwargs = kwargs
    # distillation alone (w = 1, T = 1) scores the task loss from the distillation pass, not the model's own loss
    task_from_distillation = distill == (1.0, 1.0) and any(kwargs.get(k) is not None for k in LABEL_KWARGS)
    if distill is not None:
        unlabelled = {k: v for k, v in kwargs.items() if k not in (*LABEL_KWARGS, "num_items_in_batch")}
        with torch.no_grad(), teacher_pass(tuner):
            teacher_logits = tuner.model(*args, **{**unlabelled, "use_cache": False}).logits
        if task_from_distillation:
            student_kwargs = unlabelled
    outputs = tuner.model(*args, **student_kwargs)
    loss = getattr(outputs, "loss", None)
    if not tuner.training or "pat_mask" not in tuner._modules or not len(tuner.pat_mask):
        return outputs
    if loss is None and teacher_logits is None:
        return outputs
    fraction = step_share(kwargs)
    parts_log: dict[str, torch.Tensor] = {}
    if teacher_logits is not None:
        weight, temperature = distill
        if task_from_distillation:
            labels = (kwargs.get(k) for k in LABEL_KWARGS)
            kd, parts_log["task_loss"] = distillation_and_task_loss(
                outputs.logits, teacher_logits, kwargs.get("attention_mask"), *labels
            )
        else:
            kd = distillation_loss(
                outputs.logits, teacher_logits, kwargs.get("attention_mask"), temperature, consume_teacher=True
            )
        parts_log["distillation_loss"] = kd.detach()
        kd_step = kd * distillation_share(kwargs, outputs.logits, fraction).to(kd.device)
        objective = kd_step * weight if loss is None or weight == 1.0 else loss * (1 - weight) + kd_step * weight
    else:
        objective = loss
    aux, parts = auxiliary_loss(tuner)
    outputs.loss = objective + aux.to(objective.device) * fraction
    last = {key: value.detach() for key, value in parts.items()}
    last.update(parts_log)
    if loss is not None:
        task_loss = loss.detach()
        if isinstance(fraction, torch.Tensor):  # loss = sum / (tokens in the whole step): log this micro-batch's mean
            task_loss = task_loss / fraction.to(task_loss.device).clamp(min=torch.finfo(torch.float32).tiny)
        last["task_loss"] = task_loss
    tuner.telemetry.last_losses = last
    if fused:
        return fused_objective_output(outputs.loss, outputs.logits, *(kwargs.get(k) for k in LABEL_KWARGS))
    return outputs

"""How each compared method turns the base model into the final stock model that gets evaluated.

Equal budget: every tuned method is trained by :func:`.training.train` (one Trainer setup) on the same
batches with the same loss choice, learning rate, steps and LoRA rank/alpha on the same modules (every
decoder linear); only PAT adds its HSMs and masks. Equal size: at a sparsity s every pruned model has
(within rounding) the parameter count ``PATConfig(target_sparsity=s)`` gives; the post-hoc methods cut
exactly the :class:`Shape` the package resolves (:func:`resolved_shape`).

========================  ======================================================================
``dense``                 the base model, untouched
``lora``                  LoRA on the dense model, merged (the upper reference: no pruning)
``pat``                   ``PATConfig(target_sparsity=s)`` + ``--pat-options``, Trainer + ``PATCallback()``,
                          ``merge_and_prune()``: the package's default axes
``pat_hidden``            the same with ``prune_axes=["hidden"]`` (the hidden width alone, peft-pat 0.4's default)
``prune_then_tune``       activation cut of the base model to PAT's shape (:mod:`.posthoc`), then LoRA, merged
``prune_mlp_then_tune``   activation cut of the MLP width alone (same parameter count), then LoRA, merged
``prune_hidden_then_tune`` activation cut of the hidden width alone (``pat_hidden``'s shape), then LoRA, merged
``tune_then_prune``       the merged ``lora`` model, then the activation cut to PAT's shape (no retraining)
``torch_pruning``         Torch-Pruning Taylor hidden-width cut of the base model, then LoRA, merged
========================  ======================================================================

With ``--loss distill`` the unpruned ``lora`` run (and so ``tune_then_prune``) trains on the full-sequence
cross-entropy instead: LoRA starts as the identity, so distilling the dense model into itself has zero
loss and zero gradient and would leave the dense model unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_pat import FamilySpec, PATConfig
from peft_pat.calibration import ChannelStatistics, channel_statistics
from peft_pat.merge.in_memory import stock_layout
from peft_pat.offline_models import load_causal_lm
from peft_pat.resolution import resolve_for_base

from .posthoc import cut_shape_by_activation
from .torch_pruning_peer import prune_with_torch_pruning
from .training import train

METHODS = (
    "dense", "lora", "pat", "pat_hidden", "prune_then_tune", "prune_mlp_then_tune", "prune_hidden_then_tune",
    "tune_then_prune", "torch_pruning",
)  # fmt: skip
POSTHOC_METHODS = (
    "prune_then_tune", "prune_mlp_then_tune", "prune_hidden_then_tune", "tune_then_prune", "torch_pruning",
)  # fmt: skip
PRUNING_METHODS = ("pat", "pat_hidden", *POSTHOC_METHODS)
LABELS = {
    "dense": "dense (no training)",
    "lora": "LoRA (dense)",
    "pat": "PAT",
    "pat_hidden": "PAT, hidden width only",
    "prune_then_tune": "prune → LoRA (PAT's shape)",
    "prune_mlp_then_tune": "prune MLP → LoRA",
    "prune_hidden_then_tune": "prune hidden → LoRA",
    "tune_then_prune": "LoRA → prune (PAT's shape)",
    "torch_pruning": "Torch-Pruning → LoRA",
}
SAME_SHAPE_RIVAL = {"pat": "prune_then_tune", "pat_hidden": "prune_hidden_then_tune"}  # the post-hoc twin of each PAT


@dataclass(frozen=True)
class Shape:
    """What a cut keeps: the hidden width and the per-layer MLP width (None: that axis is not cut)."""

    width: int | None
    mlp: int | None

    def __str__(self) -> str:
        return "/".join(f"{n} {v}" for n, v in (("hidden", self.width), ("MLP", self.mlp)) if v is not None)


def resolved_shape(base: nn.Module, sparsity: float, **pat_options) -> Shape:
    """The shape ``PATConfig(target_sparsity=sparsity, **pat_options)`` resolves to on ``base`` (the package's
    own budget and rounding), without wrapping ``base``."""
    config = PATConfig(task_type="CAUSAL_LM", target_sparsity=sparsity, **pat_options)
    config = resolve_for_base(config, base.config.to_dict(), stock_layout(base))
    width = None if config.kept_width == int(base.config.hidden_size) else config.kept_width
    return Shape(width, config.kept_intermediate_size)


PAT_TYPES = {f.name: f.type for f in dataclasses.fields(PATConfig) if f.init}  # annotations, as text
PAT_FIELDS = set(PAT_TYPES)
PAT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PATConfig) if f.init}  # declared defaults


@dataclass
class TuningSetup:
    """Everything a method needs that is the same for all methods."""

    model_name: str
    family: FamilySpec
    device: str
    train_batches: list[dict[str, torch.Tensor]]
    calibration_batches: list[dict[str, torch.Tensor]]
    lr: float
    warmup: float
    lora_rank: int
    lora_alpha: float
    seed: int
    loss: str = "distill"
    pat_options: dict = field(default_factory=dict)
    progress: bool = True
    trainer: str = "trainer"  # training.TRAINERS; "trl" trains PAT with SFTTrainer
    tokenizer: Any = None  # SFTTrainer's processing_class (it reads the padding token from it)
    _statistics: dict[str, ChannelStatistics] = field(default_factory=dict)
    _teacher: nn.Module | None = None

    def load_base(self) -> nn.Module:
        model, _ = load_causal_lm(self.model_name)
        return model.to(self.device).eval()

    def teacher(self) -> nn.Module:
        """The dense base model, frozen (eval, no grad): the post-hoc rivals' distillation teacher."""
        if self._teacher is None:
            self._teacher = self.load_base().requires_grad_(False)
        return self._teacher

    def train(self, model: nn.Module, desc: str, pat: bool = False, distill: bool = False) -> dict:
        print(f"   training {desc}", flush=True)
        torch.manual_seed(self.seed)
        teacher = self.teacher() if distill else None
        return train(
            model,
            self.train_batches,
            self.lr,
            self.warmup,
            seed=self.seed,
            device=self.device,
            pat=pat,
            teacher=teacher,
            progress=self.progress,
            trainer_name=self.trainer if pat else "trainer",
            tokenizer=self.tokenizer,
        )

    def lora_config(self) -> LoraConfig:
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(self.family.lora_targets),
        )

    def pat_overrides(self) -> dict:
        """The PATConfig arguments besides ``target_sparsity``: only what differs from the package defaults.

        The LoRA rank/alpha follow ``--lora-rank``/``--lora-alpha`` when those differ from PATConfig's own
        defaults; ``--loss answer|full`` turns the package's distillation off; ``--pat-options`` come last
        and win."""
        overrides: dict = {}
        if self.lora_rank != PAT_DEFAULTS["r"]:
            overrides["r"] = self.lora_rank
        if self.lora_alpha != PAT_DEFAULTS["lora_alpha"]:
            overrides["lora_alpha"] = self.lora_alpha
        if self.loss != "distill" and "distillation_weight" in PAT_FIELDS:
            overrides["distillation_weight"] = 0.0
        overrides.update(self.pat_options)
        return overrides

    def statistics(self, model: nn.Module, key: str) -> ChannelStatistics:
        """Hidden-channel and MLP-unit statistics of ``model`` on the calibration batches, cached under ``key``."""
        if key not in self._statistics:
            self._statistics[key] = channel_statistics(model, self.calibration_batches, self.family, mlp=True)
        return self._statistics[key]


def lora_tune(setup: TuningSetup, model: nn.Module, desc: str, distill: bool) -> tuple[nn.Module, dict]:
    """LoRA on ``model`` with the shared budget, merged back into a stock model."""
    torch.manual_seed(setup.seed)
    peft_model = get_peft_model(model, setup.lora_config())
    info = setup.train(peft_model, desc, distill=distill)
    info["loss"] = "distill" if distill else setup.loss
    return peft_model.merge_and_unload().eval(), info


def dense(setup: TuningSetup) -> tuple[nn.Module, dict]:
    return setup.load_base(), {}


def lora(setup: TuningSetup) -> tuple[nn.Module, dict]:
    model, info = lora_tune(setup, setup.load_base(), "LoRA", distill=False)
    if setup.loss == "distill":
        info["loss"] = "full (distilling the dense model into itself is a no-op)"
    return model, info


def pat(setup: TuningSetup, sparsity: float, **axes) -> tuple[nn.Module, dict]:
    """PAT with the package defaults (``axes`` e.g. ``prune_axes=["hidden"]`` for ``pat_hidden``)."""
    torch.manual_seed(setup.seed)
    overrides = {**setup.pat_overrides(), **axes}
    config = PATConfig(task_type="CAUSAL_LM", target_sparsity=sparsity, **overrides)
    model = get_peft_model(setup.load_base(), config)
    info = setup.train(model, f"PAT {sparsity:.0%}", pat=True)
    info["loss"] = setup.loss
    info["pat_overrides"] = overrides
    info["pat_config"] = {k: _jsonable(getattr(config, k)) for k in sorted(PAT_FIELDS) if not k.startswith("base_")}
    if setup.loss == "distill" and "distillation_weight" not in PAT_FIELDS:
        info["warning"] = "this peft_pat has no distillation_weight: PAT trained on the full-sequence cross-entropy"
        print(f"   WARNING: {info['warning']}")
    return model.merge_and_prune().eval(), info


def prune_then_tune(setup: TuningSetup, shape: Shape) -> tuple[nn.Module, dict]:
    """The base model cut to ``shape`` by activation statistics, then LoRA (+ the same distillation)."""
    model = setup.load_base()
    cut_shape_by_activation(model, setup.family, setup.statistics(model, "base"), shape.width, shape.mlp)
    model, info = lora_tune(setup, model, f"prune→LoRA {shape}", distill=setup.loss == "distill")
    return model, {**info, "shape": str(shape)}


def tune_then_prune(setup: TuningSetup, tuned: nn.Module, shape: Shape) -> tuple[nn.Module, dict]:
    """The merged LoRA model ``tuned`` (left unchanged), cut post hoc to ``shape``."""
    model = copy.deepcopy(tuned)
    cut_shape_by_activation(model, setup.family, setup.statistics(tuned, "lora"), shape.width, shape.mlp)
    return model, {"shape": str(shape)}


def torch_pruning(setup: TuningSetup, kept: int) -> tuple[nn.Module, dict]:
    model = prune_with_torch_pruning(setup.load_base(), setup.family, setup.calibration_batches, kept, setup.device)
    return lora_tune(setup, model, f"TorchPruning→LoRA {kept}", distill=setup.loss == "distill")


def _jsonable(value):
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)

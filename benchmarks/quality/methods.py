"""How each compared method turns the base model into the final stock model that gets evaluated.

Equal budget: every tuned method runs :func:`.training.train` on the same batches with the same
learning rate, steps and LoRA rank/alpha on the same modules (every decoder linear); only PAT adds
its HSMs and mask. The post-hoc methods cut exactly the width PAT keeps.

=================  =============================================================================
``dense``          the base model, untouched
``lora``           LoRA on the dense model, merged (the upper reference: no pruning)
``pat``            PAT at the target sparsity, ``merge_and_prune()``
``prune_then_tune`` activation-magnitude cut of the base model (:mod:`.posthoc`), then LoRA, merged
``tune_then_prune`` the merged ``lora`` model, then the same activation-magnitude cut (no retraining)
``torch_pruning``  Torch-Pruning Taylor hidden-width cut of the base model, then LoRA, merged
=================  =============================================================================
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_pat import FamilySpec, PATConfig
from peft_pat.calibration import activation_channel_scores
from peft_pat.pretrained import load_causal_lm

from .posthoc import cut_by_activation
from .torch_pruning_peer import prune_with_torch_pruning
from .training import train

METHODS = ("dense", "lora", "pat", "prune_then_tune", "tune_then_prune", "torch_pruning")
PRUNING_METHODS = ("pat", "prune_then_tune", "tune_then_prune", "torch_pruning")
LABELS = {
    "dense": "dense (no training)",
    "lora": "LoRA (dense)",
    "pat": "PAT",
    "prune_then_tune": "prune → LoRA",
    "tune_then_prune": "LoRA → prune",
    "torch_pruning": "Torch-Pruning → LoRA",
}


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
    progress: bool = True
    _activation_scores: dict[str, torch.Tensor] = field(default_factory=dict)

    def load_base(self) -> nn.Module:
        model, _ = load_causal_lm(self.model_name)
        return model.to(self.device).eval()

    def train(self, model: nn.Module, desc: str) -> dict:
        torch.manual_seed(self.seed)
        return train(
            model, self.train_batches, self.lr, self.warmup, device=self.device, desc=desc, progress=self.progress
        )

    def lora_config(self) -> LoraConfig:
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(self.family.lora_targets),
        )

    def activation_scores(self, model: nn.Module, key: str) -> torch.Tensor:
        """Channel scores of ``model`` on the calibration batches, cached under ``key``."""
        if key not in self._activation_scores:
            self._activation_scores[key] = activation_channel_scores(model, self.calibration_batches, self.family)
        return self._activation_scores[key]


def lora_tune(setup: TuningSetup, model: nn.Module, desc: str) -> tuple[nn.Module, dict]:
    """LoRA on ``model`` with the shared budget, merged back into a stock model."""
    torch.manual_seed(setup.seed)
    peft_model = get_peft_model(model, setup.lora_config())
    info = setup.train(peft_model, desc)
    return peft_model.merge_and_unload().eval(), info


def dense(setup: TuningSetup) -> tuple[nn.Module, dict]:
    return setup.load_base(), {}


def lora(setup: TuningSetup) -> tuple[nn.Module, dict]:
    return lora_tune(setup, setup.load_base(), "LoRA")


def pat(setup: TuningSetup, sparsity: float) -> tuple[nn.Module, dict]:
    torch.manual_seed(setup.seed)
    config = PATConfig(task_type="CAUSAL_LM", target_sparsity=sparsity, r=setup.lora_rank, lora_alpha=setup.lora_alpha)
    model = get_peft_model(setup.load_base(), config)
    info = setup.train(model, f"PAT {sparsity:.0%}")
    info["pat_config"] = {
        k: getattr(config, k)
        for k in ("kept_width", "hsm_rank", "embedding_hsm", "mask_milestone", "mask_freeze", "mask_lr")
    }
    return model.merge_and_prune().eval(), info


def prune_then_tune(setup: TuningSetup, kept: int) -> tuple[nn.Module, dict]:
    model = setup.load_base()
    cut_by_activation(model, setup.family, setup.activation_scores(model, "base"), kept)
    return lora_tune(setup, model, f"prune→LoRA {kept}")


def tune_then_prune(setup: TuningSetup, tuned: nn.Module, kept: int) -> tuple[nn.Module, dict]:
    """The merged LoRA model ``tuned`` (left unchanged), cut post hoc."""
    model = copy.deepcopy(tuned)
    return cut_by_activation(model, setup.family, setup.activation_scores(tuned, "lora"), kept), {}


def torch_pruning(setup: TuningSetup, kept: int) -> tuple[nn.Module, dict]:
    model = prune_with_torch_pruning(setup.load_base(), setup.family, setup.calibration_batches, kept, setup.device)
    return lora_tune(setup, model, f"TorchPruning→LoRA {kept}")

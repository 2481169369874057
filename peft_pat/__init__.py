"""peft-pat: Pruning-Aware Tuning (Liu et al., AAAI-25, arXiv 2408.14721) as a PEFT tuner.

``import peft_pat`` registers the ``PAT`` type with PEFT, so ``get_peft_model(base, PATConfig(...))``
and ``PeftModel.from_pretrained(base, "adapter")`` work like they do for LoRA.
"""

from ._registry import PatPeftType, register
from .config import PATConfig
from .errors import (
    AdapterMismatchError,
    PATConfigError,
    PATError,
    PATStateError,
    PATTypeError,
    UnsupportedModelError,
)
from .families import FAMILIES, FamilySpec, family_for_model, supported_model_types
from .layer import PATEmbedding, PATLayer, PATLinear
from .mask import PATMask
from .merge.checkpoint import merge_checkpoint
from .merge.in_memory import prune_hidden_channels, prune_model
from .model import PATModel, calibrate, find_pat_tuner
from .saving import save_pruned
from .training.callback import PATCallback
from .training.optimizer import optimizer_param_groups

register(PATConfig, PATModel)

__version__ = "0.4.0"

__all__ = [
    "FAMILIES",
    "AdapterMismatchError",
    "FamilySpec",
    "PATCallback",
    "PATConfig",
    "PATConfigError",
    "PATEmbedding",
    "PATError",
    "PATLayer",
    "PATLinear",
    "PATMask",
    "PATModel",
    "PATStateError",
    "PATTypeError",
    "PatPeftType",
    "UnsupportedModelError",
    "calibrate",
    "family_for_model",
    "find_pat_tuner",
    "merge_checkpoint",
    "optimizer_param_groups",
    "prune_hidden_channels",
    "prune_model",
    "save_pruned",
    "supported_model_types",
]

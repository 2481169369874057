"""`PATModel`: the PEFT tuner that injects PAT layers, owns the shared masks, adds the auxiliary
loss in its forward pass and turns a trained adapter into a smaller stock model (``merge_and_prune``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists, onload_layer
from peft.utils.other import AuxiliaryTrainingWrapper, _get_submodules
from torch import nn
from tqdm.auto import tqdm

from . import fold
from .calibration import channel_statistics, massive_channels
from .checks import (
    check_adapter_matches_base,
    check_adapter_name,
    check_calibration_batches,
    check_calibration_source,
    check_causal_lm_layout,
    check_injection_targets,
    check_not_quantized,
    plain_float_layer_error,
)
from .config import PATConfig
from .distillation import IGNORE_INDEX, distillation_and_task_loss, distillation_loss, next_token_targets
from .errors import PATConfigError, PATStateError, PATTypeError
from .families import FAMILIES, FamilySpec, family_for_model_type
from .layer import PATEmbedding, PATLayer, PATLinear
from .mask import PATMask, resolve_schedule
from .merge_plan import harden_for_merge, keeps_tie
from .saving import make_save_pretrained_atomic
from .surgery import own_config, prune_hidden_channels
from .width import kept_width_for

logger = logging.getLogger("peft_pat")

HARDENING_WINDOW = 3  # optimizer steps averaged on each side of the hardening step for the loss-change log
_LABEL_KWARGS = ("labels", "shift_labels")  # the forward arguments a causal LM computes its own loss from
PAPER_HSM_RANK_FRACTION = 0.05  # paper: "r ≈ 5% of d" (r = 200 for d = 4096)
REUSED_CONFIG_NOTE = (  # the same refusal meets a PATConfig object reused for a second, different base
    " (A PATConfig you built and already passed to get_peft_model recorded that first base: build a new "
    "PATConfig(...) for each base.)"
)


def default_hsm_rank(hidden_size: int, kept_width: int) -> int:
    """The number of pruned channels d - N (at least the paper's ~5% of d), rounded up to a multiple of 8, below d.

    With rank d - N the operator I + L1 L0 can write the content of every channel the mask removes into
    the kept ones; on SmolLM2-135M it beat the paper's rank at 25% and 50% (docs/quality.md, Levers).
    """
    rank = 8 * math.ceil(max(hidden_size - kept_width, PAPER_HSM_RANK_FRACTION * hidden_size) / 8)
    return max(1, min(rank, hidden_size - 1))


def _refuse_state_dict_after_pruning(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """Saving the consumed PEFT model would write an adapter without its layers: refuse (state_dict pre-hook)."""
    module._check_not_pruned()


def _move_mask(mask: PATMask, device: torch.device) -> None:
    """Put ``mask`` on ``device``, except while its logits are empty meta tensors.

    PEFT's ``low_cpu_mem_usage=True`` builds the tuner under ``init_empty_weights``: the logits are
    created on the meta device (buffers are not) and replaced by the saved tensor later
    (``load_state_dict(assign=True)``), after which :func:`_masks_to_embedding_device` moves the mask.
    """
    if device.type == "meta" or any(p.is_meta for p in mask.parameters()):
        return
    mask.to(device)


def _masks_to_embedding_device(tuner: nn.Module, incompatible_keys: Any) -> None:
    """load_state_dict post-hook: a mask loaded with ``assign=True`` sits where the file was read to
    (PEFT reads adapter files to its inferred device); move it next to the embedding, where
    ``_ensure_mask`` puts a new one. A no-op after an ordinary (copying) load."""
    if "pat_mask" not in tuner._modules:
        return
    device = tuner.model.get_input_embeddings().weight.device
    for mask in tuner.pat_mask.values():
        if any(t.device != device for t in itertools.chain(mask.parameters(), mask.buffers())):
            _move_mask(mask, device)


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters registered under more than one name (tied weights)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (shared if id(param) in seen else seen).add(id(param))
    return shared


class PATModel(BaseTuner):
    """Pruning-Aware Tuning (Liu et al., AAAI-25) as a PEFT tuner.

    Layout (docs/method.md §1): an HSM on the embedding and on every ``o_proj``/``down_proj`` output,
    one :class:`~peft_pat.mask.PATMask` per adapter shared by all of them (``self.pat_mask``), and LoRA
    on ``target_modules``. The training-time forward adds the auxiliary losses to ``output.loss``.
    """

    prefix: str = "pat_"
    tuner_layer_cls = PATLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {
        t: list(f.lora_targets) for f in FAMILIES for t in f.model_types
    }
    uses_shared_state: bool = True

    # ------------------------------------------------------------------ injection
    def _pre_injection_hook(self, model: nn.Module, config: PATConfig, adapter_name: str) -> None:
        if "pat_mask" not in self._modules:
            self.pat_mask = nn.ModuleDict()
        self._last_losses: dict[str, torch.Tensor] = {}
        self._pruned = False
        if not self.__dict__.get("_mask_device_hook"):
            self.register_load_state_dict_post_hook(_masks_to_embedding_device)
            self._mask_device_hook = True

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's injection, after every check that can refuse the adapter while ``model`` is unchanged.

        BaseTuner calls :meth:`_prepare_adapter_config` (once) and then :meth:`_prepare_model`, which runs
        the checks, before it replaces any module."""
        check_adapter_name(adapter_name)
        self._check_no_foreign_pat_layers(model)
        self._explicit_targets = getattr(self.peft_config[adapter_name], "target_modules", None) is not None
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _check_no_foreign_pat_layers(self, model: nn.Module) -> None:
        """Refuse a model that is a PEFT model, or whose modules are PAT layers of another PATModel.

        A second ``get_peft_model(base, cfg)`` on the same ``base`` (a notebook cell run twice) would
        otherwise re-initialise the first PeftModel's adapter in its layers and point them at a new
        mask, changing the first model's outputs. ``add_adapter`` / ``load_adapter`` inject into
        layers of this tuner, which hold a reference to this tuner's ``pat_mask``, and pass.
        """
        if isinstance(model, (PeftModel, BaseTuner)):
            raise PATTypeError(
                f"get_peft_model got a {type(model).__name__}, which is already a PEFT model; PAT wraps the base "
                "transformers model. For a second PAT adapter use peft_model.add_adapter(name, PATConfig(...)); to "
                "start over, load the base model again (or take peft_model.unload(), the base without adapters)."
            )
        own = self._modules.get("pat_mask")
        for key, module in model.named_modules():
            if isinstance(module, PATLayer) and module._pat_masks is not own:
                raise PATStateError(
                    f"This base model already holds the PAT layers of an existing PeftModel (e.g. '{key}'): "
                    "get_peft_model was called on it before, and wrapping it again would re-initialise that "
                    "PeftModel's adapter in place. Keep using the existing PeftModel (peft_model.add_adapter(name, "
                    "PATConfig(...)) adds a second adapter), or load the base model again to start over "
                    "(peft_model.unload() returns the base without PAT layers)."
                )

    def _prepare_model(self, peft_config: PATConfig, model: nn.Module) -> None:
        family = family_for_model_type(peft_config.base_model_type)
        check_causal_lm_layout(model, family)
        check_injection_targets(model, peft_config, family, self._explicit_targets)

    @property
    def family(self) -> FamilySpec:
        return family_for_model_type(getattr(self.model.config, "model_type", None))

    def _prepare_adapter_config(self, peft_config: PATConfig, model_config: dict) -> PATConfig:
        if not isinstance(peft_config, PATConfig):
            raise PATConfigError(f"PATModel needs a PATConfig, got {type(peft_config).__name__}.")
        model_type = model_config.get("model_type")
        family = family_for_model_type(model_type)
        check_not_quantized(model_config)
        hidden = int(model_config["hidden_size"])
        vocab = model_config.get("vocab_size")
        heads = int(model_config["num_attention_heads"])
        layers = model_config.get("num_hidden_layers")
        layers = int(layers) if layers is not None else None
        check_adapter_matches_base(
            peft_config, model_type, hidden, vocab,
            adapter="This PAT adapter", base="the base model it is being applied to", action="Load it onto",
            num_hidden_layers=layers, note=REUSED_CONFIG_NOTE,
        )  # fmt: skip
        peft_config.base_model_type, peft_config.base_hidden_size, peft_config.base_vocab_size = (
            model_type,
            hidden,
            vocab,
        )
        peft_config.base_num_hidden_layers = layers
        peft_config.kept_width = kept_width_for(peft_config, hidden, heads)
        if peft_config.hsm_rank is None:
            peft_config.hsm_rank = default_hsm_rank(hidden, peft_config.kept_width)
        elif peft_config.hsm_rank >= hidden:
            raise PATConfigError(
                f"hsm_rank={peft_config.hsm_rank} must be smaller than the hidden size ({hidden}); the HSM operator "
                f"is identity plus a low-rank term. The default is the number of pruned channels (here "
                f"{default_hsm_rank(hidden, peft_config.kept_width)}); the paper uses about 5% of hidden_size."
            )
        peft_config.mask_milestone, peft_config.mask_freeze = resolve_schedule(
            peft_config.mask_milestone, peft_config.mask_freeze, (hidden - peft_config.kept_width) / hidden
        )
        if peft_config.embedding_hsm == "auto":
            tied = bool(model_config.get("tie_word_embeddings", False))
            peft_config.embedding_hsm = "diagonal" if tied else "full"
        for name in peft_config.modules_to_save or []:
            if any(name == p.rsplit(".", 1)[-1] for p in (family.embedding, *family.producers)):
                raise PATConfigError(
                    f"modules_to_save contains {name!r}, a producer of the residual stream that PAT already adapts "
                    "with an HSM; remove it from modules_to_save."
                )
        if peft_config.target_modules is None:
            peft_config.target_modules = list(family.lora_targets)
        return peft_config

    @staticmethod
    def _check_target_module_exists(peft_config: PATConfig, key: str):
        family = family_for_model_type(peft_config.base_model_type)
        if family.is_producer(key):
            return True
        if peft_config.r == 0:
            return False
        return check_target_module_exists(peft_config, key)

    def _ensure_mask(self, config: PATConfig, adapter_name: str) -> nn.ModuleDict:
        if "pat_mask" not in self._modules:
            self.pat_mask = nn.ModuleDict()
        if adapter_name not in self.pat_mask:
            mask = PATMask.from_config(config, random_init=not config.init_weights)
            _move_mask(mask, self.model.get_input_embeddings().weight.device)
            mask.requires_grad_(not config.inference_mode)
            self.pat_mask[adapter_name] = mask
        return self.pat_mask

    def _create_and_replace(
        self,
        peft_config: PATConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        family = family_for_model_type(peft_config.base_model_type)
        masks = self._ensure_mask(peft_config, adapter_name)
        is_embedding = family.is_embedding(current_key)
        with_hsm = family.is_producer(current_key)
        wants_lora = peft_config.r > 0 and bool(check_target_module_exists(peft_config, current_key))
        diagonal = is_embedding and peft_config.embedding_hsm == "diagonal"
        kwargs: dict[str, Any] = {
            "lora_rank": peft_config.r if wants_lora else 0,
            "lora_alpha": peft_config.lora_alpha,
            "lora_dropout": peft_config.lora_dropout,
            "hsm_rank": None if diagonal else peft_config.hsm_rank,
            "with_hsm": with_hsm,
            "init_weights": peft_config.init_weights,
            "inference_mode": peft_config.inference_mode,
        }
        if isinstance(target, PATLayer):
            target.update_layer(adapter_name, masks, **kwargs)
            return
        # check_injection_targets refused everything else before injection; this guards direct calls
        error = plain_float_layer_error(current_key, target, nn.Embedding if is_embedding else nn.Linear)
        if error is not None:
            raise error
        layer_cls = PATEmbedding if is_embedding else PATLinear
        new_module: nn.Module = layer_cls(target, adapter_name, masks, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ------------------------------------------------------------------ trainability of the shared mask
    def _sync_mask_requires_grad(self) -> None:
        if "pat_mask" not in self._modules:
            return
        enabled = not getattr(self, "_pat_adapters_disabled", False)
        for name, mask in self.pat_mask.items():
            config = self.peft_config.get(name)
            trainable = enabled and name in self.active_adapters and not (config and config.inference_mode)
            mask.logits.requires_grad_(trainable)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._sync_mask_requires_grad()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_mask_requires_grad()
        if inference_mode and "pat_mask" in self._modules:
            names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
            for name in names:
                if name in self.pat_mask:
                    self.pat_mask[name].logits.requires_grad_(False)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._pat_adapters_disabled = not enabled
        self._sync_mask_requires_grad()

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name in names & set(self.pat_mask.keys()):
            self.pat_mask[name].logits.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.pat_mask:
            del self.pat_mask[adapter_name]
        self._sync_mask_requires_grad()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if autocast_adapter_dtype and adapter_name in self.pat_mask:
            logits = self.pat_mask[adapter_name].logits
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits.data = logits.data.float()

    # ------------------------------------------------------------------ schedule
    def _check_materialised(self) -> None:
        """Refuse to run an adapter whose weights are still empty meta tensors (low_cpu_mem_usage=True)."""
        if "pat_mask" not in self._modules:
            return
        empty = [name for name, mask in self.pat_mask.items() if mask.logits.is_meta]
        if empty:
            raise PATStateError(
                f"PAT adapter(s) {empty} have no weights yet: they were created with low_cpu_mem_usage=True, which "
                "makes empty (meta-device) adapter weights for loading. Load saved weights into them "
                "(PeftModel.from_pretrained(base, folder, low_cpu_mem_usage=True) does), or create an adapter "
                "to train without low_cpu_mem_usage."
            )

    def set_step(self, step: int, total_steps: int, learning_rate: float | None = None) -> None:
        """Drive the mask schedule: call once per optimizer step (the callback does this for Trainer).

        ``learning_rate``: the optimizer's peak learning rate; pass it (at least once) so the mask logits
        get their own learning rate ``PATConfig.mask_lr`` (default 2 / s0).
        """
        self._check_not_pruned()
        self._check_materialised()
        if "pat_mask" not in self._modules or not len(self.pat_mask):
            raise PATStateError(
                "set_step: this model has no PAT adapter (all were deleted?); add one with add_adapter(name, "
                "PATConfig(...)) or wrap the base model with get_peft_model(base, PATConfig(...))."
            )
        self._trace_hardening_loss(step)
        self._warn_if_uncalibrated(step)
        for name, mask in self.pat_mask.items():
            if mask.set_step(step, total_steps, learning_rate=learning_rate):
                kept = int(mask.hard_mask.sum())
                self._hardened_at = step
                warnings.warn(
                    f"PAT adapter '{name}': mask hardened at step {step}/{total_steps}; {kept} of "
                    f"{mask.hidden_size} hidden channels kept.",
                    stacklevel=2,
                )

    def _warn_if_uncalibrated(self, step: int) -> None:
        """Once: training started while an adapter still waits for its importance-aware start."""
        if step < 1 or self.__dict__.get("_warned_uncalibrated"):
            return
        waiting = [n for n in self.pat_mask if n in self.peft_config and self.needs_calibration(n)]
        if waiting:
            self._warned_uncalibrated = True
            warnings.warn(
                f"PAT adapter(s) {waiting}: training started without the importance-aware mask start, so the mask "
                "logits start at 0 and massive-activation channels are not protected. Call "
                "model.calibrate(first_training_batches) before the first step (PATCallback does it for "
                "the Trainer), or set PATConfig(calibration_batches=0) to start from 0 on purpose.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _trace_hardening_loss(self, step: int) -> None:
        """Record the training objective per step; HARDENING_WINDOW steps after the hardening, log its change.

        The objective is the distillation loss when distilling, else the task loss (auxiliary losses
        excluded). ``hardening_loss_change`` = mean over the window after - mean over the window before.
        """
        losses = self.__dict__.get("_last_losses", {})
        value = losses.get("distillation_loss", losses.get("task_loss"))
        if value is None or step < 1:
            return
        trace = self.__dict__.setdefault("_objective_trace", {})
        trace[step] = float(value)
        hardened = self.__dict__.get("_hardened_at")
        if hardened is None or step != hardened + HARDENING_WINDOW or "hardening_loss_change" in self.__dict__:
            return
        before = [trace[s] for s in range(hardened - HARDENING_WINDOW + 1, hardened + 1) if s in trace]
        after = [trace[s] for s in range(hardened + 1, hardened + HARDENING_WINDOW + 1) if s in trace]
        if before and after:
            self.hardening_loss_change = sum(after) / len(after) - sum(before) / len(before)
            logger.info(
                "PAT: training loss across the hardening at step %d: %.4f before, %.4f after (%+.4f).",
                hardened,
                sum(before) / len(before),
                sum(after) / len(after),
                self.hardening_loss_change,
            )

    def harden_mask(self, adapter_name: str | None = None) -> None:
        """Turn the mask of ``adapter_name`` (default: the active one) into the exact top-N 0/1 mask now."""
        self.pat_mask[self._single_adapter(adapter_name)].harden()

    @property
    def last_auxiliary_losses(self) -> dict[str, float]:
        """Each weighted auxiliary loss and the task loss (mean per target token of the micro-batch) of the
        last training forward. Kept as detached tensors until read, so the forward pass neither waits for
        the device nor breaks a ``torch.compile`` graph."""
        values = {key: float(value) for key, value in self.__dict__.get("_last_losses", {}).items()}
        if "hardening_loss_change" in self.__dict__:
            values["hardening_loss_change"] = float(self.hardening_loss_change)
        return values

    def pat_stats(self, adapter_name: str | None = None) -> dict[str, float]:
        """Schedule state and the last auxiliary losses, for logging."""
        stats = self.pat_mask[self._single_adapter(adapter_name)].stats()
        stats.update(self.last_auxiliary_losses)
        return stats

    # ------------------------------------------------------------------ losses
    def _pat_layers(self) -> list[PATLayer]:
        return [m for m in self.model.modules() if isinstance(m, PATLayer)]

    def auxiliary_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of the active-channel, polarisation and identity losses of the active adapters."""
        parts: dict[str, torch.Tensor] = {}
        total = None
        layers = None
        for name in self.active_adapters:
            if name not in self.pat_mask:
                continue
            config: PATConfig = self.peft_config[name]
            mask_losses = self.pat_mask[name].mask_losses()
            terms = {
                "active_loss": mask_losses["active"] * config.active_loss_weight,
                "polarization_loss": mask_losses["polarization"] * config.polarization_weight,
            }
            if config.identity_loss == "l0_gram" and config.identity_loss_weight > 0:
                layers = self._pat_layers() if layers is None else layers
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

    # ------------------------------------------------------------------ teacher and calibration
    @contextlib.contextmanager
    def teacher_pass(self) -> Iterator[None]:
        """Run the base model: every PAT piece (HSMs, mask, LoRA, modules_to_save copies) bypassed.

        A flag read by the PAT layers' forward; unlike PEFT's ``disable_adapter()`` it leaves
        ``requires_grad`` alone, so it is safe inside a training step (DDP, optimizers, compile).
        """
        wrappers = [m for m in self.model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]
        previous = [m._disable_adapters for m in wrappers]
        self.pat_mask.teacher_pass = True
        for module in wrappers:
            module._disable_adapters = True
        try:
            yield
        finally:
            self.pat_mask.teacher_pass = False
            for module, value in zip(wrappers, previous):
                module._disable_adapters = value

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Mapping[str, torch.Tensor]], adapter_name: str | None = None) -> dict:
        """Importance-aware mask start from ``batches`` (dicts with ``input_ids``, optional ``attention_mask``).

        Ranks hidden channels by the activation criterion of :mod:`peft_pat.calibration` on the base
        model (PAT bypassed), protects massive-activation channels (``protect_massive_activations``),
        orders the mask logits by rank within +-``calibration_margin`` (the mask starts at the activation
        top-N) and divides the change of the step-0 gate out of every HSM scale, so the network still
        computes exactly what it computed before (the base model, for a fresh adapter). Uses the first
        ``calibration_batches`` batches. Call before the first optimizer step; PATCallback does it.
        Returns a summary (tokens, protected channels and their energy ratio to the median).
        """
        self._check_not_pruned()
        name = self._single_adapter(adapter_name)
        config: PATConfig = self.peft_config[name]
        mask = self.pat_mask[name]
        if mask.hardened:
            raise PATStateError(
                "calibrate: the mask is already hard (training is past the freeze point), so its channels are fixed. "
                "Calibrate a fresh adapter before its first optimizer step."
            )
        if int(mask.step) > 0:
            raise PATStateError(
                f"calibrate: training has started (the mask schedule is at step {int(mask.step)}); the importance-"
                "aware start would overwrite the trained mask logits and change the model's outputs. Call "
                "calibrate(batches) before the first optimizer step (PATCallback does it at the start of training), "
                "or keep training without it."
            )
        check_calibration_source(batches)
        limit = config.calibration_batches or None
        chosen = list(itertools.islice(batches, limit))
        if not chosen:
            raise PATConfigError("calibrate: got no batch; pass the first batches of the training data.")
        check_calibration_batches(chosen)
        with self.teacher_pass():
            stats = channel_statistics(self.model, chosen, self.family)
        score, energy = _all_reduce_mean(stats.score, self.model), _all_reduce_mean(stats.energy, self.model)
        protected = torch.zeros(mask.hidden_size, dtype=torch.bool)
        if config.protect_massive_activations:
            protected[massive_channels(energy, config.massive_activation_ratio)] = True
        gate_before = mask.gate().detach().float().cpu()
        gate_after = mask.start_from_importance(score, protected, config.calibration_margin)
        ratio = gate_before / gate_after
        for layer in self._pat_layers():
            if layer.has_hsm(name):
                scale = layer.pat_hsm_scale[name]
                scale.data = (scale.data.float() * ratio.to(scale.device)).to(scale.dtype)
        median = float(energy.median())
        summary = {
            "tokens": stats.tokens,
            "batches": len(chosen),
            "protected_channels": protected.nonzero().flatten().tolist(),
            "protected_energy_ratio": [round(float(energy[i]) / median, 1) for i in protected.nonzero().flatten()],
        }
        if summary["protected_channels"]:
            logger.warning(
                "PAT: protected massive-activation channel(s) %s (residual energy %s x the median) from pruning; "
                "set protect_massive_activations=False to allow it.",
                summary["protected_channels"],
                summary["protected_energy_ratio"],
            )
        logger.info("PAT: mask start ranked %d channels on %d calibration tokens.", mask.hidden_size, stats.tokens)
        self.calibration_summary = summary
        return summary

    def needs_calibration(self, adapter_name: str | None = None) -> bool:
        """True while the adapter asks for an importance-aware start that has not run, the mask is soft and
        training has not started (the schedule is at step 0: later, calibrating would discard trained logits)."""
        name = self._single_adapter(adapter_name)
        mask = self.pat_mask[name]
        waiting = self.peft_config[name].calibration_batches > 0 and not bool(mask.calibrated)
        return waiting and not mask.hardened and int(mask.step) == 0

    def _distillation_settings(self) -> tuple[float, float] | None:
        """(weight, temperature) of the active adapter when this forward should distil, else None."""
        if not (self.training and torch.is_grad_enabled()) or "pat_mask" not in self._modules:
            return None
        active = [a for a in self.active_adapters if a in self.pat_mask]
        if len(active) != 1:
            return None
        config: PATConfig = self.peft_config[active[0]]
        if config.distillation_weight <= 0:
            return None
        return float(config.distillation_weight), float(config.distillation_temperature)

    def forward(self, *args: Any, **kwargs: Any):
        self._check_not_pruned()
        self._check_materialised()
        # TRL's SFTTrainer asks its patched forward for per-token log-probabilities (fused_lm_head=True) and builds
        # no logits: nothing to distil from, so that call keeps the task loss only (docs/training.md).
        distill = None if kwargs.get("fused_lm_head") else self._distillation_settings()
        teacher_logits = None
        student_kwargs = kwargs
        # distillation alone (w = 1, T = 1) scores the task loss from the distillation pass, not the model's own loss
        task_from_distillation = distill == (1.0, 1.0) and any(kwargs.get(k) is not None for k in _LABEL_KWARGS)
        if distill is not None:
            unlabelled = {k: v for k, v in kwargs.items() if k not in (*_LABEL_KWARGS, "num_items_in_batch")}
            with torch.no_grad(), self.teacher_pass():
                teacher_logits = self.model(*args, **{**unlabelled, "use_cache": False}).logits
            if task_from_distillation:
                student_kwargs = unlabelled
        outputs = self.model(*args, **student_kwargs)
        loss = getattr(outputs, "loss", None)
        if not self.training or "pat_mask" not in self._modules or not len(self.pat_mask):
            return outputs
        if loss is None and teacher_logits is None:
            return outputs
        fraction = self._aux_fraction(kwargs)
        parts_log: dict[str, torch.Tensor] = {}
        if teacher_logits is not None:
            weight, temperature = distill
            if task_from_distillation:
                labels = (kwargs.get(k) for k in _LABEL_KWARGS)
                kd, parts_log["task_loss"] = distillation_and_task_loss(
                    outputs.logits, teacher_logits, kwargs.get("attention_mask"), *labels
                )
            else:
                kd = distillation_loss(
                    outputs.logits, teacher_logits, kwargs.get("attention_mask"), temperature, consume_teacher=True
                )
            parts_log["distillation_loss"] = kd.detach()
            kd_step = kd * self._distillation_share(kwargs, outputs.logits, fraction).to(kd.device)
            objective = kd_step * weight if loss is None or weight == 1.0 else loss * (1 - weight) + kd_step * weight
        else:
            objective = loss
        aux, parts = self.auxiliary_loss()
        outputs.loss = objective + aux.to(objective.device) * fraction
        self._last_losses = {key: value.detach() for key, value in parts.items()}
        self._last_losses.update(parts_log)
        if loss is not None:
            task_loss = loss.detach()
            if isinstance(
                fraction, torch.Tensor
            ):  # loss = sum / (tokens in the whole step): log this micro-batch's mean
                task_loss = task_loss / fraction.to(task_loss.device).clamp(min=torch.finfo(torch.float32).tiny)
            self._last_losses["task_loss"] = task_loss
        return outputs

    @staticmethod
    def _distillation_share(kwargs: dict[str, Any], logits: torch.Tensor, fraction) -> torch.Tensor:
        """Weight of this micro-batch's mean KL in the step: 1, or, when the Trainer normalises the task loss by
        the label tokens of the whole step (``num_items_in_batch``), (this micro-batch's distilled tokens) /
        (the step's label tokens), so the sum over micro-batches is the same for any accumulation split."""
        if not isinstance(fraction, torch.Tensor):
            return torch.as_tensor(float(fraction))
        attention = kwargs.get("attention_mask")
        tokens = attention.sum() if attention is not None else torch.tensor(logits.shape[:-1].numel())
        total = torch.as_tensor(kwargs["num_items_in_batch"], dtype=torch.float32, device=fraction.device).clamp(
            min=1.0
        )
        return tokens.to(fraction.device, torch.float32) / total

    @staticmethod
    def _aux_fraction(kwargs: dict[str, Any]) -> float | torch.Tensor:
        """Share of this micro-batch in the optimizer step when the Trainer normalises by token count.

        With ``num_items_in_batch`` the task loss is sum / (tokens in the whole accumulated, possibly
        multi-process, batch) and the Trainer does not divide by the accumulation steps, so the
        auxiliary loss is weighted by this micro-batch's token share to count once per step.
        """
        num_items = kwargs.get("num_items_in_batch")
        labels, shifted = (kwargs.get(k) for k in _LABEL_KWARGS)
        if num_items is None or (labels is None and shifted is None):
            return 1.0
        local = (next_token_targets(labels, shifted) != IGNORE_INDEX).sum()
        total = torch.as_tensor(num_items, dtype=torch.float32, device=local.device).clamp(min=1.0)
        return local.to(torch.float32) / total

    # ------------------------------------------------------------------ merging
    def _single_adapter(self, adapter_name: str | None) -> str:
        if adapter_name is not None:
            if adapter_name not in self.pat_mask:
                raise PATConfigError(f"Unknown PAT adapter '{adapter_name}'; known: {sorted(self.pat_mask)}.")
            return adapter_name
        active = [a for a in self.active_adapters if a in self.pat_mask]
        if len(active) != 1:
            raise PATStateError(
                f"Expected exactly one active PAT adapter, found {active}; pass adapter_name= or call set_adapter()."
            )
        return active[0]

    def _check_not_pruned(self) -> None:
        if getattr(self, "_pruned", False):
            raise PATStateError(
                "This model was already merged and pruned: merge_and_prune() works in place and returns the "
                "pruned model. Use that returned model, or reload the base model and the adapter to merge again."
            )

    def _fold_tied_diagonal_embedding(self, adapter_name: str) -> bool:
        """Keep tied embeddings tied: E <- E diag(g), final-norm gain <- gain / g (exact; module docstring of prune)."""
        family = self.family
        embedding = self.model.get_submodule(family.embedding)
        lm_head = self.model.get_submodule(family.lm_head)
        if not isinstance(embedding, PATEmbedding) or adapter_name not in embedding.pat_hsm_scale:
            return False
        base = embedding.get_base_layer()
        if adapter_name in embedding.pat_hsm_down or getattr(lm_head, "weight", None) is not base.weight:
            return False  # a low-rank embedding HSM, or not tied
        gate_scale = embedding.hsm_gate_scale(adapter_name).detach()
        head_lora = isinstance(lm_head, PATLayer) and adapter_name in lm_head.pat_lora_A
        if not keeps_tie(True, False, head_lora, gate_scale):
            return False  # untie instead
        norm = self.model.get_submodule(family.final_norm)
        with torch.no_grad():
            fold.scale_columns(base.weight, gate_scale, out=base.weight)  # in place: lm_head shares it
            norm.weight.data = fold.divide_norm_gain(norm.weight, gate_scale.to(norm.weight.device), family.norm_offset)
        embedding.merged_adapters.append(adapter_name)
        return True

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ):
        """Fold every PAT layer at full width (no unmerge backups) and replace the wrappers by base layers."""
        self._check_not_pruned()
        if merge:
            names = adapter_names or [a for a in self.active_adapters if a in self.peft_config]
            shared = _shared_parameter_ids(self.model)  # tied weights get a new Parameter; all others fold in place
            for name in names:
                tied_done = self._fold_tied_diagonal_embedding(name)
                for module in self._pat_layers():
                    if tied_done and isinstance(module, PATEmbedding):
                        continue
                    with onload_layer(module):
                        in_place = id(module.get_base_layer().weight) not in shared
                        module.merge(safe_merge=safe_merge, adapter_names=[name], keep_backup=False, in_place=in_place)
            self._untie_flag_if_diverged()
        keys = [
            key
            for key, module in self.model.named_modules()
            if isinstance(module, (PATLayer, AuxiliaryTrainingWrapper))
        ]
        for key in tqdm(keys, disable=not progressbar, desc="Unloading PAT layers"):
            parent, target, target_name = _get_submodules(self.model, key)
            if isinstance(target, AuxiliaryTrainingWrapper):
                replacement = target.unload_and_optionally_merge_module(
                    merge=merge, safe_merge=safe_merge, adapter_names=adapter_names
                )
            else:
                replacement = target.get_base_layer()
            setattr(parent, target_name, replacement)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def _untie_flag_if_diverged(self) -> None:
        family = self.family
        embedding = self.model.get_submodule(family.embedding)
        lm_head = self.model.get_submodule(family.lm_head)
        base = embedding.get_base_layer() if isinstance(embedding, BaseTunerLayer) else embedding
        if getattr(self.model.config, "tie_word_embeddings", False) and lm_head.weight is not base.weight:
            own_config(self.model).tie_word_embeddings = False  # not the caller's config object

    def merge_and_prune(self, adapter_name: str | None = None, progressbar: bool = False) -> nn.Module:
        """Fold LoRA and the HSMs into the base weights, drop the masked hidden channels and return the
        smaller stock transformers model (``config.hidden_size`` = kept width, ``head_dim`` pinned).

        Works in place: the PEFT model is consumed. If the mask is still soft (training stopped before
        the freeze step), it is first hardened to the exact top-N channels, with a warning.
        """
        self._check_not_pruned()
        name = self._single_adapter(adapter_name)
        mask = self.pat_mask[name]
        harden_for_merge(mask, f"PAT adapter '{name}'", stacklevel=2)
        keep = mask.kept_indices()
        family = self.family
        others = [a for a in self.peft_config if a != name]
        if others:
            warnings.warn(f"merge_and_prune keeps only adapter '{name}'; dropping {others}.", stacklevel=2)
        model = self._unload_and_optionally_merge(merge=True, progressbar=progressbar, adapter_names=[name])
        prune_hidden_channels(model, family, keep.to("cpu"), progressbar=progressbar)
        # Trainable parameters, as from_pretrained returns them. Left frozen, transformers' logits_to_keep slice
        # (a non-foldable 3-D view) sends lm_head down PyTorch's bmm path, which copies the whole weight on every
        # prefill: measured 5x slower prefill of an in-memory pruned model (docs/performance.md).
        model.requires_grad_(True)
        self._pruned = True
        self.register_state_dict_pre_hook(_refuse_state_dict_after_pruning)
        return make_save_pretrained_atomic(model)


def _all_reduce_mean(tensor: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Mean of ``tensor`` over the processes of a running torch.distributed job (itself otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    device = next(model.parameters()).device if dist.get_backend() == "nccl" else torch.device("cpu")
    reduced = tensor.to(device, torch.float64)
    dist.all_reduce(reduced)
    return (reduced / dist.get_world_size()).cpu()


def find_pat_tuner(model: Any):
    """The :class:`~peft_pat.model.PATModel` inside a PeftModel, possibly wrapped by DDP/FSDP/compile."""
    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, PATModel):
            return model
        for attr in ("base_model", "module", "_orig_mod", "_fsdp_wrapped_module"):
            inner = getattr(model, attr, None) if attr != "base_model" else _base_model(model)
            if inner is not None and inner is not model:
                model = inner
                break
        else:
            return None
        seen += 1
    return None


def _base_model(model: Any):
    modules = getattr(model, "_modules", {})
    return modules.get("base_model")

"""`PATModel`: the PEFT tuner that injects PAT layers, owns the shared masks, adds the auxiliary
loss in its forward pass and turns a trained adapter into a smaller stock model (``merge_and_prune``).
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from .axes import gating_axes
from .checks import (
    check_adapter_name,
    check_causal_lm_layout,
    check_injection_targets,
    check_no_foreign_pat_layers,
    plain_float_layer_error,
)
from .config import PATConfig
from .errors import PATConfigError, PATStateError, PATTypeError
from .families import FAMILIES, FamilySpec, family_for_model_type
from .layer import PATEmbedding, PATLayer, PATLinear
from .mask import PATMask
from .merge.adapter import AdapterWeights
from .merge.in_memory import InMemoryMerge, embedding_scale, stock_layout
from .merge.plan import build_plan, harden_for_merge
from .resolution import resolve_for_base
from .saving import make_save_pretrained_atomic
from .sharding import is_sharded, sharded_parameters
from .training import mask_start
from .training.objective import auxiliary_loss, teacher_pass, training_forward
from .training.schedule import TrainingTelemetry, drive_schedule

logger = logging.getLogger("peft_pat")


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
    for mask in tuner.all_masks():
        if any(t.device != device for t in itertools.chain(mask.parameters(), mask.buffers())):
            _move_mask(mask, device)


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
        if "pat_mask" not in self._modules:  # the first adapter: the tuner's own state, once
            self.pat_mask = nn.ModuleDict()  # adapter -> the hidden-axis PATMask
            self.pat_unit_masks = nn.ModuleDict()  # adapter -> {axis: PATMask} of the per-layer axes (mlp, heads, ...)
            self.telemetry = TrainingTelemetry()
            self._pruned = False
            self._pending_merge: InMemoryMerge | None = None
            self._pat_adapters_disabled = False
            self.register_load_state_dict_post_hook(_masks_to_embedding_device)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's injection, after every check that can refuse the adapter while ``model`` is unchanged.

        BaseTuner calls :meth:`_prepare_adapter_config` (once) and then :meth:`_prepare_model`, which runs
        the checks, before it replaces any module."""
        check_adapter_name(adapter_name)
        check_no_foreign_pat_layers(model, self._modules.get("pat_mask"))
        self._explicit_targets = getattr(self.peft_config[adapter_name], "target_modules", None) is not None
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _prepare_model(self, peft_config: PATConfig, model: nn.Module) -> None:
        family = family_for_model_type(peft_config.base_model_type)
        check_causal_lm_layout(model, family)
        check_injection_targets(model, peft_config, family, self._explicit_targets)

    @property
    def family(self) -> FamilySpec:
        return family_for_model_type(getattr(self.model.config, "model_type", None))

    def _prepare_adapter_config(self, peft_config: PATConfig, model_config: dict) -> PATConfig:
        # the budget counts the stock layout's tensors: a model without the causal-LM layout is refused first
        check_causal_lm_layout(self.model, family_for_model_type(model_config.get("model_type")))
        return resolve_for_base(peft_config, model_config, stock_layout(self.model))

    @staticmethod
    def _check_target_module_exists(peft_config: PATConfig, key: str):
        family = family_for_model_type(peft_config.base_model_type)
        axes = peft_config.pruned_axes
        if family.is_producer(key) and "hidden" in axes:
            return True  # an HSM
        if gating_axes(family, key, axes):
            return True  # the gate on a per-layer axis' output linear's input units (down_proj, o_proj)
        if peft_config.r == 0:
            return False
        return check_target_module_exists(peft_config, key)

    def _ensure_mask(self, config: PATConfig, adapter_name: str) -> nn.ModuleDict:
        if "pat_mask" not in self._modules:
            self.pat_mask = nn.ModuleDict()
        if adapter_name not in self.pat_mask:
            mask = PATMask.from_config(config, random_init=not config.init_weights)
            units = nn.ModuleDict(PATMask.unit_masks_from_config(config, random_init=not config.init_weights))
            device = self.model.get_input_embeddings().weight.device
            for each in (mask, *units.values()):
                _move_mask(each, device)
                each.requires_grad_(not config.inference_mode)
            self.pat_mask[adapter_name] = mask
            self.pat_unit_masks[adapter_name] = units
        return self.pat_mask

    def masks_of(self, adapter_name: str) -> dict[str, PATMask]:
        """Every mask of one adapter by axis: "hidden" (all-ones and hard when that axis is not pruned), then the
        per-layer axes it prunes."""
        units = self.pat_unit_masks[adapter_name] if adapter_name in self.pat_unit_masks else {}
        return {"hidden": self.pat_mask[adapter_name], **units}

    def all_masks(self) -> list[PATMask]:
        """Every mask of every adapter (for the optimizer groups and the device moves)."""
        return [mask for name in self.pat_mask for mask in self.masks_of(name).values()]

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
        with_hsm = family.is_producer(current_key) and "hidden" in peft_config.pruned_axes
        gates_units = gating_axes(family, current_key, peft_config.pruned_axes)
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
            "unit_gate": (gates_units, family.layer_index(current_key)) if gates_units else None,
            "unit_masks": self.pat_unit_masks,
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

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Checkpoint key of a model key (PEFT uses it both ways): the per-layer axis masks are keyed adapter
        then axis, so ``pat_unit_masks.<adapter>.mlp.logits`` is saved as ``pat_unit_masks.mlp.logits``."""
        marker = f".pat_unit_masks.{adapter_name}."
        if marker in key:
            return key.replace(marker, ".pat_unit_masks.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    # ------------------------------------------------------------------ trainability of the shared mask
    def _sync_mask_requires_grad(self) -> None:
        if "pat_mask" not in self._modules:
            return
        enabled = not self._pat_adapters_disabled
        for name in self.pat_mask:
            config = self.peft_config.get(name)
            trainable = enabled and name in self.active_adapters and not (config and config.inference_mode)
            for mask in self.masks_of(name).values():
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
                    for mask in self.masks_of(name).values():
                        mask.logits.requires_grad_(False)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._pat_adapters_disabled = not enabled
        self._sync_mask_requires_grad()

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name in names & set(self.pat_mask.keys()):
            for mask in self.masks_of(name).values():
                mask.logits.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.pat_mask:
            del self.pat_mask[adapter_name]
        if adapter_name in self.pat_unit_masks:
            del self.pat_unit_masks[adapter_name]
        self._sync_mask_requires_grad()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if autocast_adapter_dtype and adapter_name in self.pat_mask:
            for mask in self.masks_of(adapter_name).values():
                if mask.logits.dtype in (torch.float16, torch.bfloat16):
                    mask.logits.data = mask.logits.data.float()

    # ------------------------------------------------------------------ training (peft_pat.training)
    def _check_materialised(self) -> None:
        """Refuse to run an adapter whose weights are still empty meta tensors (low_cpu_mem_usage=True)."""
        if "pat_mask" not in self._modules:
            return
        empty = [name for name in self.pat_mask if any(m.logits.is_meta for m in self.masks_of(name).values())]
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
        drive_schedule(self, step, total_steps, learning_rate)

    def harden_mask(self, adapter_name: str | None = None) -> None:
        """Turn the masks of ``adapter_name`` (default: the active one) into their exact top-N 0/1 masks now."""
        for mask in self.masks_of(self._single_adapter(adapter_name)).values():
            mask.harden()

    @property
    def last_auxiliary_losses(self) -> dict[str, float]:
        """Each weighted auxiliary loss and the task loss (mean per target token of the micro-batch) of the
        last training forward, and the loss change across the hardening once known."""
        return self.telemetry.logged_losses()

    @property
    def calibration_summary(self) -> dict | None:
        """What the importance-aware start did (tokens, protected channels), or None before it ran."""
        return self.telemetry.calibration_summary

    def pat_stats(self, adapter_name: str | None = None) -> dict[str, float]:
        """Schedule state and the last auxiliary losses, for logging."""
        masks = self.masks_of(self._single_adapter(adapter_name))
        stats = masks.pop("hidden").stats()
        for axis, mask in masks.items():
            stats.update({f"{axis}_{key}": value for key, value in mask.stats().items() if key != "step"})
        stats.update(self.last_auxiliary_losses)
        return stats

    def auxiliary_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of the active-channel, polarisation and identity losses of the active adapters."""
        return auxiliary_loss(self)

    def teacher_pass(self):
        """Context manager: run the base model with every PAT piece bypassed (the distillation teacher)."""
        return teacher_pass(self)

    # ------------------------------------------------------------------ calibration (peft_pat.training.mask_start)
    def calibrate(self, batches: Iterable[Mapping[str, torch.Tensor]], adapter_name: str | None = None) -> dict:
        """Importance-aware mask start from the first training ``batches`` (dicts with ``input_ids``, optional
        ``attention_mask``); the network still computes what it did. Call before the first optimizer step
        (PATCallback does it). Returns a summary (tokens, protected channels and their energy ratio)."""
        return self._calibrate(batches, adapter_name, None)

    def _calibrate(self, batches, adapter_name: str | None, model: nn.Module | None) -> dict:
        """:meth:`calibrate`, the statistics forward run through ``model`` (the outer, possibly sharded, module)."""
        self._check_not_pruned()
        summary = mask_start.calibrate(self, self._single_adapter(adapter_name), batches, model=model)
        self.telemetry.calibration_summary = summary
        return summary

    def needs_calibration(self, adapter_name: str | None = None) -> bool:
        """True while the adapter asks for an importance-aware start that has not run, the mask is soft and
        training has not started (the schedule is at step 0: later, calibrating would discard trained logits)."""
        return mask_start.needs_calibration(self, self._single_adapter(adapter_name))

    def forward(self, *args: Any, **kwargs: Any):
        """The base model's forward through the PAT layers; in training, ``loss`` is the training objective
        (distillation and the auxiliary losses, :mod:`peft_pat.training.objective`)."""
        self._check_not_pruned()
        self._check_materialised()
        return training_forward(self, args, kwargs)

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

    def _refuse_sharded(self, what: str) -> None:
        """Refuse ``what`` (a merge) while ``fully_shard`` holds this model's parameters as per-rank shards."""
        sharded = sharded_parameters(self.model)
        if sharded:
            raise PATStateError(
                f"{what}: the parameters of this model are sharded by fully_shard (FSDP2; e.g. {sharded[0]}), so no "
                "process holds the weights to fold. Gather the adapter on every rank with get_model_state_dict(model, "
                "options=StateDictOptions(full_state_dict=True)) (torch.distributed.checkpoint.state_dict), save it "
                "on rank 0 with model.save_pretrained(folder, state_dict=that_dict), then in one process: "
                "PeftModel.from_pretrained(base, folder).merge_and_prune() (or peft-pat merge BASE folder OUT)."
            )

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection of the adapter's entries; refuses sharded (DTensor) entries, which would save only
        this rank's rows: ``save_pretrained`` of a ``fully_shard``-ed model needs the gathered state dict."""
        selected = super()._get_adapter_state_dict(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )  # fmt: skip
        sharded = [key for key, value in selected.items() if is_sharded(value)]
        if sharded:
            raise PATStateError(
                f"save_pretrained: the adapter's tensors are sharded by fully_shard (FSDP2; e.g. {sharded[0]}), and "
                "saving them would write this rank's rows only. Gather them on every rank with "
                "sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) "
                "(torch.distributed.checkpoint.state_dict), then on rank 0: "
                "model.save_pretrained(folder, state_dict=sd)."
            )
        return selected

    def _check_not_pruned(self) -> None:
        if self._pruned:
            raise PATStateError(
                "This model was already merged and pruned: merge_and_prune() works in place and returns the "
                "pruned model. Use that returned model, or reload the base model and the adapter to merge again."
            )
        if self._pending_merge is not None:
            raise PATStateError(
                "A merge of this model was interrupted midway, so its weights are partly merged. Call the same "
                "merge again (merge_and_prune() or merge_and_unload()) to finish it; it continues where it stopped."
            )

    def adapter_weights(self, adapter_name: str) -> AdapterWeights:
        """This adapter's weights by stock module name: the interface a merge plan reads (an adapter folder
        gives the same through :func:`peft_pat.merge.adapter.load_pat_adapter`)."""
        weights = AdapterWeights(self.peft_config[adapter_name], self.pat_mask[adapter_name],
                                 where=f"PAT adapter '{adapter_name}'")  # fmt: skip
        weights.unit_masks = dict(self.pat_unit_masks[adapter_name]) if adapter_name in self.pat_unit_masks else {}
        for key, module in self.model.named_modules():
            if isinstance(module, PATLayer):
                if adapter_name in module.pat_lora_A:
                    lora = (module.pat_lora_A[adapter_name].weight, module.pat_lora_B[adapter_name].weight)
                    weights.lora[key] = lora
                if module.has_hsm(adapter_name):
                    down, up = module.hsm_factors(adapter_name)
                    parts = {"down": down, "up": up} if down is not None else {}
                    weights.hsm[key] = {"scale": module.pat_hsm_scale[adapter_name], **parts}
                if adapter_name in module.pat_unit_gate:
                    weights.unit_scales[key] = module.pat_unit_scale[adapter_name]
            elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                for name, param in module.modules_to_save[adapter_name].named_parameters():
                    weights.replacements[f"{key}.{name}"] = param
        return weights

    def _merge(self, adapter_names: list[str], cut: bool, progressbar: bool) -> nn.Module:
        """Plan the merge of ``adapter_names`` (``cut``: and the cut to the kept channels of the one adapter),
        unload the PAT layers and execute the plan over the base model's parameters; an interrupted merge
        resumes here (the plan is kept until it has run)."""
        pending = self._pending_merge
        if pending is None:
            if not any(isinstance(m, PATLayer) for m in self.model.modules()):
                raise PATStateError(
                    "This PeftModel holds no PAT layers any more: unload() or merge_and_unload() removed them and "
                    "returned the base model. Merge before unloading, or load the adapter again with "
                    "PeftModel.from_pretrained(base, adapter_folder)."
                )
            if any(p.is_meta for p in self.model.parameters()):
                raise PATStateError(
                    "Some weights of this model are not in memory (offloaded by device_map, or on the meta device), "
                    "so they cannot be merged here. Save the adapter and merge from disk: peft-pat merge BASE "
                    "ADAPTER OUT (streams the base checkpoint tensor by tensor)."
                )
            plans = []
            for name in adapter_names:
                weights = self.adapter_weights(name)
                keep, units = None, {}
                if cut:
                    for mask in weights.all_masks():
                        harden_for_merge(mask, f"PAT adapter '{name}'", stacklevel=3)
                    keep = weights.mask.kept_indices() if weights.prunes_hidden else None
                    units = weights.unit_keeps()
                layout = stock_layout(self.model)
                scale = embedding_scale(self.model, self.family)
                plan = build_plan(self.family, self.model.config, layout, weights, keep=keep, embedding_scale=scale,
                                  unit_keeps=units)  # fmt: skip
                plans.append((plan, weights.replacements))
            pending = InMemoryMerge(plans)
            pending.cut = cut
            self._pending_merge = pending
        elif pending.cut != cut:
            raise PATStateError(
                f"A {'merge_and_prune' if pending.cut else 'merge_and_unload'}() of this model was interrupted; "
                "call it again to finish it before anything else."
            )
        model = BaseTuner._unload_and_optionally_merge(self, merge=False, progressbar=progressbar)
        pending.run(model, progressbar=progressbar)
        self._pending_merge = None
        return model

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ):
        """PEFT's unload; with ``merge``, every PAT adapter folded at full width by the merge plan (pruned
        channels become zero) before the PAT layers are replaced by their base layers."""
        if self._pruned or (not merge and self._pending_merge is not None):
            self._check_not_pruned()
        self._refuse_sharded("merge_and_unload" if merge else "unload")
        if not merge:
            return super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)
        names = adapter_names or [a for a in self.active_adapters if a in self.peft_config]
        return self._merge(names, cut=False, progressbar=progressbar)

    def merge_and_prune(self, adapter_name: str | None = None, progressbar: bool = False) -> nn.Module:
        """Fold LoRA and the HSMs into the base weights, drop the masked hidden channels and return the
        smaller stock transformers model (``config.hidden_size`` = kept width, ``head_dim`` pinned).

        Works in place: the PEFT model is consumed. If the mask is still soft (training stopped before
        the freeze step), it is first hardened to the exact top-N channels, with a warning. Interrupted
        (Ctrl-C), it leaves the model partly merged; calling it again finishes the same merge.
        """
        if self._pruned:
            self._check_not_pruned()
        self._refuse_sharded("merge_and_prune")
        if self._pending_merge is None:
            name = self._single_adapter(adapter_name)
            others = [a for a in self.peft_config if a != name]
            if others:
                warnings.warn(f"merge_and_prune keeps only adapter '{name}'; dropping {others}.", stacklevel=2)
            names = [name]
        else:
            names = []
        model = self._merge(names, cut=True, progressbar=progressbar)
        # Trainable parameters, as from_pretrained returns them. Left frozen, transformers' logits_to_keep slice
        # (a non-foldable 3-D view) sends lm_head down PyTorch's bmm path, which copies the whole weight on every
        # prefill: measured 5x slower prefill of an in-memory pruned model (docs/performance.md).
        model.requires_grad_(True)
        self._pruned = True
        self.register_state_dict_pre_hook(_refuse_state_dict_after_pruning)
        return make_save_pretrained_atomic(model)


def calibrate(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], adapter_name: str | None = None) -> dict:
    """``model.calibrate(batches)`` for a PAT model under any wrapper (DDP, ``fully_shard``, compile): the
    statistics forward runs through ``model`` itself when ``fully_shard`` has sharded the parameters, so its
    forward gathers them. In a distributed job call it on every rank, each with its own batches."""
    tuner = find_pat_tuner(model)
    if tuner is None:
        raise PATTypeError(
            f"calibrate: {type(model).__name__} has no PAT adapter. Wrap the base model first: "
            "model = get_peft_model(base, PATConfig(task_type='CAUSAL_LM'))."
        )
    return tuner._calibrate(batches, adapter_name, model)


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

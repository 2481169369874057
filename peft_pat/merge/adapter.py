"""The adapter side of a merge: :class:`AdapterWeights`, the one interface a merge plan reads.

A live tuner provides it (:meth:`peft_pat.model.PATModel.adapter_weights`) and so does an adapter folder
saved by ``PeftModel.save_pretrained`` (:func:`load_pat_adapter`): the config, the hard mask, each
module's LoRA factors and HSM, and the tensors of ``modules_to_save`` (the trained copies). Module and
tensor names are the stock model's (``model.layers.0.self_attn.o_proj``), whichever side they came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..axes import column_gate, gating_axes, space_keeps
from ..config import PATConfig
from ..errors import AdapterMismatchError, CheckpointError, PATStateError
from ..mask import PATMask
from . import fold
from .shards import read_json, read_specs, read_tensor

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_MODEL_PREFIX = "base_model.model."
_MASK_PREFIX = "base_model.pat_mask."
_UNIT_MASK_PREFIX = "base_model.pat_unit_masks."
_ADAPTER_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<part>pat_lora_A\.weight|pat_lora_B\.weight|pat_hsm_down\.weight|"
    r"pat_hsm_up\.weight|pat_hsm_scale|pat_unit_scale)$"
)
_HSM_PARTS = {"pat_hsm_down.weight": "down", "pat_hsm_up.weight": "up", "pat_hsm_scale": "scale"}


def lora_scaling(lora_alpha: float, r: int) -> float:
    """alpha / r: the factor of the LoRA update dW = (alpha / r) B A."""
    return lora_alpha / r


def gate_scale(scale: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """g = s ⊙ M of one HSM, float32, on the scale's device."""
    return scale.float() * gate.to(scale.device, torch.float32)


@dataclass
class AdapterWeights:
    """One PAT adapter's weights, by stock module name: what a merge folds in."""

    config: PATConfig
    mask: PATMask
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B)
    hsm: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> {down, up, scale}
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save: tensor name -> tensor
    where: str = "the PAT adapter"  # names it in errors and warnings
    unit_masks: dict[str, PATMask] = field(default_factory=dict)  # per-layer axis -> its (layers, units) mask
    unit_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # gated module -> s of its input units

    @property
    def prunes_hidden(self) -> bool:
        return "hidden" in self.config.pruned_axes

    def all_masks(self) -> list[PATMask]:
        return [self.mask, *self.unit_masks.values()]

    def unit_keeps(self) -> dict[str, torch.Tensor]:
        """Each unit space's kept units, (layers, kept), from the per-layer masks (they must be hard)."""
        keeps = {axis: mask.kept_indices() for axis, mask in self.unit_masks.items()}
        return space_keeps(keeps, self.config.base_num_attention_heads, self.config.base_num_key_value_heads)

    def unit_column_scale(self, module: str, layer: int, family) -> torch.Tensor:
        """c = s ⊙ M[layer] on the input units of a gated module, float32 (as PATLayer.unit_gate_scale)."""
        scale = self.unit_scales[module]
        axes = gating_axes(family, module, self.config.pruned_axes)
        return gate_scale(scale, column_gate({axis: self.unit_masks[axis].gate(layer) for axis in axes}, scale.numel()))

    def lora_update(self, module: str) -> fold.LoRAUpdate | None:
        if module not in self.lora:
            return None
        lora_a, lora_b = self.lora[module]
        return fold.LoRAUpdate(lora_a, lora_b, lora_scaling(self.config.lora_alpha, self.config.r))

    def gate_scale(self, module: str) -> torch.Tensor:
        """g = s ⊙ M of the module's HSM, float32 (as PATLayer.hsm_gate_scale)."""
        return gate_scale(self.hsm[module]["scale"], self.mask.gate())

    def check_finite(self) -> None:
        """Refuse weights with NaN or inf (a diverged run): every merged tensor they touch would be garbage."""
        parts = [(f"{m} LoRA", t) for m, ab in self.lora.items() for t in ab]
        parts += [(f"{m} HSM {k}", t) for m, hsm in self.hsm.items() for k, t in hsm.items()]
        parts += [(f"saved copy {n}", t) for n, t in self.replacements.items()]
        parts += [(f"{m} input-unit scale", t) for m, t in self.unit_scales.items()]
        parts += [(f"{axis} mask gate", m.gate()) for axis, m in {"hidden": self.mask, **self.unit_masks}.items()]
        bad = [name for name, t in parts if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())]
        if bad:
            raise PATStateError(
                f"{self.where}: merging would have produced non-finite weights; not merged. NaN or inf in {bad[:3]}"
                f"{' and more' if len(bad) > 3 else ''} (training diverged?). Merge an earlier checkpoint."
            )


def _adapter_folder(adapter: Path, adapter_name: str | None) -> Path:
    if not adapter.is_dir():
        what = "is a file, not a folder" if adapter.exists() else "does not exist"
        raise CheckpointError(f"Adapter folder {adapter} {what}; ADAPTER is the folder save_pretrained() wrote.")
    if adapter_name in (None, "default"):
        if (adapter / ADAPTER_CONFIG_NAME).is_file():
            return adapter
    elif (adapter / adapter_name / ADAPTER_CONFIG_NAME).is_file():
        return adapter / adapter_name
    names = sorted(p.parent.name for p in adapter.glob(f"*/{ADAPTER_CONFIG_NAME}"))
    found = ("default" if (adapter / ADAPTER_CONFIG_NAME).is_file() else None, *names)
    known = [n for n in found if n]
    wanted = f"adapter '{adapter_name}'" if adapter_name not in (None, "default") else "the default adapter"
    raise CheckpointError(
        f"{adapter} holds no {ADAPTER_CONFIG_NAME} for {wanted}"
        + (f"; it has adapters {known} (pick one with --adapter-name)." if known else "; is it a PEFT adapter folder?")
    )


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, each in its own fresh allocation, as a model's parameters are (so the folds
    run the same kernels on equally aligned memory and give the same bits as the in-memory merge)."""
    if path.suffix == ".safetensors":
        with open(path, "rb") as handle:
            return {spec.name: read_tensor(spec, handle) for spec in read_specs(path)}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign pickle: torch raises several unrelated types
        raise CheckpointError(f"{path} does not load as a PyTorch state dict ({exc}); save the adapter again.") from exc
    return {key: state.pop(key).clone(memory_format=torch.contiguous_format) for key in list(state)}


def load_pat_adapter(adapter: str | Path, adapter_name: str | None = None) -> AdapterWeights:
    """Read a PAT adapter saved by ``PeftModel.save_pretrained`` (a named one from its sub-folder)."""
    folder = _adapter_folder(Path(adapter), adapter_name)
    raw = read_json(folder / ADAPTER_CONFIG_NAME, "adapter config")
    if raw.get("peft_type") != "PAT":
        raise AdapterMismatchError(
            f"{folder} holds a {raw.get('peft_type')!r} adapter, not a PAT adapter; `peft-pat merge` needs an adapter "
            "trained with PATConfig. Merge other PEFT adapters with PeftModel.merge_and_unload()."
        )
    config = PATConfig.from_pretrained(str(folder))
    missing = [k for k in ("base_model_type", "base_hidden_size", "kept_width") if getattr(config, k) is None]
    if missing:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG_NAME} lacks {missing}; save the adapter with peft-pat.")
    weights_file = next((folder / n for n in ADAPTER_WEIGHTS_NAMES if (folder / n).is_file()), None)
    if weights_file is None:
        raise CheckpointError(f"{folder} has no {' or '.join(ADAPTER_WEIGHTS_NAMES)}.")
    state = _load_state_dict(weights_file)

    mask = PATMask.from_config(config)
    mask_state = {k[len(_MASK_PREFIX) :]: v for k, v in state.items() if k.startswith(_MASK_PREFIX)}
    try:
        mask.load_state_dict(mask_state)
    except RuntimeError as exc:
        raise AdapterMismatchError(f"{weights_file}: the PAT mask does not load ({exc}).") from exc
    weights = AdapterWeights(config, mask, where=f"The PAT adapter in {folder}")
    weights.unit_masks = PATMask.unit_masks_from_config(config)
    for axis, unit_mask in weights.unit_masks.items():
        prefix = f"{_UNIT_MASK_PREFIX}{axis}."
        try:
            unit_mask.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        except RuntimeError as exc:
            raise AdapterMismatchError(f"{weights_file}: the PAT {axis} mask does not load ({exc}).") from exc
    lora_parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.startswith((_MASK_PREFIX, _UNIT_MASK_PREFIX)):
            continue
        match = _ADAPTER_KEY.match(key)
        if match and match["part"] == "pat_unit_scale":
            weights.unit_scales[match["module"]] = tensor
        elif match and match["part"].startswith("pat_lora"):
            lora_parts.setdefault(match["module"], {})[match["part"][len("pat_lora_")]] = tensor
        elif match:
            weights.hsm.setdefault(match["module"], {})[_HSM_PARTS[match["part"]]] = tensor
        elif key.startswith(_MODEL_PREFIX) and ".pat_" not in key:
            # modules_to_save, or a base layer PEFT saved along (lm_head/embeddings in target_modules)
            weights.replacements[key[len(_MODEL_PREFIX) :].replace(".base_layer.", ".")] = tensor
        else:
            raise CheckpointError(f"{weights_file}: unexpected tensor {key!r} in a PAT adapter.")
    for module, parts in lora_parts.items():
        if set(parts) != {"A", "B"}:
            raise CheckpointError(f"{weights_file}: LoRA of {module!r} lacks its A or B matrix.")
        weights.lora[module] = (parts["A"], parts["B"])
    for module, parts in weights.hsm.items():
        if "scale" not in parts or ("down" in parts) != ("up" in parts):
            raise CheckpointError(f"{weights_file}: the HSM of {module!r} is incomplete ({sorted(parts)}).")
    return weights

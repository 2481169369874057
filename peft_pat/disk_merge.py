"""``merge_checkpoint``: :meth:`PATModel.merge_and_prune` from disk to disk, one tensor at a time.

The base checkpoint is never loaded as a model. Each tensor of each safetensors shard is read, given
its role from the family table (:meth:`FamilySpec.module_roles`), folded and pruned with the same pure
functions of :mod:`peft_pat.fold` that the in-memory merge uses, in the same order and dtypes, and
written to the output shard of the same name. So the result equals ``merge_and_prune()`` bit for bit,
while peak memory is the adapter plus about one weight matrix, whatever the model size.

Per role (K kept channels, g = s ⊙ M of the module's HSM, D = I + L1 L0, factors from
:func:`peft_pat.fold.pruning_factors`):

* embedding: ``E' = (E D^T diag(g))[:, K] * f_emb``; with tied embeddings and a diagonal HSM the tie is
  kept (``E diag(g)``, and the final norm's gain is divided by g), otherwise an ``lm_head`` equal to the
  old ``E[:, K]`` is written next to it (untied);
* producers (``o_proj``, ``down_proj``): ``W' = (diag(g) D (W + dW))[K, :] * c`` (biases likewise);
* consumers and an untied ``lm_head``: ``W' = (W + dW)[:, K]``;
* norms: the gain is sliced to K and rescaled (residual, branch and final norms differ);
* anything else (q/k norms, biases of consumers, ...) is copied, with any LoRA update folded in.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, GenerationConfig

from . import fold
from .checks import check_adapter_matches_base
from .config import PATConfig
from .errors import AdapterMismatchError, CheckpointError, PATConfigError
from .families import FamilySpec, family_for_model_type
from .mask import PATMask
from .merge_plan import PRUNED_AXIS, gate_scale, harden_for_merge, keeps_tie, lora_scaling
from .saving import atomic_directory, check_output_apart
from .shards import (
    SAFE_WEIGHTS_INDEX_NAME,
    SafetensorsWriter,
    TensorSpec,
    checkpoint_shards,
    read_specs,
    read_tensor,
)
from .surgery import pruned_config_updates, validate_keep

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_MODEL_PREFIX = "base_model.model."
_MASK_PREFIX = "base_model.pat_mask."
_ADAPTER_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<part>pat_lora_A\.weight|pat_lora_B\.weight|pat_hsm_down\.weight|"
    r"pat_hsm_up\.weight|pat_hsm_scale)$"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------- adapter
@dataclass
class PATAdapterWeights:
    """A saved PAT adapter, loaded whole (it is small): config, LoRA factors, HSMs, mask, replaced modules."""

    folder: Path
    config: PATConfig
    mask: PATMask
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B)
    hsm: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> {down, up, scale}
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save: tensor name -> tensor

    def lora_update(self, module: str) -> fold.LoRAUpdate | None:
        if module not in self.lora:
            return None
        lora_a, lora_b = self.lora[module]
        return fold.LoRAUpdate(lora_a, lora_b, lora_scaling(self.config.lora_alpha, self.config.r))

    def gate_scale(self, module: str) -> torch.Tensor:
        """g = s ⊙ M of the module's HSM, float32 (as PATLayer.hsm_gate_scale)."""
        return gate_scale(self.hsm[module]["scale"], self.mask.gate())


def _adapter_folder(adapter: Path, adapter_name: str | None) -> Path:
    if not adapter.is_dir():
        raise CheckpointError(f"Adapter folder {adapter} does not exist.")
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
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {key: state.pop(key).clone(memory_format=torch.contiguous_format) for key in list(state)}


def load_pat_adapter(adapter: str | Path, adapter_name: str | None = None) -> PATAdapterWeights:
    """Read a PAT adapter saved by ``PeftModel.save_pretrained`` (a named one from its sub-folder)."""
    folder = _adapter_folder(Path(adapter), adapter_name)
    raw = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
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
    weights = PATAdapterWeights(folder, config, mask)
    lora_parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.startswith(_MASK_PREFIX):
            continue
        match = _ADAPTER_KEY.match(key)
        if match and match["part"].startswith("pat_lora"):
            lora_parts.setdefault(match["module"], {})[match["part"][len("pat_lora_")]] = tensor
        elif match:
            part = {"pat_hsm_down.weight": "down", "pat_hsm_up.weight": "up", "pat_hsm_scale": "scale"}[match["part"]]
            weights.hsm.setdefault(match["module"], {})[part] = tensor
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


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class _MergePlan:
    """Everything that decides how one tensor is transformed; built once, before any shard is read."""

    family: FamilySpec
    adapter: PATAdapterWeights
    keep: torch.Tensor
    factors: dict[str, float]
    roles: dict[str, str]
    tied_in: bool  # the base ties lm_head to the embedding
    tied_fold: bool  # ... and the merged model stays tied (diagonal embedding HSM divided out of the final norm)
    dtype: torch.dtype | None  # cast floating base tensors to this dtype on reading (--dtype)

    @property
    def kept(self) -> int:
        return int(self.keep.numel())

    def _out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.dtype if self.dtype is not None and dtype.is_floating_point else dtype

    def _role(self, name: str) -> tuple[str | None, str, str]:
        module, _, param = name.rpartition(".")
        return self.roles.get(module), module, param

    def outputs(self, spec: TensorSpec) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """Name, dtype and shape of what :meth:`stream` makes of ``spec``."""
        role, module, param = self._role(spec.name)
        dtype, shape = self._out_dtype(spec.dtype), list(spec.shape)
        if self.tied_in and module == self.family.lm_head:
            return []  # a tied lm_head has no tensor of its own (written from the embedding if untied)
        axis = PRUNED_AXIS.get((role, param), -1) if role is not None else None
        if axis == -1:
            raise CheckpointError(f"{spec.file}: unexpected tensor {spec.name!r} for a {self.family.name} model.")
        if axis is not None:
            shape[axis] = self.kept
        out = [(spec.name, dtype, tuple(shape))]
        if role == "embedding" and self.tied_in and not self.tied_fold:
            out.append((f"{self.family.lm_head}.weight", dtype, tuple(shape)))
        return out

    def stream(self, spec: TensorSpec, handle: BinaryIO) -> Iterator[tuple[str, torch.Tensor]]:
        """The merged and pruned tensor(s) made of base tensor ``spec``, in the order of :meth:`outputs`;
        mirrors PATModel.merge_and_prune. Row-wise roles (embedding, consumers, lm_head) are read, folded
        and yielded a row chunk at a time, so a 1 GiB embedding never sits in memory whole."""
        role, module, param = self._role(spec.name)
        family, adapter, keep, f = self.family, self.adapter, self.keep, self.factors
        if self.tied_in and module == family.lm_head:
            return
        source = _Source(spec, handle, adapter.replacements.get(spec.name), self.dtype)
        lora = adapter.lora_update(module) if param == "weight" else None
        if role == "embedding":
            hsm, g = adapter.hsm[module], adapter.gate_scale(module)
            for rows in source.row_chunks():
                folded = fold.fold_and_prune_embedding(
                    source.rows(rows), hsm.get("down"), hsm.get("up"), g, keep, f["embedding"]
                )
                yield spec.name, folded
            if self.tied_in and not self.tied_fold:  # untie: lm_head keeps the base embedding (+ its own LoRA)
                head_lora = adapter.lora_update(family.lm_head)
                for rows in source.row_chunks():
                    yield f"{family.lm_head}.weight", _merge_rows(source.rows(rows), head_lora, rows, keep)
            return
        if param == "weight" and (role in ("consumer", "lm_head") or (role is None and lora is not None)):
            for rows in source.row_chunks():
                yield spec.name, _merge_rows(source.rows(rows), lora, rows, keep if role else None)
            return
        tensor = source.rows(None)
        if role is None or role in ("consumer", "lm_head"):  # untouched (a consumer's bias is in its output space)
            yield spec.name, tensor
        elif role == "producer":
            hsm, g = adapter.hsm[module], adapter.gate_scale(module)
            if param == "bias":
                folded = fold.fold_bias(tensor, hsm.get("down"), hsm.get("up"), g).to(tensor.dtype)
                yield spec.name, fold.prune_rows(folded, keep, f["producer"])
            else:
                yield (
                    spec.name,
                    fold.fold_and_prune_producer(tensor, lora, hsm.get("down"), hsm.get("up"), g, keep, f["producer"]),
                )
        else:  # norms
            gain = tensor
            if role == "final_norm" and self.tied_fold:
                gain = fold.divide_norm_gain(gain, adapter.gate_scale(family.embedding), family.norm_offset)
            yield spec.name, fold.rescale_norm_gain(gain, keep, family.norm_offset, f[role])


class _Source:
    """One base tensor, read whole or by row chunks: from its shard, or from the adapter's saved copy
    (``modules_to_save``); cast to ``--dtype`` on reading, as loading the base with ``dtype=`` would."""

    def __init__(
        self, spec: TensorSpec, handle: BinaryIO, replacement: torch.Tensor | None, dtype: torch.dtype | None
    ) -> None:
        self.spec, self.handle, self.replacement = spec, handle, replacement
        self.dtype = (dtype or spec.dtype) if spec.dtype.is_floating_point else None

    def row_chunks(self) -> list[slice]:
        """The chunk boundaries the in-memory fold of a tensor of this shape uses (same bits)."""
        shape = self.spec.shape
        return fold.row_chunks(shape[0], int(torch.Size(shape[1:]).numel()))

    def rows(self, rows: slice | None) -> torch.Tensor:
        """Rows ``rows`` of the first dimension, or the whole tensor for None."""
        if self.replacement is not None:
            tensor = self.replacement if rows is None else self.replacement[rows]
        else:
            tensor = read_tensor(self.spec, self.handle, rows)
        return tensor if self.dtype is None else tensor.to(self.dtype)


def _merge_rows(
    weight_rows: torch.Tensor, lora: fold.LoRAUpdate | None, rows: slice, keep: torch.Tensor | None
) -> torch.Tensor:
    """Rows ``rows`` of W + dW, restricted to the kept columns K (None: all columns)."""
    if lora is None:
        return weight_rows if keep is None else fold.prune_columns(weight_rows, keep)
    lora = lora.restricted(rows)
    if keep is None:
        return fold.merge_lora(weight_rows, lora)
    return fold.merge_lora_and_prune_columns(weight_rows, lora, keep)


def _plan(config, specs: list[TensorSpec], adapter: PATAdapterWeights, dtype: torch.dtype | None) -> _MergePlan:
    family = family_for_model_type(getattr(config, "model_type", None))
    check_adapter_matches_base(
        adapter.config, config.model_type, config.hidden_size, getattr(config, "vocab_size", None),
        adapter=f"The PAT adapter in {adapter.folder}", base="the base checkpoint", action="Merge it into",
    )  # fmt: skip
    mask = adapter.mask
    harden_for_merge(mask, f"The PAT mask in {adapter.folder}", stacklevel=3)
    try:
        keep = validate_keep(mask.kept_indices(), int(config.hidden_size), int(config.num_attention_heads))
    except PATConfigError as exc:
        raise AdapterMismatchError(f"The adapter's kept channels do not fit the base model: {exc}") from exc

    names = {s.name for s in specs}
    tied_in = bool(getattr(config, "tie_word_embeddings", False))
    roles = family.module_roles(int(config.num_hidden_layers), tied=tied_in)
    missing = [m for m in roles if f"{m}.weight" not in names]
    if missing:
        raise CheckpointError(
            f"The base checkpoint lacks {len(missing)} tensors a {family.name} model needs, e.g. "
            f"{[m + '.weight' for m in missing[:3]]}; is it a transformers {family.name} checkpoint?"
        )
    producers = {m for m, r in roles.items() if r in ("embedding", "producer")}
    if set(adapter.hsm) != producers:
        odd = sorted(set(adapter.hsm) ^ producers)[:3]
        raise AdapterMismatchError(
            f"The adapter's HSMs do not sit on this base model's residual-stream producers (they differ at {odd}): "
            f"the base has {config.num_hidden_layers} decoder layers and {len(producers)} producers, the adapter "
            f"{len(adapter.hsm)} HSMs. Merge the adapter into the model it was trained from."
        )
    for module in adapter.lora:
        if f"{module}.weight" not in names and not (tied_in and module == family.lm_head):
            raise AdapterMismatchError(f"The adapter has LoRA on {module!r}, which the base checkpoint does not have.")
    tied_head, embedding = f"{family.lm_head}.weight", f"{family.embedding}.weight"
    if tied_in and tied_head in adapter.replacements:  # one tensor under two names
        adapter.replacements.setdefault(embedding, adapter.replacements.pop(tied_head))
    for name in adapter.replacements:
        if name not in names:
            raise AdapterMismatchError(f"The adapter saves a copy of {name!r}; the base checkpoint has no such tensor.")

    emb = adapter.hsm[family.embedding]
    tied_fold = keeps_tie(tied_in, "down" in emb, family.lm_head in adapter.lora, adapter.gate_scale(family.embedding))
    compute_dtype = dtype or next(s.dtype for s in specs if s.name == f"{family.embedding}.weight")
    d, kept = int(config.hidden_size), int(keep.numel())
    scales = fold.embedding_scales(d, kept, compute_dtype)  # as the model loaded in that dtype multiplies
    factors = fold.pruning_factors(d, kept, bool(family.embedding_scale_attr), tied_fold, embedding_scales=scales)
    return _MergePlan(family, adapter, keep, factors, roles, tied_in, tied_fold, dtype)


# ---------------------------------------------------------------------------------------------- writing
def _write_side_files(base: Path, out: Path, config, plan: _MergePlan, out_dtype: torch.dtype) -> None:
    for key, value in pruned_config_updates(config, plan.kept).items():
        setattr(config, key, value)
    config.tie_word_embeddings = plan.tied_fold
    config.dtype = out_dtype
    config.save_pretrained(out)
    if (base / "generation_config.json").is_file():
        shutil.copy2(base / "generation_config.json", out / "generation_config.json")
    else:
        GenerationConfig.from_model_config(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)


def merge_checkpoint(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    adapter_name: str | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    progressbar: bool = True,
) -> Path:
    """Merge the PAT adapter at ``adapter`` into the base checkpoint at ``base`` and write the pruned model.

    ``out`` becomes a complete stock transformers checkpoint (safetensors shards named like the base's,
    config, generation config, tokenizer files). It is built in a temporary sibling folder and renamed
    into place at the end, so a failure leaves no half-written ``out``. ``dtype``: cast the base's
    floating tensors to this dtype (as loading the base with ``dtype=`` would); default: keep them.
    """
    base, out = Path(base), Path(out)
    if not (base / "config.json").is_file():
        raise CheckpointError(f"{base} has no config.json; BASE must be a transformers model folder.")
    check_output_apart(out, {"BASE": base, "ADAPTER": Path(adapter)})
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another folder or pass --overwrite (overwrite=True).")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise PATConfigError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}.")
        dtype = DTYPES[dtype]

    adapter_weights = load_pat_adapter(adapter, adapter_name)
    config = AutoConfig.from_pretrained(base)
    shards = checkpoint_shards(base)
    specs_by_shard = {shard: read_specs(shard) for shard in shards}
    all_specs = [s for specs in specs_by_shard.values() for s in specs]
    plan = _plan(config, all_specs, adapter_weights, dtype)
    out_dtype = dtype or next(s.dtype for s in all_specs if s.name == f"{plan.family.embedding}.weight")

    weight_map: dict[str, str] = {}
    total_size = 0
    bar = tqdm(
        total=sum(s.nbytes for s in all_specs),
        unit="B",
        unit_scale=True,
        desc="peft-pat merge",
        disable=not progressbar,
    )
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for shard, specs in specs_by_shard.items():
            layout = [o for s in specs for o in plan.outputs(s)]
            if not layout:
                bar.update(sum(s.nbytes for s in specs))
                continue
            with SafetensorsWriter(tmp / shard.name, layout) as writer, open(shard, "rb") as handle:
                for spec in specs:
                    bar.set_postfix_str(shard.name, refresh=False)
                    for name, tensor in plan.stream(spec, handle):
                        writer.write(name, tensor)
                    bar.update(spec.nbytes)
            weight_map.update(dict.fromkeys((name for name, _, _ in layout), shard.name))
            total_size += writer.total_bytes
        if (base / SAFE_WEIGHTS_INDEX_NAME).is_file():
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        _write_side_files(base, tmp, config, plan, out_dtype)
    bar.close()
    return out

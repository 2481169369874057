"""``merge_checkpoint``: the merge plan executed from disk to disk, one tensor at a time.

The base checkpoint is never loaded as a model. Each tensor of each safetensors shard is read (a block of
rows at a time where its op works by rows), computed by its :class:`~peft_pat.merge.plan.TensorOp` and
written to the output shard of the same name. The plan and the ops are the ones ``merge_and_prune()``
executes over a loaded model, so the result equals it bit for bit, while peak memory is the adapter plus
about one weight matrix, whatever the model size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, GenerationConfig

from ..checks import check_adapter_matches_base
from ..errors import AdapterMismatchError, CheckpointError, PATConfigError
from ..families import family_for_model_type
from ..saving import atomic_directory, check_output_apart
from .adapter import load_pat_adapter
from .plan import MergePlan, TensorSource, build_plan, harden_for_merge
from .shards import SAFE_WEIGHTS_INDEX_NAME, SafetensorsWriter, TensorSpec, checkpoint_shards, read_json, read_specs
from .shards import read_tensor as _read_tensor

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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ShardSource:
    """One base tensor in a safetensors shard, read whole or by blocks of rows, cast to ``--dtype`` on reading
    (as loading the base with ``dtype=`` would)."""

    def __init__(self, spec: TensorSpec, handle: BinaryIO, dtype: torch.dtype | None) -> None:
        self.spec, self.handle = spec, handle
        self.shape = tuple(spec.shape)
        self.dtype = (dtype or spec.dtype) if spec.dtype.is_floating_point else None

    def rows(self, rows: slice | None) -> torch.Tensor:
        tensor = _read_tensor(self.spec, self.handle, rows)
        return tensor if self.dtype is None else tensor.to(self.dtype)


def _write_side_files(base: Path, out: Path, config, plan: MergePlan, out_dtype: torch.dtype) -> None:
    for key, value in plan.config_updates(config).items():
        setattr(config, key, value)
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
        what = "has no config.json" if base.is_dir() else "is not a folder" if base.exists() else "does not exist"
        raise CheckpointError(f"{base} {what}; BASE must be a transformers model folder (config.json + weights).")
    check_output_apart(out, {"BASE": base, "ADAPTER": Path(adapter)})
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another folder or pass --overwrite (overwrite=True).")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise PATConfigError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}.")
        dtype = DTYPES[dtype]

    adapter_weights = load_pat_adapter(adapter, adapter_name)
    read_json(base / "config.json", "model config")
    config = AutoConfig.from_pretrained(base)
    family = family_for_model_type(getattr(config, "model_type", None))
    check_adapter_matches_base(
        adapter_weights.config, config.model_type, config.hidden_size, getattr(config, "vocab_size", None),
        adapter=adapter_weights.where, base="the base checkpoint", action="Merge it into",
        num_hidden_layers=getattr(config, "num_hidden_layers", None),
        heads=(config.num_attention_heads, getattr(config, "num_key_value_heads", None)),
    )  # fmt: skip
    shards = checkpoint_shards(base)
    specs_by_shard = {shard: read_specs(shard) for shard in shards}
    all_specs = [s for specs in specs_by_shard.values() for s in specs]
    for mask in adapter_weights.all_masks():
        harden_for_merge(mask, adapter_weights.where, stacklevel=2)
    try:
        keep = adapter_weights.mask.kept_indices() if adapter_weights.prunes_hidden else None
        where, units = "the base checkpoint", adapter_weights.unit_keeps()
        plan = build_plan(family, config, all_specs, adapter_weights, keep=keep, dtype=dtype, where=where,
                          unit_keeps=units)  # fmt: skip
    except PATConfigError as exc:
        raise AdapterMismatchError(f"The adapter does not fit the base checkpoint: {exc}") from exc
    out_dtype = dtype or next(s.dtype for s in all_specs if s.name == f"{family.embedding}.weight")

    weight_map: dict[str, str] = {}
    total_size = 0
    bar = tqdm(
        total=sum(s.nbytes for s in all_specs), unit="B", unit_scale=True, desc="peft-pat merge",
        disable=not progressbar,
    )  # fmt: skip
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for shard, specs in specs_by_shard.items():
            layout = [(op.name, op.dtype, op.shape) for s in specs for op in plan.outputs_of(s.name)]
            if not layout:
                bar.update(sum(s.nbytes for s in specs))
                continue
            with SafetensorsWriter(tmp / shard.name, layout) as writer, open(shard, "rb") as handle:
                for spec in specs:
                    bar.set_postfix_str(shard.name, refresh=False)
                    for op in plan.outputs_of(spec.name):
                        source = adapter_weights.replacements.get(op.source)
                        reader = TensorSource(source, dtype) if source is not None else ShardSource(spec, handle, dtype)
                        for block in op.compute(reader, plan.keep):
                            writer.write(op.name, block)
                    bar.update(spec.nbytes)
            weight_map.update(dict.fromkeys((name for name, _, _ in layout), shard.name))
            total_size += writer.total_bytes
        if (base / SAFE_WEIGHTS_INDEX_NAME).is_file():
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        _write_side_files(base, tmp, config, plan, out_dtype)
    bar.close()
    return out

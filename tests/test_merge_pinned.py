"""The merges, pinned bit for bit: in memory and from disk, every family, against stored digests.

For every case below a tiny base model gets a random, non-identity PAT adapter (``init_weights=False``,
fixed seeds) with a hardened mask; ``merge_and_prune()`` (in memory) and ``peft-pat merge`` (disk to
disk, on the saved base and adapter) must give the same tensors bit for bit, and both must match the
sha256 digests in ``merge_digests.json``, which the code before the redesign (issue 11) wrote. A
refactoring of the merge that changes one bit of one tensor fails here.

The digests depend on the floating-point kernels of the machine that wrote them: where the torch
version or the CPU capability differ from the recorded ones, only the in-memory == disk check runs.
After a deliberate change of the merge's numbers, regenerate them with

    PEFT_PAT_WRITE_MERGE_DIGESTS=1 python -m pytest tests/test_merge_pinned.py

and say in the commit why the bits changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_pat import fold
from peft_pat.disk_merge import merge_checkpoint
from peft_pat.testing import ALL_FAMILIES, tiny_model

from helpers import wrap

DIGESTS = Path(__file__).with_name("merge_digests.json")
WRITE = os.environ.get("PEFT_PAT_WRITE_MERGE_DIGESTS") == "1"

# case id -> (family, base model kwargs, PATConfig kwargs); every family once, tied and untied both
# represented, plus the paths that differ: untie a tied base, LoRA on lm_head, modules_to_save, bfloat16.
CASES: dict[str, tuple[str, dict, dict]] = {
    family: (family, {"tie_word_embeddings": i % 2 == 0}, {}) for i, family in enumerate(ALL_FAMILIES)
}
CASES["llama"] = ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}, {})
CASES["gemma-untie"] = ("gemma", {"tie_word_embeddings": True}, {"embedding_hsm": "full"})
CASES["qwen3-lora-lm_head"] = ("qwen3", {"tie_word_embeddings": True}, {"target_modules": ["q_proj", "lm_head"]})
CASES["mistral-modules_to_save"] = ("mistral", {}, {"modules_to_save": ["lm_head"]})
CASES["qwen2-bfloat16"] = ("qwen2", {"dtype": torch.bfloat16}, {})


def _digest(tensor: torch.Tensor) -> str:
    tensor = tensor.detach().contiguous().cpu()
    data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)} {hashlib.sha256(data).hexdigest()}"


def _machine() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _save_checkpoint(model, folder: Path) -> None:
    """What ``save_pretrained`` writes, in a fraction of its time (it compiles hundreds of regexes)."""
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    folder.mkdir()
    model.config.save_pretrained(folder)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _merge_both_ways(tmp_path: Path, family: str, base_kwargs: dict, pat: dict):
    base = tiny_model(family, seed=3, **base_kwargs)
    _save_checkpoint(base, tmp_path / "base")
    torch.manual_seed(4)
    model = wrap(base, init_weights=False, **pat)
    model.base_model.harden_mask()
    model.save_pretrained(tmp_path / "adapter")
    small = model.merge_and_prune()
    memory = dict(small.state_dict())
    if small.config.tie_word_embeddings:
        del memory["lm_head.weight"]  # one tensor under two names; a checkpoint stores it once
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progressbar=False)
    disk: dict[str, torch.Tensor] = {}
    for shard in sorted((tmp_path / "out").glob("*.safetensors")):
        disk.update(load_file(shard))
    return memory, disk


@pytest.fixture(scope="module")
def stored():
    if WRITE:
        record = {"machine": _machine(), "cases": {}}
        yield record
        DIGESTS.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    else:
        yield json.loads(DIGESTS.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_merges_are_bit_identical_and_pinned(case, tmp_path, monkeypatch, stored):
    monkeypatch.setattr(fold, "CHUNK_BYTES", 4096)  # many row / column chunks in both paths
    family, base_kwargs, pat = CASES[case]
    memory, disk = _merge_both_ways(tmp_path, family, base_kwargs, pat)
    digests = {name: _digest(t) for name, t in sorted(memory.items())}
    assert {name: _digest(t) for name, t in sorted(disk.items())} == digests
    if WRITE:
        stored["cases"][case] = digests
        return
    if stored["machine"] != _machine():
        pytest.skip(f"digests were written on {stored['machine']}, this is {_machine()}: in-memory == disk only")
    assert digests == stored["cases"][case]

"""The merges, pinned bit for bit: in memory and from disk, every family, against stored digests.

For every case below a tiny base model gets a random, non-identity PAT adapter (``init_weights=False``,
fixed seeds) with a hardened mask; ``merge_and_prune()`` (in memory) and ``peft-pat merge`` (disk to
disk, on the saved base and adapter) must give the same tensors bit for bit, and both must match the
sha256 digests in ``merge_digests.json``, which the merge before the one-plan redesign wrote. A
refactoring of the merge that changes one bit of one tensor fails here.

The digests depend on the floating-point kernels of the machine that wrote them, so the file keeps one
record per (torch version, CPU capability); on a machine with no record only the in-memory == disk
check runs. CI runs on the developers' kind of machine, whose record is in the file.
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
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_pat.merge import fold
from peft_pat.merge.checkpoint import merge_checkpoint
from peft_pat.testing import ALL_FAMILIES, tiny_inputs, tiny_model

from helpers import logits, save_checkpoint, wrap

DIGESTS = Path(__file__).with_name("merge_digests.json")
IDS = tiny_inputs(length=7)
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
CASES["llama-tied-modules_to_save"] = ("llama", {"tie_word_embeddings": True}, {"modules_to_save": ["lm_head"]})


def _digest(tensor: torch.Tensor) -> str:
    tensor = tensor.detach().contiguous().cpu()
    data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)} {hashlib.sha256(data).hexdigest()}"


def _machine() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _merge_both_ways(tmp_path: Path, family: str, base_kwargs: dict, pat: dict, before_merge=None):
    base = tiny_model(family, seed=3, **base_kwargs)
    save_checkpoint(base, tmp_path / "base")
    torch.manual_seed(4)
    model = wrap(base, init_weights=False, **pat)
    model.base_model.harden_mask()
    if before_merge is not None:
        before_merge(model)
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
    """The digests recorded on this kind of machine ({} where none were), kept beside other machines' records."""
    records = json.loads(DIGESTS.read_text())["records"] if DIGESTS.is_file() else []
    mine = next((r for r in records if r["machine"] == _machine()), None)
    if WRITE:
        mine = {"machine": _machine(), "cases": {}}
        yield mine
        others = [r for r in records if r["machine"] != _machine()]
        DIGESTS.write_text(json.dumps({"records": [*others, mine]}, indent=1, sort_keys=True) + "\n")
    else:
        yield mine


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
    if stored is None or case not in stored["cases"]:
        pytest.skip(f"no digests recorded on {_machine()} for {case!r}: in-memory == disk only")
    assert digests == stored["cases"][case]


# ---------------------------------------------------------------------------------------------- the matrix
# Beyond the pinned cases: every family tied and untied, and the configurations whose merge takes another
# path (a saved copy of lm_head, no LoRA, LoRA on some layers only, bfloat16, each embedding HSM). Both merges
# execute one plan, so they must agree bit for bit, and the merged model must compute what the PAT model does.
MATRIX: dict[str, tuple[str, dict, dict]] = {
    f"{family}-{'tied' if tied else 'untied'}": (family, {"tie_word_embeddings": tied}, {})
    for family in ALL_FAMILIES
    for tied in (False, True)
}
for _family in ("llama", "gemma2", "phi3"):
    for _tied in (False, True):
        _t = "tied" if _tied else "untied"
        MATRIX[f"{_family}-{_t}-modules_to_save"] = (
            _family,
            {"tie_word_embeddings": _tied},
            {"modules_to_save": ["lm_head"]},
        )
        MATRIX[f"{_family}-{_t}-r0"] = (_family, {"tie_word_embeddings": _tied}, {"r": 0})
        MATRIX[f"{_family}-{_t}-layers"] = (_family, {"tie_word_embeddings": _tied}, {"layers_to_transform": [1]})
        MATRIX[f"{_family}-{_t}-bfloat16"] = (_family, {"tie_word_embeddings": _tied, "dtype": torch.bfloat16}, {})
        for _hsm in ("full", "diagonal"):
            MATRIX[f"{_family}-{_t}-{_hsm}"] = (_family, {"tie_word_embeddings": _tied}, {"embedding_hsm": _hsm})
MATRIX["qwen2-tied-lora-lm_head"] = ("qwen2", {"tie_word_embeddings": True}, {"target_modules": ["v_proj", "lm_head"]})
MATRIX["gemma-tied-modules_to_save-full"] = (
    "gemma", {"tie_word_embeddings": True}, {"modules_to_save": ["lm_head"], "embedding_hsm": "full"}
)  # fmt: skip


@pytest.mark.parametrize("case", list(MATRIX))
def test_merge_matrix_memory_equals_disk_and_the_pat_model(case, tmp_path, monkeypatch):
    monkeypatch.setattr(fold, "CHUNK_BYTES", 4096)
    family, base_kwargs, pat = MATRIX[case]
    seen = {}

    def train_copies_and_keep_logits(model):
        with torch.no_grad():  # a trained modules_to_save copy differs from the base module it replaces
            for module in model.modules():
                if isinstance(module, ModulesToSaveWrapper):
                    for param in module.modules_to_save.parameters():
                        param.add_(0.1 * torch.randn_like(param))
        seen["pat"] = logits(model, IDS)

    memory, disk = _merge_both_ways(tmp_path, family, base_kwargs, pat, before_merge=train_copies_and_keep_logits)
    assert set(disk) == set(memory)
    for name, tensor in memory.items():
        assert disk[name].dtype == tensor.dtype and torch.equal(disk[name], tensor), name
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    scale = 3e-2 if base_kwargs.get("dtype") == torch.bfloat16 else 2e-5
    diff = float((logits(merged, IDS) - seen["pat"]).abs().max())
    assert diff <= scale * max(1.0, float(seen["pat"].abs().max())), diff

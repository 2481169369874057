"""Shared helpers for model-level tests."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from peft import get_peft_model

from peft_pat import PATConfig
from peft_pat.testing import VOCAB

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as the module ``name``, loaded from its file: the examples are scripts, not a
    package. Run as ``python examples/<name>.py`` a script finds the siblings it imports (``from _common
    import ...``) because its folder is on sys.path; here those siblings are loaded the same way first and
    registered under their names, so nothing is added to sys.path. Each file is loaded once per session."""
    if name in sys.modules:
        return sys.modules[name]
    path = EXAMPLES / f"{name}.py"
    for sibling in _sibling_imports(path):
        load_example(sibling)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as an import does (dataclasses look their module up)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _sibling_imports(path: Path) -> list[str]:
    """The other examples/*.py modules that ``path`` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
    return sorted(n for n in names if n != path.stem and (EXAMPLES / f"{n}.py").is_file())


def wrap(base, **kwargs):
    """A PAT model on ``base`` for unit tests of the hidden axis: the task-loss path (no distillation, zero mask
    start) unless a test passes ``distillation_weight`` / ``calibration_batches`` (tests/test_quality_levers.py
    covers those), the hidden width alone unless it passes ``prune_axes`` (the default axes: tests/test_mlp_axis.py,
    tests/test_families.py, tests/test_merge_exact.py)."""
    defaults = {"target_sparsity": 0.25, "hsm_rank": 8, "r": 4, "distillation_weight": 0.0, "calibration_batches": 0}
    if not {"prune_axes", "target_width", "target_intermediate_size"} & set(kwargs):
        defaults["prune_axes"] = ["hidden"]
    config = PATConfig(task_type="CAUSAL_LM", **{**defaults, **kwargs})
    return get_peft_model(base, config)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


def assert_logits_close(actual, expected, scale=None):
    """Exact up to float32 accumulation: |diff| <= 2e-5 * max(1, max|logits|)."""
    scale = float(expected.abs().max()) if scale is None else scale
    diff = float((actual - expected).abs().max())
    assert diff <= 2e-5 * max(1.0, scale), f"max |logit diff| {diff:.3e} (logit scale {scale:.3e})"
    return diff


def train_steps(model, ids, steps=6, total=None, lr=1e-2):
    """A few AdamW steps on a causal-LM loss, driving the schedule like a plain loop would."""
    total = total or steps
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.set_step(step + 1, total)
    model.eval()
    return loss.detach()


class TokenDataset(torch.utils.data.Dataset):
    """``n`` seeded random rows of ``length`` token ids (no special ids), each its own language-model target."""

    def __init__(self, n: int = 32, length: int = 12, seed: int = 0):
        self.ids = torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def assert_bf16_autocast_step(model, ids, device_type: str, rel: float) -> None:
    """One training forward under bf16 autocast equals the float32 one within ``rel`` (bf16 rounding of the
    matmuls), and the mask's logits and their gradients stay float32, finite and non-zero."""
    model.set_step(2, 30)
    model.train()
    reference = model(input_ids=ids, labels=ids).loss
    with torch.autocast(device_type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - reference.item()) <= rel * abs(reference.item()), (loss.item(), reference.item())
    mask = model.base_model.pat_mask["default"]
    assert mask.logits.dtype == torch.float32 and mask.logits.grad.dtype == torch.float32
    assert torch.isfinite(mask.logits.grad).all() and mask.logits.grad.abs().max() > 0


def save_checkpoint(model, folder) -> None:
    """What ``save_pretrained`` writes (config and one safetensors file, a tied lm_head stored once), in a
    fraction of its time (it compiles hundreds of regexes)."""
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    folder.mkdir()
    model.config.save_pretrained(folder)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})

"""How the untrained post-hoc cut scores each split of one parameter budget between the hidden and the MLP width.

For each ``--shares`` h, the hidden width loses h x ``--sparsity`` of its channels (the package's rounding,
:func:`peft_pat.width.resolve_kept_width`) and the MLP width what the parameter budget leaves
(``PATConfig(target_sparsity=s, target_width=N)``, the package's own budget); the base model is cut to that
shape by activation statistics on the first 8 training batches of the quality benchmark
(:func:`benchmarks.quality.posthoc.cut_shape_by_activation`, no training) and scored by

* the distillation loss: mean KL(dense || cut) per token over 8 further training batches (Minitron's search
  criterion), and
* WikiText-2 perplexity on ``--windows`` windows of 512 tokens.

One JSON line per (sparsity, share) is appended to ``--output``. This is the zero-cost evidence for
:data:`peft_pat.budget.HIDDEN_SHARE`; the trained ablation (levers loop) is in docs/quality.md, Multi-axis.

    python -m benchmarks.research.split_search --sparsity 0.25 --shares 0,0.25,0.5,0.75,1
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from peft_pat import family_for_model
from peft_pat.calibration import channel_statistics
from peft_pat.offline_models import load_causal_lm
from peft_pat.training.distillation import distillation_loss
from peft_pat.width import resolve_kept_width

from ..quality.commonsense import TaskMixture
from ..quality.evaluation import perplexity
from ..quality.methods import Shape, resolved_shape
from ..quality.posthoc import cut_shape_by_activation
from ..quality.wikitext import perplexity_windows

REPO = Path(__file__).resolve().parents[2]
CALIBRATION_BATCHES = 8  # the package default (PATConfig.calibration_batches)


def split_shape(base: torch.nn.Module, sparsity: float, share: float) -> Shape:
    """The shape of the split ``share``: the hidden width cut by ``share * sparsity``, the MLP the rest."""
    if share >= 1.0:
        return resolved_shape(base, sparsity, prune_axes=["hidden"])
    if share <= 0.0:
        return resolved_shape(base, sparsity, prune_axes=["mlp"])
    width = resolve_kept_width(base.config.hidden_size, base.config.num_attention_heads, share * sparsity, None)
    return resolved_shape(base, sparsity, target_width=width)


@torch.no_grad()
def mean_kl(student: torch.nn.Module, teacher_logits: list[torch.Tensor], batches: list[dict]) -> float:
    """KL(teacher || student) per non-padding token, averaged over ``batches``."""
    losses = []
    for batch, reference in zip(batches, teacher_logits, strict=True):
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses.append(float(distillation_loss(logits, reference, batch["attention_mask"])))
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.research.split_search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--sparsity", type=float, default=0.25)
    p.add_argument("--shares", default="0,0.25,0.5,0.75,1")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "split_search.jsonl")
    args = p.parse_args(argv)
    base, tokenizer = load_causal_lm(args.model)
    base.eval()
    family = family_for_model(base)
    batches = TaskMixture(args.data_dir / "commonsense", None, tokenizer, 8, 160, "full").batches(16, 0)
    calibration, scoring = batches[:CALIBRATION_BATCHES], batches[CALIBRATION_BATCHES:]
    windows = perplexity_windows(args.data_dir / "wikitext-2-raw" / "wiki.test.raw", tokenizer, 512, args.windows)
    stats = channel_statistics(base, calibration, family, mlp=True)
    with torch.no_grad():
        teacher = [base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in scoring]
    dense = sum(p.numel() for p in base.parameters())
    rows = []
    for share in (float(s) for s in args.shares.split(",")):
        shape = split_shape(base, args.sparsity, share)
        cut = cut_shape_by_activation(copy.deepcopy(base), family, stats, shape.width, shape.mlp)
        row = {
            "sparsity": args.sparsity,
            "hidden_share": share,
            "shape": str(shape),
            "parameter_fraction": sum(p.numel() for p in cut.parameters()) / dense,
            "kl": mean_kl(cut, teacher, scoring),
            "wikitext2_ppl": perplexity(cut, windows, progress=False)["perplexity"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        with args.output.open("a") as f:
            f.write(json.dumps(row) + "\n")
        del cut
    return rows


if __name__ == "__main__":
    main()

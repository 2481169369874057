"""Quality benchmark: does pruning while tuning (PAT) beat pruning then tuning, on a real model?

Compares, at equal training budget (same batches, steps, batch size, sequence length, learning rate,
LoRA rank/alpha on every decoder linear, seed), on the real SmolLM2-135M by default:

  dense            the untouched model
  lora             dense LoRA fine-tune (upper reference), merged
  pat              PAT at the target sparsity, merge_and_prune()
  prune_then_tune  activation-magnitude hidden-channel cut (same kept width as PAT), then LoRA
  tune_then_prune  the LoRA model (reused), then the same cut
  torch_pruning    Torch-Pruning (PyPI torch-pruning) Taylor hidden-width cut, then LoRA

Tuning: the instruction-formatted commonsense train sets (loss on the answer only, tasks mixed).
Evaluation of every final stock model: WikiText-2 perplexity (concatenate and chunk), zero-shot
accuracy on the commonsense test sets by log-likelihood of the answer texts (lm-eval-harness style,
acc and length-normalised acc_norm, with standard errors), parameter count and kept width.

    python -m benchmarks.quality --quick             # < 15 min on 2 CPU cores (one sparsity, short runs)
    python -m benchmarks.quality                     # default preset, about 90 min on 2 CPU cores
    python -m benchmarks.quality --evaluate-checkpoint outputs/quickstart/pruned   # no training
    python -m benchmarks.quality --methods pat,prune_then_tune --sparsities 0.25 --steps 300 --device cuda

Writes quality.json (everything, per-item correctness included), quality.md (table + paired
comparisons) and quality.png (accuracy and perplexity vs. sparsity) to --output.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads collapse on a shared CPU
import torch

from .methods import METHODS
from .runner import BenchmarkOptions, evaluate_checkpoint, run_benchmark

REPO = Path(__file__).resolve().parents[2]

# Budgets from measured costs (docs/quality.md). On 2 CPU cores shared with other jobs one training
# step (8 instruction examples) took 3.4-7.8 s and evaluating one model (150 test items + 4096
# WikiText tokens) 37-258 s; the default preset (7 training runs, 10 evaluated models) took 57 min and
# the quick preset 12 min there. Raise --steps / --subsample / --ppl-tokens when you have the time.
PRESETS = {
    "default": dict(steps=72, subsample=30, ppl_tokens=4096, sparsities=(0.25, 0.5), calibration_batches=4),
    "quick": dict(steps=16, subsample=12, ppl_tokens=2048, sparsities=(0.25,), calibration_batches=2),
}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the quick preset (< 15 min on 2 CPU cores)")
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (offline), a hub id or a local folder")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=REPO.parent / "shared" / "data",
        help="folder with commonsense/<task>/{train,test}.json and wikitext-2-raw/wiki.test.raw",
    )
    p.add_argument(
        "--output", type=Path, default=None, help="results folder (default benchmarks/results/quality[-quick])"
    )
    p.add_argument("--methods", type=_names, default=METHODS, help=f"comma list from {','.join(METHODS)}")
    p.add_argument("--sparsities", type=_floats, default=None, help="comma list of hidden-width sparsities")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every tuned method")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=160, help="max training sequence length (prompt cut from the left)")
    p.add_argument(
        "--loss-on",
        choices=("answer", "full"),
        default="answer",
        help="tuning loss on the answer only (the issue's protocol) or on every token of prompt + answer",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, the same for every method")
    p.add_argument("--lora-rank", type=int, default=20)
    p.add_argument("--lora-alpha", type=float, default=20.0)
    p.add_argument("--calibration-batches", type=int, default=None, help="batches for the post-hoc criteria")
    p.add_argument("--train-tasks", type=_names, default=None, help="comma list (default: every task with train.json)")
    p.add_argument("--eval-tasks", type=_names, default=None,
                   help="comma list of task folders with test.json (default: ARC-Easy,ARC-Challenge,boolq,openbookqa,"
                   "piqa when present, else every task with test.json)")  # fmt: skip
    p.add_argument("--subsample", type=int, default=None, help="test items per task (0: all)")
    p.add_argument("--scoring", type=_names, default=("text",), help="'text' (answer texts), 'label', or 'text,label'")
    p.add_argument("--ppl-context", type=int, default=512, help="WikiText-2 window length in tokens")
    p.add_argument("--ppl-tokens", type=int, default=None, help="WikiText-2 token budget (0: the whole test set)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-models", action="store_true", help="save every final model under OUTPUT/models/")
    p.add_argument(
        "--evaluate-checkpoint",
        type=Path,
        default=None,
        help="evaluate a saved (pruned or merged) model folder or a PEFT adapter folder; no training",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def options_from_args(args: argparse.Namespace) -> BenchmarkOptions:
    preset_name = "quick" if args.quick else "default"
    preset = PRESETS[preset_name]

    def pick(name):
        value = getattr(args, name)
        return preset[name] if value is None else value

    commonsense = Path(args.data_dir) / "commonsense"
    eval_tasks = args.eval_tasks
    if eval_tasks is None:
        standard = BenchmarkOptions.eval_tasks
        present = commonsense.is_dir() and all((commonsense / t / "test.json").is_file() for t in standard)
        eval_tasks = standard if present else None
    subsample = pick("subsample")
    ppl_tokens = pick("ppl_tokens")
    return BenchmarkOptions(
        model=args.model,
        data_dir=Path(args.data_dir),
        output=args.output or REPO / "benchmarks" / "results" / ("quality-quick" if args.quick else "quality"),
        sparsities=pick("sparsities"),
        methods=args.methods,
        steps=pick("steps"),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        loss_on=args.loss_on,
        lr=args.lr,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        calibration_batches=pick("calibration_batches"),
        train_tasks=args.train_tasks,
        eval_tasks=eval_tasks,
        subsample=subsample or None,
        scoring=args.scoring,
        ppl_context=args.ppl_context,
        ppl_tokens=ppl_tokens or None,
        device=args.device,
        seed=args.seed,
        save_models=args.save_models,
        progress=not args.no_progress,
        preset=preset_name,
    )


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = options_from_args(args)
    if args.evaluate_checkpoint is not None:
        return evaluate_checkpoint(options, args.evaluate_checkpoint)
    return run_benchmark(options)

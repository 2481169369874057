"""Quality benchmark: does pruning while tuning (PAT) beat pruning then tuning, on a real model?

Compares, at equal training budget (one transformers Trainer setup: same batches in the same order,
steps, batch size, sequence length, learning rate and schedule, LoRA rank/alpha on every decoder
linear, seed, loss), on the real SmolLM2-135M by default:

  dense                   the untouched model
  lora                    dense LoRA fine-tune (upper reference), merged
  pat                     PATConfig(target_sparsity=s) + --pat-options, Trainer + PATCallback(), merge_and_prune()
                          (the package default: hidden and MLP width under one parameter budget)
  pat_hidden              the same with prune_axes=["hidden"] (the 0.4 default)
  prune_then_tune         activation cut to PAT's shape (peft_pat.calibration, every axis), then LoRA
  prune_mlp_then_tune     activation cut of the MLP width alone, same parameter count, then LoRA
  prune_hidden_then_tune  activation cut of the hidden width alone, same parameter count, then LoRA
  tune_then_prune         the LoRA model (reused), then the cut of PAT's shape
  torch_pruning           Torch-Pruning (PyPI torch-pruning) Taylor hidden-width cut, then LoRA

Tuning: the instruction-formatted commonsense train sets (tasks mixed) with --loss distill (default:
logit distillation from the dense model on every token), full (cross-entropy on every token) or
answer (cross-entropy on the answer only). Evaluation of every final stock model: WikiText-2
perplexity (512-token windows), zero-shot accuracy on the commonsense test sets by log-likelihood of
the answer texts (lm-eval-harness style, acc and length-normalised acc_norm, with standard errors),
parameter count and kept widths; every pruned model is compared paired (same items, same windows) with
the best post-hoc pipeline, PAT also with the post-hoc cut of its own shape and with the hidden-only PAT.

    python -m benchmarks.quality --quick             # smoke: one sparsity, short runs, small evaluation
    python -m benchmarks.quality                     # default preset (prints its estimated wall time)
    python -m benchmarks.quality --pat-options distillation_weight=0,hsm_rank=8   # a PAT ablation
    python -m benchmarks.quality --evaluate-checkpoint outputs/quickstart/pruned   # no training
    python -m benchmarks.quality --methods pat,prune_then_tune --sparsities 0.25 --steps 300 --device cuda

Writes quality.json (everything, per-item correctness and per-window log-loss included), quality.md
(table + paired comparisons) and quality.png (accuracy and perplexity vs. sparsity) to --output.
"""

from __future__ import annotations

import argparse
import ast
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads collapse on a shared CPU
import torch

from .methods import METHODS, PAT_FIELDS, PAT_TYPES
from .runner import BenchmarkOptions, evaluate_checkpoint, run_benchmark
from .training import LOSSES, TRAINERS

REPO = Path(__file__).resolve().parents[2]

# The default preset: >= 200 test items per task and >= 40 WikiText-2 windows of 512
# tokens, so paired differences resolve a few accuracy points and a PPL ratio of 0.75; 72 steps x 8
# is the budget of the earlier measurements. The quick preset is a smoke run of the same code.
PRESETS = {
    "default": dict(steps=72, subsample=200, ppl_windows=40, sparsities=(0.25, 0.5), calibration_batches=8),
    "quick": dict(steps=16, subsample=12, ppl_windows=4, sparsities=(0.25,), calibration_batches=2),
}
# Set by the benchmark itself, so not accepted in --pat-options.
PAT_RESERVED = ("task_type", "target_sparsity", "target_width", "kept_width", "base_model_name_or_path",
                "base_model_type", "base_hidden_size", "base_vocab_size", "peft_type", "inference_mode", "auto_mapping",
                "peft_version", "revision")  # fmt: skip


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _value(text: str, annotation: str):
    """A --pat-options value, read as the PATConfig field's type says (``annotation`` is its type as text)."""
    lowered = text.lower()
    if lowered in ("none", "null") and "None" in annotation:
        return None
    if lowered in ("true", "false") and "bool" in annotation:
        return lowered == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(value, int) and not isinstance(value, bool) and "float" in annotation and "int" not in annotation:
        return float(value)
    if "str" in annotation and not isinstance(value, str) and annotation.replace("| None", "").strip() == "str":
        return text
    return value


def parse_pat_options(text: str) -> dict:
    """``key=value,...`` -> PATConfig keyword arguments; unknown or benchmark-owned keys are refused."""
    from peft_pat import PATConfig

    options = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{part!r} is not key=value (example: distillation_weight=0,hsm_rank=8)")
        if key in PAT_RESERVED:
            raise argparse.ArgumentTypeError(f"{key!r} is set by the benchmark (--sparsities), not by --pat-options")
        if key not in PAT_FIELDS:
            known = ", ".join(sorted(k for k in PAT_FIELDS if k not in PAT_RESERVED))
            raise argparse.ArgumentTypeError(f"unknown PATConfig option {key!r}; known options: {known}")
        options[key] = _value(value.strip(), str(PAT_TYPES[key]))
    try:
        PATConfig(task_type="CAUSAL_LM", target_sparsity=0.25, **options)
    except Exception as error:  # a value PATConfig refuses: say so before any training
        raise argparse.ArgumentTypeError(f"PATConfig refuses {options}: {error}") from error
    return options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="the quick preset (a smoke run of a few minutes on a GPU)")
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
    p.add_argument("--sparsities", type=_floats, default=None, help="comma list of parameter fractions removed")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every tuned method")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=160, help="max training sequence length (prompt cut from the left)")
    p.add_argument(
        "--loss",
        choices=LOSSES,
        default="distill",
        help="every tuned method's loss: distillation from the dense model on every token (default), "
        "cross-entropy on every token (full) or on the answer only (answer)",
    )
    p.add_argument(
        "--pat-options",
        type=parse_pat_options,
        default={},
        metavar="KEY=VALUE,...",
        help="PATConfig arguments on top of PATConfig(target_sparsity=s), for ablations "
        "(e.g. distillation_weight=0,calibration_batches=0,hsm_rank=8); unknown keys are refused",
    )
    p.add_argument(
        "--trainer",
        choices=TRAINERS,
        default="trainer",
        help="what trains PAT: transformers' Trainer (default) or TRL's SFTTrainer (trl), same arguments and batches",
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
    p.add_argument("--ppl-windows", type=int, default=None, help="WikiText-2 windows scored (0: the whole test set)")
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
    ppl_windows = pick("ppl_windows")
    return BenchmarkOptions(
        model=args.model,
        data_dir=Path(args.data_dir),
        output=args.output or REPO / "benchmarks" / "results" / ("quality-quick" if args.quick else "quality"),
        sparsities=pick("sparsities"),
        methods=args.methods,
        steps=pick("steps"),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        loss=args.loss,
        pat_options=args.pat_options,
        lr=args.lr,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        calibration_batches=pick("calibration_batches"),
        train_tasks=args.train_tasks,
        eval_tasks=eval_tasks,
        subsample=subsample or None,
        scoring=args.scoring,
        ppl_context=args.ppl_context,
        ppl_windows=ppl_windows or None,
        device=args.device,
        seed=args.seed,
        save_models=args.save_models,
        progress=not args.no_progress,
        preset=preset_name,
        trainer=args.trainer,
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

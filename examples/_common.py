"""Pieces the example scripts share: command-line options, data as (prompt, answer) pairs (built-in
arithmetic, or the commonsense train sets), and the end of every run (save the adapter, merge and prune,
save a stock model, reload it with plain transformers).

Not part of the peft_pat package; the scripts import it from their own folder.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peft_pat.offline_models import load_causal_lm

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
TINY_MODEL = "tiny-random-llama"
IGNORE_INDEX = -100
ARITHMETIC_PROMPT = "Question: What is {a} plus {b}?\nAnswer:"
COMMONSENSE_TASKS = ("ARC-Challenge", "ARC-Easy", "boolq", "openbookqa")  # the tasks that ship a train.json
RECORD_KEYS = ("instruction", "input", "output", "answer")
PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


# ---------------------------------------------------------------------------------------------- options
def base_parser(doc: str, *, steps: int, batch_size: int, lr: float, output: str) -> argparse.ArgumentParser:
    """The options every example has; each script adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="hub id, local folder, or 'smollm2-135m' (offline)")
    parser.add_argument("--tiny", action="store_true", help=f"use {TINY_MODEL} (2 random layers, seconds)")
    parser.add_argument("--sparsity", type=float, default=0.25, help="fraction of hidden channels removed")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate (cosine schedule)")
    parser.add_argument("--output", default=output, help="where the adapter and the pruned model go")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def load_model(args: argparse.Namespace):
    """(model, tokenizer, reload) where ``reload()`` gives a fresh copy of the same base model."""
    name = TINY_MODEL if args.tiny else args.model
    model, tokenizer = load_causal_lm(name)
    return model, tokenizer, lambda: load_causal_lm(name)


def device_options() -> dict:
    """TrainingArguments that pick the GPU when there is one and never ask the hub or a reporter."""
    return {"use_cpu": not torch.cuda.is_available(), "report_to": [], "save_strategy": "no"}


# ---------------------------------------------------------------------------------------------- data
def arithmetic_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """A built-in instruction set (two-number sums) so an example needs no download."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        pairs.append((ARITHMETIC_PROMPT.format(a=a, b=b), f" {a + b}"))
    return pairs


def add_commonsense_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with commonsense/<task>/train.json")
    parser.add_argument("--tasks", default=",".join(COMMONSENSE_TASKS), help="comma-separated task folders")
    parser.add_argument("--samples-per-task", type=int, default=2000, help="records used per task (the first N)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (prompt cut from the left)")


def load_records(data: Path, task: str) -> list[dict]:
    """The records of ``<data>/commonsense/<task>/train.json``, checked; errors name the file and the fix."""
    path = Path(data) / "commonsense" / task / "train.json"
    if not path.is_file():
        available = sorted(p.parent.name for p in (Path(data) / "commonsense").glob("*/train.json"))
        raise SystemExit(
            f"No training file {path}. Pass the data folder with --data FOLDER (it must hold "
            f"commonsense/<task>/train.json; default {DEFAULT_DATA}) and pick --tasks from those present "
            f"({', '.join(available) or 'none found'}), or run with --tiny to use generated records."
        )
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list) or not records:
        raise SystemExit(f"{path} must hold a non-empty JSON list of records {{{', '.join(RECORD_KEYS)}}}.")
    for i, record in enumerate(records):
        missing = [key for key in ("instruction", "output") if not isinstance(record.get(key), str)]
        if missing:
            raise SystemExit(f"{path}: record {i} lacks the text field(s) {missing}; expected keys {RECORD_KEYS}.")
    return records


def fake_records(n: int, seed: int) -> list[dict]:
    """Records in the commonsense format, for the --tiny smoke runs."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        label = "true" if a < b else "false"
        instruction = f"Please answer true or false: is {a} smaller than {b}?\n\nAnswer format: true/false"
        records.append({"instruction": instruction, "input": "", "output": f"the correct answer is {label}"})
        records[-1]["answer"] = label
    return records


def commonsense_pairs(args: argparse.Namespace) -> tuple[list[tuple[str, str]], str]:
    """Shuffled (prompt, output) pairs of the chosen tasks (generated records with --tiny) and a description.

    A record becomes ``### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n``
    followed by ``{output}``; the loss is meant for the output only."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.tiny:
        records, source = fake_records(64, args.seed), "generated records"
    else:
        records = [r for task in tasks for r in load_records(args.data, task)[: args.samples_per_task]]
        source = ", ".join(tasks)
    random.Random(args.seed).shuffle(records)
    pairs = [((PROMPT_WITH_INPUT if r.get("input") else PROMPT).format(**r), r["output"]) for r in records]
    return pairs, source


def tokenize_pair(tokenizer, prompt: str, answer: str, max_length: int) -> dict[str, list[int]]:
    """Prompt + answer + EOS; the labels hide the prompt (-100), so the loss covers the answer and EOS only.

    Too long examples lose prompt tokens from the left, never the answer."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer_ids = answer_ids[:max_length]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(answer_ids) - max_length) :]
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


class PromptAnswerDataset(torch.utils.data.Dataset):
    """Tokenized (prompt, answer) pairs; batch them with :func:`pad_batch`."""

    def __init__(self, pairs: Sequence[tuple[str, str]], tokenizer, max_length: int = 256) -> None:
        self.items = [tokenize_pair(tokenizer, prompt, answer, max_length) for prompt, answer in pairs]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


def pad_batch(pad_token_id: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """A collate function that right-pads input_ids (pad id), labels (-100) and builds the attention mask."""

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for item in items:
            pad = width - len(item["input_ids"])
            batch["input_ids"].append(item["input_ids"] + [pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(item["input_ids"]) + [0] * pad)
            batch["labels"].append(item["labels"] + [IGNORE_INDEX] * pad)
        return {key: torch.tensor(value) for key, value in batch.items()}

    return collate


# ---------------------------------------------------------------------------------------------- results
def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def folder_megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits.float().cpu()


def save_merge_and_reload(model, tokenizer, reload_base: Callable, output: Path, probe: str) -> dict:
    """The end of every example, on a trained PAT ``model`` (consumed):

    1. ``save_pretrained`` the adapter; a fresh base model + ``PeftModel.from_pretrained`` restores it;
    2. ``merge_and_prune()`` folds LoRA and the HSMs into the weights and drops the pruned channels;
    3. the smaller model is saved with its tokenizer and reloaded with ``AutoModelForCausalLM`` alone.

    Returns sizes and the largest logit differences on ``probe`` (adapter reload, PAT vs merged, merged
    vs stock reload), which are float rounding when everything is right.
    """
    output = Path(output)
    model.eval()
    inputs = tokenizer(probe, return_tensors="pt", add_special_tokens=False).to(model.device)
    pat_logits = _logits(model, inputs)
    model.save_pretrained(output / "adapter")
    fresh_base, _ = reload_base()
    params_before = parameter_count(fresh_base)
    reloaded = PeftModel.from_pretrained(fresh_base.to(model.device), output / "adapter").eval()
    reload_diff = float((_logits(reloaded, inputs) - pat_logits).abs().max())
    del reloaded, fresh_base

    start = time.perf_counter()
    small = model.merge_and_prune()
    merge_seconds = time.perf_counter() - start
    merged_logits = _logits(small, inputs)
    small.save_pretrained(output / "pruned")
    tokenizer.save_pretrained(output / "pruned")
    stock = AutoModelForCausalLM.from_pretrained(output / "pruned").eval().to(model.device)
    return {
        "hidden_size_after": stock.config.hidden_size,
        "parameters_before": params_before,
        "parameters_after": parameter_count(stock),
        "pruned_model_megabytes": round(folder_megabytes(output / "pruned"), 2),
        "merge_seconds": round(merge_seconds, 2),
        "max_logit_diff_adapter_reload": reload_diff,
        "max_logit_diff_pat_vs_merged": float((merged_logits - pat_logits).abs().max()),
        "max_logit_diff_merged_vs_stock_reload": float((_logits(stock, inputs) - merged_logits).abs().max()),
        "answer_after": greedy_answer(stock, tokenizer, probe),
        "pruned_model": str(output / "pruned"),
    }


def trained_model(trainer):
    """The trained PeftModel without the accelerate wrapper that ``bf16=True``/``fp16=True`` put around its
    forward (autocast stays on after training otherwise, and float32 comparisons would see bf16 rounding)."""
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)


def last_logged(trainer, key: str) -> float | None:
    """The latest value of ``key`` in the Trainer's logs (the ``pat/*`` numbers come from PATCallback)."""
    return next((entry[key] for entry in reversed(trainer.state.log_history) if key in entry), None)


def finish(model, tokenizer, reload_base: Callable, args: argparse.Namespace, probe: str, **facts) -> dict:
    """Run :func:`save_merge_and_reload` into ``args.output``, print and return the summary (``facts`` first)."""
    summary = {"model": TINY_MODEL if args.tiny else args.model, **facts}
    summary.update(save_merge_and_reload(model, tokenizer, reload_base, Path(args.output), probe))
    print(json.dumps(summary, indent=2))
    return summary

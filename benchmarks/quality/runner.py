"""Orchestration: build the shared data once, run each method at each sparsity, evaluate, record.

Model reuse where the protocol allows: the dense model is evaluated once; the LoRA run is trained
once and its merged model is both the ``lora`` result and the starting point of ``tune_then_prune``
at every sparsity; the base model's activation scores are computed once for all sparsities.
The results JSON (and the plot) are rewritten after every finished run, so an interrupted run keeps
what it measured.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from torch import nn

from peft_pat import family_for_model
from peft_pat.pretrained import load_causal_lm
from peft_pat.width import resolve_kept_width

from ..measure import machine_info, write_json
from . import methods
from .commonsense import TaskMixture, load_test_items
from .evaluation import evaluate_model
from .plotting import plot_results
from .report import comparisons, markdown_table
from .torch_pruning_peer import PeerUnavailable, torch_pruning_available
from .wikitext import perplexity_windows


@dataclass
class BenchmarkOptions:
    """All options of ``python -m benchmarks.quality`` (see its ``--help``)."""

    model: str = "smollm2-135m"
    data_dir: Path = Path("../shared/data")
    output: Path = Path("benchmarks/results/quality")
    sparsities: tuple[float, ...] = (0.25, 0.5)
    methods: tuple[str, ...] = methods.METHODS
    steps: int = 72
    batch_size: int = 8
    seq_len: int = 160
    loss_on: str = "answer"
    lr: float = 1e-3
    warmup: float = 0.05
    lora_rank: int = 20
    lora_alpha: float = 20.0
    calibration_batches: int = 4
    train_tasks: tuple[str, ...] | None = None
    eval_tasks: tuple[str, ...] | None = ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa", "piqa")
    subsample: int | None = 30
    scoring: tuple[str, ...] = ("text",)
    eval_max_length: int = 512
    ppl_context: int = 512
    ppl_tokens: int | None = 4096
    device: str = "cpu"
    seed: int = 0
    save_models: bool = False
    progress: bool = True
    preset: str = "default"

    @property
    def commonsense_dir(self) -> Path:
        return Path(self.data_dir) / "commonsense"

    @property
    def wikitext_file(self) -> Path:
        return Path(self.data_dir) / "wikitext-2-raw" / "wiki.test.raw"


def _options_json(options: BenchmarkOptions) -> dict:
    return {
        k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in vars(options).items()
    }


class Recorder:
    """Results JSON, markdown table and plot, rewritten after every run."""

    def __init__(self, options: BenchmarkOptions, extra: dict) -> None:
        self.options = options
        self.out = Path(options.output)
        self.payload = {
            "options": _options_json(options),
            "hardware": machine_info(options.device),
            **extra,
            "runs": [],
        }
        self.started = time.perf_counter()

    def add(self, run: dict) -> None:
        self.payload["runs"].append(run)
        self.flush()

    def flush(self, final: bool = False) -> None:
        self.payload["wall_seconds"] = time.perf_counter() - self.started
        self.payload["finished"] = final
        self.payload["comparisons"] = comparisons(self.payload["runs"], self.options.scoring[0])
        write_json(self.out / "quality.json", self.payload)
        (self.out / "quality.md").write_text(markdown_table(self.payload))
        runs = [r for r in self.payload["runs"] if "error" not in r]
        if runs:
            plot_results(self.payload, self.out / "quality.png")


def _evaluate(model: nn.Module, tokenizer, data: dict, options: BenchmarkOptions) -> dict:
    start = time.perf_counter()
    result = evaluate_model(
        model,
        tokenizer,
        data["items"],
        data["windows"],
        modes=options.scoring,
        max_length=options.eval_max_length,
        progress=options.progress,
    )
    result["eval_seconds"] = time.perf_counter() - start
    return result


def _maybe_save(model: nn.Module, tokenizer, options: BenchmarkOptions, name: str) -> str | None:
    if not options.save_models:
        return None
    folder = Path(options.output) / "models" / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def prepare_evaluation_data(options: BenchmarkOptions, tokenizer) -> dict:
    items = load_test_items(
        options.commonsense_dir,
        list(options.eval_tasks) if options.eval_tasks else None,
        options.subsample,
        options.seed,
    )
    windows = perplexity_windows(options.wikitext_file, tokenizer, options.ppl_context, options.ppl_tokens)
    return {"items": items, "windows": windows}


def run_benchmark(options: BenchmarkOptions) -> dict:
    """Run every selected method at every sparsity; returns the results payload (also written to disk)."""
    torch.manual_seed(options.seed)
    unknown = [m for m in options.methods if m not in methods.METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {list(methods.METHODS)}.")
    base, tokenizer = load_causal_lm(options.model)
    family = family_for_model(base)
    d, heads = int(base.config.hidden_size), int(base.config.num_attention_heads)
    kept = {s: resolve_kept_width(d, heads, s, None) for s in options.sparsities}
    del base

    mixture = TaskMixture(
        options.commonsense_dir,
        list(options.train_tasks) if options.train_tasks else None,
        tokenizer,
        options.batch_size,
        options.seq_len,
        options.loss_on,
    )
    setup = methods.TuningSetup(
        model_name=options.model,
        family=family,
        device=options.device,
        train_batches=mixture.batches(options.steps, options.seed),
        calibration_batches=mixture.batches(options.calibration_batches, options.seed + 1),
        lr=options.lr,
        warmup=options.warmup,
        lora_rank=options.lora_rank,
        lora_alpha=options.lora_alpha,
        seed=options.seed,
        progress=options.progress,
    )
    data = prepare_evaluation_data(options, tokenizer)
    train_tokens = sum(int(b["attention_mask"].sum()) for b in setup.train_batches)
    recorder = Recorder(
        options,
        {
            "model": {"name": options.model, "family": family.name, "hidden_size": d, "kept_width": kept},
            "data": {
                "train_tasks": mixture.tasks,
                "loss_on": options.loss_on,
                "train_examples": options.steps * options.batch_size,
                "train_tokens": train_tokens,
                "eval_items": {t: len(v) for t, v in data["items"].items()},
                "perplexity_tokens": int(data["windows"].shape[0] * (data["windows"].shape[1] - 1)),
            },
        },
    )
    print(
        f"{family.name} d={d}; kept widths {kept}; {len(setup.train_batches)} steps x {options.batch_size} "
        f"({train_tokens} tokens) on {mixture.tasks}; eval items {recorder.payload['data']['eval_items']}"
    )

    def record(method: str, sparsity: float, build) -> nn.Module | None:
        name = method if method in ("dense", "lora") else f"{method}-{sparsity:g}"
        print(f"== {methods.LABELS[method]}" + ("" if method in ("dense", "lora") else f" at {sparsity:.0%}"))
        run = {"method": method, "label": methods.LABELS[method], "sparsity": sparsity}
        start = time.perf_counter()
        try:
            model, info = build()
        except PeerUnavailable as error:
            run["error"] = f"not run: {error}"
            print(f"   {run['error']}")
            recorder.add(run)
            return None
        except Exception as error:  # record the failure of one method, keep the others going
            run["error"] = f"{type(error).__name__}: {error}"
            run["traceback"] = traceback.format_exc()
            print(f"   FAILED {run['error']}")
            recorder.add(run)
            return None
        run["build_seconds"] = time.perf_counter() - start
        run["train"] = info
        run.update(_evaluate(model, tokenizer, data, options))
        run["kept_width"] = int(model.config.hidden_size)
        run["saved_to"] = _maybe_save(model, tokenizer, options, name)
        summary = run.get(f"accuracy_{options.scoring[0]}", {}).get("mean", {})
        ppl = run.get("wikitext2", {}).get("perplexity")
        print(
            f"   width {run['kept_width']}, {run['parameters'] / 1e6:.1f}M params, PPL {ppl:.2f}, "
            f"mean acc_norm {summary.get('acc_norm', float('nan')):.4f}, build {run['build_seconds']:.0f}s, "
            f"eval {run['eval_seconds']:.0f}s"
        )
        recorder.add(run)
        return model

    selected = set(options.methods)
    if "dense" in selected:
        record("dense", 0.0, lambda: methods.dense(setup))
    tuned = None
    if selected & {"lora", "tune_then_prune"}:
        if "lora" in selected:
            tuned = record("lora", 0.0, lambda: methods.lora(setup))
        else:
            tuned, _ = methods.lora(setup)
    for sparsity in options.sparsities:
        width = kept[sparsity]
        if "pat" in selected:
            record("pat", sparsity, lambda: methods.pat(setup, sparsity))  # noqa: B023
        if "prune_then_tune" in selected:
            record("prune_then_tune", sparsity, lambda: methods.prune_then_tune(setup, width))  # noqa: B023
        if "tune_then_prune" in selected and tuned is not None:
            record("tune_then_prune", sparsity, lambda: methods.tune_then_prune(setup, tuned, width))  # noqa: B023
        if "torch_pruning" in selected:
            reason = torch_pruning_available()
            if reason:
                recorder.add({"method": "torch_pruning", "label": methods.LABELS["torch_pruning"],
                              "sparsity": sparsity, "error": f"not run: {reason}"})  # fmt: skip
            else:
                record("torch_pruning", sparsity, lambda: methods.torch_pruning(setup, width))  # noqa: B023
    recorder.flush(final=True)
    print(f"done in {recorder.payload['wall_seconds'] / 60:.1f} min; results in {options.output}")
    return recorder.payload


def load_checkpoint(path: Path, base_model: str) -> tuple[nn.Module, object, str]:
    """A stock model folder (merged or pruned), or a PEFT adapter folder applied to ``base_model`` and merged
    (PAT adapters with ``merge_and_prune``, others with ``merge_and_unload``)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--evaluate-checkpoint {path}: not a folder (expected a saved model or adapter).")
    if (path / "adapter_config.json").is_file():
        config = PeftConfig.from_pretrained(path)
        base, tokenizer = load_causal_lm(config.base_model_name_or_path or base_model)
        model = PeftModel.from_pretrained(base, path)
        kind = str(config.peft_type)
        merged = model.merge_and_prune() if "PAT" in kind else model.merge_and_unload()
        return merged.eval(), tokenizer, f"adapter ({kind})"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--evaluate-checkpoint {path}: no config.json or adapter_config.json inside.")
    model, tokenizer = load_causal_lm(str(path))
    return model.eval(), tokenizer, "stock model"


def evaluate_checkpoint(options: BenchmarkOptions, path: Path) -> dict:
    """Evaluate one saved model without any training; writes ``quality.json`` like a full run."""
    model, tokenizer, kind = load_checkpoint(path, options.model)
    model.to(options.device)
    data = prepare_evaluation_data(options, tokenizer)
    recorder = Recorder(options, {"checkpoint": {"path": str(path), "kind": kind}})
    run = {"method": "checkpoint", "label": Path(path).name, "sparsity": None}
    run.update(_evaluate(model, tokenizer, data, options))
    run["kept_width"] = int(model.config.hidden_size)
    recorder.add(run)
    recorder.flush(final=True)
    return recorder.payload

"""Orchestration: build the shared data once, run each method at each sparsity, evaluate, record.

Model reuse where the protocol allows: the dense model is evaluated once; the LoRA run is trained
once and its merged model is both the ``lora`` result and the starting point of ``tune_then_prune``
at every sparsity; the base model's activation scores are computed once for all sparsities.
The results JSON (and the plot) are rewritten after every finished run, so an interrupted run keeps
what it measured. The wall time is estimated before the first run (from one timed forward pass of the
base model) and re-estimated from the measured runs after each one.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from torch import nn

from peft_pat import family_for_model
from peft_pat.offline_models import load_causal_lm

from ..measure import machine_info
from . import methods
from .commonsense import TaskMixture, load_test_items
from .evaluation import evaluate_model
from .results import write_results
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
    loss: str = "distill"
    pat_options: dict = field(default_factory=dict)
    lr: float = 1e-3
    warmup: float = 0.05
    lora_rank: int = 20
    lora_alpha: float = 20.0
    calibration_batches: int = 4
    train_tasks: tuple[str, ...] | None = None
    eval_tasks: tuple[str, ...] | None = ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa", "piqa")
    subsample: int | None = 200
    scoring: tuple[str, ...] = ("text",)
    eval_max_length: int = 512
    ppl_context: int = 512
    ppl_windows: int | None = 40
    device: str = "cpu"
    seed: int = 0
    save_models: bool = False
    progress: bool = True
    preset: str = "default"
    trainer: str = "trainer"  # "trl": PAT trained by TRL's SFTTrainer (training.TRAINERS)

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
        write_results(self.payload, self.out)


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
    windows = perplexity_windows(options.wikitext_file, tokenizer, options.ppl_context, options.ppl_windows)
    return {"items": items, "windows": windows}


def plan(options: BenchmarkOptions) -> dict:
    """How many training runs (of them with a distillation teacher) and evaluations the options ask for."""
    selected = set(options.methods)
    trained = ("pat", "pat_hidden", "prune_then_tune", "prune_mlp_then_tune", "prune_hidden_then_tune", "torch_pruning")
    per_sparsity_trained = [m for m in trained if m in selected]
    if "torch_pruning" in selected and torch_pruning_available():
        per_sparsity_trained.remove("torch_pruning")
    evaluated = [m for m in (*trained[:-1], "tune_then_prune") if m in selected]
    evaluated += ["torch_pruning"] if "torch_pruning" in per_sparsity_trained else []
    n = len(options.sparsities)
    lora_runs = 1 if selected & {"lora", "tune_then_prune"} else 0
    distilled = len(per_sparsity_trained) * n if options.loss == "distill" else 0
    return {
        "train_runs": lora_runs + len(per_sparsity_trained) * n,
        "distilled_runs": distilled,
        "evaluations": len(selected & {"dense", "lora"}) + len(evaluated) * n,
    }


class WallClock:
    """Wall-time estimate: before the first run from one timed forward pass of the base model (a training
    step ~ 3 forwards, +1 for a distillation teacher; an evaluation ~ its tokens at the same speed), then
    from the measured runs."""

    def __init__(self, plan: dict, setup, data: dict, tokenizer, options: BenchmarkOptions) -> None:
        self.plan = plan
        self.steps = options.steps
        self.started = time.perf_counter()
        self.train_done: list[float] = []  # seconds per step of finished training runs
        self.eval_done: list[float] = []
        base = setup.load_base()
        batch = {k: v.to(options.device) for k, v in setup.train_batches[0].items() if k != "labels"}
        with torch.inference_mode():
            base(**batch)  # warm-up
            start = time.perf_counter()
            base(**batch)
            forward = time.perf_counter() - start
        del base
        tokens_per_second = batch["input_ids"].numel() / forward
        eval_tokens = int(data["windows"].numel())
        for items in data["items"].values():
            for item in items:
                for mode in options.scoring:
                    context, candidates = item.scoring(mode)
                    ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
                    eval_tokens += sum(
                        ctx + len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in candidates
                    )
        step = 3 * forward
        self.initial = {
            **plan,
            "forward_seconds_per_batch": forward,
            "train_step_seconds": step,
            "eval_tokens_per_model": eval_tokens,
            "eval_seconds_per_model": eval_tokens / tokens_per_second,
        }
        distilled = plan["distilled_runs"] * self.steps * forward
        self.initial["total_seconds"] = (
            plan["train_runs"] * self.steps * step
            + distilled
            + plan["evaluations"] * self.initial["eval_seconds_per_model"]
        )

    def describe_initial(self) -> str:
        e = self.initial
        return (
            f"plan: {e['train_runs']} training runs x {self.steps} steps ({e['distilled_runs']} with a teacher), "
            f"{e['evaluations']} evaluations ({e['eval_tokens_per_model']:,} tokens each); estimated "
            f"~{e['train_step_seconds']:.1f} s per step, ~{e['eval_seconds_per_model'] / 60:.1f} min per evaluation, "
            f"~{e['total_seconds'] / 60:.0f} min in all (first guess from one forward pass; refined after each run)"
        )

    def finished(self, run: dict) -> None:
        train = run.get("train") or {}
        if train.get("seconds_per_step"):
            self.train_done.append(train["seconds_per_step"])
        if "eval_seconds" in run:
            self.eval_done.append(run["eval_seconds"])
        step = sum(self.train_done) / len(self.train_done) if self.train_done else self.initial["train_step_seconds"]
        evaluation = (
            sum(self.eval_done) / len(self.eval_done) if self.eval_done else self.initial["eval_seconds_per_model"]
        )
        left_train = max(0, self.plan["train_runs"] - len(self.train_done))
        left_eval = max(0, self.plan["evaluations"] - len(self.eval_done))
        remaining = left_train * self.steps * step + left_eval * evaluation
        elapsed = time.perf_counter() - self.started
        print(
            f"   elapsed {elapsed / 60:.1f} min; estimated remaining {remaining / 60:.0f} min "
            f"({left_train} training runs at {step:.1f} s/step, {left_eval} evaluations at {evaluation / 60:.1f} min)",
            flush=True,
        )


def run_benchmark(options: BenchmarkOptions) -> dict:
    """Run every selected method at every sparsity; returns the results payload (also written to disk)."""
    torch.manual_seed(options.seed)
    unknown = [m for m in options.methods if m not in methods.METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {list(methods.METHODS)}.")
    base, tokenizer = load_causal_lm(options.model)
    family = family_for_model(base)
    d, mlp = int(base.config.hidden_size), int(base.config.intermediate_size)
    shapes = {  # per sparsity and PAT variant the shape the package resolves; the post-hoc twins cut the same
        s: {
            "pat": methods.resolved_shape(base, s, **options.pat_options),
            "hidden": methods.resolved_shape(base, s, prune_axes=["hidden"]),
            "mlp": methods.resolved_shape(base, s, prune_axes=["mlp"]),
        }
        for s in options.sparsities
    }
    kept = {s: shape["hidden"].width for s, shape in shapes.items()}  # the hidden-only width (Torch-Pruning's axis)
    del base

    mixture = TaskMixture(
        options.commonsense_dir,
        list(options.train_tasks) if options.train_tasks else None,
        tokenizer,
        options.batch_size,
        options.seq_len,
        "answer" if options.loss == "answer" else "full",  # distillation: every token, labels for the logged CE
    )
    train_batches = mixture.batches(options.steps, options.seed)
    setup = methods.TuningSetup(
        model_name=options.model,
        family=family,
        device=options.device,
        train_batches=train_batches,
        calibration_batches=train_batches[: options.calibration_batches],  # PATCallback calibrates on these too
        lr=options.lr,
        warmup=options.warmup,
        lora_rank=options.lora_rank,
        lora_alpha=options.lora_alpha,
        seed=options.seed,
        loss=options.loss,
        pat_options=dict(options.pat_options),
        progress=options.progress,
        trainer=options.trainer,
        tokenizer=tokenizer,
    )
    data = prepare_evaluation_data(options, tokenizer)
    train_tokens = sum(int(b["attention_mask"].sum()) for b in setup.train_batches)
    recorder = Recorder(
        options,
        {
            "model": {
                "name": options.model,
                "family": family.name,
                "hidden_size": d,
                "intermediate_size": mlp,
                "kept_width": kept,
                "shapes": {str(s): {k: str(v) for k, v in shape.items()} for s, shape in shapes.items()},
            },
            "data": {
                "train_tasks": mixture.tasks,
                "loss": options.loss,
                "labels": mixture.loss_on,
                "train_examples": options.steps * options.batch_size,
                "train_tokens": train_tokens,
                "eval_items": {t: len(v) for t, v in data["items"].items()},
                "perplexity_tokens": int(data["windows"].shape[0] * (data["windows"].shape[1] - 1)),
            },
        },
    )
    print(
        f"{family.name} d={d}; shapes {recorder.payload['model']['shapes']}; "
        f"{len(setup.train_batches)} steps x {options.batch_size} "
        f"({train_tokens} tokens) on {mixture.tasks}, loss {options.loss}; "
        f"eval items {recorder.payload['data']['eval_items']}, {data['windows'].shape[0]} WikiText windows"
    )
    clock = WallClock(plan(options), setup, data, tokenizer, options)
    recorder.payload["estimate"] = clock.initial
    print(clock.describe_initial(), flush=True)

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
        run["intermediate_size"] = int(model.config.intermediate_size)
        run["saved_to"] = _maybe_save(model, tokenizer, options, name)
        summary = run.get(f"accuracy_{options.scoring[0]}", {}).get("mean", {})
        ppl = run.get("wikitext2", {}).get("perplexity")
        print(
            f"   width {run['kept_width']}, MLP {run['intermediate_size']}, {run['parameters'] / 1e6:.1f}M params, "
            f"PPL {ppl:.2f}, "
            f"mean acc_norm {summary.get('acc_norm', float('nan')):.4f}, build {run['build_seconds']:.0f}s, "
            f"eval {run['eval_seconds']:.0f}s"
        )
        recorder.add(run)
        clock.finished(run)
        return model

    selected = set(options.methods)
    if "dense" in selected:
        record("dense", 0.0, lambda: methods.dense(setup))
    tuned = None
    if selected & {"lora", "tune_then_prune"}:
        if "lora" in selected:
            tuned = record("lora", 0.0, lambda: methods.lora(setup))
        else:
            tuned, info = methods.lora(setup)
            clock.finished({"train": info})
    for sparsity in options.sparsities:
        width, shape = kept[sparsity], shapes[sparsity]
        if "pat" in selected:
            record("pat", sparsity, lambda: methods.pat(setup, sparsity))  # noqa: B023
        if "pat_hidden" in selected:
            record("pat_hidden", sparsity, lambda: methods.pat(setup, sparsity, prune_axes=["hidden"]))  # noqa: B023
        for method, key in (
            ("prune_then_tune", "pat"), ("prune_mlp_then_tune", "mlp"), ("prune_hidden_then_tune", "hidden"),
        ):  # fmt: skip
            if method in selected:
                record(method, sparsity, lambda k=key: methods.prune_then_tune(setup, shape[k]))  # noqa: B023
        if "tune_then_prune" in selected and tuned is not None:
            record("tune_then_prune", sparsity, lambda: methods.tune_then_prune(setup, tuned, shape["pat"]))  # noqa: B023
        if "torch_pruning" in selected:
            reason = torch_pruning_available()
            if reason:
                recorder.add({"method": "torch_pruning", "label": methods.LABELS["torch_pruning"],
                              "sparsity": sparsity, "error": f"not run: {reason}"})  # fmt: skip
            else:
                record("torch_pruning", sparsity, lambda: methods.torch_pruning(setup, width))  # noqa: B023
    recorder.flush(final=True)
    for t in recorder.payload["pat_targets"]:
        print(
            f"PPL ratio PAT / {t['reference']} ({t['best_posthoc_label']}) at {t['sparsity']:.0%}: "
            f"{t['ppl_ratio_pat_over_best_posthoc']:.3f} (target <= {t['ppl_target']}); "
            f"mean acc_norm difference {100 * t['mean_acc_norm_difference']:+.1f} "
            f"± {100 * t['paired_stderr']:.1f} points"
        )
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
    run["intermediate_size"] = int(model.config.intermediate_size)
    recorder.add(run)
    recorder.flush(final=True)
    return recorder.payload

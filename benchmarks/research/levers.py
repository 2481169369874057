"""One quality lever at a time: PAT with PATConfig overrides, or the post-hoc rival, on WikiText-2 only.

The fast loop behind the ablation table of docs/quality.md ("Levers"): the quality benchmark's
training data (72 pre-built batches of 8 full-sequence commonsense instructions, 160 tokens) and
optimizer (AdamW, lr 1e-3, 5% warm-up + cosine, clipping 1.0, no weight decay), one method per
process, WikiText-2 perplexity on 40 windows of 512 tokens, one JSON line appended to ``--output``.

* ``--method pat``: ``PATConfig(target_sparsity=s, **--opts)``; the schedule is driven and the
  mask calibrated exactly as PATCallback does (``set_step`` around every step, ``calibrate`` on the
  first 8 training batches), so the package defaults are what is measured.
* ``--method posthoc``: the activation cut of the same 8 batches (massive-activation channels
  protected, as PAT's start protects them; with ``--opts prune_axes=[...]`` the shape PAT would prune
  to, MLP units ranked per layer by their RMS input to ``down_proj``, heads by their RMS attention output
  within each KV head, KV heads by the sum), then LoRA r=20 on every decoder
  linear, distilled from a frozen dense copy with ``peft_pat.training.distillation.distillation_loss``
  (``--loss distill``) or trained on cross-entropy (``--loss full``).

    python -m benchmarks.research.levers --method pat --sparsity 0.25
    python -m benchmarks.research.levers --method pat --sparsity 0.25 --opts mask_fade_to_hard=False
    python -m benchmarks.research.levers --method posthoc --sparsity 0.25 --loss distill
    python -m benchmarks.research.levers --method pat --sparsity 0.25 --opts "prune_axes=['mlp']"
    python -m benchmarks.research.levers --method posthoc --sparsity 0.25 --opts "prune_axes=['mlp']"
    python -m benchmarks.research.levers --method pat --opts "prune_axes=['heads'],target_num_attention_heads=6"

A research loop, not maintained as a product (benchmarks/research/README.md): the maintained comparison
is ``python -m benchmarks.quality`` (the Trainer + PATCallback path, ``--pat-options`` for ablations).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from peft_pat import PATConfig, family_for_model
from peft_pat.calibration import channel_statistics, massive_channels
from peft_pat.offline_models import load_causal_lm
from peft_pat.training.distillation import distillation_loss
from peft_pat.width import resolve_kept_width

from ..quality.commonsense import TaskMixture
from ..quality.evaluation import perplexity
from ..quality.posthoc import cut_by_activation, cut_shape_by_activation
from ..quality.wikitext import perplexity_windows

REPO = Path(__file__).resolve().parents[2]


def lr_factor(step: int, total: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at ``total`` (the quality benchmark's schedule)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))))


CALIBRATION_BATCHES = 8


class LayerwiseDistillation:
    """Probe for the "next lever" (``--layerwise W``): distil every decoder layer's residual output on the kept
    channels, as CoFi does, on top of the logit distillation. Not a package feature.

    Hooks record each decoder layer's output in the tuner's teacher pass (PAT bypassed) and in the student
    pass. Per token both are normalised by their RMS over the kept channels (the shared HSM scale and the
    norms make the residual's overall scale meaningless), each channel is divided by the teacher's RMS of
    that channel in the batch (so the massive-activation channels do not dominate), and the loss is the
    mean squared difference over kept channels, non-padding tokens and layers: 0 at step 0 (student ==
    teacher), ~2 for unrelated directions.
    """

    def __init__(self, tuner, kept: torch.Tensor) -> None:
        self.tuner, self.kept = tuner, kept
        self.teacher: list[torch.Tensor] = []
        self.student: list[torch.Tensor] = []
        layers = tuner.model.get_submodule(family_for_model(tuner.model).layers)
        self.hooks = [layer.register_forward_hook(self._record) for layer in layers]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def _record(self, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if self.tuner.pat_mask.teacher_pass:
            self.teacher.append(hidden.detach()[..., self.kept])
        else:
            self.student.append(hidden[..., self.kept])

    def loss(self, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = attention_mask.bool()
        total = torch.zeros(())
        for t, s in zip(self.teacher, self.student, strict=True):
            t = t[tokens].float()
            s = s[tokens].float()
            t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-12)
            s = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-12)
            channel = torch.rsqrt(t.pow(2).mean(0) + 1e-6)
            total = total + ((s - t) * channel).pow(2).mean()
        count = len(self.student)
        self.teacher.clear()
        self.student.clear()
        return total / max(1, count)


def parse_opts(text: str) -> dict:
    """``key=value,...`` with Python literals (``mask_fade_to_hard=False,hsm_rank=64``,
    ``prune_axes=['hidden','mlp'],target_width=504``)."""
    call = ast.parse(f"f({text})", mode="eval").body  # keyword arguments, so a list value may hold commas
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.research.levers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", choices=("pat", "posthoc"), required=True)
    p.add_argument("--sparsity", type=float, default=0.25)
    p.add_argument("--loss", choices=("distill", "full"), default="distill")
    p.add_argument("--opts", type=parse_opts, default={}, help="PATConfig overrides, e.g. hsm_rank=64")
    p.add_argument("--steps", type=int, default=72)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "levers.jsonl")
    p.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "2")))
    p.add_argument("--layerwise", type=float, default=0.0, help="PAT only: weight of the layer-wise probe")
    p.add_argument(
        "--posthoc-producer-rank", type=int, default=20,
        help="posthoc only: LoRA rank (alpha = rank) on o_proj and down_proj, the residual producers; above 20 it "
        "gives the rival the extra output-side rank PAT's HSMs have (20 + hsm_rank)",
    )  # fmt: skip
    p.add_argument(
        "--seed", type=int, default=0,
        help="replicate: draws other training batches (so other calibration batches) and, if not 0, another adapter "
        "initialisation; 0 is the runs in docs/quality.md",
    )  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.data_dir / "commonsense").is_dir():
        raise SystemExit(f"--data-dir {args.data_dir} has no commonsense/ folder (see ../shared/data/README.md).")

    base, tokenizer = load_causal_lm(args.model)
    batches = TaskMixture(args.data_dir / "commonsense", None, tokenizer, 8, 160, "full").batches(args.steps, args.seed)
    windows = perplexity_windows(args.data_dir / "wikitext-2-raw" / "wiki.test.raw", tokenizer, 512, args.windows)
    kept = resolve_kept_width(base.config.hidden_size, base.config.num_attention_heads, args.sparsity, None)
    start = time.time()
    teacher, tuner, layerwise = None, None, None
    if args.seed:  # seed 0 keeps the generator's default state here, as the documented runs had it
        torch.manual_seed(args.seed)
    if args.method == "pat":
        overrides = {"distillation_weight": 0.0} if args.loss == "full" else {}
        model = get_peft_model(base, PATConfig(target_sparsity=args.sparsity, **overrides, **args.opts))
        tuner = model.base_model
        config = model.peft_config["default"]
        kept, kept_mlp = (config.kept_width if "hidden" in config.pruned_axes else None), config.kept_intermediate_size
        kept_heads = (config.kept_num_attention_heads, config.kept_num_key_value_heads)
    else:
        teacher = copy.deepcopy(base).eval().requires_grad_(False) if args.loss == "distill" else None
        family = family_for_model(base)
        kept_heads = (None, None)
        if PATConfig(target_sparsity=args.sparsity, **args.opts).pruned_axes != ("hidden",):  # PAT's shape
            shape = get_peft_model(copy.deepcopy(base), PATConfig(target_sparsity=args.sparsity, **args.opts))
            config = shape.peft_config["default"]
            kept = config.kept_width if "hidden" in config.pruned_axes else None
            kept_mlp = config.kept_intermediate_size
            kept_heads = (config.kept_num_attention_heads, config.kept_num_key_value_heads)
            stats = channel_statistics(base, batches[:CALIBRATION_BATCHES], mlp=True, heads=True)
            cut_shape_by_activation(base, family, stats, kept, kept_mlp, *kept_heads)
            del shape
        else:
            kept_mlp = None
            stats = channel_statistics(base, batches[:CALIBRATION_BATCHES])
            cut_by_activation(base, family, stats.score, massive_channels(stats.energy), kept)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        producers = {name: args.posthoc_producer_rank for name in ("o_proj", "down_proj")}
        lora = LoraConfig(
            task_type="CAUSAL_LM", r=20, lora_alpha=20, target_modules=targets,
            rank_pattern=producers, alpha_pattern=producers,
        )  # fmt: skip
        model = get_peft_model(base, lora)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    total, warmup = len(batches), max(1, round(0.05 * len(batches)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    torch.manual_seed(args.seed)
    if tuner is not None:
        tuner.set_step(0, total, learning_rate=args.lr)
        if tuner.needs_calibration():
            tuner.calibrate(batches[:CALIBRATION_BATCHES])
        mask = next(iter(tuner.pat_mask.values()))
        start_set = mask.kept_set().clone()
        layerwise = LayerwiseDistillation(tuner, start_set.nonzero().flatten()) if args.layerwise > 0 else None
    curve = []
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PAT adapter .* mask hardened")
        for step, batch in enumerate(batches):
            out = model(**batch)
            loss = out.loss
            if layerwise is not None:
                probe = layerwise.loss(batch["attention_mask"])
                loss = loss + args.layerwise * probe
                if step % 8 == 0:
                    print(f"step {step} layer-wise loss {float(probe.detach()):.4f}", flush=True)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = distillation_loss(out.logits, target, batch["attention_mask"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if tuner is not None:
                tuner.set_step(step + 1, total)
                logged = tuner.last_auxiliary_losses
                curve.append(round(logged.get("distillation_loss", logged.get("task_loss", 0.0)), 4))
            else:
                curve.append(round(float(loss), 4))
            if step % 8 == 0:
                print(f"step {step} loss {curve[-1]} {time.time() - start:.0f} s", flush=True)
    model.eval()
    if layerwise is not None:
        layerwise.remove()
    result = {"method": args.method, "sparsity": args.sparsity, "kept": kept, "loss": args.loss}
    if kept_mlp is not None:
        result["kept_intermediate"] = kept_mlp
    if kept_heads[0] is not None:
        result["kept_heads"], result["kept_kv_heads"] = kept_heads
    result["opts"] = {k: repr(v) for k, v in args.opts.items()}
    if args.layerwise:
        result["layerwise"] = args.layerwise
    if args.seed:
        result["seed"] = args.seed
    if args.method == "posthoc" and args.posthoc_producer_rank != 20:
        result["posthoc_producer_rank"] = args.posthoc_producer_rank
    result["trainable"] = sum(q.numel() for q in params)
    if tuner is not None:
        result["hardening_loss_change"] = tuner.last_auxiliary_losses.get("hardening_loss_change")
        result["protected"] = getattr(tuner, "calibration_summary", {}).get("protected_channels")
        result["kept_from_start"] = int((mask.kept_set() & start_set).sum())  # of `kept`: how far the mask moved
        small = model.merge_and_prune()
    else:
        small = model.merge_and_unload()
    train_seconds = time.time() - start
    result["params"] = sum(q.numel() for q in small.parameters())  # unique: a tied lm_head once
    result.update(ppl=perplexity(small, windows, progress=False)["perplexity"], train_s=round(train_seconds))
    result["curve"] = curve
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a") as f:
        f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()

"""Training cost of PAT vs LoRA on the real SmolLM2-135M: optimizer-step time and peak memory.

Configurations (``--configs``), all on every decoder linear (q, k, v, o, gate, up, down), float32:

  pat           PAT with the defaults users get: r=20 LoRA, HSM rank d - N (144 for d=576 at 25%),
                distillation, 25% target sparsity, mask in its soft phase (gate recomputed in every HSM)
  pat-no-kd     ``pat`` without the distillation teacher (distillation_weight=0): pat / pat-no-kd is the
                cost of distillation (one extra no-grad forward of the base model and the blockwise KL)
  pat-hard      the same after the freeze step (hard 0/1 gate)
  pat-unfused   ``pat`` with the HSM composed of plain autograd ops (the implementation before
                peft_pat/hsm.py), to show what the fused HSM saves
  lora-20       PEFT LoRA r=20 (PAT's LoRA branch alone)
  lora-matched  PEFT LoRA with the rank whose trainable-parameter count is closest to PAT's
                (the paper's parameter-matched LoRA-64 comparison for Llama-2-7B)

One optimizer step = forward with labels (PAT adds its auxiliary losses), backward, AdamW step,
zero_grad, and for PAT ``set_step`` (the schedule work a callback does each step). Same random token
batch (``--batch`` x ``--seq-len``) for all. Step time: every configuration lives in one process and
they are stepped round-robin (benchmarks/measure.py), medians of ``--repeats`` after ``--warmup``.
Peak memory: a fresh subprocess per configuration runs ``--memory-steps`` steps; reported are its
peak resident memory (VmHWM) and the part above the resident memory just before the first step
(activations, gradients, optimizer state), each the median of ``--memory-repeats`` processes run
round-robin (one process's peak moves by up to ~250 MiB between identical runs on this machine).

``merge_and_prune`` on SmolLM2: time and peak memory in a subprocess. The merge of large Llama-shaped
models is measured by benchmarks/merge_memory.py; its numbers are read from
benchmarks/results/merge_memory.json when that file exists and printed next to these.

    python -m benchmarks.training --threads 1                       # 23 min on 1 thread (docs/performance.md)
    python -m benchmarks.training --configs pat,lora-matched --batch 4 --seq-len 256 --repeats 10
    python -m benchmarks.training --profile                         # also torch.profiler top ops per config
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .measure import (
    PeakMemory,
    alternate,
    format_table,
    machine_info,
    median,
    run_json_subprocess,
    write_json,
)

REPO = Path(__file__).resolve().parent.parent
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = ("pat", "pat-no-kd", "pat-unfused", "pat-hard", "lora-20", "lora-matched")
FAR_AWAY = 10**9  # total steps for the soft-phase schedule: the mask never reaches its freeze step


# ---------------------------------------------------------------------------------------- models
def unfused_hsm(layer, y: torch.Tensor, adapter_name: str) -> torch.Tensor:
    """The HSM as plain autograd ops, as layer.py computed it before peft_pat/hsm.py (baseline only)."""
    dtype = y.dtype
    if adapter_name in layer.pat_hsm_down:
        down = layer.pat_hsm_down[adapter_name].weight
        up = layer.pat_hsm_up[adapter_name].weight
        y = y + F.linear(F.linear(y, down.to(dtype)), up.to(dtype))
    return y * layer.hsm_gate_scale(adapter_name).to(y.device, dtype)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_parameters_per_rank(base) -> int:
    """Trainable parameters LoRA adds per unit of rank: sum of (in + out) over the targeted linears."""
    return sum(
        m.in_features + m.out_features
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS
    )


def pat_config(args, distillation: bool = True):
    """The package defaults (distillation from the dense model included) or, for pat-no-kd, without the teacher."""
    from peft_pat import PATConfig

    extra = {} if distillation else {"distillation_weight": 0.0}
    return PATConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=float(args.rank), target_sparsity=0.25, **extra)


def matched_rank(args) -> tuple[int, int]:
    """(LoRA rank whose trainable parameters are closest to PAT's, PAT's trainable parameters)."""
    from peft import get_peft_model

    from peft_pat.offline_models import load_causal_lm

    base, _ = load_causal_lm(args.model)
    per_rank = lora_parameters_per_rank(base)
    pat = trainable_parameters(get_peft_model(base, pat_config(args)))
    return max(1, round(pat / per_rank)), pat


def build(config_name: str, args, lora_matched_rank: int):
    """(peft model, step function) for one configuration; the base is loaded fresh."""
    from peft import LoraConfig, get_peft_model

    from peft_pat.offline_models import load_causal_lm

    base, _ = load_causal_lm(args.model)
    if args.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config_name.startswith("pat"):
        model = get_peft_model(base, pat_config(args, distillation=config_name != "pat-no-kd"))
    else:
        rank = args.rank if config_name == "lora-20" else lora_matched_rank
        lora = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=float(rank), target_modules=LORA_TARGETS)
        model = get_peft_model(base, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq_len), generator=generator)
    pat = config_name.startswith("pat")
    if config_name == "pat-hard":
        model.base_model.harden_mask()
    if config_name == "pat-unfused":
        from peft_pat.layer import PATLayer

        for module in model.modules():
            if isinstance(module, PATLayer):
                module._apply_hsm = types.MethodType(unfused_hsm, module)
    counter = {"step": 0}

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counter["step"] += 1
        if pat:
            model.base_model.set_step(counter["step"], FAR_AWAY, learning_rate=args.lr)
        return float(loss.detach())

    return model, step


# ---------------------------------------------------------------------------------------- probes (subprocess)
def probe_memory(args) -> dict:
    """Peak resident memory of ``args.probe_memory`` training for ``--memory-steps`` steps (own process)."""

    model, step = build(args.probe_memory, args, args.lora_matched_rank)
    with PeakMemory() as training:
        for _ in range(args.memory_steps):
            step()
    return {
        "config": args.probe_memory,
        "trainable_parameters": trainable_parameters(model),
        "rss_before_training_mib": training.before_mib,
        "peak_rss_mib": training.peak_mib,
        "training_extra_mib": training.extra_mib,
    }


def probe_merge(args) -> dict:
    """Time and peak memory of merge_and_prune() on SmolLM2 with a non-trivial PAT adapter (own process)."""

    from peft import get_peft_model

    from peft_pat import PATConfig
    from peft_pat.offline_models import load_causal_lm

    base, _ = load_causal_lm(args.model)
    torch.manual_seed(args.seed)
    config = PATConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=float(args.rank), init_weights=False)
    model = get_peft_model(base, config)
    model.base_model.harden_mask()
    model_mib = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    with warnings.catch_warnings(), PeakMemory() as merge:
        warnings.simplefilter("ignore")
        pruned = model.base_model.merge_and_prune()
    return {
        "model": args.model,
        "model_mib": model_mib,
        "kept_width": pruned.config.hidden_size,
        "seconds": merge.seconds,
        "rss_before_mib": merge.before_mib,
        "peak_rss_mib": merge.peak_mib,
        "peak_extra_mib": merge.extra_mib,
    }


def _probe_argv(args, extra: list[str]) -> list[str]:
    argv = ["-m", "benchmarks.training", "--model", args.model]
    argv += ["--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    argv += ["--rank", str(args.rank), "--lr", str(args.lr), "--seed", str(args.seed)]
    argv += ["--memory-steps", str(args.memory_steps), "--lora-matched-rank", str(args.lora_matched_rank)]
    argv += ["--threads", str(torch.get_num_threads())]
    if args.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    return argv + extra


# ---------------------------------------------------------------------------------------- profile
def profile_step(step, rows: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "self_ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in events[:rows]
    ]


# ---------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--configs", default="pat,pat-unfused,lora-20,lora-matched", help=f"comma list of {', '.join(CONFIGS)}"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=20, help="LoRA rank of PAT and of the lora-20 baseline")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument(
        "--memory-repeats",
        type=int,
        default=3,
        help="fresh processes per configuration for peak memory (round-robin); the median is reported",
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one step per configuration")
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "training.json")
    p.add_argument("--probe-memory", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--probe-merge", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lora-matched-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    if args.probe_memory:
        print(json.dumps(probe_memory(args)))
        return {}
    if args.probe_merge:
        print(json.dumps(probe_merge(args)))
        return {}

    start = time.perf_counter()
    names = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; choose from {', '.join(CONFIGS)}")
    args.lora_matched_rank, pat_params = matched_rank(args)
    results = {
        "machine": machine_info(),
        "command": " ".join(sys.argv),
        "args": vars(args) | {"out": str(args.out)},
        "lora_matched_rank": args.lora_matched_rank,
        "pat_trainable_parameters": pat_params,
    }
    print(f"PAT trains {pat_params:,} parameters; parameter-matched LoRA rank {args.lora_matched_rank}", flush=True)

    models, steps = {}, {}
    for name in names:
        models[name], steps[name] = build(name, args, args.lora_matched_rank)
    if args.profile:
        results["profile"] = {}
        for name in names:
            steps[name]()  # warm
            results["profile"][name] = profile_step(steps[name], rows=15)
    print(f"timing {len(names)} configurations round-robin ...", flush=True)
    times = alternate(steps, args.repeats, args.warmup)
    del models, steps

    probes: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.memory_repeats):  # round-robin, like the timing: machine drift hits every config
        for name in names:
            print(f"memory probe {name} ({repeat + 1}/{args.memory_repeats}) ...", flush=True)
            probes[name].append(run_json_subprocess(_probe_argv(args, ["--probe-memory", name])))
    rows = []
    for name in names:
        peaks = [probe["peak_rss_mib"] for probe in probes[name]]
        memory = dict(probes[name][0])
        for key in ("rss_before_training_mib", "peak_rss_mib", "training_extra_mib"):
            memory[key] = median([probe[key] for probe in probes[name]])
        memory["peak_rss_mib_runs"] = peaks
        rows.append({"config": name, "step_s": median(times[name]), "times": times[name], **memory})
    reference = {row["config"]: row for row in rows}
    for row in rows:
        for ref in ("lora-20", "lora-matched", "pat-unfused"):
            if ref in reference:
                key = ref.replace("-", "_")
                row[f"time_vs_{key}"] = row["step_s"] / reference[ref]["step_s"]
                row[f"peak_vs_{key}"] = row["peak_rss_mib"] / reference[ref]["peak_rss_mib"]
                row[f"extra_vs_{key}"] = row["training_extra_mib"] / reference[ref]["training_extra_mib"]
    results["configs"] = rows

    if args.merge:
        print("merge_and_prune probe ...", flush=True)
        results["merge_smollm2"] = run_json_subprocess(_probe_argv(args, ["--probe-merge"]))
    merge_file = REPO / "benchmarks" / "results" / "merge_memory.json"
    if merge_file.exists():
        results["merge_llama_shaped"] = {
            "source": str(merge_file.relative_to(REPO)),
            **json.loads(merge_file.read_text()),
        }
    results["seconds"] = time.perf_counter() - start
    write_json(args.out, results)
    print_report(results, args)
    return results


def print_report(results: dict, args) -> None:
    print(f"\n== training step, {args.model}, batch {args.batch} x {args.seq_len} tokens, float32")
    for row in results["configs"]:
        row["params"] = f"{row['trainable_parameters'] / 1e6:.2f}M"
        if "profile" in results:
            top = results["profile"][row["config"]][:3]
            row["top_ops"] = ", ".join(f"{e['op']} {100 * e['share']:.0f}%" for e in top)
    print(
        format_table(
            results["configs"],
            [
                ("config", "config"),
                ("params", "trainable"),
                ("step_s", "step s"),
                ("time_vs_lora_20", "time/LoRA-20"),
                ("time_vs_lora_matched", "time/matched"),
                ("time_vs_pat_unfused", "time/unfused"),
                ("peak_rss_mib", "peak MiB"),
                ("peak_vs_lora_matched", "peak/matched"),
                ("training_extra_mib", "train extra MiB"),
                ("extra_vs_lora_matched", "extra/matched"),
                ("extra_vs_pat_unfused", "extra/unfused"),
            ],
        )
    )
    print(f"(matched LoRA rank {results['lora_matched_rank']}; peak = process peak RSS, train extra = peak minus RSS")
    print(" before the first step: activations, gradients, optimizer state)")
    if "profile" in results:
        for name, events in results["profile"].items():
            print(
                f"\nprofile of one step, {name}: " + ", ".join(f"{e['op']} {e['self_ms']:.0f} ms" for e in events[:8])
            )
    merge = results.get("merge_smollm2")
    if merge:
        print(
            f"\nmerge_and_prune {merge['model']} -> width {merge['kept_width']}: {merge['seconds']:.2f} s, "
            f"peak RSS {merge['peak_rss_mib']:.0f} MiB ({merge['peak_extra_mib']:.0f} MiB above the "
            f"{merge['rss_before_mib']:.0f} MiB before; model {merge['model_mib']:.0f} MiB)"
        )
    big = results.get("merge_llama_shaped")
    if big and big.get("in_memory"):
        m = big["in_memory"]
        print(
            f"merge_and_prune {big['shape']}-shaped, {big['layers']} layers, {big['dtype']} (from {big['source']}): "
            f"{m['seconds']:.1f} s, peak RSS {m['peak_rss_mib']:.0f} MiB ({m['peak_extra_mib']:.0f} MiB above before; "
            f"model {m['model_mib']:.0f} MiB)"
        )
    print(f"\ntotal {results['seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()

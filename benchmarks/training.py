"""Training cost of PAT vs LoRA: optimizer-step time and peak memory, on the real SmolLM2-135M or on a
layer slice of a 7B/8B-shaped model extrapolated to full depth.

Configurations (``--configs``), all on every decoder linear (q, k, v, o, gate, up, down):

  pat           PAT with the defaults users get: r=20 LoRA, the default HSM rank (resolution.default_hsm_rank),
                distillation, ``--sparsity`` (25%), mask in its soft phase (gate recomputed in every HSM)
  pat-no-kd     ``pat`` without the distillation teacher (distillation_weight=0): pat / pat-no-kd is the
                cost of distillation (one extra no-grad forward of the base model and the blockwise KL)
  pat-hard      the same after the freeze step (hard 0/1 gate)
  pat-uncapped  ``pat`` with the HSM rank of the rule before its cap (d - N, at least 5% of d; peft-pat 0.4)
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

On CUDA (``--device cuda``) the peak is ``torch.cuda.max_memory_allocated`` over the same steps (reset just
before the first), the "extra" part the peak minus the memory allocated before it.

**7B-shaped slice** (``--shape llama2-7b`` or ``llama3-8b``): a random bfloat16 Llama with those layer shapes and
``--layers`` decoder layers (two or more depths, e.g. ``2,4``), the widths and the prune axes resolved on the
full-depth config and passed explicitly (on a slice the embeddings would dominate the parameter budget). Each
configuration's trainable parameters and peak memory are measured at each depth and extrapolated linearly to
the full depth (``peak(L) = a + b L`` through the two depths farthest apart: the embeddings, lm_head and the
logits are the intercept, each decoder layer adds its weights, adapter state and activations to the slope);
ratios against lora-20 are taken at full depth. Timing is skipped unless ``--repeats`` is given. Writes
benchmarks/results/training-SHAPE.json unless ``--out`` says otherwise.

**Counts** (``--count``): trainable parameters of the default HSM rank and of the uncapped rule against LoRA r=20
at full depth for each of ``SHAPES`` (d = 576 to 8192) at -25% and -50% (hidden + MLP cut), counted on meta-device
slices (:func:`count_trainable`), with the optimizer-state memory model 2 bytes per base parameter + 16 bytes
(float32 weight, gradient, two AdamW moments) per trainable parameter; benchmarks/results/training-counts.json.

``merge_and_prune`` on SmolLM2: time and peak memory in a subprocess. The merge of large Llama-shaped
models is measured by benchmarks/merge_memory.py; its numbers are read from
benchmarks/results/merge_memory.json when that file exists and printed next to these.

    python -m benchmarks.training --threads 1                       # 23 min on 1 thread (docs/performance.md)
    python -m benchmarks.training --configs pat,lora-matched --batch 4 --seq-len 256 --repeats 10
    python -m benchmarks.training --profile                         # also torch.profiler top ops per config
    python -m benchmarks.training --count                           # 75 s, parameter counts only
    python -m benchmarks.training --shape llama2-7b --layers 2,4 --batch 1 --seq-len 256 --threads 1 \
        --configs pat,pat-uncapped,lora-20                          # 718 s (docs/performance.md, Training cost at 7B)
    python -m benchmarks.training --shape llama3-8b --layers 2,32 --batch 4 --seq-len 1024 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
import warnings
from functools import partial
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
CONFIGS = ("pat", "pat-no-kd", "pat-unfused", "pat-hard", "pat-uncapped", "lora-20", "lora-matched")
FAR_AWAY = 10**9  # total steps for the soft-phase schedule: the mask never reaches its freeze step
# Published configs, by shape: the slices (--shape) and the parameter counts (--count). Full depth: num_hidden_layers.
SHAPES = {
    "smollm2-135m": {
        "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
        "vocab_size": 49152, "num_hidden_layers": 30, "tie_word_embeddings": True,
    },
    "llama3.2-1b": {
        "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "vocab_size": 128256, "num_hidden_layers": 16, "tie_word_embeddings": True,
    },
    "llama2-7b": {
        "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32000, "num_hidden_layers": 32, "tie_word_embeddings": False,
    },
    "llama3-8b": {
        "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "num_hidden_layers": 32, "tie_word_embeddings": False,
    },
    "llama2-70b": {
        "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
        "vocab_size": 32000, "num_hidden_layers": 80, "tie_word_embeddings": False,
    },
}  # fmt: skip
# A test-sized shape, so the slice pipeline runs end to end in seconds (tests/test_scale.py); not counted by --count.
TEST_SHAPES = {
    "tiny-llama": {
        "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 128, "num_hidden_layers": 8, "tie_word_embeddings": False,
    },
}  # fmt: skip
SLICE_SHAPES = ("llama2-7b", "llama3-8b", "tiny-llama")  # what --shape trains (the others are counted only)


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


def llama_config(shape: str, layers: int | None = None, dtype: str = "bfloat16"):
    """The LlamaConfig of ``shape`` (``SHAPES``), with ``layers`` decoder layers (None: full depth)."""
    from transformers import LlamaConfig

    spec = dict({**SHAPES, **TEST_SHAPES}[shape])
    if layers is not None:
        spec["num_hidden_layers"] = layers
    return LlamaConfig(**spec, dtype=dtype)


def full_depth_widths(shape: str, sparsity: float, axes: tuple[str, ...] = ("hidden", "mlp")) -> dict:
    """PATConfig fields that pin the cut the full-depth ``shape`` gets at ``sparsity``: ``prune_axes``,
    ``target_width`` and (with the MLP axis) ``target_intermediate_size``, resolved on a meta-device model."""
    from transformers import LlamaForCausalLM

    from peft_pat import PATConfig
    from peft_pat.budget import resolve_widths
    from peft_pat.families import family_for_model_type
    from peft_pat.merge.in_memory import stock_layout

    with torch.device("meta"):
        full = LlamaForCausalLM(llama_config(shape))
    cfg = PATConfig(target_sparsity=sparsity, prune_axes=list(axes))
    widths = resolve_widths(cfg, family_for_model_type("llama"), full.config.to_dict(), stock_layout(full))
    width, mlp = widths.hidden, widths.mlp
    fields = {"prune_axes": list(axes), "target_width": width}
    if mlp is not None:
        fields["target_intermediate_size"] = mlp
    return fields


def random_slice(shape: str, layers: int, dtype: torch.dtype, device: str):
    """A random Llama of ``shape`` with ``layers`` decoder layers, built on ``device`` in ``dtype`` (no float32 copy):
    weights N(0, 0.02), norms 1."""
    from transformers import LlamaForCausalLM

    config = llama_config(shape, layers, str(dtype).removeprefix("torch."))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)  # inv_freq: to_empty left junk
    return model


def load_base(args, layers: int | None = None):
    """The base a configuration trains: the real ``--model`` (float32), or a ``--shape`` slice of ``layers`` layers."""
    if args.shape:
        return random_slice(args.shape, layers or args.probe_layers, getattr(torch, args.dtype), args.device)
    from peft_pat.offline_models import load_causal_lm

    base, _ = load_causal_lm(args.model, dtype=getattr(torch, args.dtype))
    return base.to(args.device)


def pat_config(args, config_name: str = "pat", base=None):
    """The package defaults (distillation from the dense model included); pat-no-kd without the teacher;
    pat-uncapped with the uncapped rank on ``base``. On a ``--shape`` slice the cut is the full-depth model's
    (``full_depth_widths``)."""
    from peft_pat import PATConfig

    extra = {"distillation_weight": 0.0} if config_name == "pat-no-kd" else {}
    if args.shape:
        extra |= full_depth_widths(args.shape, args.sparsity)
    else:
        extra["target_sparsity"] = args.sparsity
    config = PATConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=float(args.rank), **extra)
    if config_name == "pat-uncapped":
        from peft_pat.resolution import default_hsm_rank

        probe = PATConfig(**{k: v for k, v in extra.items()})
        resolved = get_peft_model_meta_config(base, probe)
        config.hsm_rank = default_hsm_rank(resolved.base_hidden_size, resolved.kept_width, cap=None)
    return config


def get_peft_model_meta_config(base, config):
    """``config`` resolved on ``base``'s shapes, on a meta-device copy (nothing allocated)."""
    from peft import get_peft_model

    with torch.device("meta"):
        clone = type(base)(base.config)
    return get_peft_model(clone, config).peft_config["default"]


def matched_rank(args, layers: int | None = None) -> tuple[int, int]:
    """(LoRA rank whose trainable parameters are closest to PAT's, PAT's trainable parameters)."""
    from peft import get_peft_model

    base = load_base(args, layers)
    per_rank = lora_parameters_per_rank(base)
    pat = trainable_parameters(get_peft_model(base, pat_config(args)))
    return max(1, round(pat / per_rank)), pat


def build(config_name: str, args, lora_matched_rank: int, layers: int | None = None):
    """(peft model, step function) for one configuration; the base is loaded fresh."""
    from peft import LoraConfig, get_peft_model

    base = load_base(args, layers)
    if args.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config_name.startswith("pat"):
        model = get_peft_model(base, pat_config(args, config_name, base))
    else:
        rank = args.rank if config_name == "lora-20" else lora_matched_rank
        lora = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=float(rank), target_modules=LORA_TARGETS)
        model = get_peft_model(base, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq_len), generator=generator).to(args.device)
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
    """Peak memory of ``args.probe_memory`` training for ``--memory-steps`` steps (own process): resident memory
    (VmHWM) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA."""

    model, step = build(args.probe_memory, args, args.lora_matched_rank)
    with DevicePeakMemory(args.device) as training:
        for _ in range(args.memory_steps):
            step()
    result = {
        "config": args.probe_memory,
        "trainable_parameters": trainable_parameters(model),
        "rss_before_training_mib": training.before_mib,
        "peak_rss_mib": training.peak_mib,
        "training_extra_mib": training.extra_mib,
    }
    if args.shape:
        result["layers"] = args.probe_layers
        pat = model.peft_config.get("default")
        result["hsm_rank"] = getattr(pat, "hsm_rank", None)
    return result


class DevicePeakMemory:
    """:class:`~benchmarks.measure.PeakMemory` on CPU; on CUDA the same fields from the caching allocator's counters
    (memory allocated before the block, its peak during it)."""

    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self._cpu = None if self.cuda else PeakMemory()

    def __enter__(self) -> DevicePeakMemory:
        if not self.cuda:
            self._cpu.__enter__()
            return self
        torch.cuda.synchronize(self.device)
        self.before_mib = torch.cuda.memory_allocated(self.device) / 2**20
        torch.cuda.reset_peak_memory_stats(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if not self.cuda:
            self._cpu.__exit__(*exc)
            self.before_mib, self.peak_mib, self.extra_mib = (
                self._cpu.before_mib, self._cpu.peak_mib, self._cpu.extra_mib,
            )  # fmt: skip
            self.seconds = self._cpu.seconds
            return
        torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
        self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.extra_mib = self.peak_mib - self.before_mib


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
    argv += ["--memory-steps", str(args.memory_steps)]
    if args.lora_matched_rank is not None:
        argv += ["--lora-matched-rank", str(args.lora_matched_rank)]
    argv += ["--threads", str(torch.get_num_threads()), "--dtype", args.dtype, "--device", args.device]
    argv += ["--sparsity", str(args.sparsity)]
    if args.shape:
        argv += ["--shape", args.shape]
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
    p.add_argument("--shape", choices=SLICE_SHAPES, help="train a random layer slice of this shape instead of --model")
    p.add_argument(
        "--count",
        action="store_true",
        help="only count trainable parameters (meta device) of the default rank with and without its cap, "
        f"against LoRA r=20, at {', '.join(SHAPES)}",
    )
    p.add_argument(
        "--layers", default="2,4", help="with --shape: comma list of slice depths (two or more), extrapolated"
    )
    p.add_argument("--dtype", default=None, help="base dtype (default float32 for --model, bfloat16 for --shape)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (peak memory: max_memory_allocated on CUDA)")
    p.add_argument("--sparsity", type=float, default=0.25, help="PAT's target_sparsity")
    p.add_argument(
        "--configs",
        default=None,
        help=f"comma list of {', '.join(CONFIGS)} (default pat,pat-unfused,lora-20,lora-matched; "
        "with --shape pat,lora-20)",
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=20, help="LoRA rank of PAT and of the lora-20 baseline")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 8; with --shape 0: no timing)")
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
    p.add_argument(
        "--out", type=Path, default=None, help="JSON (default benchmarks/results/training[-SHAPE|-counts].json)"
    )
    p.add_argument("--probe-memory", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--probe-merge", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lora-matched-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-layers", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None:
        suffix = "-counts" if args.count else f"-{args.shape}" if args.shape else ""
        args.out = REPO / "benchmarks" / "results" / f"training{suffix}.json"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.shape else "float32"
    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        p.error(f"--dtype {args.dtype} is not a torch dtype (float32, bfloat16, float16)")
    if args.configs is None:
        args.configs = "pat,lora-20" if args.shape else "pat,pat-unfused,lora-20,lora-matched"
    if args.repeats is None:
        args.repeats = 0 if args.shape else 8
    try:
        args.depths = sorted({int(x) for x in args.layers.split(",") if x.strip()})
    except ValueError:
        p.error(f"--layers {args.layers!r} must be a comma list of integers, e.g. 2,4")
    if args.shape and (len(args.depths) < 2 or args.depths[0] < 1):
        p.error(f"--layers {args.layers!r}: a slice needs two or more depths >= 1 to extrapolate, e.g. 2,4")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine (torch {torch.__version__})")
    return args


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
    if args.count:
        rows = count_table()
        write_json(args.out, {"command": " ".join(sys.argv), "rows": rows})
        print_count_table(rows)
        return {"rows": rows}

    start = time.perf_counter()
    names = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; choose from {', '.join(CONFIGS)}")
    if args.shape:
        return run_slice(args, names, start)
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
    times = alternate(steps, max(args.repeats, 1), args.warmup, device=args.device)
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


def count_trainable(shape: str, config_factory, layers: int | None = None) -> int:
    """Trainable parameters of ``config_factory()`` on ``shape`` at full depth: get_peft_model on meta-device
    slices of 2 and 3 layers (nothing allocated), the per-layer difference scaled to the full depth."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    def at(depth: int) -> int:
        with torch.device("meta"):
            base = LlamaForCausalLM(llama_config(shape, depth))
        return trainable_parameters(get_peft_model(base, config_factory()))

    two, three = at(2), at(3)
    return two + ((layers or llama_config(shape).num_hidden_layers) - 2) * (three - two)


def count_table(sparsities=(0.25, 0.5), rank: int = 20) -> list[dict]:
    """Per shape and sparsity (hidden + MLP cut of the full-depth config): the default HSM rank with and without
    its cap, trainable parameters against LoRA r=20, and the optimizer-state memory model (module docstring)."""
    from peft import LoraConfig
    from transformers import LlamaForCausalLM

    from peft_pat import PATConfig
    from peft_pat.resolution import default_hsm_rank

    rows = []
    for shape, spec in SHAPES.items():
        with torch.device("meta"):
            dense = sum(p.numel() for p in LlamaForCausalLM(llama_config(shape)).parameters())
        lora = count_trainable(shape, lambda: LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS))
        for sparsity in sparsities:
            cut = full_depth_widths(shape, sparsity)
            d, kept = spec["hidden_size"], cut["target_width"]
            row = {"shape": shape, "d": d, "layers": spec["num_hidden_layers"], "sparsity": sparsity, **cut}
            row |= {"dense_parameters": dense, "lora_20": lora}
            # the default (hsm_rank=None, resolved by the package) and the uncapped rule, given explicitly
            for label, hsm_rank, given in (
                ("pat", default_hsm_rank(d, kept), None),
                ("uncapped", default_hsm_rank(d, kept, None), default_hsm_rank(d, kept, None)),
            ):
                pat = count_trainable(shape, partial(PATConfig, calibration_batches=0, hsm_rank=given, **cut))
                row |= {f"{label}_rank": hsm_rank, f"{label}_trainable": pat, f"{label}_vs_lora_20": pat / lora}
                # bf16 base (2 bytes a parameter) + 16 bytes a trainable parameter, activations left out
                row[f"{label}_state_memory_vs_lora_20"] = (2 * dense + 16 * pat) / (2 * dense + 16 * lora)
            rows.append(row)
    return rows


def print_count_table(rows: list[dict]) -> None:
    for row in rows:
        row["cut"] = f"{row['d']}->{row['target_width']}, I'={row['target_intermediate_size']}"
        for label in ("pat", "uncapped", "lora_20"):
            key = label if label == "lora_20" else f"{label}_trainable"
            row[f"{label}_m"] = f"{row[key] / 1e6:.1f}M"
    columns = [("shape", "shape"), ("sparsity", "cut %"), ("cut", "kept"), ("lora_20_m", "LoRA-20")]
    columns += [("uncapped_rank", "d-N rank"), ("uncapped_m", "trainable"), ("uncapped_vs_lora_20", "/LoRA")]
    columns += [("uncapped_state_memory_vs_lora_20", "state mem /LoRA")]
    columns += [("pat_rank", "default rank"), ("pat_m", "trainable"), ("pat_vs_lora_20", "/LoRA")]
    columns += [("pat_state_memory_vs_lora_20", "state mem /LoRA")]
    print(format_table(rows, columns))
    print("(state mem: 2 bytes per base parameter + 16 per trainable one, activations left out)")


def extrapolate(depths: list[int], values: list[float], full: int) -> float:
    """``values`` (one per depth) on the line through the shallowest and the deepest slice, at depth ``full``."""
    (d0, v0), (d1, v1) = (depths[0], values[0]), (depths[-1], values[-1])
    return v0 + (v1 - v0) * (full - d0) / (d1 - d0)


def run_slice(args, names: list[str], start: float) -> dict:
    """Peak memory and trainable parameters of each configuration on slices of ``args.shape`` at ``args.depths``
    layers (fresh processes, medians of ``--memory-repeats``), extrapolated to full depth (module docstring)."""
    full = llama_config(args.shape).num_hidden_layers
    if "lora-matched" in names:
        args.probe_layers = args.depths[-1]
        args.lora_matched_rank, _ = matched_rank(args, args.depths[-1])
    args.probe_layers = None
    results = {
        "machine": machine_info(args.device),
        "command": " ".join(sys.argv),
        "args": vars(args) | {"out": str(args.out)},
        "shape": args.shape,
        "full_depth": full,
        "cut": full_depth_widths(args.shape, args.sparsity),
        "per_depth": {},
    }
    print(
        f"{args.shape} slices at {args.depths} layers, {args.dtype} on {args.device}; cut {results['cut']}", flush=True
    )
    for depth in args.depths:
        probes: dict[str, list[dict]] = {name: [] for name in names}
        for repeat in range(args.memory_repeats):
            for name in names:
                print(f"{depth} layers: memory probe {name} ({repeat + 1}/{args.memory_repeats}) ...", flush=True)
                argv = _probe_argv(args, ["--probe-memory", name, "--probe-layers", str(depth)])
                probes[name].append(run_json_subprocess(argv))
        results["per_depth"][str(depth)] = {
            name: {
                **{k: v for k, v in runs[0].items() if k not in ("rss_before_training_mib", "peak_rss_mib")},
                **{
                    key: median([run[key] for run in runs])
                    for key in ("rss_before_training_mib", "peak_rss_mib", "training_extra_mib")
                },
                "peak_rss_mib_runs": [run["peak_rss_mib"] for run in runs],
            }
            for name, runs in probes.items()
        }
    if args.repeats:
        depth = args.depths[-1]
        models, steps = {}, {}
        for name in names:
            models[name], steps[name] = build(name, args, args.lora_matched_rank, layers=depth)
        print(f"timing {len(names)} configurations round-robin at {depth} layers ...", flush=True)
        times = alternate(steps, args.repeats, args.warmup, device=args.device)
        del models, steps
        results["step_s"] = {name: median(times[name]) for name in names}
        results["times"] = times
    rows = []
    for name in names:
        at = [results["per_depth"][str(d)][name] for d in args.depths]
        row = {"config": name, "hsm_rank": at[0].get("hsm_rank")}
        for key, out in (
            ("trainable_parameters", "trainable_full"),
            ("peak_rss_mib", "peak_full_mib"),
            ("training_extra_mib", "extra_full_mib"),
        ):
            row[out] = extrapolate(args.depths, [a[key] for a in at], full)
        row["peak_per_layer_mib"] = (at[-1]["peak_rss_mib"] - at[0]["peak_rss_mib"]) / (
            args.depths[-1] - args.depths[0]
        )
        for d, a in zip(args.depths, at):
            row[f"peak_{d}_mib"] = a["peak_rss_mib"]
        if "step_s" in results:
            row["step_s"] = results["step_s"][name]
        rows.append(row)
    reference = {row["config"]: row for row in rows}.get("lora-20")
    if reference:
        for row in rows:
            row["params_vs_lora_20"] = row["trainable_full"] / reference["trainable_full"]
            row["peak_vs_lora_20"] = row["peak_full_mib"] / reference["peak_full_mib"]
            for d in args.depths:
                row[f"peak_{d}_vs_lora_20"] = row[f"peak_{d}_mib"] / reference[f"peak_{d}_mib"]
            if "step_s" in row:
                row["time_vs_lora_20"] = row["step_s"] / reference["step_s"]
    results["configs"] = rows
    results["seconds"] = time.perf_counter() - start
    write_json(args.out, results)
    print_slice_report(results, args)
    return results


def print_slice_report(results: dict, args) -> None:
    full = results["full_depth"]
    print(
        f"\n== training step, {args.shape} slices of {args.depths} layers -> {full}, "
        f"batch {args.batch} x {args.seq_len}, {args.dtype} base on {args.device}, cut {results['cut']}"
    )
    for row in results["configs"]:
        row["params"] = f"{row['trainable_full'] / 1e6:.1f}M"
    columns = [("config", "config"), ("hsm_rank", "HSM rank"), ("params", f"trainable @{full}")]
    columns += [("params_vs_lora_20", "/LoRA-20")]
    columns += [(f"peak_{d}_mib", f"peak MiB @{d}") for d in args.depths]
    columns += [(f"peak_{d}_vs_lora_20", f"/LoRA-20 @{d}") for d in args.depths]
    columns += [("peak_per_layer_mib", "MiB/layer"), ("peak_full_mib", f"peak MiB @{full}")]
    columns += [("peak_vs_lora_20", f"/LoRA-20 @{full}")]
    if "step_s" in results:
        columns += [("step_s", f"step s @{args.depths[-1]}"), ("time_vs_lora_20", "time/LoRA-20")]
    print(format_table(results["configs"], columns))
    kind = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM), median of processes"
    print(f"(peak = {kind}; @{full}: the line through the {args.depths[0]}- and {args.depths[-1]}-layer slices)")
    print(f"\ntotal {results['seconds']:.0f} s; wrote {args.out}")


def print_report(results: dict, args) -> None:
    print(
        f"\n== training step, {args.model}, batch {args.batch} x {args.seq_len} tokens, {args.dtype} on {args.device}"
    )
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

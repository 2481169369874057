"""The CUDA path in one run on one GPU, within a time budget (default 570 s): does it work, and what does it cost?

Phases (``--phases``), each in its own process with its own timeout, cheapest first; a phase that would start
after the budget is spent is recorded as skipped, and one that fails does not stop the others:

  tests         the device-independent tests on the GPU: ``pytest -m device`` with ``PEFT_PAT_TEST_DEVICE``
                set (tests/conftest.py: HSM autograd, training step with the mask hardening to exactly N, merge
                exactness, bf16 autocast, distillation; tests/test_hsm.py, tests/test_on_device.py)
  autocast      SmolLM2-135M (tiny random Llama if the offline model is missing) with the package defaults: one
                training forward/backward in float32 and under ``torch.autocast("cuda", bfloat16)``, the loss
                difference, the mask gradient's dtype and finiteness, and the step time of each
  distillation  the distillation kernel (peft_pat/training/distillation.py) on the GPU: loss and gradient of
                the quality benchmark's logits (8 x 160 positions, SmolLM2's 49,152-way vocabulary) and of 8 x 512,
                for several block sizes: times, peak memory, agreement, and the accelerator default
                (``DISTILLATION_BLOCK_TOKENS``) against the fastest
  memory        peak training memory of PAT's default against LoRA r=20 on a Llama-2-7B-shaped bfloat16 model
                (``--memory-shapes``: also llama3-8b), batch 4 x 1024, by ``torch.cuda.max_memory_allocated``
                (benchmarks/training.py --shape --device cuda, at 2 layers and at the full 32: the full depth is
                measured, not extrapolated)
  quality       ``python -m benchmarks.quality --methods pat,prune_then_tune --steps 720 --sparsities S`` on the
                GPU for S = 0.25, then 0.5, one process each (the package defaults against the post-hoc rival);
                needs the commonsense/WikiText data (``--data-dir``) and the offline SmolLM2

Expected times on an H200 (estimates, never run): tests ~1.5 min, autocast and distillation under 1 min,
memory ~1.5 min, quality ~2.5 min per sparsity; a phase cut short by the budget is recorded as a timeout with
what it finished (``--phases quality`` reruns one phase).

Writes one JSON (``--out``): the machine, and per phase its status (ok / failed / timeout / skipped), seconds,
command and results; work files (pytest log, quality results, training JSONs) go to ``--work-dir``.

    python -m benchmarks.gpu_check --out $OUT/gpu_check.json --work-dir $OUT/gpu_check   # on the GPU machine
    python -m benchmarks.gpu_check --dry-run --out /tmp/gpu_check.json                  # anywhere: the plan only

Without CUDA (and without ``--dry-run``) it prints why and exits with status 0, running and writing nothing. Exit
status 1 when a phase failed or timed out; a phase whose data or model is absent is skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from .measure import REPO, machine_info, median, synchronize, write_json

PHASES = ("tests", "autocast", "distillation", "memory", "quality")
# Seconds each phase may take at most (further capped by what is left of --budget-s).
PHASE_TIMEOUT_S = {"tests": 150, "autocast": 60, "distillation": 60, "memory": 150, "quality": 420}
QUALITY_STEPS = 720
QUALITY_SPARSITIES = "0.25,0.5"
MEMORY_BATCH = (4, 1024)  # (batch, seq_len) of the memory phase: bf16 base, depths 2 and 32 (full)
MEMORY_SHAPES = ("llama2-7b",)  # --memory-shapes: llama3-8b adds ~90 s
DISTILLATION_SHAPES = ((8, 160), (8, 512))  # (batch, positions): the quality benchmark's, and a longer one
DISTILLATION_VOCAB = 49152  # SmolLM2
DISTILLATION_BLOCKS = (64, 128, 256, 512, 1024, 4096)


# ---------------------------------------------------------------------------------------------- the plan
def phase_command(name: str, args) -> list[list[str]]:
    """The command lines (``python ...`` argv, without the interpreter) a phase runs, in order."""
    device = ["--device", args.device]
    work = Path(args.work_dir)
    if name == "tests":
        return [["-m", "pytest", "-q", "-m", "device", "-p", "no:cacheprovider", "tests"]]
    if name in ("autocast", "distillation"):
        return [["-m", "benchmarks.gpu_check", "--phase", name, *device]]
    if name == "memory":
        batch, seq = MEMORY_BATCH
        return [
            ["-m", "benchmarks.training", "--shape", shape, "--layers", "2,32", "--batch", str(batch),
             "--seq-len", str(seq), "--configs", "pat,lora-20", "--memory-repeats", "1", "--memory-steps", "3",
             *device, "--out", str(work / f"training-{shape}.json")]
            for shape in args.memory_shapes
        ]  # fmt: skip
    if name == "quality":  # one process per sparsity, so a run cut short by the budget keeps the first
        commands = []
        for sparsity in args.quality_sparsities:
            command = ["-m", "benchmarks.quality", "--methods", "pat,prune_then_tune", "--steps",
                       str(args.quality_steps), "--sparsities", str(sparsity), *device, "--output",
                       str(work / f"quality-{sparsity:g}"), "--no-progress"]  # fmt: skip
            if args.data_dir is not None:
                command += ["--data-dir", str(args.data_dir)]
            commands.append(command)
        return commands
    raise ValueError(name)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list from {','.join(PHASES)}")
    p.add_argument("--device", default="cuda", help="the CUDA device (cuda, cuda:1, ...)")
    p.add_argument("--budget-s", type=float, default=570.0, help="wall-clock budget of the whole check, seconds")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.json")
    p.add_argument("--work-dir", type=Path, default=None, help="work files (default: next to --out, gpu_check/)")
    p.add_argument("--data-dir", type=Path, default=None, help="the quality benchmark's --data-dir")
    p.add_argument("--quality-steps", type=int, default=QUALITY_STEPS)
    p.add_argument(
        "--memory-shapes", default=",".join(MEMORY_SHAPES), help="comma list of llama2-7b, llama3-8b (memory phase)"
    )
    p.add_argument("--quality-sparsities", default=QUALITY_SPARSITIES)
    p.add_argument("--dry-run", action="store_true", help="write the plan (every phase's command) and run nothing")
    p.add_argument("--phase", choices=("autocast", "distillation"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown or not phases:
        p.error(f"--phases {args.phases!r}: unknown {unknown or 'empty list'}; choose from {', '.join(PHASES)}")
    args.phases = phases
    if args.budget_s <= 0:
        p.error(f"--budget-s {args.budget_s} must be positive")
    if args.quality_steps < 1:
        p.error(f"--quality-steps {args.quality_steps} must be at least 1")
    try:
        args.quality_sparsities = [float(x) for x in args.quality_sparsities.split(",") if x.strip()]
    except ValueError:
        p.error(f"--quality-sparsities {args.quality_sparsities!r} must be a comma list of numbers, e.g. 0.25,0.5")
    if not args.quality_sparsities or not all(0 < x < 1 for x in args.quality_sparsities):
        p.error(f"--quality-sparsities {args.quality_sparsities}: each must lie strictly between 0 and 1")
    try:
        if torch.device(args.device).type != "cuda":
            p.error(f"--device {args.device!r}: this check is for a CUDA device (cuda, cuda:N)")
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a torch device")
    from .training import SLICE_SHAPES

    args.memory_shapes = [x.strip() for x in args.memory_shapes.split(",") if x.strip()]
    if not args.memory_shapes or not set(args.memory_shapes) <= set(SLICE_SHAPES):
        p.error(f"--memory-shapes {args.memory_shapes}: choose from {', '.join(SLICE_SHAPES)}")
    if args.work_dir is None:
        args.work_dir = args.out.parent / "gpu_check"
    return args


# ---------------------------------------------------------------------------------------------- phases in-process
def phase_autocast(device: str, model_name: str = "smollm2-135m", batch: tuple[int, int] = (8, 160)) -> dict:
    """One PAT training step in float32 and under bf16 autocast on ``device`` (module docstring)."""
    import warnings

    from peft import get_peft_model

    from peft_pat import PATConfig
    from peft_pat.testing import tiny_model

    try:
        if model_name == "tiny":
            raise LookupError("asked for the tiny model")
        from peft_pat.offline_models import load_causal_lm

        base, _ = load_causal_lm(model_name)
    except Exception as error:  # the offline package is optional on a bare GPU machine
        base, model_name = tiny_model("llama"), f"tiny-random-llama ({type(error).__name__}: {error})"
    model = get_peft_model(base.to(device), PATConfig(task_type="CAUSAL_LM", calibration_batches=0))
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.base_model.set_step(2, 100, learning_rate=1e-3)  # soft phase: the mask logits get gradients
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, batch, generator=generator).to(device)
    kind = torch.device(device).type
    result = {"model": model_name, "bf16_supported": kind != "cuda" or torch.cuda.is_bf16_supported()}
    for label, autocast in (("float32", False), ("bf16_autocast", True)):
        times, losses = [], []
        for _ in range(4):
            model.zero_grad(set_to_none=True)
            synchronize(device)
            start = time.perf_counter()
            with torch.autocast(kind, dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            synchronize(device)
            times.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
        logits_grad = model.base_model.pat_mask["default"].logits.grad
        result[label] = {
            "loss": losses[-1],
            "forward_backward_s": median(times[1:]),
            "mask_grad_dtype": str(logits_grad.dtype),
            "mask_grad_finite": bool(torch.isfinite(logits_grad).all()),
            "mask_grad_max": float(logits_grad.abs().max()),
            "non_finite_grads": sorted(
                n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()
            )[:10],
        }
    ref, low = result["float32"]["loss"], result["bf16_autocast"]["loss"]
    result["loss_relative_difference"] = abs(low - ref) / max(abs(ref), 1e-12)
    result["speedup_bf16"] = result["float32"]["forward_backward_s"] / result["bf16_autocast"]["forward_backward_s"]
    result["ok"] = (
        result["loss_relative_difference"] < 3e-2
        and result["bf16_autocast"]["mask_grad_dtype"] == "torch.float32"
        and result["bf16_autocast"]["mask_grad_finite"]
        and not result["bf16_autocast"]["non_finite_grads"]
    )
    return result


def _allocated(device: str) -> int:
    return torch.cuda.memory_allocated(device) if torch.device(device).type == "cuda" else 0


def _reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: str) -> int:
    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else 0


def phase_distillation(
    device: str, shapes=DISTILLATION_SHAPES, vocab: int = DISTILLATION_VOCAB, blocks=DISTILLATION_BLOCKS
) -> dict:
    """Loss + gradient of the distillation kernel per block size on ``device`` (module docstring; peak memory
    on CUDA only)."""
    from peft_pat.training.distillation import DISTILLATION_BLOCK_TOKENS, block_rows, distillation_loss

    default = block_rows(torch.device(device), vocab)
    result = {"vocab": vocab, "default_block": default, "constant": DISTILLATION_BLOCK_TOKENS, "shapes": []}
    generator = torch.Generator(device=device).manual_seed(0)
    ok = True
    for batch, positions in shapes:
        shape = (batch, positions, vocab)
        student = (3 * torch.randn(shape, generator=generator, device=device)).requires_grad_()
        teacher = 3 * torch.randn(shape, generator=generator, device=device)
        rows = batch * positions
        sizes = sorted({b for b in (*blocks, default, rows) if b <= rows}, reverse=True)  # whole first: reference
        entries, reference = [], None
        for block in sizes:
            times = []
            for _ in range(4):
                student.grad = None
                _reset_peak(device)
                before = _allocated(device)
                synchronize(device)
                start = time.perf_counter()
                loss = distillation_loss(student, teacher, block_tokens=block)
                loss.backward()
                synchronize(device)
                times.append(time.perf_counter() - start)
                peak = _peak(device) - before
            grad = student.grad.detach().clone()
            if reference is None:
                reference = (float(loss.detach()), grad)
            entries.append({
                "block": block, "seconds": median(times[1:]), "peak_extra_mib": peak / 2**20,
                "loss_difference": abs(float(loss.detach()) - reference[0]),
                "grad_max_difference": float((grad - reference[1]).abs().max()),
            })  # fmt: skip
            del grad
        fastest = min(entries, key=lambda e: e["seconds"])
        chosen = next(e for e in entries if e["block"] == min(default, rows))
        grad_scale = float(reference[1].abs().max())
        agree = all(
            e["loss_difference"] <= 1e-4 * max(1.0, abs(reference[0])) and e["grad_max_difference"] <= 1e-4 * grad_scale
            for e in entries
        )
        ok = ok and agree
        result["shapes"].append({
            "batch": batch, "positions": positions, "blocks": entries, "fastest_block": fastest["block"],
            "default_vs_fastest_time": chosen["seconds"] / fastest["seconds"], "blocks_agree": agree,
        })  # fmt: skip
        del student, teacher, reference
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    result["ok"] = ok
    return result


# ---------------------------------------------------------------------------------------------- runner
def _summarise(name: str, args, outputs: list[str]) -> dict:
    """What each phase's output says, read from its log or its JSON files."""
    work = Path(args.work_dir)
    if name == "tests":
        tail = outputs[-1].strip().splitlines()[-1:] if outputs and outputs[-1].strip() else []
        counts = {
            k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped|deselected)", "".join(tail))
        }
        return {"summary": tail[0] if tail else "", "counts": counts}
    if name in ("autocast", "distillation"):
        lines = [line for line in outputs[-1].strip().splitlines() if line.strip()]
        return json.loads(lines[-1])
    if name == "memory":
        summary = {}
        for shape in args.memory_shapes:
            path = work / f"training-{shape}.json"
            if path.exists():
                data = json.loads(path.read_text())
                summary[shape] = [
                    {k: row.get(k) for k in ("config", "hsm_rank", "trainable_full", "params_vs_lora_20",
                                             "peak_2_mib", "peak_32_mib", "peak_32_vs_lora_20", "peak_vs_lora_20")}
                    for row in data["configs"]
                ]  # fmt: skip
        return summary
    if name == "quality":
        summary = {}
        for sparsity in args.quality_sparsities:
            path = work / f"quality-{sparsity:g}" / "quality.json"
            if path.exists():
                data = json.loads(path.read_text())
                summary[f"{sparsity:g}"] = {
                    "pat_targets": data.get("pat_targets"), "wall_seconds": data.get("wall_seconds"),
                    "runs": [{k: r.get(k) for k in ("method", "sparsity", "kept_width", "parameters", "wikitext2")}
                             for r in data.get("runs", [])],
                }  # fmt: skip
        return summary
    return {}


def missing_for(name: str, args) -> str | None:
    """Why phase ``name`` cannot run here (its data or model is absent), or None. The quality runs need the
    commonsense and WikiText-2 files and the offline SmolLM2 (converted here once if only its GGUF is installed)."""
    if name != "quality":
        return None
    data = args.data_dir if args.data_dir is not None else REPO.parent / "shared" / "data"
    needed = [data / "commonsense", data / "wikitext-2-raw" / "wiki.test.raw"]
    absent = [str(path) for path in needed if not path.exists()]
    if absent:
        folders = "commonsense/ and wikitext-2-raw/"
        return f"quality data missing: {', '.join(absent)} (pass --data-dir FOLDER holding {folders})"
    from peft_pat.offline_models import smollm2_safetensors_folder

    try:
        smollm2_safetensors_folder()
    except (FileNotFoundError, ImportError) as error:
        return f"SmolLM2-135M is not available offline: {error}"
    return None


def run_phase(name: str, args, deadline: float) -> dict:
    commands = phase_command(name, args)
    record: dict = {"commands": [" ".join(["python", *c]) for c in commands]}
    left = deadline - time.monotonic()
    if left < 10:
        return record | {"status": "skipped", "reason": f"time budget spent ({args.budget_s:.0f} s)"}
    reason = missing_for(name, args)
    if reason:
        return record | {"status": "skipped", "reason": reason}
    timeout = min(PHASE_TIMEOUT_S[name], left)
    env = {**os.environ, "PEFT_PAT_TEST_DEVICE": args.device, "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    outputs, status = [], "ok"
    log = Path(args.work_dir) / f"{name}.log"
    for command in commands:
        remaining = timeout - (time.monotonic() - start)
        try:
            proc = subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=max(remaining, 1))  # fmt: skip
        except subprocess.TimeoutExpired as expired:
            out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
            outputs.append(out)
            status = "timeout"
            break
        outputs.append(proc.stdout)
        with log.open("a") as f:
            f.write(f"$ python {' '.join(command)}\n{proc.stdout}\n{proc.stderr}\n")
        if proc.returncode != 0:
            status = "failed"
            record["stderr_tail"] = proc.stderr[-3000:]
            break
    record |= {"status": status, "seconds": time.monotonic() - start, "timeout_s": timeout, "log": str(log)}
    try:
        record["results"] = _summarise(name, args, outputs)
    except (ValueError, KeyError, IndexError, json.JSONDecodeError) as error:
        record["results_error"] = f"{type(error).__name__}: {error}"
    if status == "ok" and isinstance(record.get("results"), dict) and record["results"].get("ok") is False:
        record["status"] = "failed"
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.phase:  # a phase's own process: its result is the last stdout line
        print(json.dumps({"autocast": phase_autocast, "distillation": phase_distillation}[args.phase](args.device)))
        return 0
    payload = {
        "command": " ".join(["python -m benchmarks.gpu_check", *(argv if argv is not None else sys.argv[1:])]),
        "budget_s": args.budget_s,
        "phases": {},
    }
    if args.dry_run:
        payload |= {"dry_run": True, "machine": machine_info("cpu")}
        payload["phases"] = {
            name: {"status": "planned", "timeout_s": PHASE_TIMEOUT_S[name],
                   "commands": [" ".join(["python", *c]) for c in phase_command(name, args)]}
            for name in args.phases
        }  # fmt: skip
        write_json(args.out, payload)
        print(f"dry run: {len(args.phases)} phases planned ({', '.join(args.phases)}); wrote {args.out}")
        return 0
    if not torch.cuda.is_available():
        print(
            f"benchmarks.gpu_check: no CUDA device here (torch {torch.__version__}, cuda available: False); nothing "
            "was run or written. Run it on a machine with a GPU, or pass --dry-run to see the plan."
        )
        return 0
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    payload["machine"] = machine_info(args.device)
    deadline = time.monotonic() + args.budget_s
    start = time.monotonic()
    for name in args.phases:
        print(f"[gpu_check] {name} ...", flush=True)
        payload["phases"][name] = run_phase(name, args, deadline)
        print(f"[gpu_check] {name}: {payload['phases'][name]['status']}", flush=True)
        payload["seconds"] = time.monotonic() - start
        write_json(args.out, payload)  # after every phase: a killed run keeps what it measured
    print(json.dumps({n: p["status"] for n, p in payload["phases"].items()}))
    print(f"wrote {args.out} ({payload['seconds']:.0f} s)")
    return 0 if all(p["status"] in ("ok", "skipped") for p in payload["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

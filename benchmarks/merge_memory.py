"""Peak memory of merging: in memory (``merge_and_prune``) and from disk (``peft-pat merge``).

Builds a random Llama-shaped model (Llama-2-7B layer shapes by default: d = 4096, intermediate 11008,
32 heads, vocab 32000) with as many layers as asked, wraps it with PAT (random non-trivial adapters:
LoRA r = 20 on every linear, HSM rank about 5% of d, hard mask at 25% sparsity) and measures, each in
its own process so nothing else counts:

* in memory: peak resident memory (VmHWM, reset with /proc/self/clear_refs right before the call)
  of ``merge_and_prune()`` minus the resident memory just before it, next to the model, one decoder
  layer and the largest weight matrix;
* from disk: the base saved as safetensors shards plus the adapter, then ``python -m peft_pat.cli merge``
  in a child process, whose peak resident memory (``ru_maxrss`` from ``wait4``) is set against the
  checkpoint size, the largest shard and the same command's resident memory after imports only.

    flock /tmp/peft_pat_heavy.lock python -m benchmarks.merge_memory                   # 16 layers, bfloat16
    python -m benchmarks.merge_memory --layers 2 --skip-cli --output /tmp/mm.json      # quick look

Prints a table and writes JSON (default benchmarks/results/merge_memory.json). Run it once, under the
heavy lock: other processes do not change a process's own RSS, but they slow it down.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .measure import PeakMemory, proc_status_mib

MIB = 1 << 20
SHAPES = {
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "vocab_size": 32000},
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
}


# ---------------------------------------------------------------------------------------------- children
def _build(args):
    """A random Llama-shaped model in args.dtype, materialised parameter by parameter (no float32 copy)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(
        **SHAPES[args.shape], num_hidden_layers=args.layers, tie_word_embeddings=args.tied, dtype=args.dtype
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0).add_(torch.rand(param.shape, generator=generator, dtype=torch.float32).to(dtype) - 0.5)
            else:
                for rows in torch.arange(param.shape[0]).split(1024):
                    chunk = torch.randn((len(rows), *param.shape[1:]), generator=generator) * 0.02
                    param[rows[0] : rows[-1] + 1] = chunk.to(dtype)
        model.model.rotary_emb = type(model.model.rotary_emb)(config)  # recompute inv_freq (to_empty left junk)
    return model.eval()


def _wrap(model):
    import torch
    from peft import get_peft_model

    from peft_pat import PATConfig

    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, PATConfig(task_type="CAUSAL_LM", target_sparsity=0.25, r=20, lora_alpha=20, init_weights=False)
    )
    peft_model.base_model.harden_mask()
    return peft_model


def _sizes(model) -> dict:
    layer = model.model.layers[0]
    matrices = [p for p in model.parameters() if p.dim() == 2]
    return {
        "model_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / MIB,
        "layer_mib": sum(p.numel() * p.element_size() for p in layer.parameters()) / MIB,
        "largest_matrix_mib": max(p.numel() * p.element_size() for p in matrices) / MIB,
        "embedding_mib": model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size() / MIB,
    }


def child_in_memory(args) -> dict:
    import torch

    import peft_pat

    torch.set_num_threads(args.threads)
    model = _build(args)
    sizes = _sizes(model)
    peft_model = _wrap(model)
    adapter_mib = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "pat_" in n) / MIB
    with PeakMemory() as merge:
        small = peft_model.merge_and_prune()
    gc.collect()
    after = proc_status_mib("VmRSS")
    return {
        **sizes,
        "adapter_mib": adapter_mib,
        "rss_before_mib": merge.before_mib,
        "peak_rss_mib": merge.peak_mib,
        "rss_after_mib": after,
        "peak_extra_mib": merge.extra_mib,
        "seconds": merge.seconds,
        "kept_width": small.config.hidden_size,
        "peft_pat": str(Path(peft_pat.__file__).parent),
    }


def child_save(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = _build(args)
    sizes = _sizes(model)
    model.save_pretrained(args.work / "base", max_shard_size=args.shard_size)
    _wrap(model).save_pretrained(args.work / "adapter")
    return sizes


# ---------------------------------------------------------------------------------------------- parent
def _run_child(args, mode: str) -> dict:
    argv = [sys.executable, "-m", "benchmarks.merge_memory", "--child", mode, *_forward(args)]
    done = subprocess.run(argv, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"child {mode} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _forward(args) -> list[str]:
    out = ["--shape", args.shape, "--layers", str(args.layers), "--dtype", args.dtype, "--threads", str(args.threads)]
    out += ["--shard-size", args.shard_size, "--work", str(Path(args.work).resolve())]
    return out + (["--tied"] if args.tied else [])


def _max_rss_of(argv: list[str]) -> tuple[float, float, int]:
    """Peak RSS (MiB) and wall time of a child process, from wait4's rusage; and its exit status."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{argv} failed:\n{process.stderr.read().decode()[-4000:]}")
    process.stderr.close()
    return usage.ru_maxrss / 1024, seconds, process.returncode


def measure_cli(args) -> dict:
    sizes = _run_child(args, "save")
    shards = sorted((args.work / "base").glob("*.safetensors"))
    checkpoint_mib = sum(p.stat().st_size for p in shards) / MIB
    env_python = [sys.executable, "-c", "import peft_pat.cli"]
    imports_mib, _, _ = _max_rss_of(env_python)
    out = args.work / "out"
    cli = [sys.executable, "-m", "peft_pat.cli", "merge", str(args.work / "base"), str(args.work / "adapter"), str(out)]
    peak, seconds, _ = _max_rss_of([*cli, "--no-progress"])
    config = json.loads((out / "config.json").read_text())
    out_mib = sum(p.stat().st_size for p in out.glob("*.safetensors")) / MIB
    return {
        **sizes,
        "checkpoint_mib": checkpoint_mib,
        "shards": len(shards),
        "largest_shard_mib": max(p.stat().st_size for p in shards) / MIB,
        "adapter_file_mib": (args.work / "adapter" / "adapter_model.safetensors").stat().st_size / MIB,
        "imports_only_rss_mib": imports_mib,
        "peak_rss_mib": peak,
        "peak_extra_mib": peak - imports_mib,
        "seconds": seconds,
        "output_mib": out_mib,
        "kept_width": config["hidden_size"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--tied", action="store_true", help="tie lm_head to the embedding (diagonal embedding HSM)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shard-size", default="2GB", help="max_shard_size of the saved base checkpoint")
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "merge_memory.json")
    parser.add_argument("--child", choices=["in_memory", "save"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = child_in_memory(args) if args.child == "in_memory" else child_save(args)
        print(json.dumps(result))
        return

    own_work = args.work is None
    args.work = args.work or Path(tempfile.mkdtemp(prefix="pat-merge-memory-"))
    try:
        in_memory = _run_child(args, "in_memory")
        cli = None if args.skip_cli else measure_cli(args)
    finally:
        if own_work:
            shutil.rmtree(args.work, ignore_errors=True)

    m = in_memory
    print(
        f"\nLlama-shaped model ({args.shape} layer shapes), {args.layers} layers, {args.dtype}, "
        f"{'tied' if args.tied else 'untied'}: model {m['model_mib']:.0f} MiB, one decoder layer {m['layer_mib']:.0f} "
        f"MiB, largest matrix {m['largest_matrix_mib']:.0f} MiB, adapter {m['adapter_mib']:.0f} MiB, "
        f"kept width {m['kept_width']}\n"
    )
    print(f"{'merge':<24}{'peak RSS':>12}{'peak extra':>12}{'extra/layer':>13}{'extra/model':>13}{'time':>9}")
    print(
        f"{'merge_and_prune()':<24}{m['peak_rss_mib']:>9.0f}MiB{m['peak_extra_mib']:>9.0f}MiB"
        f"{m['peak_extra_mib'] / m['layer_mib']:>13.2f}{m['peak_extra_mib'] / m['model_mib']:>13.3f}"
        f"{m['seconds']:>8.1f}s"
    )
    if cli:
        print(
            f"{'peft-pat merge (disk)':<24}{cli['peak_rss_mib']:>9.0f}MiB{cli['peak_extra_mib']:>9.0f}MiB"
            f"{cli['peak_extra_mib'] / m['layer_mib']:>13.2f}{cli['peak_extra_mib'] / cli['checkpoint_mib']:>13.3f}"
            f"{cli['seconds']:>8.1f}s"
        )
        print(
            f"\npeft-pat merge: checkpoint {cli['checkpoint_mib']:.0f} MiB in {cli['shards']} shards (largest "
            f"{cli['largest_shard_mib']:.0f} MiB), process after imports {cli['imports_only_rss_mib']:.0f} MiB, "
            f"peak {cli['peak_rss_mib']:.0f} MiB = {cli['peak_rss_mib'] / cli['checkpoint_mib']:.3f} x checkpoint; "
            f"extra over imports {cli['peak_extra_mib']:.0f} MiB (adapter file {cli['adapter_file_mib']:.0f} MiB)"
        )
    print("peak extra: peak resident memory during the merge minus resident memory before it (in memory), or")
    print("minus the same command's resident memory after imports only (disk).")
    result = {
        "shape": args.shape,
        "layers": args.layers,
        "dtype": args.dtype,
        "tied": args.tied,
        "threads": args.threads,
        "in_memory": in_memory,
        "cli": cli,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()

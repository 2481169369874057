"""Dense vs pruned SmolLM2-135M in llama.cpp (llama-cpp-python): prefill and decode tokens/s, with the
ideal speed-up from shapes next to each measured one.

    python -m benchmarks.engine_speed                                   # f32 GGUF, 1 thread
    python -m benchmarks.engine_speed --outtype q8_0 --threads 2 --repeats 9
    python -m benchmarks.engine_speed --cuts 504:1168,432:672          # multi-axis shapes beside them

The pruned models (``--sparsities``) keep 432 (25% pruned) and 288 (50%) of the 576 hidden channels:
``merge_and_prune()`` of a fresh PAT adapter after its calibration on 4 WikiText-2 windows, without
training (the shapes, not which channels or the training, set the speed); ``examples/deploy_llamacpp.py``
(``--model smollm2-135m --sparsity p``) prunes and saves them. ``--cuts HIDDEN:INTERMEDIATE`` adds
multi-axis shapes, cut post hoc by ``benchmarks.inference.cut_post_hoc`` (``peft_pat.prune_model``,
seeded random hidden and per-layer MLP channels) and saved here. Every model is converted with llama.cpp's
own ``convert_hf_to_gguf.py`` by ``examples/deploy_llamacpp.py``, run as a user runs it (``--model FOLDER
--outtype T``, a subprocess; it finds or fetches the converter and checks the GGUF's logits and greedy
tokens against transformers'), once per model into ``--work``; then each GGUF is loaded once, all live in
one process and are measured round-robin (the order rotates every round), medians of ``--repeats`` after
``--warmup`` discarded rounds.

  prefill  one ``eval`` of a ``--prompt-lengths`` prompt from an empty KV cache (logits of the last
           position only); tokens/s = prompt tokens / seconds
  decode   ``--new-tokens`` greedy single-token ``eval`` calls after a ``--decode-context`` prompt
           (the prompt is re-evaluated untimed before each round); tokens/s = new tokens / seconds

Ideal speed-ups: benchmarks/cost_model.py, FLOPs for prefill, bytes moved for decode, the same model
the transformers benchmark (benchmarks/inference.py) uses.

Needs llama-cpp-python, sentencepiece (the converter imports it) and the SmolLM2 package: see README
"Deploy". Writes ``--out`` (default benchmarks/results/engine_speed.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .cost_model import DecoderShape
from .inference import parse_cuts

REPO = Path(__file__).resolve().parents[1]
DEPLOY_EXAMPLE = REPO / "examples" / "deploy_llamacpp.py"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ENGINE_MISSING = (
    "llama-cpp-python is not installed in this environment ({error}). Install it in a separate environment "
    "so torch stays pinned: pip install torch==2.13.0 -e '.[llamacpp]' (compiles llama.cpp; README \"Deploy\")."
)


def import_llama_cpp():
    """The llama_cpp module, or an ImportError that says how to install it."""
    try:
        import llama_cpp
    except ImportError as error:
        raise ImportError(ENGINE_MISSING.format(error=error)) from error
    return llama_cpp


def run_deploy_example(model: str, output: Path, outtype: str, sparsity: float | None = None) -> None:
    """``python examples/deploy_llamacpp.py --model MODEL [--sparsity p] --output OUTPUT --outtype T``, with
    this checkout's package importable; it writes ``OUTPUT/[pruned-NN/]`` and ``OUTPUT/model-T.gguf``."""
    command = [sys.executable, str(DEPLOY_EXAMPLE), "--model", model, "--output", str(output), "--outtype", outtype]
    if sparsity:
        command += ["--sparsity", str(sparsity)]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    print(" ".join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
    if result.returncode != 0:
        raise RuntimeError(
            f"{DEPLOY_EXAMPLE.name} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )


def save_cut(model_name: str, hidden: int, intermediate: int, folder: Path, seed: int) -> None:
    """``model_name`` cut post hoc to ``hidden`` x ``intermediate`` (benchmarks.inference.cut_post_hoc), saved
    into ``folder`` with its tokenizer."""
    import peft_pat
    from peft_pat.offline_models import load_causal_lm

    from .inference import cut_post_hoc

    dense, tokenizer = load_causal_lm(model_name)
    peft_pat.save_pruned(cut_post_hoc(dense, hidden, intermediate, seed), folder, tokenizer=tokenizer, overwrite=True)


def prepare(args) -> dict[str, dict[str, Path]]:
    """{'folders': {'dense': folder, 'p25': folder, 'hN-mM': folder, ...}, 'ggufs': {...}}, made once into
    --work and reused: ``WORK/dense/model-T.gguf``, ``WORK/pNN/pruned-NN/``, ``WORK/pNN/model-T.gguf``,
    ``WORK/hN-mM/model/`` and ``WORK/hN-mM/model-T.gguf``."""
    from peft_pat.offline_models import resolve_model_path

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folders = {"dense": Path(resolve_model_path(args.model))}
    ggufs = {"dense": work / "dense" / f"model-{args.outtype}.gguf"}
    if not ggufs["dense"].is_file():
        run_deploy_example(args.model, work / "dense", args.outtype)
    for p in args.sparsities:
        key = f"p{round(100 * p)}"
        folders[key] = work / key / f"pruned-{round(100 * p)}"
        ggufs[key] = work / key / f"model-{args.outtype}.gguf"
        if ggufs[key].is_file():
            continue
        if (folders[key] / "config.json").is_file():  # pruned before (another --outtype): convert only
            run_deploy_example(str(folders[key]), work / key, args.outtype)
        else:
            run_deploy_example(args.model, work / key, args.outtype, sparsity=p)
    for hidden, intermediate in args.cuts:
        key = f"h{hidden}-m{intermediate}"
        folders[key] = work / key / "model"
        ggufs[key] = work / key / f"model-{args.outtype}.gguf"
        if ggufs[key].is_file():
            continue
        if not (folders[key] / "config.json").is_file():
            save_cut(args.model, hidden, intermediate, folders[key], args.seed + 2)
        run_deploy_example(str(folders[key]), work / key, args.outtype)
    return {"folders": folders, "ggufs": ggufs}


def load_gguf(llama_cpp, path: Path, n_ctx: int, threads: int | None):
    """llama_cpp.Llama on a GGUF file (quiet), logits of the last position only."""
    threads = threads or min(2, os.cpu_count() or 1)
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False
    )


def prefill_call(llm, ids: list[int]):
    def run():
        llm.reset()
        llm.eval(ids)

    return run


def decode_call(llm, prompt: list[int], new_tokens: int):
    def run():
        llm.reset()
        llm.eval(prompt)  # untimed: run() returns the decode time only
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return time.perf_counter() - start

    return run


def alternate(calls: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call, round-robin with a rotating order; a call that returns a float reports its own time."""
    names = list(calls)
    times = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            reported = calls[name]()
            elapsed = reported if isinstance(reported, float) else time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.engine_speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", type=float, nargs="*", default=[0.25, 0.5], help="PAT-pruned hidden widths")
    parser.add_argument(
        "--cuts", type=parse_cuts, default=[], help="multi-axis shapes HIDDEN:INTERMEDIATE,... cut post hoc"
    )
    parser.add_argument("--outtype", default="f32", choices=OUTTYPES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--decode-context", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work",
        default=str(Path(os.environ.get("PEFT_PAT_CACHE", Path.home() / ".cache" / "peft_pat")) / "engine_speed"),
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "engine_speed.json")
    args = parser.parse_args(argv)

    llama_cpp = import_llama_cpp()
    prepared = prepare(args)
    from transformers import AutoConfig

    shapes = {key: DecoderShape.from_config(AutoConfig.from_pretrained(f)) for key, f in prepared["folders"].items()}
    n_ctx = max(max(args.prompt_lengths), args.decode_context + args.new_tokens) + 8
    llms = {
        key: load_gguf(llama_cpp, path, n_ctx=n_ctx, threads=args.threads) for key, path in prepared["ggufs"].items()
    }
    rng = np.random.default_rng(args.seed)
    vocab = shapes["dense"].vocab
    report = {
        "engine": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}",
        "outtype": args.outtype,
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "loadavg_start": os.getloadavg()},
        "widths": {key: s.hidden for key, s in shapes.items()},
        "shapes": {
            key: dict(
                hidden=s.hidden, intermediate=s.intermediate, heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim
            )
            for key, s in shapes.items()
        },
        "parameters": {key: s.parameters for key, s in shapes.items()},
        "parameter_fraction": {key: s.parameters / shapes["dense"].parameters for key, s in shapes.items()},
        "gguf_mib": {key: round(p.stat().st_size / 2**20, 1) for key, p in prepared["ggufs"].items()},
        "prefill": [],
        "decode": [],
    }
    for length in args.prompt_lengths:
        ids = [int(i) for i in rng.integers(0, vocab, size=length)]
        times = alternate({k: prefill_call(llm, ids) for k, llm in llms.items()}, args.repeats, args.warmup)
        dense = statistics.median(times["dense"])
        for key in llms:
            seconds = statistics.median(times[key])
            ideal = shapes["dense"].prefill_flops(1, length) / shapes[key].prefill_flops(1, length)
            report["prefill"].append(
                dict(
                    model=key,
                    tokens=length,
                    ms=1e3 * seconds,
                    tokens_per_s=length / seconds,
                    speedup=dense / seconds,
                    ideal=ideal,
                    efficiency=dense / seconds / ideal,
                )
            )
    prompt = [int(i) for i in rng.integers(0, vocab, size=args.decode_context)]
    calls = {k: decode_call(llm, prompt, args.new_tokens) for k, llm in llms.items()}
    times = alternate(calls, args.repeats, args.warmup)
    dense = statistics.median(times["dense"])
    for key in llms:
        seconds = statistics.median(times[key])
        cost = {k: shapes[k].decode_bytes(1, args.decode_context, args.new_tokens, 1) for k in ("dense", key)}
        ideal = cost["dense"] / cost[key]
        report["decode"].append(
            dict(
                model=key,
                context=args.decode_context,
                new_tokens=args.new_tokens,
                tokens_per_s=args.new_tokens / seconds,
                speedup=dense / seconds,
                ideal=ideal,
                efficiency=dense / seconds / ideal,
            )
        )
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["note_ideal_decode"] = (
        "ratio of bytes moved per decode step, weights and KV cache at the same bytes per value "
        "(llama.cpp keeps the KV cache in f16; at this context the KV cache is <2% of the bytes)"
    )
    print(json.dumps(report, indent=2))
    for phase in ("prefill", "decode"):
        for row in report[phase]:
            what = f"{row['tokens']} tok" if phase == "prefill" else f"ctx {row['context']}"
            print(
                f"{phase:7s} {what:8s} {row['model']:10s} {row['tokens_per_s']:9.1f} tok/s  "
                f"speed-up {row['speedup']:.2f}x  ideal {row['ideal']:.2f}x  efficiency {row['efficiency']:.2f}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

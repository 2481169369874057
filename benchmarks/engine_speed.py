"""Dense vs pruned SmolLM2-135M in llama.cpp (llama-cpp-python): prefill and decode tokens/s, with the
ideal speed-up from shapes next to each measured one.

    python benchmarks/engine_speed.py                                   # f32 GGUF, 1 thread
    python benchmarks/engine_speed.py --outtype q8_0 --threads 2 --repeats 9

The pruned models keep 432 (25% pruned) and 288 (50%) of the 576 hidden channels: ``merge_and_prune()``
of a fresh PAT adapter after its calibration on 4 WikiText-2 windows, without training
(``deploy_llamacpp.pat_pruned``; the kept width, not which channels or the training, sets the speed). Each
model is saved, converted with llama.cpp's own ``convert_hf_to_gguf.py`` (examples/deploy_llamacpp.py
finds or fetches it) and loaded once; all three live in one process and are measured round-robin
(the order rotates every round), medians of ``--repeats`` after ``--warmup`` discarded rounds.

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
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

import deploy_llamacpp  # noqa: E402
from cost_model import DecoderShape  # noqa: E402

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def prepare(args) -> dict[str, Path]:
    """{'dense': gguf, 'p25': gguf, 'p50': gguf}, converted once into --work and reused."""
    from peft_pat.offline_models import resolve_model_path

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folders = {"dense": Path(resolve_model_path(args.model))}
    for p in args.sparsities:
        key = f"p{round(100 * p)}"
        folder = work / key
        if not (folder / "config.json").is_file():
            deploy_llamacpp.prune_named(args.model, p, folder)
        folders[key] = folder
    ggufs = {}
    for key, folder in folders.items():
        gguf = work / f"{key}-{args.outtype}.gguf"
        if not gguf.is_file():
            print(f"converting {key} ({folder}) -> {gguf}", flush=True)
            deploy_llamacpp.convert(folder, gguf, args.outtype)
        ggufs[key] = gguf
    return {"folders": folders, "ggufs": ggufs}


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5])
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
    parser.add_argument("--out", type=Path, default=HERE / "results" / "engine_speed.json")
    args = parser.parse_args(argv)

    llama_cpp = deploy_llamacpp.import_llama_cpp()
    prepared = prepare(args)
    configs = {key: json.loads((folder / "config.json").read_text()) for key, folder in prepared["folders"].items()}
    shapes = {key: DecoderShape.from_config(argparse.Namespace(**c)) for key, c in configs.items()}
    n_ctx = max(max(args.prompt_lengths), args.decode_context + args.new_tokens) + 8
    llms = {
        key: deploy_llamacpp.load_gguf(path, n_ctx=n_ctx, threads=args.threads, logits_all=False)
        for key, path in prepared["ggufs"].items()
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
                f"{phase:7s} {what:8s} {row['model']:5s} {row['tokens_per_s']:9.1f} tok/s  "
                f"speed-up {row['speedup']:.2f}x  ideal {row['ideal']:.2f}x  efficiency {row['efficiency']:.2f}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

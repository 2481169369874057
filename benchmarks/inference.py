"""Inference speed of PAT-pruned models vs their dense parents, next to the ideal speed-up from shapes.

Models (``--models``):

  smollm2-135m      the real SmolLM2-135M-Instruct (offline pip package, see peft_pat.offline_models)
  llama2-7b-shape   random weights, Llama-2-7B layer shapes: d=4096, 32 heads (MHA), I=11008, V=32000
  llama3-8b-shape   random weights, Llama-3-8B layer shapes: d=4096, 32 heads, 8 KV heads, I=14336, V=128256
  tiny-llama        peft_pat.testing's 2-layer random Llama (d=64, 4 heads of 16, I=96): seconds, for tests

The random models have ``--layers`` decoder layers (default 2) so that they fit and run on a laptop
CPU; their per-layer shapes, lm_head and embedding are the real ones. Two kinds of pruned model, both
stock transformers models; which channels are kept does not change the speed, so no training is needed:

  pNN       ``--sparsities``: produced exactly as a user would, ``get_peft_model(dense copy,
            PATConfig(target_sparsity=p))``, a hardened *random* mask (seeded logits, exact top-N), then
            ``merge_and_prune()`` to hidden width N
  hN-mM     ``--cuts N:M,...``: multi-axis shapes, the dense copy cut post hoc by ``peft_pat.prune_model``
            to N seeded random hidden channels and M seeded random MLP channels per layer (every layer
            keeps the same count; N or M equal to the dense size leaves that axis alone)

Measured, alternately in one process with medians of ``--repeats`` after ``--warmup`` discarded
rounds (benchmarks/measure.py):

  prefill   time to the first token: one forward over batch x prompt tokens with a KV cache and
            ``logits_to_keep=1``, for every (batch, prompt length) of the grid
  decode    tokens/s of a greedy decode loop with a KV cache (``--new-tokens`` steps after a prompt
            of ``--decode-context`` tokens; the cache is cropped back to the prompt between rounds)

Next to every measured speed-up: the ideal one from benchmarks/cost_model.py (FLOPs for prefill,
bytes for decode) and efficiency = measured / ideal. ``--width-sweep`` also times the seven linears of
one Llama-2-7B-shaped layer at hidden widths near 3/4 and 1/2 of 4096 (multiples of 128, 64, 32, 16,
8 and odd widths), which is the evidence behind peft_pat.width's rounding default.

    python -m benchmarks.inference --threads 1                      # 391 s on one core (docs/performance.md)
    python -m benchmarks.inference --models llama2-7b-shape --layers 4 --repeats 9
    python -m benchmarks.inference --device cuda --layers 32 --dtype bfloat16 --batches 1,8,32 --prompt-lengths 128,512
    python -m benchmarks.inference --models smollm2-135m --sparsities= --cuts 504:1168,432:672 --no-width-sweep

Writes ``--out`` (default benchmarks/results/inference.json) and prints the tables.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .cost_model import DecoderShape
from .measure import alternate, format_table, machine_info, median, peak_rss_mib, write_json

REPO = Path(__file__).resolve().parent.parent

LLAMA_SHAPES = {
    "llama2-7b-shape": dict(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008, vocab_size=32000
    ),
    "llama3-8b-shape": dict(
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------- models
def build_dense(name: str, layers: int, dtype: torch.dtype, device: str, seed: int):
    """The dense parent: the real SmolLM2, a random Llama-shaped model or the tiny test Llama."""
    if name == "smollm2-135m":
        from peft_pat.offline_models import load_causal_lm

        model, _ = load_causal_lm("smollm2-135m", dtype=dtype)
        return model.to(device).eval()
    if name == "tiny-llama":
        from peft_pat.testing import tiny_model

        return tiny_model("llama", seed=seed, dtype=dtype).to(device).eval()
    if name not in LLAMA_SHAPES:
        raise SystemExit(f"unknown model {name!r}; choose from smollm2-135m, tiny-llama, {', '.join(LLAMA_SHAPES)}")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=layers, max_position_embeddings=4096, tie_word_embeddings=False, **LLAMA_SHAPES[name]
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype (no float32 copy of 8B-shaped tables)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device).eval()


def prune_with_pat(dense, sparsity: float, seed: int):
    """A copy of ``dense`` pruned by PAT: default PATConfig, hardened random mask, merge_and_prune()."""
    from peft import get_peft_model

    from peft_pat import PATConfig

    model = copy.deepcopy(dense)
    peft_model = get_peft_model(model, PATConfig(task_type="CAUSAL_LM", target_sparsity=sparsity))
    mask = peft_model.base_model.pat_mask["default"]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mask.logits.copy_(torch.randn(mask.hidden_size, generator=generator).to(mask.logits))
    mask.harden()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = peft_model.base_model.merge_and_prune()
    return pruned.eval()


def cut_post_hoc(dense, hidden: int, intermediate: int, seed: int):
    """A copy of ``dense`` cut by ``peft_pat.prune_model`` to ``hidden`` random hidden channels and, in every
    layer, ``intermediate`` random MLP channels (seeded; a size equal to the dense one leaves that axis)."""
    import peft_pat
    from peft_pat.families import family_for_model

    shape = DecoderShape.from_config(dense.config)
    for axis, kept, width in (("hidden", hidden, shape.hidden), ("MLP", intermediate, shape.intermediate)):
        if not 1 <= kept <= width:
            raise SystemExit(f"--cuts {hidden}:{intermediate}: the {axis} size must be between 1 and {width}")
    generator = torch.Generator().manual_seed(seed)

    def kept_of(width: int, kept: int) -> torch.Tensor:
        return torch.randperm(width, generator=generator)[:kept].sort().values

    keep_hidden = None if hidden == shape.hidden else kept_of(shape.hidden, hidden)
    keep_mlp = None
    if intermediate != shape.intermediate:
        keep_mlp = torch.stack([kept_of(shape.intermediate, intermediate) for _ in range(shape.layers)])
    device = next(dense.parameters()).device
    model = copy.deepcopy(dense).cpu()  # cut on the CPU, where the index tensors are
    model = peft_pat.prune_model(model, family_for_model(model), hidden=keep_hidden, mlp=keep_mlp)
    return model.to(device).eval()


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------- workloads
def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _crop(cache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def prefill_call(model, ids: torch.Tensor):
    def run():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)

    return run


def decode_call(model, prompt: torch.Tensor, new_tokens: int):
    """A greedy decode loop of ``new_tokens`` steps on a cache that is cropped back to the prompt each call."""
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache, first = _cache_of(out), out.logits[:, -1:].argmax(-1)
    length = prompt.shape[1]

    def run():
        with torch.inference_mode():
            _crop(cache, length)
            token = first
            for _ in range(new_tokens):
                out = model(input_ids=token, cache=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)

    return run


# ---------------------------------------------------------------------------------------- one model
def bench_model(name: str, args, dtype: torch.dtype) -> dict:
    t0 = time.perf_counter()
    dense = build_dense(name, args.layers, dtype, args.device, args.seed)
    models = {"dense": dense}
    prune_seconds = {}
    for p in args.sparsities:
        start = time.perf_counter()
        models[f"p{round(100 * p)}"] = prune_with_pat(dense, p, args.seed + 1)
        prune_seconds[f"p{round(100 * p)}"] = time.perf_counter() - start
    for hidden, intermediate in args.cuts:
        models[f"h{hidden}-m{intermediate}"] = cut_post_hoc(dense, hidden, intermediate, args.seed + 2)
    shapes = {key: DecoderShape.from_config(m.config) for key, m in models.items()}
    bytes_per_value = torch.finfo(dtype).bits // 8
    parameters = {key: parameter_count(m) for key, m in models.items()}
    mismatch = {key: (parameters[key], s.parameters) for key, s in shapes.items() if parameters[key] != s.parameters}
    if mismatch:  # the ideal speed-ups below would be computed for other shapes than the models have
        raise RuntimeError(f"cost model and models disagree on parameter counts (model, cost model): {mismatch}")
    info = {
        "model": name,
        "dtype": str(dtype).replace("torch.", ""),
        "layers": shapes["dense"].layers,
        "widths": {key: s.hidden for key, s in shapes.items()},
        "shapes": {
            key: dict(
                hidden=s.hidden, intermediate=s.intermediate, heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim
            )
            for key, s in shapes.items()
        },
        "parameters": parameters,
        "parameter_fraction": {key: parameters[key] / parameters["dense"] for key in models},
        "merge_and_prune_seconds": prune_seconds,
        "prefill": [],
        "decode": [],
    }
    vocab = shapes["dense"].vocab
    generator = torch.Generator().manual_seed(args.seed)

    for batch in args.batches:
        for length in args.prompt_lengths:
            ids = torch.randint(0, vocab, (batch, length), generator=generator).to(args.device)
            calls = {key: prefill_call(m, ids) for key, m in models.items()}
            times = alternate(calls, args.repeats, args.warmup, args.device)
            base = median(times["dense"])
            for key in models:
                if key == "dense":
                    continue
                measured = base / median(times[key])
                ideal = shapes["dense"].prefill_flops(batch, length) / shapes[key].prefill_flops(batch, length)
                info["prefill"].append(
                    dict(
                        pruned=key,
                        batch=batch,
                        tokens=length,
                        dense_ms=1e3 * base,
                        pruned_ms=1e3 * median(times[key]),
                        speedup=measured,
                        ideal=ideal,
                        efficiency=measured / ideal,
                        dense_times=times["dense"],
                        pruned_times=times[key],
                    )
                )
            print(f"  [{name}] prefill batch={batch} tokens={length} done", flush=True)

    for batch in args.decode_batches:
        prompt = torch.randint(0, vocab, (batch, args.decode_context), generator=generator).to(args.device)
        calls = {key: decode_call(m, prompt, args.new_tokens) for key, m in models.items()}
        times = alternate(calls, args.repeats, args.warmup, args.device)
        base = median(times["dense"])
        tokens = batch * args.new_tokens
        for key in models:
            if key == "dense":
                continue
            measured = base / median(times[key])
            cost = {
                k: shapes[k].decode_bytes(batch, args.decode_context, args.new_tokens, bytes_per_value) for k in shapes
            }
            ideal = cost["dense"] / cost[key]
            info["decode"].append(
                dict(
                    pruned=key,
                    batch=batch,
                    context=args.decode_context,
                    new_tokens=args.new_tokens,
                    dense_tok_s=tokens / base,
                    pruned_tok_s=tokens / median(times[key]),
                    speedup=measured,
                    ideal=ideal,
                    efficiency=measured / ideal,
                    dense_times=times["dense"],
                    pruned_times=times[key],
                )
            )
        print(f"  [{name}] decode batch={batch} done", flush=True)
    info["seconds"] = time.perf_counter() - t0
    del models, dense
    gc.collect()
    return info


# ---------------------------------------------------------------------------------------- width sweep
def width_sweep(args, dtype: torch.dtype) -> list[dict]:
    """Time the seven linears of one Llama-2-7B-shaped layer at hidden width w, for each w in the sweep.

    Per width: q, k, v (w -> 4096), o (4096 -> w), gate, up (w -> 11008), down (11008 -> w) on
    ``--sweep-tokens`` tokens. Reports GFLOP/s and the time per FLOP relative to the nearest
    multiple of 128 (1.0 = as efficient; > 1 = the width costs more than its FLOPs).
    """
    shape = LLAMA_SHAPES["llama2-7b-shape"]
    attn, inter = shape["hidden_size"], shape["intermediate_size"]
    tokens = args.sweep_tokens
    generator = torch.Generator().manual_seed(args.seed)

    def make(width: int):
        def rand(*size):
            return (torch.randn(*size, generator=generator) * 0.02).to(args.device, dtype)

        x, a, h = rand(tokens, width), rand(tokens, attn), rand(tokens, inter)
        wq, wo, wg, wd = rand(attn, width), rand(width, attn), rand(inter, width), rand(width, inter)

        def run():
            with torch.inference_mode():
                for _ in range(3):
                    F.linear(x, wq)  # q, k, v
                F.linear(a, wo)
                F.linear(x, wg)  # gate, up
                F.linear(x, wg)
                F.linear(h, wd)

        flops = 2 * tokens * (4 * width * attn + 3 * width * inter)
        return run, flops

    calls, flops = {}, {}
    for width in args.sweep_widths:
        calls[width], flops[width] = make(width)
    times = alternate(calls, args.repeats, args.warmup, args.device)
    rows = []
    for width in args.sweep_widths:
        seconds = median(times[width])
        ref = min(args.sweep_widths, key=lambda w: (w % 128 != 0, abs(w - width)))
        rel = (seconds / flops[width]) / (median(times[ref]) / flops[ref])
        rows.append(
            dict(
                width=width,
                multiple_of=max(m for m in (1, 2, 4, 8, 16, 32, 64, 128, 256) if width % m == 0),
                ms=1e3 * seconds,
                gflops=flops[width] / seconds / 1e9,
                reference_width=ref,
                time_per_flop_vs_reference=rel,
                times=times[width],
            )
        )
    return rows


# ---------------------------------------------------------------------------------------- main
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse_cuts(text: str) -> list[tuple[int, int]]:
    """``504:1168,432:672`` -> [(504, 1168), (432, 672)]: (hidden, intermediate) sizes."""
    cuts = []
    for item in (x for x in text.split(",") if x):
        hidden, sep, intermediate = item.partition(":")
        if not sep or not hidden.isdigit() or not intermediate.isdigit():
            raise argparse.ArgumentTypeError(f"{item!r}: write each cut as HIDDEN:INTERMEDIATE, e.g. 504:1168")
        cuts.append((int(hidden), int(intermediate)))
    return cuts


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="smollm2-135m,llama2-7b-shape,llama3-8b-shape")
    p.add_argument("--sparsities", type=_floats, default=[0.25, 0.5], help="PAT-pruned hidden widths (empty: none)")
    p.add_argument(
        "--cuts", type=parse_cuts, default=[], help="multi-axis shapes HIDDEN:INTERMEDIATE,... (prune_model)"
    )
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the random Llama-shaped models")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="auto: float32 for smollm2-135m (its stored dtype) and tiny-llama, bfloat16 for the Llama shapes",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", type=_ints, default=[1, 4], help="prefill batch sizes")
    p.add_argument("--prompt-lengths", type=_ints, default=[64, 256], help="prefill prompt lengths")
    p.add_argument("--decode-batches", type=_ints, default=[1, 4])
    p.add_argument("--decode-context", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--width-sweep", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--sweep-widths", type=_ints, default=[3072, 3071, 3064, 3040, 3008, 2048, 2047, 2040, 2016, 1984])
    p.add_argument("--sweep-tokens", type=int, default=256)
    p.add_argument(
        "--sweep-dtypes",
        default="float32,bfloat16",
        help="dtypes of the sweep (also shows which one CPU kernels run best)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "inference.json")
    return p.parse_args(argv)


def model_dtype(name: str, choice: str) -> torch.dtype:
    if choice != "auto":
        return DTYPES[choice]
    return torch.bfloat16 if name in LLAMA_SHAPES else torch.float32


def print_tables(results: dict) -> None:
    for info in results["models"]:
        print(f"\n== {info['model']} ({info['dtype']}, {info['layers']} layers)")
        shapes = [
            dict(pruned=key, **shape, parameters=info["parameters"][key], fraction=info["parameter_fraction"][key])
            for key, shape in info["shapes"].items()
        ]
        print(
            format_table(
                shapes,
                [
                    ("pruned", "model"),
                    ("hidden", "hidden"),
                    ("intermediate", "MLP"),
                    ("heads", "heads"),
                    ("kv_heads", "KV heads"),
                    ("head_dim", "head_dim"),
                    ("parameters", "parameters"),
                    ("fraction", "of dense"),
                ],
            )
        )
        print("prefill (time to first token)")
        print(
            format_table(
                info["prefill"],
                [
                    ("pruned", "model"),
                    ("batch", "batch"),
                    ("tokens", "tokens"),
                    ("dense_ms", "dense ms"),
                    ("pruned_ms", "pruned ms"),
                    ("speedup", "speed-up"),
                    ("ideal", "ideal"),
                    ("efficiency", "efficiency"),
                ],
            )
        )
        print(f"decode ({info['decode'][0]['new_tokens'] if info['decode'] else 0} tokens after a prompt)")
        print(
            format_table(
                info["decode"],
                [
                    ("pruned", "model"),
                    ("batch", "batch"),
                    ("context", "context"),
                    ("dense_tok_s", "dense tok/s"),
                    ("pruned_tok_s", "pruned tok/s"),
                    ("speedup", "speed-up"),
                    ("ideal", "ideal"),
                    ("efficiency", "efficiency"),
                ],
            )
        )
    for dtype_name, sweep in (results.get("width_sweep") or {}).items():
        print(
            f"\n== width sweep ({dtype_name}): seven linears of one Llama-2-7B layer, {results['sweep_tokens']} tokens"
        )
        print(
            format_table(
                sweep,
                [
                    ("width", "width"),
                    ("multiple_of", "multiple of"),
                    ("ms", "ms"),
                    ("gflops", "GFLOP/s"),
                    ("reference_width", "vs width"),
                    ("time_per_flop_vs_reference", "time/FLOP ratio"),
                ],
            )
        )


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False on this machine.")
    start = time.perf_counter()
    results = {
        "machine": machine_info(args.device),
        "command": " ".join(sys.argv),
        "args": vars(args) | {"out": str(args.out)},
    }
    results["models"] = []
    for name in [m for m in args.models.split(",") if m]:
        print(f"benchmarking {name} ...", flush=True)
        results["models"].append(bench_model(name, args, model_dtype(name, args.dtype)))
        write_json(args.out, results)
    if args.width_sweep:
        results["width_sweep"] = {}
        results["sweep_tokens"] = args.sweep_tokens
        for dtype_name in args.sweep_dtypes.split(","):
            print(f"width sweep {dtype_name} ...", flush=True)
            results["width_sweep"][dtype_name] = width_sweep(args, DTYPES[dtype_name])
            write_json(args.out, results)
    results["seconds"] = time.perf_counter() - start
    results["peak_rss_mib"] = peak_rss_mib()
    write_json(args.out, results)
    print_tables(results)
    print(f"\ntotal {results['seconds']:.0f} s, peak RSS {results['peak_rss_mib']:.0f} MiB; wrote {args.out}")
    return results


if __name__ == "__main__":
    main()

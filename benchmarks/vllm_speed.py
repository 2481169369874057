"""Dense vs pruned SmolLM2-135M served by vLLM: request throughput and generated tokens/s at batch 1 and
at 16 concurrent requests, next to the ideal speed-up (the parameter ratio).

    python -m benchmarks.vllm_speed                                 # needs PEFT_PAT_VLLM_PYTHON (or --vllm-python)
    python -m benchmarks.vllm_speed --rounds 3 --new-tokens 64 --prompt-tokens 128

Shapes (cut post hoc from the real SmolLM2-135M with ``peft_pat.prune_model``; speed depends on the
shapes, not on which channels are kept or on training, so the first N channels of every axis are kept):

  dense  hidden 576, MLP 1536
  -25%   hidden 504, MLP 1168   (about 25% of the parameters removed)
  -50%   hidden 432, MLP 672    (about 50%)

Each model is saved as a stock checkpoint (``save_pruned``) into ``--work``; vLLM runs in its own venv
(examples/serve_vllm.py says how to make it), one subprocess per model and round (the order rotates
every round), each starting ``vllm.LLM`` with examples/serve_vllm.py's engine arguments (float32, eager).
In one start:

  batch 1      ``--requests`` requests one after another (each ``generate`` call holds one prompt)
  16 concurrent  16 requests in one ``generate`` call: vLLM's scheduler batches them as it batches 16
               clients of its server
  request/s = requests / seconds; tokens/s = generated tokens / seconds (``ignore_eos``, greedy,
  ``--new-tokens`` each, prompts of ``--prompt-tokens`` random token ids), after one untimed warm-up of each.

Medians over ``--rounds``. The ideal speed-up is dense parameters / pruned parameters (decoding reads every
weight once per step; the tied embedding counts once, as the LM head it is read at every step).
Writes ``--out`` (default benchmarks/results/vllm_speed.json).
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

REPO = Path(__file__).resolve().parents[1]
SERVE_EXAMPLE = REPO / "examples" / "serve_vllm.py"
SHAPES = {"dense": None, "-25%": (504, 1168), "-50%": (432, 672)}  # name -> (hidden, MLP) kept
VLLM_PYTHON_ENV = "PEFT_PAT_VLLM_PYTHON"


def build_models(work: Path, model_name: str = "smollm2-135m") -> dict[str, dict]:
    """Save the dense model and each pruned shape into ``work``; name -> {folder, parameters, widths}."""
    import torch

    import peft_pat
    from peft_pat.offline_models import load_causal_lm

    models = {}
    for name, shape in SHAPES.items():
        folder = work / name.replace("%", "pct")
        model, tokenizer = load_causal_lm(model_name)
        if shape is not None:
            hidden, mlp = shape
            layers = model.config.num_hidden_layers
            keep_mlp = torch.arange(mlp).expand(layers, mlp)
            peft_pat.prune_model(model, peft_pat.family_for_model(model), hidden=torch.arange(hidden), mlp=keep_mlp)
        if not (folder / "config.json").is_file():
            peft_pat.save_pruned(model, folder, tokenizer=tokenizer)
        config = model.config
        models[name] = {
            "folder": str(folder),
            "parameters": int(model.num_parameters()),
            "hidden_size": int(config.hidden_size),
            "intermediate_size": int(config.intermediate_size),
        }
        print(f"{name}: hidden {config.hidden_size}, MLP {config.intermediate_size}, {model.num_parameters():,} params")
    return models


# ---------------------------------------------------------------------------------------- worker (vLLM's venv)
def worker(folder: str, prompt_tokens: int, new_tokens: int, requests: int, concurrent: int, seed: int) -> dict:
    """One vLLM start on ``folder``: batch-1 and concurrent throughput (module docstring)."""
    import random

    sys.path.insert(0, str(SERVE_EXAMPLE.parent))
    from serve_vllm import check_folder, engine_arguments, import_vllm
    from vllm.inputs import TokensPrompt

    vllm = import_vllm()
    config = check_folder(folder)
    vocab = int(config.get("vocab_size"))
    rng = random.Random(seed)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab) for _ in range(prompt_tokens)])
               for _ in range(max(requests, concurrent) + 1)]  # fmt: skip
    max_len = prompt_tokens + new_tokens + 8
    llm = vllm.LLM(model=folder, **engine_arguments(max_model_len=max_len), seed=seed)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)

    def timed(batch) -> tuple[float, int]:
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)

    timed(prompts[-1:])  # warm-up: one request
    seconds, tokens = 0.0, 0
    for prompt in prompts[:requests]:
        s, t = timed([prompt])
        seconds, tokens = seconds + s, tokens + t
    single = {"requests": requests, "seconds": seconds, "tokens": tokens}
    timed(prompts[:concurrent])  # warm-up: the concurrent batch shape
    s, t = timed(prompts[:concurrent])
    return {"batch1": single, "concurrent": {"requests": concurrent, "seconds": s, "tokens": t}}


def run_worker(python: str, folder: str, args: argparse.Namespace) -> dict:
    command = [python, str(Path(__file__).resolve()), "--worker", folder, "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens), "--requests", str(args.requests),
               "--concurrent", str(args.concurrent), "--seed", str(args.seed)]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM worker on {folder} failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def vllm_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", default=os.environ.get(VLLM_PYTHON_ENV),
                        help=f"python of vLLM's venv (default ${VLLM_PYTHON_ENV})")  # fmt: skip
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", type=Path, default=Path("outputs/vllm_speed"), help="where the models are saved")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4, help="batch-1 requests per round")
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vllm_speed.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement in vLLM's venv
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(args.worker, args.prompt_tokens, args.new_tokens, args.requests, args.concurrent, args.seed)
        print("RESULT " + json.dumps(result), flush=True)
        return result
    if not args.vllm_python:
        raise SystemExit(f"Name vLLM's python with --vllm-python or {VLLM_PYTHON_ENV} (examples/serve_vllm.py).")
    args.work.mkdir(parents=True, exist_ok=True)
    models = build_models(args.work, args.model)
    names = list(models)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            result = run_worker(args.vllm_python, models[name]["folder"], args)
            runs[name].append(result)
            print(f"round {round_index + 1} {name}: " + ", ".join(
                f"{k} {v['requests'] / v['seconds']:.2f} req/s {v['tokens'] / v['seconds']:.1f} tok/s"
                for k, v in result.items()), flush=True)  # fmt: skip
    table = {}
    for name in names:
        row = {"parameters": models[name]["parameters"], "hidden_size": models[name]["hidden_size"],
               "intermediate_size": models[name]["intermediate_size"],
               "ideal_speedup": models["dense"]["parameters"] / models[name]["parameters"]}  # fmt: skip
        for mode in ("batch1", "concurrent"):
            done = runs[name]
            row[f"{mode}_requests_per_s"] = statistics.median(r[mode]["requests"] / r[mode]["seconds"] for r in done)
            row[f"{mode}_tokens_per_s"] = statistics.median(r[mode]["tokens"] / r[mode]["seconds"] for r in done)
        table[name] = row
    for row in table.values():
        for mode in ("batch1", "concurrent"):
            row[f"{mode}_speedup"] = row[f"{mode}_tokens_per_s"] / table["dense"][f"{mode}_tokens_per_s"]
    payload = {
        "engine": f"vllm {vllm_version(args.vllm_python)}",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "settings": {k: getattr(args, k) for k in ("rounds", "prompt_tokens", "new_tokens", "requests", "concurrent")},
        "models": table,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    print("\n| model | hidden | MLP | params | ideal | batch 1 req/s | batch 1 tok/s | 16 concurrent req/s | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['hidden_size']} | {row['intermediate_size']} | {row['parameters'] / 1e6:.1f}M | "
              f"{row['ideal_speedup']:.2f}x | {row['batch1_requests_per_s']:.3f} | {row['batch1_tokens_per_s']:.1f} "
              f"({row['batch1_speedup']:.2f}x) | {row['concurrent_requests_per_s']:.3f} | "
              f"{row['concurrent_tokens_per_s']:.1f} ({row['concurrent_speedup']:.2f}x) |")  # fmt: skip
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":  # vLLM starts engine processes: the guard keeps them from re-running the script
    main()

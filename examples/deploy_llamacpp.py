"""Run a pruned checkpoint in llama.cpp: convert the saved folder to GGUF, load it with llama-cpp-python,
check its logits and greedy tokens against transformers'.

    python examples/deploy_llamacpp.py --model outputs/quickstart/pruned          # a folder saved by save_pruned
    python examples/deploy_llamacpp.py --tiny                                    # tiny random Llama, pruned, seconds
    python examples/deploy_llamacpp.py --tiny hidden-mlp                         # hidden and MLP width cut
    python examples/deploy_llamacpp.py --tiny heads                              # fewer query and KV heads too
    python examples/deploy_llamacpp.py --model smollm2-135m --sparsity 0.25      # prune the real SmolLM2 first

What it needs (a separate environment; the package's own pins stay untouched):

    pip install torch==2.13.0 -e ".[llamacpp]"       # llama-cpp-python compiles llama.cpp (~30-60 min on 2 cores)

and llama.cpp's converter ``convert_hf_to_gguf.py``, which the llama-cpp-python *wheel* does not
install but its *source distribution* ships (``vendor/llama.cpp/``). ``--converter PATH`` or
``LLAMA_CPP_CONVERTER`` names it; otherwise the script looks in the cache
(``~/.cache/peft_pat/llama.cpp-<version>/``) and, if absent, downloads the sdist of the installed
llama-cpp-python version with ``pip download`` and unpacks the converter there.

A pruned model has ``hidden_size = N`` while ``num_attention_heads * head_dim`` stays the dense width;
the converter writes ``head_dim`` to ``llama.attention.key_length`` / ``value_length`` and
``rope.dimension_count`` whenever ``head_dim`` is in config.json, and ``merge_and_prune()`` always
writes it, so llama.cpp sizes the attention from it (tested here: logits agree to float32 rounding).
Without ``head_dim`` in the config llama.cpp derives it as ``hidden_size / num_attention_heads`` and
refuses the q_proj shape; see :func:`check_config`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("PEFT_PAT_CACHE", Path.home() / ".cache" / "peft_pat"))
CONVERTER_ENV = "LLAMA_CPP_CONVERTER"
# The config fields that size a Llama's tensors, each of which pruning may change (head_dim stays pinned).
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")


# ---------------------------------------------------------------------------------------- converter
ENGINE_MISSING = (
    "llama-cpp-python is not installed in this environment ({error}). Install it in a separate "
    "environment so torch stays pinned: pip install torch==2.13.0 -e '.[llamacpp]' (compiles llama.cpp)."
)


def import_llama_cpp():
    """The llama_cpp module, or an ImportError that says how to install it."""
    try:
        import llama_cpp
    except ImportError as error:
        raise ImportError(ENGINE_MISSING.format(error=error)) from error
    return llama_cpp


def llama_cpp_version() -> str:
    return import_llama_cpp().__version__


def find_converter(version: str | None = None) -> Path | None:
    """convert_hf_to_gguf.py from LLAMA_CPP_CONVERTER, else the cache for ``version``; None if neither."""
    if os.environ.get(CONVERTER_ENV):
        path = Path(os.environ[CONVERTER_ENV]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{CONVERTER_ENV}={path} is not a file; point it at llama.cpp's convert_hf_to_gguf.py "
                "(vendor/llama.cpp/ in the llama-cpp-python sdist) or unset it to fetch the converter"
            )
        return path
    version = version or llama_cpp_version()
    path = CACHE / f"llama.cpp-{version}" / "convert_hf_to_gguf.py"
    return path if path.is_file() else None


def fetch_converter(version: str | None = None) -> Path:
    """Download the llama-cpp-python sdist of ``version`` (pip) and unpack its converter into the cache."""
    version = version or llama_cpp_version()
    target = CACHE / f"llama.cpp-{version}"
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            tmp,
            f"llama-cpp-python=={version}",
        ]
        print("fetching llama.cpp's converter:", " ".join(command))
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        staging = Path(tmp) / "out"
        with tarfile.open(archive) as tar:
            members = [
                m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(wanted)
            ]
            for member in members:
                member.name = member.name[len(prefix) :]
            tar.extractall(staging, members=members, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), target)
    return target / "convert_hf_to_gguf.py"


# Widths llama.cpp's CPU matmuls run fast at. Measured on SmolLM2-135M (f32 GGUF, 1 thread, AVX-512;
# benchmarks/results/engine_speed_width_probe.json): hidden 504 (a multiple of 8, not 16) prefills at 0.36x the
# dense model, 576 / MLP 1160 at 0.86x, while 576 / MLP 1168 and 880 (multiples of 16) run at 1.16x and 1.28x.
FAST_WIDTH_MULTIPLE = 16


def check_config(folder: Path) -> None:
    """Refuse a config that llama.cpp would misread (a pruned width without an explicit head_dim); warn about
    widths that llama.cpp runs off its fast path (not multiples of :data:`FAST_WIDTH_MULTIPLE`)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if config.get("head_dim") is None and heads and hidden and hidden % heads:
        raise ValueError(
            f"{folder}/config.json has hidden_size={hidden} and no head_dim: llama.cpp would derive "
            f"head_dim = {hidden}/{heads}; add the dense head_dim (merge_and_prune() writes it)"
        )
    slow = {k: config[k] for k in ("hidden_size", "intermediate_size") if config.get(k, 0) % FAST_WIDTH_MULTIPLE}
    if slow:
        sizes = ", ".join(f"{k}={v}" for k, v in slow.items())
        warnings.warn(
            f"{folder}: {sizes} is not a multiple of {FAST_WIDTH_MULTIPLE}; llama.cpp's CPU matmuls then leave "
            "their fast path (SmolLM2-135M at hidden 504: prefill 0.36x the dense model instead of ~1.3x). The model "
            "is correct, only slower. For llama.cpp, prune to multiples of 16: PATConfig(width_multiple=16) where "
            "the head count allows it, else prune_axes=['mlp'] (SmolLM2 at 25%: MLP 880, prefill 1.28x) or "
            "target_width=<a multiple of lcm(heads, 16)>.",
            stacklevel=2,
        )


def convert(folder: Path, outfile: Path, outtype: str = "f32", converter: Path | None = None) -> Path:
    """GGUF of a saved transformers folder, with llama.cpp's own converter (a subprocess)."""
    check_config(folder)
    converter = converter or find_converter() or fetch_converter()
    command = [sys.executable, str(converter), str(folder), "--outfile", str(outfile), "--outtype", outtype]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return Path(outfile)


# ---------------------------------------------------------------------------------------- engine
def load_gguf(path: Path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = True):
    """llama_cpp.Llama on a GGUF file (quiet); the engine's own message if it refuses the file."""
    Llama = import_llama_cpp().Llama
    threads = threads or min(2, os.cpu_count() or 1)
    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
    )


def engine_logits(llm, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) float32 logits of every position, from one llama.cpp evaluation."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def engine_greedy(llm, ids: list[int], new_tokens: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(int(token))
        if len(out) == new_tokens:
            break
    return out


def transformers_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def transformers_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """``new_tokens`` argmax steps, end-of-sequence included, as llama.cpp's ``generate`` takes them
    (``model.generate(min_new_tokens=...)`` would suppress the EOS token and diverge where it wins)."""
    import torch

    out: list[int] = []
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def compare(folder: Path, gguf: Path, ids: list[int], new_tokens: int = 8) -> dict:
    """Logit and greedy-token agreement of transformers (float32) and llama.cpp on the same token ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    llm = load_gguf(gguf, n_ctx=max(64, len(ids) + new_tokens + 1))
    reference, engine = transformers_logits(model, ids), engine_logits(llm, ids)
    scale = float(np.abs(reference).max())
    return {
        "tokens": len(ids),
        "max_abs_logit_diff": float(np.abs(reference - engine).max()),
        "max_abs_logit": scale,
        "argmax_agreement": float((reference.argmax(-1) == engine.argmax(-1)).mean()),
        "greedy_transformers": transformers_greedy(model, ids, new_tokens),
        "greedy_llama_cpp": engine_greedy(llm, ids, new_tokens),
    }


# ---------------------------------------------------------------------------------------- models
def tiny_bpe_tokenizer(vocab_size: int):
    """A Llama-style BPE tokenizer (byte fallback, "▁" for spaces) of exactly ``vocab_size`` tokens:
    what llama.cpp's converter reads as a 'llama' vocabulary. Ids 0-2 are <unk>, <s>, </s>."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    for char in string.ascii_letters + string.digits + string.punctuation:
        if len(vocab) == vocab_size:
            break
        vocab.setdefault(char, len(vocab))
    vocab_size_made = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return tokenizer, vocab_size_made


TINY_DENSE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
# The tiny engine cases (``--tiny SHAPE``): every one keeps head_dim 32, so hidden_size != heads * head_dim.
TINY_SHAPES = {
    "hidden": "PAT-pruned hidden width 64 -> 48 (merge_and_prune of a random non-trivial adapter)",
    "hidden-mlp": "hidden 64 -> 48 and MLP 96 -> 64 in every layer, cut post hoc by peft_pat.prune_model",
    "heads": "hidden 48, MLP 64, 2 query heads and 1 KV head (dense: 4 and 2), head_dim 32 pinned in the config",
}


def tiny_llama(seed: int = 0, **shape):
    """A tiny random 2-layer Llama of ``TINY_DENSE`` shapes (``shape`` overrides them) with non-trivial norm
    gains, and a tokenizer the converter reads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, vocab_size = tiny_bpe_tokenizer(97)
    config = LlamaConfig(
        vocab_size=vocab_size,
        num_hidden_layers=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        **{**TINY_DENSE, **shape},
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + torch.rand_like(param) - 0.5)
    return model, tokenizer


def tiny_pruned_folder(folder: Path, sparsity: float = 0.25, seed: int = 0) -> Path:
    """``TINY_SHAPES["hidden"]``: the tiny Llama (hidden 64, 4 heads of 32, GQA 2 KV heads) wrapped in PAT with
    a random non-trivial adapter, merge_and_prune()d to 48 channels and saved with its tokenizer."""
    import torch
    from peft import get_peft_model

    import peft_pat

    base, tokenizer = tiny_llama(seed)
    model = get_peft_model(
        base,
        peft_pat.PATConfig(task_type="CAUSAL_LM", target_sparsity=sparsity, prune_axes=["hidden"], init_weights=False),
    )
    mask = model.base_model.pat_mask["default"]
    with torch.no_grad():
        mask.logits.copy_(torch.randn(mask.hidden_size, generator=torch.Generator().manual_seed(seed + 1)))
    mask.harden()
    pruned = model.merge_and_prune()
    return peft_pat.save_pruned(pruned, folder, tokenizer=tokenizer, overwrite=True)


def tiny_multi_axis_folder(folder: Path, shape: str = "hidden-mlp", seed: int = 0) -> Path:
    """``TINY_SHAPES[shape]`` for "hidden-mlp" and "heads", saved with its tokenizer. The head-count case is a
    random model of that config: an engine reads only the config and the tensors' shapes."""
    import torch

    import peft_pat
    from peft_pat.families import family_for_model

    if shape == "heads":
        model, tokenizer = tiny_llama(seed, hidden_size=48, intermediate_size=64, num_attention_heads=2,
                                      num_key_value_heads=1)  # fmt: skip
    elif shape == "hidden-mlp":
        model, tokenizer = tiny_llama(seed)
        generator = torch.Generator().manual_seed(seed + 1)
        hidden = torch.randperm(64, generator=generator)[:48].sort().values
        mlp = torch.stack([torch.randperm(96, generator=generator)[:64].sort().values for _ in range(2)])
        model = peft_pat.prune_model(model, family_for_model(model), hidden=hidden, mlp=mlp)
    else:
        raise ValueError(f"unknown tiny multi-axis shape {shape!r}; choose hidden-mlp or heads")
    return peft_pat.save_pruned(model, folder, tokenizer=tokenizer, overwrite=True)


def tiny_folder(folder: Path, shape: str = "hidden") -> Path:
    """The tiny engine case ``shape`` (a key of ``TINY_SHAPES``) saved into ``folder``."""
    if shape not in TINY_SHAPES:
        raise ValueError(f"unknown tiny shape {shape!r}; choose from {', '.join(TINY_SHAPES)}")
    return tiny_pruned_folder(folder) if shape == "hidden" else tiny_multi_axis_folder(folder, shape)


def calibration_batches(tokenizer, batches: int = 4, length: int = 256) -> list[dict]:
    """The first ``batches`` windows of ``length`` tokens of WikiText-2 test (``PAT_DATA_DIR`` or
    ``../shared/data``), as the dicts ``calibrate`` takes."""
    import torch

    data = Path(os.environ.get("PAT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = data / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; set PAT_DATA_DIR to the folder holding wikitext-2-raw/")
    text = path.read_text(encoding="utf-8")[:200_000]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][: batches * length])
    return [{"input_ids": w[None]} for w in ids.view(batches, length)]


def pat_pruned(model, tokenizer, sparsity: float):
    """The stock model ``merge_and_prune()`` returns for a fresh PAT adapter after its calibration (the
    importance-aware mask start) and no training: the shapes, hence the speed, of a trained one."""
    from peft import get_peft_model

    import peft_pat

    peft_model = get_peft_model(model, peft_pat.PATConfig(task_type="CAUSAL_LM", target_sparsity=sparsity))
    peft_model.base_model.calibrate(calibration_batches(tokenizer))
    next(iter(peft_model.base_model.pat_mask.values())).harden()
    return peft_model.merge_and_prune()


def prune_named(name: str, sparsity: float, folder: Path) -> Path:
    """Prune a dense model (hub id, folder or smollm2-135m) to ``sparsity`` of its width with
    :func:`pat_pruned` and save it with its tokenizer."""
    import peft_pat
    from peft_pat.offline_models import load_causal_lm

    model, tokenizer = load_causal_lm(name)
    return peft_pat.save_pruned(pat_pruned(model, tokenizer, sparsity), folder, tokenizer=tokenizer, overwrite=True)


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="pruned folder, or a dense model to prune with --sparsity (smollm2-135m)")
    source.add_argument(
        "--tiny",
        nargs="?",
        const="hidden",
        choices=list(TINY_SHAPES),
        help="a tiny random Llama of one engine case (seconds): "
        + "; ".join(f"{k}: {v}" for k, v in TINY_SHAPES.items()),
    )
    parser.add_argument("--sparsity", type=float, default=None, help="prune --model first (activation criterion)")
    parser.add_argument("--output", default="outputs/deploy_llamacpp")
    parser.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--converter", type=Path, default=None, help="path to llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args(argv)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny or not args.model:
        folder = tiny_folder(out / "pruned", args.tiny or "hidden")
    elif args.sparsity:
        folder = prune_named(args.model, args.sparsity, out / f"pruned-{round(100 * args.sparsity)}")
    else:
        from peft_pat.offline_models import resolve_model_path

        folder = Path(resolve_model_path(args.model))
    gguf = convert(folder, out / f"model-{args.outtype}.gguf", args.outtype, args.converter)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(args.prompt)["input_ids"]
    summary = {"folder": str(folder), "gguf": str(gguf), "gguf_mib": round(gguf.stat().st_size / 2**20, 1)}
    config = json.loads((folder / "config.json").read_text())
    summary["shape"] = {k: config.get(k) for k in SHAPE_FIELDS}
    summary.update(compare(folder, gguf, ids, args.new_tokens))
    summary["text_llama_cpp"] = tokenizer.decode(summary["greedy_llama_cpp"])
    summary["text_transformers"] = tokenizer.decode(summary["greedy_transformers"])
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

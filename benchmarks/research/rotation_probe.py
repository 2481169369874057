"""Probe for the next 25% lever: keep a subspace of the residual stream instead of a subset of its channels.

Untrained, on the real model: the activation channel cut (the quality benchmark's rival start) against
one global rotation Q of the residual stream (SliceGPT-style, one Q for every layer), then the top-N
directions kept. The rotation folds every residual-reading norm's gain into its consumers (norm gains
become sqrt(d/N)), rotates the producers' outputs (embedding, o_proj, down_proj: Q_N^T W) and the
consumers' inputs (W Q_N), and unties the LM head (head = W_head diag(g_final) Q_N, +vocab x N params).
Q comes from the second moment of every norm's input over the calibration tokens, either raw or per-token
RMS-normalised with the massive-activation channels kept as their own coordinates (``--normalised``).
Prints WikiText-2 perplexity; a probe for docs/quality.md ("Levers"), not a package feature.

    python -m benchmarks.research.rotation_probe --normalised

A research probe, not maintained as a product (benchmarks/research/README.md).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

from peft_pat import family_for_model
from peft_pat.calibration import channel_statistics, massive_channels
from peft_pat.offline_models import load_causal_lm
from peft_pat.width import resolve_kept_width

from ..quality.commonsense import TaskMixture
from ..quality.evaluation import perplexity
from ..quality.posthoc import cut_by_activation
from ..quality.wikitext import perplexity_windows
from .levers import CALIBRATION_BATCHES, REPO


@torch.no_grad()
def residual_rotation(model: nn.Module, batches: list[dict], normalised: bool) -> torch.Tensor:
    """Q (d x d, columns = directions by decreasing energy) from the norm inputs over ``batches``."""
    d = model.config.hidden_size
    second = torch.zeros(d, d, dtype=torch.float64)
    norms = [m for n, m in model.named_modules() if n.endswith("layernorm") or n == "model.norm"]
    tokens: list[torch.Tensor] = []

    def record(module, args) -> None:
        x = args[0].detach().double()[tokens[-1]]
        if normalised:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
        second.add_(x.T @ x)

    hooks = [m.register_forward_pre_hook(record) for m in norms]
    for batch in batches:
        tokens.append(batch["attention_mask"].bool())
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for hook in hooks:
        hook.remove()
    fixed = torch.zeros(d, dtype=torch.bool)
    if normalised:
        fixed[massive_channels(channel_statistics(model, batches).energy)] = True
    rest = (~fixed).nonzero().flatten()
    values, vectors = torch.linalg.eigh(second[rest][:, rest])
    q = torch.zeros(d, d)
    q[fixed.nonzero().flatten(), torch.arange(int(fixed.sum()))] = 1.0
    q[rest[:, None], torch.arange(int(fixed.sum()), d)[None, :]] = vectors[:, values.argsort(descending=True)].float()
    return q


@torch.no_grad()
def rotate_and_slice(model: nn.Module, q: torch.Tensor, kept: int) -> nn.Module:
    """Fold the norm gains, rotate by ``q`` and keep its first ``kept`` directions (Llama layout); in place."""
    inner, d = model.model, model.config.hidden_size
    qn = q[:, :kept]
    head = nn.Linear(d, model.config.vocab_size, bias=False)
    head.weight.data = (model.lm_head.weight.data * inner.norm.weight.data[None, :]) @ qn
    inner.embed_tokens = nn.Embedding.from_pretrained(inner.embed_tokens.weight.data @ qn, freeze=False)
    gain = (d / kept) ** 0.5
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, consumers in (
            (layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
            (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
        ):
            for linear in consumers:
                linear.weight.data = (linear.weight.data * norm.weight.data[None, :]) @ qn
            norm.weight.data = torch.full((kept,), gain)
        attn.o_proj.weight.data = qn.T @ attn.o_proj.weight.data
        mlp.down_proj.weight.data = qn.T @ mlp.down_proj.weight.data
    inner.norm.weight.data = torch.full((kept,), gain)
    model.lm_head = head
    model.config.tie_word_embeddings = False
    model.config.hidden_size = kept
    return model


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.research.rotation_probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sparsities", default="0.25", help="comma list of hidden-width sparsities")
    p.add_argument("--normalised", action="store_true", help="per-token normalised statistics, massive channels fixed")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    args = p.parse_args(argv)
    base, tokenizer = load_causal_lm("smollm2-135m")
    base.eval()
    batches = TaskMixture(args.data_dir / "commonsense", None, tokenizer, 8, 160, "full").batches(
        CALIBRATION_BATCHES, 0
    )
    windows = perplexity_windows(args.data_dir / "wikitext-2-raw" / "wiki.test.raw", tokenizer, 512, args.windows)
    q = residual_rotation(base, batches, args.normalised)
    results = {}
    for sparsity in map(float, args.sparsities.split(",")):
        kept = resolve_kept_width(base.config.hidden_size, base.config.num_attention_heads, sparsity, None)
        cut = copy.deepcopy(base)
        stats = channel_statistics(cut, batches)
        cut_by_activation(cut, family_for_model(cut), stats.score, massive_channels(stats.energy), kept)
        rotated = rotate_and_slice(copy.deepcopy(base), q, kept)
        results[sparsity] = {
            "kept": kept,
            "activation_cut": perplexity(cut, windows, progress=False)["perplexity"],
            "rotation": perplexity(rotated, windows, progress=False)["perplexity"],
        }
        print(sparsity, results[sparsity], flush=True)
    return results


if __name__ == "__main__":
    main()

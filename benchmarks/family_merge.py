"""Per family: how exact ``merge_and_prune()`` is, and what merging costs in memory.

For every family in ``peft_pat.families`` (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text,
Phi-3) it builds a random model of one mid-size shape (default d = 1024, 16 heads, 4 KV heads,
intermediate 2816, 4 layers, vocabulary 32000, float32; the family's own tying), wraps it with PAT
with random non-trivial adapters (``init_weights=False``: LoRA r = 20 on every linear, HSMs of the
default rank, hard mask at 25% sparsity) and, in a process of its own, measures

* the largest absolute logit difference between the PAT model and ``merge_and_prune()``'s model,
  next to the largest logit (the scale the difference is relative to);
* the same between the merged model and its stock reload (``save_pretrained`` then
  ``AutoModelForCausalLM.from_pretrained``), expected to be exactly 0;
* the extra resident memory at the peak of ``merge_and_prune()`` (VmHWM reset right before the
  call, minus the resident memory just before it), next to the size of one decoder layer.

    python -m benchmarks.family_merge                        # all families, about 2 minutes on 2 cores
    python -m benchmarks.family_merge --families llama gemma2 --layers 2

The shapes come from the tiny-model builders the test suite uses (``peft_pat.testing``), scaled up,
so the benchmark and the tests agree on what each family's config looks like. Prints a table and
writes JSON (default ``benchmarks/results/family_merge.json``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from .measure import PeakMemory, format_table, machine_info, write_json  # noqa: E402

MIB = 1 << 20


def child(args) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_pat import PATConfig
    from peft_pat.testing import tiny_model

    torch.set_num_threads(args.threads)
    shape = dict(
        hidden_size=args.hidden_size,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_hidden_layers=args.layers,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
    )
    if args.family in ("gemma", "gemma2", "gemma3_text"):
        shape["tie_word_embeddings"] = True  # as the released Gemma models
    model = tiny_model(args.family, **shape)
    layer_mib = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters()) / MIB
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, PATConfig(task_type="CAUSAL_LM", target_sparsity=0.25, r=20, lora_alpha=20, init_weights=False)
    )
    peft_model.base_model.harden_mask()
    peft_model.eval()
    ids = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pat_logits = peft_model(input_ids=ids).logits
    with PeakMemory() as merge:
        small = peft_model.merge_and_prune()
    with torch.no_grad():
        merged_logits = small(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as folder:
        small.save_pretrained(folder)
        stock = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            stock_logits = stock(input_ids=ids).logits
    return {
        "family": args.family,
        "model_type": small.config.model_type,
        "stock_class": type(stock).__name__,
        "hidden_size": args.hidden_size,
        "kept_width": small.config.hidden_size,
        "tied_after_merge": bool(small.config.tie_word_embeddings),
        "max_abs_logit": float(pat_logits.abs().max()),
        "max_diff_pat_vs_merged": float((merged_logits - pat_logits).abs().max()),
        "max_diff_merged_vs_reload": float((stock_logits - merged_logits).abs().max()),
        "model_mib": model_mib,
        "layer_mib": layer_mib,
        "merge_peak_extra_mib": merge.extra_mib,
        "merge_seconds": merge.seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    from peft_pat.testing import ALL_FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(ALL_FAMILIES), choices=ALL_FAMILIES)
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "family_merge.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.family = args.child
        print(json.dumps(child(args)))
        return {}
    rows = []
    for family in args.families:
        forward = [a for a in (argv if argv is not None else sys.argv[1:]) if a]
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.family_merge", *forward, "--child", family],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            raise SystemExit(f"{family} failed:\n{done.stderr[-4000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{family}: done", file=sys.stderr, flush=True)
    columns = [
        ("family", "family"),
        ("kept_width", "width"),
        ("tied_after_merge", "tied"),
        ("max_abs_logit", "max |logit|"),
        ("max_diff_pat_vs_merged", "max diff PAT vs merged"),
        ("max_diff_merged_vs_reload", "max diff merged vs reload"),
        ("layer_mib", "layer MiB"),
        ("merge_peak_extra_mib", "merge peak extra MiB"),
        ("merge_seconds", "merge s"),
    ]
    print(format_table(rows, columns))
    payload = {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "output")}, "rows": rows}
    payload["machine"] = machine_info()
    write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()

"""lm-evaluation-harness (the ``pat_*`` tasks) vs the project's own scorer (benchmarks/quality/evaluation.py)
on the same items: the first ``--limit`` test records of each commonsense task, one model.

    python benchmarks/lm_eval_compare.py --model smollm2-135m --limit 200 --out benchmarks/results/lm_eval_compare.json

For each task: accuracy and acc_norm from both, the number of items where they disagree, and the largest
per-candidate log-likelihood difference (0 up to float noise when both build the same token sequences).
WikiText-2: lm-eval's document-level rolling perplexity (``--ppl-max-length`` tokens per window),
converted to a token perplexity, next to the scorer's concatenate-and-chunk windows of the same length.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "lm_eval_tasks"))

TASKS = {
    "ARC-Challenge": "pat_arc_challenge",
    "ARC-Easy": "pat_arc_easy",
    "boolq": "pat_boolq",
    "openbookqa": "pat_openbookqa",
    "piqa": "pat_piqa",
}


def ours(model, tokenizer, data: Path, limit: int, ppl_length: int, ppl_tokens: int | None) -> dict:
    from quality.commonsense import load_records, parse_choice
    from quality.evaluation import choice_loglikelihoods, perplexity, task_accuracy
    from quality.wikitext import perplexity_windows

    out = {}
    for task in TASKS:
        path = data / "commonsense" / task / "test.json"
        items = [parse_choice(r, task, str(path)) for r in load_records(path)[:limit]]
        start = time.perf_counter()
        scores = choice_loglikelihoods(model, tokenizer, items, "text", progress=False)
        result = task_accuracy(items, scores)
        result["seconds"] = time.perf_counter() - start
        result["loglikelihoods"] = [[s for s, _ in item] for item in scores]
        out[task] = result
    windows = perplexity_windows(data / "wikitext-2-raw" / "wiki.test.raw", tokenizer, ppl_length, ppl_tokens)
    start = time.perf_counter()
    out["wikitext2"] = perplexity(model, windows, progress=False)
    out["wikitext2"]["seconds"] = time.perf_counter() - start
    return out


def harness(path: str, data: Path, limit: int, ppl_length: int, batch_size: int, wikitext_docs: int | None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(HERE / "lm_eval_tasks"), metadata={"data_dir": str(data)})
    out = {}
    start = time.perf_counter()
    result = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={path},dtype=float32,max_length={ppl_length}",
        tasks=list(TASKS.values()),
        task_manager=manager,
        limit=limit,
        batch_size=batch_size,
        log_samples=True,
        device="cpu",
    )
    seconds = time.perf_counter() - start
    for task, name in TASKS.items():
        metrics = result["results"][name]
        samples = sorted(result["samples"][name], key=lambda s: s["doc_id"])
        out[task] = {
            "acc": metrics["acc,none"],
            "acc_norm": metrics["acc_norm,none"],
            "n": len(samples),
            "correct": "".join(str(int(s["acc"])) for s in samples),
            "correct_norm": "".join(str(int(s["acc_norm"])) for s in samples),
            "loglikelihoods": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
            "example_request": samples[0]["arguments"] if samples else None,
        }
    out["seconds_commonsense"] = seconds
    start = time.perf_counter()
    result = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={path},dtype=float32,max_length={ppl_length}",
        tasks=["pat_wikitext2"],
        task_manager=manager,
        limit=wikitext_docs,
        batch_size=1,
        device="cpu",
    )
    w = {k.split(",")[0]: v for k, v in result["results"]["pat_wikitext2"].items() if "," in k}
    w["seconds"] = time.perf_counter() - start
    # token perplexity from bits per byte: total NLL = bpb * ln 2 * bytes, over every token of the pages
    import math

    import pat_tasks
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    pages = pat_tasks.wikitext_dataset(data_dir=str(data))["test"]["page"][:wikitext_docs]
    size = sum(len(p.encode("utf-8")) for p in pages)
    tokens = sum(len(tokenizer(pat_tasks.wikitext_detokenizer({"page": p}))["input_ids"]) for p in pages)
    w.update(
        documents=len(pages),
        bytes=size,
        tokens=tokens,
        token_perplexity=math.exp(w["bits_per_byte"] * math.log(2) * size / tokens),
    )
    out["wikitext2"] = w
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("PAT_DATA_DIR", HERE.parent.parent / "shared" / "data"))
    )
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--ppl-max-length", type=int, default=512)
    parser.add_argument("--ppl-tokens", type=int, default=None, help="our scorer's WikiText token budget (None: all)")
    parser.add_argument("--wikitext-docs", type=int, default=None, help="lm-eval: first N articles (None: all 62)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lm_eval_compare.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_pat.pretrained import resolve_model_path

    path = resolve_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    mine = ours(model, tokenizer, args.data_dir, args.limit, args.ppl_max_length, args.ppl_tokens)
    del model
    theirs = harness(path, args.data_dir, args.limit, args.ppl_max_length, args.batch_size, args.wikitext_docs)

    rows = {}
    for task in TASKS:
        a, b = mine[task], theirs[task]
        diffs = [abs(x - y) for la, lb in zip(a["loglikelihoods"], b["loglikelihoods"]) for x, y in zip(la, lb)]
        rows[task] = {
            "n": a["n"],
            "ours_acc": a["acc"],
            "lm_eval_acc": b["acc"],
            "ours_acc_norm": a["acc_norm"],
            "lm_eval_acc_norm": b["acc_norm"],
            "items_acc_differ": sum(x != y for x, y in zip(a["correct"], b["correct"])),
            "items_acc_norm_differ": sum(x != y for x, y in zip(a["correct_norm"], b["correct_norm"])),
            "max_abs_loglikelihood_diff": max(diffs),
            "ours_seconds": a["seconds"],
            "lm_eval_example_request": b["example_request"],
        }
    mean = {
        k: sum(r[k] for r in rows.values()) / len(rows)
        for k in ("ours_acc", "lm_eval_acc", "ours_acc_norm", "lm_eval_acc_norm")
    }
    w = theirs["wikitext2"]
    report = {
        "model": args.model,
        "limit": args.limit,
        "tasks": rows,
        "mean": mean,
        "lm_eval_commonsense_seconds": theirs["seconds_commonsense"],
        "ours_commonsense_seconds": sum(r["ours_seconds"] for r in rows.values()),
        "wikitext2": {"ours": mine["wikitext2"], "lm_eval": w},
    }
    print(json.dumps({k: v for k, v in report.items()}, indent=2, default=str))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()

"""lm-evaluation-harness (the ``pat_*`` tasks) vs the project's own scorer (benchmarks/quality/evaluation.py)
on the same items: the first ``--limit`` test records of each commonsense task, one model.

    python -m benchmarks.research.lm_eval_compare --model smollm2-135m --limit 200
    python -m benchmarks.research.lm_eval_compare --limit 40 --wikitext-docs 1 --ppl-windows 8   # the README's run

For each task: accuracy and acc_norm from both, the number of items where they disagree, and the largest
per-candidate log-likelihood difference. Our scorer runs twice where the prompts differ: on its own
prompts (``ours_*``, what ``python -m benchmarks.quality`` reports) and on lm-eval's exact request
strings taken from lm-eval's logged samples (``same_requests_*``), so a difference splits into prompt
format, acc_norm's length (ours counts the candidate's leading space, lm-eval does not:
``same_requests_acc_norm_lm_eval_lengths`` re-scores ours with lm-eval's lengths) and the rest
(tokenisation of the continuation, batching/float noise). WikiText-2: lm-eval's document-level rolling
perplexity (``--ppl-max-length`` tokens per window, first ``--wikitext-docs`` articles), converted to
a token perplexity, next to the scorer's concatenate-and-chunk windows (first ``--ppl-windows``). Writes
``--out`` (default benchmarks/results/lm_eval_compare.json).

A one-off check of the scorer, not maintained as a product (benchmarks/research/README.md). Needs
lm-eval (``pip install -e ".[eval]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ..lm_eval_run import TASKS as TASK_FOLDER

BENCHMARKS = Path(__file__).resolve().parents[1]

TASKS = {
    "ARC-Challenge": "pat_arc_challenge",
    "ARC-Easy": "pat_arc_easy",
    "boolq": "pat_boolq",
    "openbookqa": "pat_openbookqa",
    "piqa": "pat_piqa",
}


def _score(model, tokenizer, items: list) -> dict:
    from ..quality.evaluation import choice_loglikelihoods, task_accuracy

    start = time.perf_counter()
    scores = choice_loglikelihoods(model, tokenizer, items, "text", progress=False)
    result = task_accuracy(items, scores)
    result["seconds"] = time.perf_counter() - start
    result["loglikelihoods"] = [[s for s, _ in item] for item in scores]
    # acc_norm with lm-eval's lengths: the candidate without its leading delimiter space
    lengths = [[len(c.lstrip(" ")) for c in item.text_candidates] for item in items]
    norm = [
        int(max(range(len(sc)), key=lambda k: sc[k][0] / max(n[k], 1)) == item.gold)
        for item, sc, n in zip(items, scores, lengths)
    ]
    result["acc_norm_lm_eval_lengths"] = sum(norm) / len(items)
    result["correct_norm_lm_eval_lengths"] = "".join(map(str, norm))
    return result


def ours(model, tokenizer, data: Path, limit: int, ppl_length: int, ppl_windows: int | None, requests: dict) -> dict:
    """Our scorer on its own prompts and, where lm-eval's request strings differ, on lm-eval's."""
    from dataclasses import replace

    from ..quality.commonsense import load_records, parse_choice
    from ..quality.evaluation import perplexity
    from ..quality.wikitext import perplexity_windows

    out = {}
    for task in TASKS:
        path = data / "commonsense" / task / "test.json"
        items = [parse_choice(r, task, str(path)) for r in load_records(path)[:limit]]
        result = _score(model, tokenizer, items)
        theirs = [
            replace(item, text_context=ctx, text_candidates=tuple(cands))
            for item, (ctx, cands) in zip(items, requests[task])
        ]
        same = all(
            a.text_context == b.text_context and a.text_candidates == b.text_candidates for a, b in zip(items, theirs)
        )
        result["prompts_identical_to_lm_eval"] = same
        result["same_requests"] = dict(result) if same else _score(model, tokenizer, theirs)
        out[task] = result
    windows = perplexity_windows(data / "wikitext-2-raw" / "wiki.test.raw", tokenizer, ppl_length, ppl_windows)
    start = time.perf_counter()
    out["wikitext2"] = perplexity(model, windows, progress=False)
    out["wikitext2"]["seconds"] = time.perf_counter() - start
    return out


def _arg(sample: dict, k: int) -> tuple[str, str]:
    """(context, continuation) of candidate k of one logged lm-eval sample."""
    arg = sample["arguments"][k]
    if isinstance(arg, dict):  # newer lm-eval logs {"arg_0": context, "arg_1": continuation}
        return arg["arg_0"], arg["arg_1"]
    return arg[0], arg[1]


def harness(path: str, data: Path, limit: int, ppl_length: int, batch_size: int, wikitext_docs: int | None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASK_FOLDER), metadata={"data_dir": str(data)})
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
            "requests": [(_arg(s, 0)[0], [_arg(s, k)[1] for k in range(len(s["arguments"]))]) for s in samples],
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

    from transformers import AutoTokenizer

    from ..lm_eval_tasks import pat_tasks

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
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.research.lm_eval_compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("PAT_DATA_DIR", BENCHMARKS.parent.parent / "shared" / "data")),
    )
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--ppl-max-length", type=int, default=512)
    parser.add_argument(
        "--ppl-windows", type=int, default=None, help="our scorer: first N WikiText windows (None: all)"
    )
    parser.add_argument("--wikitext-docs", type=int, default=None, help="lm-eval: first N articles (None: all 62)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results" / "lm_eval_compare.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_pat.offline_models import resolve_model_path

    path = resolve_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    theirs = harness(path, args.data_dir, args.limit, args.ppl_max_length, args.batch_size, args.wikitext_docs)
    requests = {task: theirs[task]["requests"] for task in TASKS}
    mine = ours(model, tokenizer, args.data_dir, args.limit, args.ppl_max_length, args.ppl_windows, requests)

    rows = {}
    for task in TASKS:
        a, b = mine[task], theirs[task]
        same = a["same_requests"]
        diffs = [abs(x - y) for la, lb in zip(same["loglikelihoods"], b["loglikelihoods"]) for x, y in zip(la, lb)]
        rows[task] = {
            "n": a["n"],
            "prompts_identical_to_lm_eval": a["prompts_identical_to_lm_eval"],
            "ours_acc": a["acc"],
            "ours_acc_norm": a["acc_norm"],
            "same_requests_acc": same["acc"],
            "same_requests_acc_norm": same["acc_norm"],
            "same_requests_acc_norm_lm_eval_lengths": same["acc_norm_lm_eval_lengths"],
            "lm_eval_acc": b["acc"],
            "lm_eval_acc_norm": b["acc_norm"],
            "items_acc_differ_same_requests": sum(x != y for x, y in zip(same["correct"], b["correct"])),
            "items_acc_norm_differ_same_requests": sum(x != y for x, y in zip(same["correct_norm"], b["correct_norm"])),
            "items_acc_norm_differ_same_lengths": sum(
                x != y for x, y in zip(same["correct_norm_lm_eval_lengths"], b["correct_norm"])
            ),
            "max_abs_loglikelihood_diff_same_requests": max(diffs),
            "ours_seconds": a["seconds"],
            "lm_eval_example_request": b["example_request"],
        }
    keys = (
        "ours_acc",
        "ours_acc_norm",
        "same_requests_acc",
        "same_requests_acc_norm",
        "lm_eval_acc",
        "lm_eval_acc_norm",
    )
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in keys}
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

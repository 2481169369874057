"""Tables and paired comparisons from the results payload (no model code here).

Headline accuracy is ``acc_norm`` (length-normalised log-likelihood, see :mod:`.evaluation`) under the
first scoring mode. A difference between two methods is called real only when it exceeds twice its
paired standard error (same items for both models).
"""

from __future__ import annotations

import math

from .evaluation import paired_difference

HEADLINE = "acc_norm"


def _ok(runs: list[dict]) -> list[dict]:
    return [r for r in runs if "error" not in r]


def comparisons(runs: list[dict], mode: str) -> list[dict]:
    """PAT against every other pruning method and against dense LoRA, per sparsity."""
    key = f"accuracy_{mode}"
    runs = [r for r in _ok(runs) if key in r]
    out = []
    for pat in (r for r in runs if r["method"] == "pat"):
        others = [r for r in runs if r["method"] != "pat" and r["sparsity"] in (pat["sparsity"], 0.0)]
        for other in others:
            diff = paired_difference(pat[key]["tasks"], other[key]["tasks"], "correct_norm")
            ppl_pat = pat.get("wikitext2", {}).get("perplexity")
            ppl_other = other.get("wikitext2", {}).get("perplexity")
            out.append(
                {
                    "sparsity": pat["sparsity"],
                    "pat_minus": other["method"],
                    "other_sparsity": other["sparsity"],
                    "mean_acc_norm_difference": diff["difference"],
                    "paired_stderr": diff["stderr"],
                    "significant_2se": bool(abs(diff["difference"]) > 2 * diff["stderr"]),
                    "perplexity_ratio_pat_over_other": (ppl_pat / ppl_other) if ppl_pat and ppl_other else None,
                }
            )
    return out


def _fmt_ppl(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:,.1f}" if value < 1e4 else f"{value:.2e}"


def markdown_table(payload: dict) -> str:
    """The results table (headline metric) plus the paired comparisons, as markdown."""
    runs = payload["runs"]
    mode = payload["options"]["scoring"][0]
    key = f"accuracy_{mode}"
    tasks: list[str] = []
    for run in _ok(runs):
        for task in run.get(key, {}).get("tasks", {}):
            if task not in tasks:
                tasks.append(task)
    head = ["method", "sparsity", "width", "params (M)", "WikiText-2 PPL", *tasks, "mean ± se", "train (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        sparsity = "—" if run.get("sparsity") in (None, 0.0) else f"{run['sparsity']:.0%}"
        if "error" in run:
            lines.append(f"| {run['label']} | {sparsity} | {run['error']} |" + " |" * (len(head) - 3))
            continue
        acc = run.get(key, {})
        cells = [f"{100 * acc['tasks'][t][HEADLINE]:.1f}" if t in acc.get("tasks", {}) else "—" for t in tasks]
        mean = acc.get("mean", {})
        mean_cell = f"{100 * mean[HEADLINE]:.1f} ± {100 * mean[HEADLINE + '_stderr']:.1f}" if mean else "—"
        train = run.get("train") or {}
        lines.append(
            "| "
            + " | ".join(
                [
                    run["label"],
                    sparsity,
                    str(run.get("kept_width", "—")),
                    f"{run['parameters'] / 1e6:.1f}",
                    _fmt_ppl(run.get("wikitext2", {}).get("perplexity")),
                    *cells,
                    mean_cell,
                    f"{train['seconds']:.0f}" if "seconds" in train else "—",
                ]
            )
            + " |"
        )
    comps = payload.get("comparisons") or []
    if comps:
        lines += [
            "",
            f"Paired differences, PAT minus other (mean {HEADLINE} over tasks, same items; * = beyond 2 se):",
            "",
            "| sparsity | PAT minus | Δ mean acc (points) | paired se | PPL ratio PAT / other |",
            "|---|---|---|---|---|",
        ]
        for c in comps:
            star = " *" if c["significant_2se"] else ""
            ratio = c["perplexity_ratio_pat_over_other"]
            lines.append(
                f"| {c['sparsity']:.0%} | {c['pat_minus']} | {100 * c['mean_acc_norm_difference']:+.1f}{star} | "
                f"{100 * c['paired_stderr']:.1f} | {ratio:.2f} |"
                if ratio is not None
                else f"| {c['sparsity']:.0%} | {c['pat_minus']} | {100 * c['mean_acc_norm_difference']:+.1f}{star} | "
                f"{100 * c['paired_stderr']:.1f} | — |"
            )
    return "\n".join(lines) + "\n"

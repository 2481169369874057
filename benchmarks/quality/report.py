"""Tables and paired comparisons from the results payload (no model code here).

Headline accuracy is ``acc_norm`` (length-normalised log-likelihood, see :mod:`.evaluation`) under the
first scoring mode. At every sparsity the reference is the **best post-hoc pipeline**: among the
post-hoc methods that ran (prune → LoRA, LoRA → prune, Torch-Pruning → LoRA) the one with the lowest
WikiText-2 perplexity. Every other pruned method (PAT first) is compared with it paired:

* accuracy: per item, a_i - b_i on the same test items; mean over tasks with its paired standard error;
* perplexity: per window, the log-loss difference on the same windows; the PPL ratio
  exp(mean difference) with the paired standard error of the mean difference and the ratio's
  interval exp(mean ± 2 se).

A difference is called real only beyond 2 paired standard errors. Each PAT run is also compared with its
post-hoc twin of the same shape (:data:`.methods.SAME_SHAPE_RIVAL`) and the default PAT with the hidden-only
PAT at the same parameter count. Targets: PAT's PPL at most :data:`SAME_SHAPE_TARGET` x its same-shape
twin's and :data:`PPL_TARGET` x the hidden-only PAT's, with the accuracy difference not negative.
"""

from __future__ import annotations

import math

from .evaluation import paired_difference, paired_log_loss
from .methods import POSTHOC_METHODS as POSTHOC
from .methods import PRUNING_METHODS as PRUNED
from .methods import SAME_SHAPE_RIVAL

HEADLINE = "acc_norm"
PPL_TARGET = 0.75  # PAT / best post-hoc (kept for comparison with earlier runs)
SAME_SHAPE_TARGET = 0.85  # PAT / the post-hoc cut of the same shape


def _ok(runs: list[dict]) -> list[dict]:
    return [r for r in runs if "error" not in r]


def _ppl(run: dict) -> float:
    value = run.get("wikitext2", {}).get("perplexity")
    return value if value is not None and math.isfinite(value) else math.inf


def best_posthoc(runs: list[dict], sparsity: float) -> dict | None:
    """The post-hoc run with the lowest perplexity at ``sparsity`` (None when none ran)."""
    candidates = [r for r in _ok(runs) if r["method"] in POSTHOC and r["sparsity"] == sparsity and "wikitext2" in r]
    return min(candidates, key=_ppl) if candidates else None


def paired_against(run: dict, reference: dict, key: str) -> dict:
    """Accuracy and perplexity of ``run`` against ``reference`` on the same items and windows."""
    row: dict = {}
    if key in run and key in reference:
        diff = paired_difference(run[key]["tasks"], reference[key]["tasks"], "correct_norm")
        row.update(
            mean_acc_norm_difference=diff["difference"],
            paired_stderr=diff["stderr"],
            significant_2se=bool(abs(diff["difference"]) > 2 * diff["stderr"]),
        )
    if "wikitext2" in run and "wikitext2" in reference:
        row.update(paired_log_loss(run["wikitext2"], reference["wikitext2"]))
    return row


def comparisons(runs: list[dict], mode: str) -> list[dict]:
    """Every pruned method against the best post-hoc pipeline at its sparsity, and each PAT run against its
    same-shape twin (``reference`` says which; module docstring)."""
    key = f"accuracy_{mode}"
    out = []
    for sparsity in dict.fromkeys(r["sparsity"] for r in _ok(runs) if r["method"] in PRUNED):
        best = best_posthoc(runs, sparsity)
        at = {r["method"]: r for r in _ok(runs) if r["sparsity"] == sparsity}
        for run in _ok(runs):
            if run["method"] not in PRUNED or run["sparsity"] != sparsity:
                continue
            head = {"sparsity": sparsity, "method": run["method"], "label": run["label"]}
            if best is not None and run is not best:
                out.append({**head, "reference": "best post-hoc", "best_posthoc": best["method"],
                            "best_posthoc_label": best["label"], **paired_against(run, best, key)})  # fmt: skip
            twin, hidden_pat = SAME_SHAPE_RIVAL.get(run["method"]), "pat_hidden" if run["method"] == "pat" else None
            for reference, other in (("same shape", twin), ("hidden-only PAT", hidden_pat)):
                if other in at:
                    paired = paired_against(run, at[other], key)
                    out.append({**head, "reference": reference, "best_posthoc": other,
                                "best_posthoc_label": at[other]["label"], **paired})  # fmt: skip
    return out


def _one_row_per_reference_run(comps: list[dict]) -> list[dict]:
    """The comparisons with a run compared twice to the same reference run (the best post-hoc pipeline *is*
    the same-shape twin) shown once, its reference kinds joined."""
    rows: dict[tuple, dict] = {}
    for c in comps:
        key = (c["sparsity"], c["method"], c["best_posthoc"])
        if key in rows:
            rows[key] = {**rows[key], "reference": f"{rows[key]['reference']} = {c['reference']}"}
        else:
            rows[key] = c
    return list(rows.values())


def pat_targets(comps: list[dict]) -> list[dict]:
    """Per sparsity and reference: PAT's PPL ratio to the best post-hoc pipeline and to its same-shape twin, and
    whether the target is met."""
    out = []
    for c in comps:
        if c["method"] != "pat":
            continue
        ratio = c.get("ppl_ratio", float("nan"))
        acc = c.get("mean_acc_norm_difference", float("nan"))
        target = SAME_SHAPE_TARGET if c["reference"] == "same shape" else PPL_TARGET  # hidden-only PAT: 0.75 too
        out.append(
            {
                "sparsity": c["sparsity"],
                "reference": c["reference"],
                "best_posthoc": c["best_posthoc"],
                "best_posthoc_label": c["best_posthoc_label"],
                "ppl_ratio_pat_over_best_posthoc": ratio,
                "ppl_ratio_2se": c.get("ppl_ratio_2se"),
                "ppl_target": target,
                "ppl_target_met": bool(ratio <= target),
                "mean_acc_norm_difference": acc,
                "paired_stderr": c.get("paired_stderr", float("nan")),
                "accuracy_not_lower": bool(acc >= 0),
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
    head = ["method", "sparsity", "hidden / MLP", "params (M)", "WikiText-2 PPL", *tasks, "mean ± se", "train (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # runs recorded before the MLP axis existed kept the base's MLP width
    base_mlp = payload.get("model", {}).get("intermediate_size", "base")
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
                    f"{run.get('kept_width', '—')} / {run.get('intermediate_size', base_mlp)}",
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
            f"Paired differences against the best post-hoc pipeline at each sparsity (lowest WikiText-2 PPL) and "
            "of each PAT run against the post-hoc cut of its own shape; "
            f"accuracy = mean {HEADLINE} over tasks on the same items, * = beyond 2 paired se; PPL ratio on the "
            "same windows with the interval exp(mean log-loss difference ± 2 se):",
            "",
            "| sparsity | method | against | Δ mean acc (points) | paired se | PPL ratio | ratio ± 2 se |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in _one_row_per_reference_run(comps):
            acc = c.get("mean_acc_norm_difference")
            star = " *" if c.get("significant_2se") else ""
            acc_cell = f"{100 * acc:+.1f}{star}" if acc is not None else "—"
            se_cell = f"{100 * c['paired_stderr']:.1f}" if acc is not None else "—"
            ratio = c.get("ppl_ratio")
            low, high = c.get("ppl_ratio_2se") or (None, None)
            ratio_cell = f"{ratio:.3f}" if ratio is not None else "—"
            band = f"{low:.3f} – {high:.3f}" if low is not None and math.isfinite(low) else "—"
            lines.append(
                f"| {c['sparsity']:.0%} | {c['label']} | {c['reference']}: {c['best_posthoc_label']} | {acc_cell} | "
                f"{se_cell} | "
                f"{ratio_cell} | {band} |"
            )
    targets = payload.get("pat_targets") or []
    if targets:
        lines += ["", "**PPL ratio of PAT** (accuracy not lower):", ""]
        for t in targets:
            verdict = "met" if t["ppl_target_met"] and t["accuracy_not_lower"] else "not met"
            ppl = "met" if t["ppl_target_met"] else "missed"
            parts = f"PPL {ppl}, accuracy {'not lower' if t['accuracy_not_lower'] else 'lower'}"
            lines.append(
                f"* {t['sparsity']:.0%}: PAT / {t['reference']} ({t['best_posthoc_label']}) = "
                f"{t['ppl_ratio_pat_over_best_posthoc']:.3f}; Δ mean acc {100 * t['mean_acc_norm_difference']:+.1f} "
                f"± {100 * t['paired_stderr']:.1f} points; target <= {t['ppl_target']}: {verdict} ({parts})"
            )
    return "\n".join(lines) + "\n"

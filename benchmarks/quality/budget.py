"""PAT against its post-hoc twin as the training budget grows: ``python -m benchmarks.quality.budget``.

Each input is one quality run (``quality.json``) measured with the same options except ``--steps``
(:func:`.merge.check_same_measurement`; ``FILE:OLD=NEW`` renames methods as in :mod:`.merge`). Per step
count and sparsity, every PAT method (``pat``, ``pat_hidden``) is compared paired with the post-hoc cut of
its own shape (:data:`.methods.SAME_SHAPE_RIVAL`) by the report's own comparison
(:func:`.report.paired_against`): the PPL ratio exp(mean per-window log-loss difference) with its interval
exp(mean ± 2 se), and the mean accuracy difference on the same items. The budget scales the whole run (the
schedule is in fractions of it), so a row says whether PAT's lead grows or shrinks with more steps.

    python -m benchmarks.quality.budget benchmarks/results/quality-axes/p25/quality.json \\
        benchmarks/results/quality-budget/s144/quality.json benchmarks/results/quality-budget/s288/quality.json \\
        --output benchmarks/results/quality-budget

Writes ``budget.json`` (the rows), ``budget.md`` (the table) and ``budget.png`` (PPL and ratio vs steps).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..measure import write_json
from .merge import IncompatibleResults, check_same_measurement, load_pieces
from .methods import SAME_SHAPE_RIVAL
from .plotting import STYLE
from .report import HEADLINE, SAME_SHAPE_TARGET, paired_against


def _mean_acc(run: dict, key: str) -> float | None:
    mean = run.get(key, {}).get("mean")
    return mean[HEADLINE] if mean else None


def budget_rows(payloads: list[dict], names: list[str]) -> list[dict]:
    """One row per (steps, sparsity, PAT method) whose same-shape twin ran in the same piece, by steps."""
    if not payloads:
        raise IncompatibleResults("nothing to compare: pass at least one quality.json")
    for payload, name in zip(payloads, names):
        check_same_measurement(payload, name, payloads[0], names[0], ignore=("steps",))
    rows: dict[tuple, dict] = {}
    for payload, name in zip(payloads, names):
        steps, key = payload["options"]["steps"], f"accuracy_{payload['options']['scoring'][0]}"
        at = {(r["method"], r.get("sparsity")): r for r in payload["runs"] if "error" not in r}
        for (method, sparsity), run in at.items():
            twin = at.get((SAME_SHAPE_RIVAL.get(method), sparsity))
            if twin is None:
                continue
            if (steps, sparsity, method) in rows:
                held = rows[steps, sparsity, method]["source"]
                raise IncompatibleResults(
                    f"{run['label']} at sparsity {sparsity} after {steps} steps is in both {held} and {name}; "
                    "pass each budget once"
                )
            rows[steps, sparsity, method] = {
                "steps": steps,
                "sparsity": sparsity,
                "method": method,
                "label": run["label"],
                "rival": twin["method"],
                "rival_label": twin["label"],
                "shape": [run.get("kept_width"), run.get("intermediate_size")],
                "ppl": run["wikitext2"]["perplexity"],
                "rival_ppl": twin["wikitext2"]["perplexity"],
                "acc": _mean_acc(run, key),
                "rival_acc": _mean_acc(twin, key),
                **paired_against(run, twin, key),
                "source": name,
            }
    return [rows[k] for k in sorted(rows, key=lambda k: (k[1], k[2], k[0]))]


def markdown(rows: list[dict]) -> str:
    head = ["parameters removed", "PAT", "steps", "PAT PPL", "same-shape rival PPL", "PPL ratio", "ratio ± 2 se",
            "Δ mean acc ± paired se (points)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        low, high = r.get("ppl_ratio_2se") or (math.nan, math.nan)
        acc = r.get("mean_acc_norm_difference")
        star = " *" if r.get("significant_2se") else ""
        acc_cell = f"{100 * acc:+.1f} ± {100 * r['paired_stderr']:.1f}{star}" if acc is not None else "—"
        lines.append(
            f"| {r['sparsity']:.0%} | {r['label']} | {r['steps']} | {r['ppl']:,.1f} | {r['rival_ppl']:,.1f} | "
            f"{r['ppl_ratio']:.3f} | {low:.3f} – {high:.3f} | {acc_cell} |"
        )
    return "\n".join(lines) + "\n\n(* beyond 2 paired se; ratio < 1: PAT better.)\n"


def plot(rows: list[dict], path: Path) -> Path:
    """Left: WikiText-2 PPL of each PAT method and its twin vs steps; right: the paired PPL ratio (± 2 se)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4.2))
    for sparsity, method in dict.fromkeys((r["sparsity"], r["method"]) for r in rows):
        mine = [r for r in rows if (r["sparsity"], r["method"]) == (sparsity, method)]
        steps = [r["steps"] for r in mine]
        tag = f" ({sparsity:.0%})"
        pair = ((method, mine[0]["label"], [r["ppl"] for r in mine]),
                (mine[0]["rival"], mine[0]["rival_label"], [r["rival_ppl"] for r in mine]))  # fmt: skip
        for name, label, values in pair:
            color, marker, line = STYLE.get(name, ("tab:brown", "x", "-"))
            ax_ppl.plot(steps, values, color=color, marker=marker, linestyle=line, label=label + tag)
        color, marker, line = STYLE.get(method, ("tab:brown", "x", "-"))
        ratio = [r["ppl_ratio"] for r in mine]
        err = [[x - r["ppl_ratio_2se"][0] for x, r in zip(ratio, mine)],
               [r["ppl_ratio_2se"][1] - x for x, r in zip(ratio, mine)]]  # fmt: skip
        ax_ratio.errorbar(steps, ratio, yerr=err, color=color, marker=marker, linestyle=line, capsize=3,
                          label=f"{mine[0]['label']} / {mine[0]['rival_label']}{tag}")  # fmt: skip
    ax_ratio.axhline(1.0, color="0.5", linewidth=1)
    ax_ratio.axhline(SAME_SHAPE_TARGET, color="0.6", linestyle=":", linewidth=1, label=f"target {SAME_SHAPE_TARGET}")
    for ax in (ax_ppl, ax_ratio):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["steps"] for r in rows}), [str(s) for s in sorted({r["steps"] for r in rows})])
        ax.set_xlabel("optimizer steps (same data stream, schedule in fractions of the run)")
        ax.legend(fontsize=7, loc="best")
    ax_ppl.set(ylabel="WikiText-2 perplexity (log)", yscale="log", title="PAT and the post-hoc cut of its shape")
    ax_ratio.set(ylabel="PPL ratio PAT / same-shape rival (paired, ± 2 se)", title="PAT's lead vs budget")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality.budget", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("files", nargs="+", help="quality.json of each budget; FILE:OLD=NEW,... renames methods")
    parser.add_argument("--output", type=Path, required=True, help="folder for budget.json/.md/.png")
    parser.add_argument("--sparsities", type=lambda t: [float(x) for x in t.split(",")], default=None,
                        help="comma list: only these sparsities (default: every one with a pair)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        payloads, names = load_pieces(args.files)
        rows = budget_rows(payloads, names)
    except IncompatibleResults as exc:
        parser.error(str(exc))
    if args.sparsities is not None:
        rows = [r for r in rows if r["sparsity"] in args.sparsities]
    if not rows:
        parser.error("no PAT run has its same-shape rival in the same file (methods pat + prune_then_tune, or "
                     "pat_hidden + prune_hidden_then_tune)")  # fmt: skip
    write_json(args.output / "budget.json", {"sources": names, "rows": rows})
    (args.output / "budget.md").write_text(markdown(rows))
    plot(rows, args.output / "budget.png")
    print((args.output / "budget.md").read_text())
    return rows


if __name__ == "__main__":
    main()

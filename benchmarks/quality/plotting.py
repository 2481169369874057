"""Accuracy and perplexity vs. sparsity, one line per method (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

from .report import HEADLINE

STYLE = {
    "dense": ("black", "s", "--"),
    "lora": ("tab:gray", "D", "--"),
    "pat": ("tab:red", "o", "-"),
    "pat_hidden": ("tab:pink", "o", ":"),
    "prune_then_tune": ("tab:blue", "^", "-"),
    "prune_mlp_then_tune": ("tab:cyan", "^", ":"),
    "prune_hidden_then_tune": ("tab:olive", "^", "--"),
    "tune_then_prune": ("tab:green", "v", "-"),
    "torch_pruning": ("tab:purple", "P", "-"),
    "checkpoint": ("tab:orange", "*", "-"),
}


def plot_results(payload: dict, path: Path) -> Path:
    """Left: mean accuracy (headline metric, ±1 se) vs. sparsity; right: WikiText-2 PPL (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode = payload["options"]["scoring"][0]
    key = f"accuracy_{mode}"
    runs = [r for r in payload["runs"] if "error" not in r]
    fig, (ax_acc, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4.2))
    sparsities = sorted({r["sparsity"] or 0.0 for r in runs})
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["sparsity"] or 0.0)
        color, marker, line = STYLE.get(method, ("tab:brown", "x", "-"))
        label = mine[0]["label"]
        xs = [100 * (r["sparsity"] or 0.0) for r in mine]
        if method in ("dense", "lora") and len(sparsities) > 1:  # references: flat across the sparsity axis
            xs = [100 * min(sparsities), 100 * max(sparsities)]
            mine = [mine[0], mine[0]]
        if key in mine[0]:
            acc = [100 * r[key]["mean"][HEADLINE] for r in mine]
            err = [100 * r[key]["mean"][HEADLINE + "_stderr"] for r in mine]
            ax_acc.errorbar(xs, acc, yerr=err, color=color, marker=marker, linestyle=line, capsize=3, label=label)
        if "wikitext2" in mine[0]:
            ppl = [r["wikitext2"]["perplexity"] for r in mine]
            ax_ppl.plot(xs, ppl, color=color, marker=marker, linestyle=line, label=label)
    chance = next((r[key]["mean"].get("chance") for r in runs if key in r), None)
    if chance is not None:
        ax_acc.axhline(100 * chance, color="0.6", linestyle=":", linewidth=1, label="chance")
        ax_acc.legend(fontsize=8, loc="best")
    tasks = ", ".join(next((list(r[key]["tasks"]) for r in runs if key in r), []))
    ax_acc.set(xlabel="parameters removed (%)", ylabel=f"mean zero-shot {HEADLINE} (%)", title=f"Accuracy ({tasks})")
    ax_acc.title.set_fontsize(9)
    ppl_info = next((r["wikitext2"] for r in runs if "wikitext2" in r), None)
    ppl_title = f"WikiText-2 ({ppl_info['tokens_scored']} tokens, ctx {ppl_info['context']})" if ppl_info else ""
    ax_ppl.set(xlabel="parameters removed (%)", ylabel="perplexity (log)", yscale="log", title=ppl_title)
    ax_ppl.title.set_fontsize(9)
    for ax in (ax_acc, ax_ppl):
        ax.grid(alpha=0.3)
    ax_ppl.legend(fontsize=8, loc="best")
    model = payload.get("model", {}).get("name", "")
    opts = payload["options"]
    fig.suptitle(
        f"{model}: {opts['steps']} steps x batch {opts['batch_size']}, LoRA r={opts['lora_rank']}", fontsize=10
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Combine results of several runs of one protocol into one table: ``python -m benchmarks.quality.merge``.

The default preset takes hours on a CPU, so it is often run in pieces (``--methods`` /
``--sparsities``). Pieces combine only when they measured the same thing: every option except the
ones that choose *which* runs happen (methods, sparsities, output folder, progress bars) must be equal,
and each (method, sparsity) may come from one piece only, unless ``--replace`` says that a later piece
supersedes an earlier one's run (a method re-measured after its defaults changed; the sources record
which runs were replaced and each piece's commit). The combined ``quality.json`` keeps every
run as recorded, lists its sources, and recomputes the paired comparisons, the table and the plot
with the same code as a single run (:class:`benchmarks.quality.runner.Recorder`).

    python -m benchmarks.quality.merge results/a/quality.json results/b/quality.json --output results/all
    python -m benchmarks.quality.merge old.json new-pat.json --replace --output results/all
    python -m benchmarks.quality.merge "old.json:pat=pat_hidden,tune_then_prune=-" new.json --output results/all

``FILE:OLD=NEW,...`` renames methods of that piece before merging (a piece measured when ``pat`` was what
``pat_hidden`` is now); ``OLD=-`` leaves that method's runs out. The sources record the renaming.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .methods import METHODS
from .results import write_results

# Options that select which runs a piece contains (or where it writes), not what a run measures.
SELECTION_OPTIONS = ("methods", "sparsities", "output", "progress")
# Options added after pieces were recorded, with the value those pieces ran with.
LATER_OPTIONS = {"trainer": "trainer"}


class IncompatibleResults(ValueError):
    """The pieces measured different things (or the same run twice); the message names the difference."""


def _run_key(run: dict) -> tuple[str, float | None]:
    return run["method"], run.get("sparsity")


def _run_name(run: dict) -> str:
    """``method@sparsity``, as the sources list a piece's runs."""
    return f"{run['method']}@{run.get('sparsity')}"


def renamed(payload: dict, renames: dict[str, str]) -> dict:
    """``payload`` with its runs' methods renamed (labels too; ``-``: run left out), the renaming recorded."""
    from .methods import LABELS

    unknown = sorted(set(renames.values()) - set(METHODS) - {"-"})
    if unknown:
        raise IncompatibleResults(f"cannot rename to unknown method(s) {unknown}; choose from {list(METHODS)}")
    runs = []
    for run in payload["runs"]:
        new = renames.get(run["method"], run["method"])
        if new != "-":
            runs.append({**run, "method": new, "label": LABELS.get(new, run["label"])})
    return {**payload, "runs": runs, "renamed": renames}


def measured_options(payload: dict, ignore: tuple[str, ...] = ()) -> dict:
    """The options that say what a piece measured: all but :data:`SELECTION_OPTIONS` and ``ignore``, with
    :data:`LATER_OPTIONS` filled in for pieces recorded before those options existed."""
    skip = (*SELECTION_OPTIONS, *ignore)
    return {**LATER_OPTIONS, **{k: v for k, v in payload["options"].items() if k not in skip}}


def check_same_measurement(payload: dict, name: str, first: dict, first_name: str, ignore: tuple[str, ...] = ()):
    """Refuse (:class:`IncompatibleResults`, naming each option) a piece measured otherwise than ``first``."""
    reference, options = measured_options(first, ignore), measured_options(payload, ignore)
    diff = sorted(k for k in reference.keys() | options.keys() if reference.get(k) != options.get(k))
    if diff:
        detail = "; ".join(f"{k}: {reference.get(k)!r} vs {options.get(k)!r}" for k in diff)
        raise IncompatibleResults(
            f"{name} was measured with other options than {first_name} ({detail}); "
            "rerun the piece with the same options"
        )
    if payload.get("model", {}).get("name") != first.get("model", {}).get("name"):
        model, first_model = payload.get("model", {}).get("name"), first.get("model", {}).get("name")
        raise IncompatibleResults(f"{name} measured model {model!r}, {first_name} measured {first_model!r}")


def load_pieces(specs: list[str]) -> tuple[list[dict], list[str]]:
    """``FILE`` or ``FILE:OLD=NEW,OLD2=-`` arguments -> (payloads, as renamed; their file names)."""
    pieces = []
    for spec in specs:
        path, _, mapping = spec.partition(":")
        try:
            renames = dict(pair.split("=", 1) for pair in mapping.split(",")) if mapping else {}
        except ValueError:
            raise IncompatibleResults(f"{spec}: renamings are FILE:OLD=NEW,OLD2=NEW2") from None
        pieces.append((Path(path), renames))
    missing = [str(f) for f, _ in pieces if not f.is_file()]
    if missing:
        raise IncompatibleResults(f"no such results file: {', '.join(missing)}")
    payloads = [renamed(json.loads(f.read_text()), r) if r else json.loads(f.read_text()) for f, r in pieces]
    return payloads, [str(f) for f, _ in pieces]


def merge_payloads(payloads: list[dict], names: list[str], replace: bool = False) -> dict:
    """One payload from several: options checked equal (module docstring), runs concatenated in the
    benchmark's order (sparsity, then method), sources recorded; comparisons are left to the writer.
    ``replace``: a run held by two pieces is taken from the later one (else refused)."""
    if not payloads:
        raise IncompatibleResults("nothing to merge: pass at least one quality.json")
    first, first_name = payloads[0], names[0]
    runs: dict[tuple, tuple[str, dict]] = {}  # run key -> (piece that holds it, run)
    replaced: dict[str, list[str]] = {name: [] for name in names}
    for payload, name in zip(payloads, names):
        check_same_measurement(payload, name, first, first_name)
        for run in payload["runs"]:
            key = _run_key(run)
            if key in runs:
                holder = runs[key][0]
                if not replace:
                    raise IncompatibleResults(
                        f"{run['label']} at sparsity {run.get('sparsity')} is in both {holder} and {name}; "
                        "keep it in one piece only, or pass --replace to take the later piece's"
                    )
                replaced[holder].append(_run_name(run))
            runs[key] = (name, run)
    order = {m: i for i, m in enumerate(METHODS)}
    runs = sorted(
        (run for _, run in runs.values()),
        key=lambda r: (r.get("sparsity") or 0.0, order.get(r["method"], len(order))),
    )
    options = dict(first["options"])
    options["methods"] = [m for m in METHODS if any(r["method"] == m for r in runs)]
    options["sparsities"] = sorted({s for p in payloads for s in p["options"]["sparsities"]})
    kept, model = {}, {}
    for payload in payloads:  # a later piece may record more about the same model (e.g. its MLP width)
        kept.update(payload.get("model", {}).get("kept_width", {}))
        model.update({k: v for k, v in payload.get("model", {}).items() if k not in model})
    return {
        "options": options,
        "hardware": first.get("hardware"),
        "model": {**model, "kept_width": kept},
        "data": first.get("data"),
        "sources": [
            {
                "file": name,
                "runs": [_run_name(r) for r in p["runs"]],
                **({"replaced_by_later_piece": replaced[name]} if replaced[name] else {}),
                "wall_seconds": p.get("wall_seconds"),
                "finished": p.get("finished"),
                "hardware": p.get("hardware"),
                **({"renamed": p["renamed"]} if p.get("renamed") else {}),
            }
            for p, name in zip(payloads, names)
        ],
        "wall_seconds": sum(p.get("wall_seconds") or 0.0 for p in payloads),
        "finished": all(p.get("finished") for p in payloads),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality.merge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "files", nargs="+",
        help="quality.json files of runs with the same options; FILE:OLD=NEW,... renames methods of that piece",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, required=True, help="folder for the combined quality.json/.md/.png")
    parser.add_argument(
        "--replace", action="store_true",
        help="a run held by two pieces is taken from the later one (e.g. a method re-measured after a default changed)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        payloads, names = load_pieces(args.files)
        merged = merge_payloads(payloads, names, replace=args.replace)
    except IncompatibleResults as exc:
        parser.error(str(exc))
    write_results(merged, args.output)
    print((args.output / "quality.md").read_text())
    return merged


if __name__ == "__main__":
    main()

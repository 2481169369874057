"""The results files of a payload: ``quality.json`` (with the paired comparisons), ``quality.md``, ``quality.png``.

One writer for a live run (:class:`.runner.Recorder`, after every finished run) and for combined
pieces (:mod:`.merge`), so both give the same comparisons and the same table.
"""

from __future__ import annotations

from pathlib import Path

from ..measure import write_json
from .plotting import plot_results
from .report import comparisons, markdown_table, pat_targets


def write_results(payload: dict, out: Path) -> None:
    """Recompute ``comparisons`` and ``pat_targets`` in ``payload`` and write the three files to ``out``."""
    out = Path(out)
    payload["comparisons"] = comparisons(payload["runs"], payload["options"]["scoring"][0])
    payload["pat_targets"] = pat_targets(payload["comparisons"])
    write_json(out / "quality.json", payload)
    (out / "quality.md").write_text(markdown_table(payload))
    if any("error" not in r for r in payload["runs"]):
        plot_results(payload, out / "quality.png")

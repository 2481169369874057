"""Measurement helpers shared by the scripts in benchmarks/ (timing, peak memory, tables, JSON).

Rules every speed number in these benchmarks follows:

* configurations are measured **alternately in one process** (round-robin, the order rotated every
  round so no configuration always runs first or last), so a slow phase of a shared machine hits
  all of them alike;
* the first ``warmup`` rounds are run and discarded (allocator, kernel selection, lazy init);
* the reported time is the **median** of the remaining rounds; ratios are ratios of medians.

Peak memory is the process peak resident set size (``ru_maxrss``) of a fresh subprocess per
configuration, so one configuration's allocations never hide in another's peak.
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels so wall-clock time covers the work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    configurations: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Seconds per call of each configuration, measured round-robin (see module docstring)."""
    names = list(configurations)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            configurations[name]()
            synchronize(device)
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def proc_status_mib(field: str) -> float:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...), MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current VmRSS, so ``proc_status_mib("VmHWM")`` reads the peak of what follows
    (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


class PeakMemory:
    """``with PeakMemory() as usage: work()``: this process's resident memory before the block
    (``before_mib``, after a ``gc.collect()``), its peak during the block (``peak_mib``, VmHWM reset on
    entry), ``extra_mib`` = peak - before, and the block's wall time (``seconds``). Linux only."""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self.before_mib = proc_status_mib("VmRSS")
        reset_peak_rss()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
        self.peak_mib = proc_status_mib("VmHWM")
        self.extra_mib = self.peak_mib - self.before_mib


REPO = Path(__file__).resolve().parent.parent


def run_json_subprocess(args: list[str], timeout: float | None = None) -> dict:
    """Run ``python args...`` in a fresh process from the repository root (so ``-m benchmarks.<name>``
    imports); its last stdout line must be one JSON object."""
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ}
    )
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    return json.loads(lines[-1])


def machine_info(device: torch.device | str = "cpu") -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "device": str(device),
    }
    for distribution in ("transformers", "peft", "torch-pruning"):  # installed versions (a module's
        try:  # __version__ can lag: torch-pruning 1.6.1 says 1.6.0)
            info[distribution.replace("-", "_")] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            pass
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    info["code"] = _code_version()
    return info


def _code_version() -> str | None:
    """The commit the numbers were measured on (``+dirty`` with uncommitted changes); None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True)  # fmt: skip
    except OSError:
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Fixed-width text table; ``columns`` are (key, header) pairs, values are pre-formatted or numbers."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "" if value is None else str(value)

    body = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in body)
    return "\n".join(lines)

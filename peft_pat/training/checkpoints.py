"""Trainer checkpoints a kill cannot spoil: each complete ``checkpoint-N`` carries a marker written last,
and an incomplete one is moved aside before the Trainer looks for the newest.

The Trainer writes ``checkpoint-N`` in place (model, optimizer, scheduler, RNG, ``trainer_state.json``, in
that order) and ``resume_from_checkpoint=True`` takes the highest N, so a SIGKILL during a save leaves a
half-written folder that the resumed run picks and crashes on (or resumes from a torn adapter file).
:class:`~peft_pat.training.callback.PATCallback` calls :func:`mark_complete` from ``on_save`` (after the Trainer
wrote everything) and :func:`set_aside_incomplete` from ``on_init_end`` (when ``Trainer(...)`` is built,
before ``train()`` resolves ``resume_from_checkpoint=True``). A folder without the marker counts as
complete when its content is (checkpoints written without PATCallback, or by an older peft-pat): a
``trainer_state.json`` that parses, and adapter weights whose safetensors header and length agree.
Nothing is deleted: an incomplete folder is renamed ``.checkpoint-N.incomplete-<time>``, which the
Trainer's checkpoint pattern does not match.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
import warnings
from pathlib import Path

MARKER = "pat_checkpoint_complete.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def mark_complete(folder: str | os.PathLike) -> None:
    """Write the marker of a complete checkpoint: the size of every file in it, then fsync; atomic (a
    temporary file renamed into place), so a kill leaves either no marker or a whole one."""
    folder = Path(folder)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}
    for name in files:  # the Trainer does not fsync: make what the marker vouches for durable first
        with open(folder / name, "rb") as handle:
            os.fsync(handle.fileno())
    tmp = folder / f".{MARKER}.tmp"
    with open(tmp, "w") as handle:
        json.dump({"files": files}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / MARKER)
    _fsync_directory(folder)


def _safetensors_whole(path: Path) -> bool:
    """The header parses and the file is as long as the header says."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return size >= 8 + length + end
    except (OSError, struct.error, ValueError, KeyError, TypeError):
        return False


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether ``checkpoint-N`` can be resumed from: its marker vouches for every file's size, or (no marker)
    its trainer state parses and its weights are whole."""
    folder = Path(folder)
    marker = folder / MARKER
    if marker.is_file():
        try:
            files = json.loads(marker.read_text())["files"]
            return all(
                (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items()
            )
        except (OSError, ValueError, KeyError, TypeError):
            return False
    try:
        json.loads((folder / TRAINER_STATE).read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    weights = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    return bool(weights) and all(_safetensors_whole(w) for w in weights)


def set_aside_incomplete(output_dir: str | os.PathLike) -> list[Path]:
    """Rename every incomplete ``checkpoint-N`` in ``output_dir`` to ``.checkpoint-N.incomplete-<time>``, with a
    warning that names them; returns the new paths. The main process only (the caller decides)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    moved = []
    for folder in sorted(output_dir.iterdir()):
        if folder.is_dir() and CHECKPOINT.match(folder.name) and not is_complete(folder):
            target = folder.with_name(f".{folder.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            os.replace(folder, target)
            moved.append(target)
    if moved:
        _fsync_directory(output_dir)
        warnings.warn(
            f"PATCallback: {len(moved)} checkpoint folder(s) in {output_dir} were incomplete (a run killed while "
            f"saving?) and were moved aside so that resume_from_checkpoint=True takes the newest complete one: "
            f"{[p.name for p in moved]}. Nothing was deleted; remove them once you do not need them.",
            RuntimeWarning,
            stacklevel=3,
        )
    return moved

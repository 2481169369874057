"""Trainer checkpoints that a kill cannot turn into a bad resume.

transformers writes ``checkpoint-N`` in place (weights, optimizer, scheduler, RNG state, then
``trainer_state.json``) and ``train(resume_from_checkpoint=True)`` takes the folder with the highest N,
whatever it holds. A process killed during a save leaves a half-written newest folder, and the resume
then crashes on it or continues from a mix. :class:`~peft_pat.PATCallback` closes that gap
with the functions here:

- after every save (``on_save``, which fires once the Trainer has written and rotated everything) it
  flushes the folder's files to disk and writes :data:`MARKER`, a manifest of every file and its size,
  as the last step (:func:`mark_complete`);
- when the Trainer is built (``on_init_end``, before ``train()`` looks for the last checkpoint) it moves
  every incomplete ``checkpoint-N`` of ``output_dir`` aside to ``.checkpoint-N.incomplete-<id>``
  (:func:`set_aside_incomplete`; one rename each, nothing is deleted).

The completeness rule (:func:`checkpoint_problem`): a folder with a marker is complete when the marker
names its step and every file it lists is there with the listed size. A folder without one (written
without PATCallback, or killed after the Trainer's last write and before the marker) is judged by its
contents: ``trainer_state.json`` parses and names step N (the Trainer writes it last), a weights file is
there, every ``.json`` parses, every ``.safetensors`` file is as long as its header says, and every
torch zip file (``.pt``, ``.pth``, ``.bin``) has its end-of-archive directory. A kill truncates the file
being written, which each of these checks catches.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import uuid
import warnings
import zipfile
from pathlib import Path

MARKER = "pat_checkpoint_complete.json"
MARKER_FORMAT = 1
LOCK_NAME = ".pat-training.lock"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR pattern
TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_ZIP_MAGIC = b"PK\x03\x04"


def _fsync_path(path: Path) -> None:
    """Flush one file or folder to the disk (folders: their entries; not supported everywhere)."""
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. folders on some network file systems
    finally:
        os.close(fd)


@contextlib.contextmanager
def _keeping_mtime(folder: Path):
    """Restore ``folder``'s modification time after changing its entries: transformers' rotation
    (``save_total_limit``) orders checkpoints by it, so PAT's marker must not reorder them."""
    before = folder.stat()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))


def _files(folder: Path) -> dict[str, int]:
    """Every regular file under ``folder`` (relative POSIX path -> size), the marker and temporary files excluded."""
    found: dict[str, int] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name != MARKER and not path.name.startswith(f".{MARKER}"):
            found[path.relative_to(folder).as_posix()] = path.stat().st_size
    return found


def mark_complete(folder: str | os.PathLike) -> Path:
    """Flush every file of a finished checkpoint to disk, then write its completion marker; returns the marker.

    The marker lists each file with its size and is itself written to a temporary name, flushed and
    renamed, so it is either absent or whole.
    """
    folder = Path(folder)
    files = _files(folder)
    for relative in files:
        _fsync_path(folder / relative)
    for sub in sorted({p for relative in files for p in (folder / relative).parents if folder in p.parents}):
        _fsync_path(sub)
    _fsync_path(folder)  # the files' entries are on disk before the marker's
    step = CHECKPOINT_NAME.match(folder.name)
    manifest = {"format": MARKER_FORMAT, "step": int(step[1]) if step else None, "files": files}
    tmp = folder / f".{MARKER}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    marker = folder / MARKER
    with _keeping_mtime(folder):
        with open(tmp, "w") as handle:
            json.dump(manifest, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, marker)
    _fsync_path(folder)
    return marker


def drop_marker(folder: str | os.PathLike) -> bool:
    """Remove the completion marker of ``folder`` (PAT's own file; nothing else is touched); True if there was one.

    For a checkpoint the Trainer is about to write over in place: until the new save is complete, the
    folder is judged by its contents.
    """
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return False
    with _keeping_mtime(Path(folder)):
        marker.unlink(missing_ok=True)
    _fsync_path(Path(folder))
    return True


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                return f"{path.name} is cut short (header of {header_len} bytes in a {size}-byte file)"
            header = json.loads(handle.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        return f"{path.name} has no readable safetensors header ({exc.__class__.__name__})"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"{path.name} holds {size} bytes, its header describes {expected}"
    return None


def _torch_zip_problem(path: Path) -> str | None:
    with open(path, "rb") as handle:
        if handle.read(4) != _ZIP_MAGIC:
            return None  # not a torch zip archive (legacy format or another writer): not checked
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return f"{path.name} is not a whole torch archive ({exc})"
    return None


def _content_problem(folder: Path, step: int) -> str | None:
    """Why a checkpoint without a marker is not complete by its contents; None when it is."""
    state_file = folder / TRAINER_STATE
    if not state_file.is_file():
        return f"it has no {TRAINER_STATE} (the Trainer writes it last)"
    try:
        state = json.loads(state_file.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"its {TRAINER_STATE} does not parse"
    if not isinstance(state, dict) or state.get("global_step", step) != step:
        return f"its {TRAINER_STATE} names step {state.get('global_step') if isinstance(state, dict) else '?'}"
    weights = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    weights += [sub.name for sub in folder.iterdir() if sub.is_dir() and (sub / WEIGHT_FILES[0]).is_file()]
    if not weights:
        return f"it holds no weights file ({', '.join(WEIGHT_FILES[:2])}, ...)"
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        problem = None
        if path.suffix == ".json":
            try:
                json.loads(path.read_bytes())
            except (ValueError, UnicodeDecodeError):
                problem = f"{path.name} does not parse"
        elif path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            problem = _torch_zip_problem(path)
        if problem:
            return problem
    return None


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` (a ``checkpoint-N``) is not a complete checkpoint, or None when it is.

    The rule is stated in the module docstring: the marker's manifest where there is one, else the contents."""
    folder = Path(folder)
    match = CHECKPOINT_NAME.match(folder.name)
    step = int(match[1]) if match else None
    marker = folder / MARKER
    if not marker.is_file():
        return _content_problem(folder, step)
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
        marked_step = manifest["step"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        return f"its {MARKER} does not parse"
    if marked_step != step:
        return f"its {MARKER} was written for step {marked_step}"
    for relative, size in files.items():
        path = folder / relative
        if not path.is_file():
            return f"{relative} is missing (listed in {MARKER})"
        if path.stat().st_size != size:
            return f"{relative} holds {path.stat().st_size} bytes, {size} when the checkpoint was completed"
    return None


def incomplete_checkpoints(output_dir: str | os.PathLike) -> dict[Path, str]:
    """Every ``checkpoint-N`` folder of ``output_dir`` that is not complete, with the reason."""
    root = Path(output_dir)
    if not root.is_dir():
        return {}
    found = {}
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        if CHECKPOINT_NAME.match(folder.name) and folder.is_dir() and not folder.is_symlink():
            problem = checkpoint_problem(folder)
            if problem is not None:
                found[folder] = problem
    return found


def set_aside_incomplete(output_dir: str | os.PathLike) -> dict[Path, Path]:
    """Rename every incomplete ``checkpoint-N`` of ``output_dir`` to ``.checkpoint-N.incomplete-<id>``, with a warning.

    Returns {old path: new path}. Nothing is deleted; the new names match neither transformers'
    ``get_last_checkpoint`` nor its rotation (``save_total_limit``), so a resume takes the newest complete
    checkpoint and rotation counts only complete ones. Each folder moves in one rename: a kill leaves it
    either where it was (moved on the next start) or aside.
    """
    moved: dict[Path, Path] = {}
    problems = incomplete_checkpoints(output_dir)
    for folder, _problem in problems.items():
        target = folder.with_name(f".{folder.name}.incomplete-{uuid.uuid4().hex[:8]}")
        os.rename(folder, target)
        moved[folder] = target
    if moved:
        _fsync_path(Path(output_dir))
        lines = "; ".join(f"{old.name} -> {new.name} ({problems[old]})" for old, new in moved.items())
        warnings.warn(
            f"PAT: {len(moved)} incomplete checkpoint folder(s) in {output_dir} (a run killed while saving?) were "
            f"moved aside so that resume_from_checkpoint=True takes the newest complete one: {lines}. Nothing was "
            "deleted; remove the moved folders yourself once the resumed run is fine.",
            RuntimeWarning,
            stacklevel=3,
        )
    return moved


# ------------------------------------------------------------------ one training process per output_dir
_held_locks: dict[str, list[int]] = {}  # realpath of output_dir -> [file descriptor, holders in this process]


def acquire_output_lock(output_dir: str | os.PathLike) -> bool:
    """Take the exclusive lock of ``output_dir`` for this process; False if another process holds it.

    A run holds it while it trains, so a second Trainer on the same folder (an evaluation script, a
    duplicated job) never moves aside the checkpoint a live run is writing. The operating system drops it
    when the holding process dies, SIGKILL included. Within one process it is counted: each successful
    call needs one :func:`release_output_lock`. Where ``fcntl`` is missing (Windows) every call succeeds.
    """
    try:
        import fcntl
    except ImportError:
        return True
    key = os.path.realpath(output_dir)
    if key in _held_locks:
        _held_locks[key][1] += 1
        return True
    Path(key).mkdir(parents=True, exist_ok=True)
    fd = os.open(os.path.join(key, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _held_locks[key] = [fd, 1]
    return True


def release_output_lock(output_dir: str | os.PathLike) -> None:
    """Undo one :func:`acquire_output_lock` of this process; the last one frees the lock (the empty file stays)."""
    key = os.path.realpath(output_dir)
    entry = _held_locks.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _held_locks[key]
        with contextlib.suppress(OSError):
            os.close(entry[0])  # closing the last descriptor releases the flock

"""Writes that cannot leave a half-written output: build in a temporary sibling folder, then rename.

:func:`atomic_directory` is the primitive (also used by the CLI and the SmolLM2 cache). :func:`save_pruned`
saves a pruned model with it, and :func:`make_save_pretrained_atomic` routes the ``save_pretrained`` of
the model that ``merge_and_prune`` returns through it, so the only copy a user ships is never half
written: an exception or Ctrl-C mid-way leaves the previous folder (or nothing) and no temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import types
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import CheckpointError, PATTypeError

# Weight files (and their shard indexes) a new save replaces; stale ones are not carried over.
WEIGHT_FILE = re.compile(r"^(model|pytorch_model)([.-].*)?\.(safetensors|bin)(\.index\.json)?$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover_killed_write(target: Path) -> None:
    """Clean up after an :func:`atomic_directory` write whose process was killed (SIGKILL skips every
    ``finally``): its temporary folder is removed, and a previous output it had moved aside for the final
    rename is put back if the new one never arrived. Only leftovers of processes no longer alive are touched."""
    if not target.parent.is_dir():
        return
    leftovers = re.compile(rf"^\.{re.escape(target.name)}\.(partial|old)-(\d+)-")
    found = []
    for entry in target.parent.iterdir():
        match = leftovers.match(entry.name)
        if match and not _process_alive(int(match[2])):
            found.append((match[1], entry))
    for kind, entry in sorted(found, key=lambda item: item[0] != "old"):  # put an old output back first
        if kind == "old" and not target.exists():
            os.replace(entry, target)
            warnings.warn(f"{target}: restored the previous output that a killed write had moved aside.", stacklevel=4)
        elif entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` in one rename.

    On any exception (or Ctrl-C) the temporary folder is removed and ``path`` is left as it was:
    the previous output, or nothing. After a SIGKILL, the next write to ``path`` cleans up what the killed
    process left (:func:`_recover_killed_write`).
    """
    target = Path(path)
    _recover_killed_write(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; choose another folder or pass overwrite=True (--overwrite).")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; give the final folder the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def check_output_apart(out: str | os.PathLike, inputs: dict[str, str | os.PathLike]) -> None:
    """Refuse an output folder that is, lies inside or contains one of ``inputs`` (symlinks resolved).

    Replacing ``out`` (``overwrite``) removes everything under it, and writing inside an input changes it:
    either would destroy what the command reads."""
    target = Path(out).resolve()
    for what, folder in inputs.items():
        source = Path(folder).resolve()
        if target == source or source in target.parents:
            raise CheckpointError(f"OUT ({out}) must not be {what} ({folder}) or lie inside it; choose another folder.")
        if target in source.parents:
            raise CheckpointError(
                f"OUT ({out}) contains {what} ({folder}): writing OUT (with --overwrite, replacing it) would delete "
                f"{what}. Choose an output folder outside {what}'s folder."
            )


def _link_or_copy(source: str, destination: str) -> None:
    """Hard link (instant, no extra space: the folders are siblings) or copy where links are not possible."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _carry_over(old: Path, new: Path) -> None:
    """Copy into ``new`` what ``old`` holds and the new save did not write (tokenizer, README, ...),
    except stale weight files: the same files transformers' ``save_pretrained`` would leave in place."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        destination = new / entry.name
        if destination.exists() or destination.is_symlink() or WEIGHT_FILE.match(entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), destination)
        elif entry.is_dir():
            shutil.copytree(entry, destination, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(destination))


def save_pruned(
    model: Any, path: str | os.PathLike, overwrite: bool = False, tokenizer: Any = None, **kwargs: Any
) -> Path:
    """Save a pruned (or any transformers) model to ``path`` atomically; returns ``path``.

    The model (and ``tokenizer``, if given) is written to a temporary sibling folder that replaces
    ``path`` in one rename at the end; ``kwargs`` go to the model's ``save_pretrained``. If ``path``
    exists, ``overwrite=False`` raises ``FileExistsError``; ``overwrite=True`` replaces the model's
    files and keeps the other files in the folder (a tokenizer saved earlier, a README), as
    transformers does, minus stale weight shards.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    save = getattr(type(model), "save_pretrained", None)
    if save is None or isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise PATTypeError(
            f"save_pruned saves the transformers model returned by merge_and_prune(); this {type(model).__name__} "
            "still holds adapter layers (or is no transformers model). Call merge_and_prune() and save what it "
            "returns, or save the adapter itself with peft_model.save_pretrained(folder)."
        )
    target = Path(path)
    if not kwargs.get("is_main_process", True):
        return target  # other ranks write nothing (transformers' contract); never replace the folder with nothing
    if kwargs.get("push_to_hub"):
        kwargs.setdefault("repo_id", target.name)  # not the temporary folder's name
    with atomic_directory(target, overwrite=overwrite) as tmp:
        save(model, str(tmp), **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if overwrite:
            _carry_over(target, tmp)
    return target


def _atomic_save_pretrained(self: Any, save_directory: str | os.PathLike, overwrite: bool = True, **kwargs: Any):
    """transformers' ``save_pretrained``, made atomic with :func:`save_pruned` (see its docstring)."""
    return save_pruned(self, save_directory, overwrite=overwrite, **kwargs)


def make_save_pretrained_atomic(model: Any) -> Any:
    """Route ``model.save_pretrained`` through :func:`save_pruned`; returns ``model``.

    An instance attribute: the class stays the stock transformers class, so the saved folder loads
    with ``AutoModelForCausalLM.from_pretrained`` and no custom code. Like transformers it writes into
    an existing folder by default (``overwrite=True``, other files kept); pass ``overwrite=False`` to
    refuse an existing folder instead.
    """
    model.save_pretrained = types.MethodType(_atomic_save_pretrained, model)
    return model

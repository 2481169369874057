"""peft_pat.training.checkpoints: which checkpoint folders a resume may take, decided without training."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

from peft_pat.training.checkpoints import MARKER, is_complete, mark_complete, set_aside_incomplete


def _checkpoint(folder, state=True, torn=False):
    import torch

    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(64)}, folder / "adapter_model.safetensors")
    if torn:
        path = folder / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:-40])
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    return folder


def test_legacy_checkpoints_are_judged_by_their_content(tmp_path):
    assert is_complete(_checkpoint(tmp_path / "ok"))  # written without PATCallback: whole by content
    assert not is_complete(_checkpoint(tmp_path / "torn", torn=True))
    assert not is_complete(_checkpoint(tmp_path / "nostate", state=False))


def test_the_marker_vouches_for_every_file_size(tmp_path):
    folder = _checkpoint(tmp_path / "checkpoint-3")
    mark_complete(folder)
    assert is_complete(folder) and (folder / MARKER).is_file()
    (folder / "trainer_state.json").write_text("{}")  # changed after the marker: not the checkpoint it vouched for
    assert not is_complete(folder)


def test_incomplete_checkpoints_are_renamed_never_deleted(tmp_path):
    good = _checkpoint(tmp_path / "checkpoint-3")
    _checkpoint(tmp_path / "checkpoint-6", torn=True)
    (tmp_path / "other").mkdir()  # not a checkpoint: untouched
    with pytest.warns(RuntimeWarning, match="moved aside"):
        moved = set_aside_incomplete(tmp_path)
    assert [p.name.split(".incomplete")[0] for p in moved] == [".checkpoint-6"]
    assert moved[0].is_dir() and (moved[0] / "adapter_model.safetensors").is_file()
    assert good.is_dir() and (tmp_path / "other").is_dir() and not (tmp_path / "checkpoint-6").exists()
    assert set_aside_incomplete(tmp_path / "missing") == []

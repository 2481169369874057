"""A Trainer run with PATCallback killed (SIGKILL) at several moments, inside a checkpoint save included,
then resumed with ``resume_from_checkpoint=True``: the final adapter and merged model are bit-identical to an
uninterrupted run's. Without PATCallback's checkpoint marker the resume picks the torn checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "fault_train.py"
pytestmark = pytest.mark.slow


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), str(out), *extra], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def _assert_same(got: Path, expected: Path) -> None:
    for name in ("final/adapter_model.safetensors", "merged.safetensors"):
        a, b = load_file(got / name), load_file(expected / name)
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    done = _run(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize(
    "kill",
    ["step:4", "save:6", "state:9", "step:10"],
    ids=["before-the-freeze", "inside-a-save-torn-adapter", "inside-a-save-no-trainer-state", "after-the-freeze"],
)
def test_killed_run_resumes_bit_identically(kill, tmp_path, uninterrupted):
    killed = _run(tmp_path, "--kill", kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _run(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same(tmp_path, uninterrupted)
    if kill.startswith(("save", "state")):  # the torn checkpoint was moved aside, with a warning, not deleted
        step = kill.split(":")[1]
        aside = [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(f".checkpoint-{step}.incomplete")]
        assert len(aside) == 1 and "moved aside" in resumed.stderr


def test_resume_after_target_sparsity_was_edited_is_refused(tmp_path, uninterrupted):
    """The config and the saved adapter would say one width while the restored mask keeps another."""
    from fault_train import PAT_SETTINGS
    from transformers import Trainer, TrainingArguments

    from peft_pat import PATCallback, PATConfigError

    from helpers import TokenDataset, wrap
    from tiny_models import tiny_model

    model = wrap(tiny_model("llama"), **{**PAT_SETTINGS, "target_sparsity": 0.5})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, save_strategy="steps", save_steps=3,
        report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[PATCallback()])
    with pytest.raises(PATConfigError, match=r"keeps \[48\] of 64 units, but this adapter's config asks for 32"):
        trainer.train(resume_from_checkpoint=str(uninterrupted / "run" / "checkpoint-9"))

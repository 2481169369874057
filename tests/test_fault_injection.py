"""A Trainer run SIGKILLed at chosen moments, resumed each time with ``resume_from_checkpoint=True``, ends
bit-exactly where an uninterrupted run ends: same adapter tensors, same ``merge_and_prune()`` weights.

One output folder lives through six processes (tests/fault_train.py: 12 steps, mask freeze at step 7,
checkpoints every 3 steps, ``save_total_limit=2``), each killed with SIGKILL from inside itself:

1. after step 5 (soft mask, between saves): the next start resumes from checkpoint-3;
2. inside the save of checkpoint-6, with ``optimizer.pt`` half written: moved aside, resume from 3;
3. after step 8 (hard mask, between saves): resume from the new checkpoint-6;
4. inside the save of checkpoint-9, with ``adapter_model.safetensors`` half written: moved aside, resume from 6;
5. in the rotation after checkpoint-9, half way through deleting checkpoint-3 (checkpoint-9 is whole but
   has no completion marker yet; checkpoint-3 has lost files but kept its marker): 3 is moved aside, resume
   from 9, judged complete by its contents;
6. inside the final save, checkpoint-12, with ``trainer_state.json`` half written: moved aside, resume from 9.

Before the last start the completion markers are removed, as in checkpoints written before PATCallback
wrote them: the resume still takes checkpoint-9, by content. Without the move-aside, stage 2's resume
takes the half-written checkpoint-6 (no trainer state: it restarts at step 0 from trained weights) and
the run ends elsewhere.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_pat.training.checkpoints import MARKER

SCRIPT = Path(__file__).resolve().parent / "fault_train.py"
TIMEOUT = 300

pytestmark = pytest.mark.slow

STAGES = [  # (fault, checkpoint the start resumes from, folders moved aside at that start)
    ("step:5", 0, []),
    ("save:6:optimizer.pt", 3, []),
    ("step:8", 3, ["checkpoint-6"]),
    ("save:9:adapter_model.safetensors", 6, []),
    ("rotate:9", 6, ["checkpoint-9"]),
    ("save:12:trainer_state.json", 9, ["checkpoint-3"]),
    (None, 9, ["checkpoint-12"]),
]


def start(output_dir: Path, result: Path, kill: str | None) -> subprocess.Popen:
    root = str(SCRIPT.parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    command = [sys.executable, str(SCRIPT), str(output_dir), str(result)] + (["--kill", kill] if kill else [])
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    return process.returncode, stdout, stderr


def moved_aside(output_dir: Path) -> set[str]:
    """The checkpoint names of the folders set aside as incomplete."""
    return {p.name[1:].split(".incomplete-")[0] for p in output_dir.iterdir() if ".incomplete-" in p.name}


def test_killed_at_any_moment_and_resumed_run_is_bit_exact(tmp_path):
    reference = start(tmp_path / "uninterrupted", tmp_path / "uninterrupted.pt", None)
    output_dir = tmp_path / "run"
    aside: set[str] = set()
    for stage, (kill, resumes_from, newly_aside) in enumerate(STAGES, 1):
        if kill is None:  # checkpoints from before the completion marker: judged by their contents
            for marker in output_dir.glob(f"checkpoint-*/{MARKER}"):
                folder = marker.parent.stat()
                marker.unlink()
                os.utime(marker.parent, ns=(folder.st_atime_ns, folder.st_mtime_ns))  # rotation orders by mtime
        code, stdout, stderr = finish(start(output_dir, tmp_path / "resumed.pt", kill))
        where = f"stage {stage} ({kill or 'to the end'}):\n{stdout[-2000:]}\n{stderr[-4000:]}"
        assert f"START step={resumes_from}\n" in stdout, where
        aside |= set(newly_aside)
        assert moved_aside(output_dir) == aside, where
        if kill is None:
            assert code == 0, where
        else:
            assert code == -9 and "FAULT killed" in stdout, where
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-9"]

    code, stdout, stderr = finish(reference)
    assert code == 0, f"uninterrupted run failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    expected = torch.load(tmp_path / "uninterrupted.pt")
    resumed = torch.load(tmp_path / "resumed.pt")
    for part in ("adapter", "merged"):
        assert resumed[part].keys() == expected[part].keys()
        different = [k for k in expected[part] if not torch.equal(resumed[part][k], expected[part][k])]
        assert not different, f"{part}: the resumed run differs from the uninterrupted one in {different}"

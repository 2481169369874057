"""PAT under DDP: ``accelerate launch`` with 2 CPU processes (gloo) against one process, same global batch.

accelerate's ``--cpu`` launcher starts a single process unless MPI is installed, so the test uses the
torchrun-based launcher (``--multi_gpu``) and ``TrainingArguments(use_cpu=True)`` in the script, which
makes accelerate pick DDP over gloo on the CPU. The script is tests/ddp_train.py.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "ddp_train.py"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], timeout: int = 600) -> None:
    # The repository root on the path, as pytest's pythonpath gives this process: the script imports this
    # checkout's peft_pat (its tiny models are peft_pat.testing), not another installed copy.
    root = str(SCRIPT.parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module", params=[0.0, 0.5], ids=["task-loss", "distillation"])
def runs(tmp_path_factory, request):
    """The same comparison with the task loss only and with distillation mixed in (weight 0.5): the teacher
    forward runs on each rank's shard and the KL is weighted by the rank's share of the step's tokens."""
    root = tmp_path_factory.mktemp("ddp")
    extra = ["--distillation-weight", str(request.param)]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port())]
    run([*launch, str(SCRIPT), "--out", str(root / "ddp"), "--batch-size", "2", *extra])
    run([sys.executable, str(SCRIPT), "--out", str(root / "single"), "--batch-size", "4", *extra])
    load = lambda name: torch.load(root / name, weights_only=False)  # noqa: E731
    return load("ddp/rank0.pt"), load("ddp/rank1.pt"), load("single/rank0.pt")


def test_both_ranks_end_with_the_same_mask_and_adapter(runs):
    rank0, rank1, _ = runs
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert torch.equal(rank0["kept"], rank1["kept"]) and len(rank0["kept"]) == 48
    assert rank0["pat_state"].keys() == rank1["pat_state"].keys()
    for key in rank0["pat_state"]:
        assert torch.equal(rank0["pat_state"][key], rank1["pat_state"][key]), key


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    """Tolerances: the first step's gradients differ only by float32 summation order (all-reduce of two
    partial sums; measured <= 2.2e-7 relative), so 1e-5 relative. After 8 AdamW steps (lr 5e-3) the
    weights may differ by that noise divided by Adam's normaliser (measured 3.9e-6); 1e-4 is 2% of a
    single step's size, far below what a wrong loss weighting (e.g. the auxiliary loss counted once per
    rank) or a missing all-reduce would cause, which move weights by whole steps."""
    ddp, _, single = runs
    assert single["world_size"] == 1
    assert ddp["first_step_grads"].keys() == single["first_step_grads"].keys()
    assert "base_model.pat_mask.default.logits" in single["first_step_grads"]
    for key, expected in single["first_step_grads"].items():
        got = ddp["first_step_grads"][key]
        assert float((got - expected).abs().max()) <= 1e-5 * max(float(expected.abs().max()), 1e-6), key
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert torch.equal(ddp["kept"], single["kept"])
    for key, expected in single["pat_state"].items():
        got = ddp["pat_state"][key]
        if expected.dtype.is_floating_point:
            assert float((got - expected).abs().max()) <= 1e-4, key
        else:
            assert torch.equal(got, expected), key

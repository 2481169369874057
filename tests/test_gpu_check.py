"""benchmarks/gpu_check.py on the CPU: argument handling, the dry-run plan and its JSON, the clean exit without
CUDA, and its two in-process phases on tiny inputs (the code the GPU run executes, here on the CPU)."""

import json

import pytest
import torch

from benchmarks import gpu_check


def test_dry_run_writes_the_plan(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--data-dir", "/data/x"]) == 0
    plan = json.loads(out.read_text())
    assert plan["dry_run"] is True and list(plan["phases"]) == list(gpu_check.PHASES)
    assert all(p["status"] == "planned" for p in plan["phases"].values())
    quality = plan["phases"]["quality"]["commands"]
    assert len(quality) == 2  # one process per sparsity
    for command, sparsity in zip(quality, ("0.25", "0.5")):
        assert "--methods pat,prune_then_tune --steps 720" in command and f"--sparsities {sparsity}" in command
        assert "--device cuda" in command and "--data-dir /data/x" in command
    (memory,) = plan["phases"]["memory"]["commands"]
    assert "--shape llama2-7b --layers 2,32" in memory and "--configs pat,lora-20" in memory
    assert "-m device" in plan["phases"]["tests"]["commands"][0]
    assert "5 phases planned" in capsys.readouterr().out


def test_phase_selection_and_work_dir(tmp_path):
    out = tmp_path / "sub" / "check.json"
    argv = ["--dry-run", "--out", str(out), "--phases", "memory,tests", "--memory-shapes", "llama2-7b,llama3-8b"]
    gpu_check.main(argv)
    plan = json.loads(out.read_text())
    assert list(plan["phases"]) == ["memory", "tests"]
    memory = plan["phases"]["memory"]["commands"]
    assert [("llama2-7b" in c, "llama3-8b" in c) for c in memory] == [(True, False), (False, True)]
    assert str(tmp_path / "sub" / "gpu_check" / "training-llama2-7b.json") in memory[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--phases", "tests,bogus"], "unknown ['bogus']"),
        (["--phases", ","], "unknown empty list"),
        (["--device", "cpu"], "this check is for a CUDA device"),
        (["--device", "gpu0"], "is not a torch device"),
        (["--budget-s", "0"], "must be positive"),
        (["--quality-steps", "0"], "must be at least 1"),
        (["--quality-sparsities", "0.25,1.5"], "strictly between 0 and 1"),
        (["--quality-sparsities", "a"], "comma list of numbers"),
        (["--memory-shapes", "llama2-70b"], "choose from llama2-7b, llama3-8b"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main([*argv, "--dry-run", "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_without_cuda_it_exits_cleanly_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    assert "no CUDA device here" in capsys.readouterr().out
    assert not out.exists() and not (tmp_path / "gpu_check").exists()


def test_a_phase_after_the_budget_is_skipped(tmp_path):
    args = gpu_check.parse_args(["--out", str(tmp_path / "c.json")])
    record = gpu_check.run_phase("quality", args, deadline=0.0)
    assert record["status"] == "skipped" and "time budget" in record["reason"]


def test_quality_without_its_data_is_skipped_with_the_reason(tmp_path):
    args = gpu_check.parse_args(["--out", str(tmp_path / "c.json"), "--data-dir", str(tmp_path / "nothing")])
    record = gpu_check.run_phase("quality", args, deadline=float("inf"))
    assert record["status"] == "skipped"
    assert "quality data missing" in record["reason"] and "--data-dir" in record["reason"]
    assert gpu_check.missing_for("memory", args) is None


def test_pytest_summary_is_parsed():
    args = gpu_check.parse_args([])
    summary = gpu_check._summarise("tests", args, ["....\n17 passed, 2 failed, 300 deselected in 12.3s\n"])
    assert summary["counts"] == {"passed": 17, "failed": 2, "deselected": 300}


def test_distillation_phase_on_tiny_logits():
    result = gpu_check.phase_distillation("cpu", shapes=((2, 8),), vocab=64, blocks=(4, 8))
    (shape,) = result["shapes"]
    assert result["ok"] and shape["blocks_agree"]
    assert {e["block"] for e in shape["blocks"]} == {4, 8, 16}  # 16 = every row in one block, the reference
    assert shape["fastest_block"] in {4, 8, 16} and shape["default_vs_fastest_time"] >= 1.0


def test_autocast_phase_on_the_tiny_model():
    result = gpu_check.phase_autocast("cpu", model_name="tiny", batch=(2, 9))
    assert result["model"].startswith("tiny-random-llama")
    assert result["ok"], result
    assert result["bf16_autocast"]["mask_grad_dtype"] == "torch.float32"

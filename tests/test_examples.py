"""The example scripts' --tiny paths, end to end (train, save/reload adapter, merge_and_prune, stock reload)."""

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from helpers import EXAMPLES, load_example


@pytest.fixture
def examples(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    return load_example


def check_summary(summary):
    # the default axes at 25%: the hidden width loses 12.5% (64 -> 56), the MLP width the rest of the budget
    assert summary["hidden_size_before"] == 64 and summary["hidden_size_after"] == 56
    assert summary["parameters_after"] < summary["parameters_before"]
    assert summary["max_logit_diff_adapter_reload"] <= 1e-6
    assert summary["max_logit_diff_pat_vs_merged"] <= 1e-4  # float32 folding; the logits are O(1)
    assert summary["max_logit_diff_merged_vs_stock_reload"] == 0.0
    assert (Path(summary["pruned_model"]) / "config.json").is_file()


def test_quickstart_runs_as_a_script(tmp_path):
    command = [sys.executable, str(EXAMPLES / "quickstart.py"), "--tiny", "--steps", "6", "--output", str(tmp_path)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    start = result.stdout.rindex("\n{\n")
    summary = json.loads(result.stdout[start : result.stdout.index("\n}", start) + 2])
    check_summary(summary)


def test_train_commonsense_tiny_with_accumulation(examples, tmp_path):
    summary = examples("train_commonsense").main(
        ["--tiny", "--steps", "6", "--batch-size", "4", "--grad-accum", "2", "--output", str(tmp_path)]
    )
    check_summary(summary)
    assert summary["data"] == "generated records" and summary["examples"] == 64
    assert summary["last_logged_task_loss"] > 0


def test_train_commonsense_without_data_says_how_to_fix_it(examples, tmp_path):
    with pytest.raises(SystemExit, match="--data FOLDER.*--tiny"):
        examples("train_commonsense").main(["--data", str(tmp_path / "missing"), "--output", str(tmp_path)])


def test_commonsense_records_become_prompts_with_the_output_as_answer(examples, tmp_path):
    common = examples("_common")
    task = tmp_path / "commonsense" / "boolq"
    task.mkdir(parents=True)
    question = "Is water wet?\n\nAnswer format: true/false"
    records = [
        {"instruction": question, "input": "", "output": "the correct answer is true", "answer": "true"},
        {"instruction": "Pick one", "input": "context", "output": "the correct answer is false", "answer": "false"},
    ]
    (task / "train.json").write_text(json.dumps(records))
    args = Namespace(tiny=False, data=tmp_path, tasks="boolq", samples_per_task=10, seed=0)
    pairs, source = common.commonsense_pairs(args)
    assert source == "boolq" and len(pairs) == 2
    prompts = dict((answer, prompt) for prompt, answer in pairs)
    assert prompts["the correct answer is true"] == (
        "### Instruction:\nIs water wet?\n\nAnswer format: true/false\n\n### Response:\n"
    )
    assert "### Input:\ncontext\n\n### Response:\n" in prompts["the correct answer is false"]
    (task / "train.json").write_text(json.dumps([{"instruction": "no output"}]))
    with pytest.raises(SystemExit, match=r"record 0 lacks the text field\(s\) \['output'\]"):
        common.commonsense_pairs(args)


def test_labels_cover_the_answer_and_eos_only(examples):
    common = examples("_common")
    from peft_pat.offline_models import load_causal_lm

    _, tokenizer = load_causal_lm("tiny-random-llama")
    item = common.tokenize_pair(tokenizer, "Q: 1+1?\nA:", " 2", max_length=6)
    assert len(item["input_ids"]) == 6  # the prompt lost tokens from the left, the answer none
    assert item["labels"] == [-100] * 3 + [*tokenizer(" 2", add_special_tokens=False)["input_ids"], 2]
    batch = common.pad_batch(tokenizer.pad_token_id)([item, common.tokenize_pair(tokenizer, "Q", " 2", 16)])
    assert batch["input_ids"].shape == (2, 6) and batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]
    assert batch["labels"][1].tolist()[-2:] == [-100, -100]


def test_plain_loop_tiny_writes_the_plots(examples, tmp_path):
    pytest.importorskip("matplotlib")
    summary = examples("plain_loop").main(
        ["--tiny", "--steps", "6", "--grad-accum", "2", "--weight-decay", "0.1", "--output", str(tmp_path)]
    )
    check_summary(summary)
    assert summary["mask_snapshots"] == 7
    for png in summary["plots"]:
        assert Path(png).stat().st_size > 10_000


def test_sft_trl_tiny(examples, tmp_path):
    pytest.importorskip("trl")
    summary = examples("sft_trl").main(["--tiny", "--steps", "6", "--output", str(tmp_path)])
    check_summary(summary)
    assert summary["kept_channels_logged"] == 56

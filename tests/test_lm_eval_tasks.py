"""The lm-evaluation-harness glue: the ``pat_*`` task data functions and ``benchmarks.lm_eval_run``'s
argv. Neither needs lm-eval installed (the task functions need ``datasets``); the lm-eval runs
themselves are documented in README "Evaluate with lm-evaluation-harness"."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("datasets", reason="the pat_* task data functions build datasets.Dataset objects")

RECORD = {
    "instruction": "Please choose the correct answer to the question: Which is a mammal?\n\n"
    "Answer1: trout Answer2: whale Answer3: crow\n\nAnswer format: answer1/answer2/answer3",
    "input": "",
    "output": "the correct answer is answer2",
    "answer": "answer2",
}


@pytest.fixture(scope="module")
def pat_tasks():
    """The task file loaded by its path under the bare name, as lm-eval's ``!function`` loads it."""
    spec = importlib.util.spec_from_file_location("pat_tasks", ROOT / "benchmarks" / "lm_eval_tasks" / "pat_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_commonsense_docs_come_from_the_quality_benchmarks_parser(pat_tasks, tmp_path):
    from benchmarks.quality.commonsense import parse_choice

    folder = tmp_path / "commonsense" / "toy"
    folder.mkdir(parents=True)
    (folder / "test.json").write_text(json.dumps([RECORD]))
    (doc,) = pat_tasks.commonsense_dataset("toy", data_dir=str(tmp_path))["test"].to_list()
    item = parse_choice(RECORD, "toy", "x")
    assert doc["question"] == "Which is a mammal?"
    assert doc["choices"] == ["trout", "whale", "crow"]
    assert doc["labels"] == ["answer1", "answer2", "answer3"]
    assert doc["gold"] == 1
    # lm-eval's request = context + " " + choice: the same strings our scorer scores
    assert "Question: " + doc["question"] + "\nAnswer:" == item.text_context
    assert tuple(" " + c for c in doc["choices"]) == item.text_candidates
    assert doc["label_context"] == item.label_context


def test_missing_data_folder_names_the_three_fixes(pat_tasks, tmp_path, monkeypatch):
    monkeypatch.delenv("PAT_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="PAT_DATA_DIR"):
        pat_tasks.commonsense_dataset("toy", data_dir=str(tmp_path / "nowhere"))


def test_wikitext_articles_split_at_top_level_titles(pat_tasks):
    text = " = A = \n text a \n = = Sub = = \n more a \n = B = \n text b \n"
    pages = pat_tasks.wikitext_articles(text)
    assert [p.splitlines()[0] for p in pages] == [" = A = ", " = B = "]
    assert "Sub" in pages[0]


def test_run_adds_the_defaults_and_keeps_the_users_options():
    from benchmarks.lm_eval_run import TASKS, build_argv

    argv = build_argv(["--model_args", "pretrained=out/pruned", "--tasks", "pat_piqa", "--batch_size", "2"])
    assert argv[0] == "run"
    assert argv[argv.index("--include_path") + 1] == str(TASKS)
    assert argv[argv.index("--model") + 1] == "hf"
    assert argv.count("--batch_size") == 1 and argv[argv.index("--batch_size") + 1] == "2"
    assert argv[argv.index("--model_args") + 1] == "pretrained=out/pruned"


def test_run_resolves_the_offline_smollm2_alias(monkeypatch):
    import peft_pat.offline_models
    from benchmarks.lm_eval_run import build_argv

    monkeypatch.setattr(peft_pat.offline_models, "smollm2_safetensors_folder", lambda: Path("/cache/smollm2"))
    argv = build_argv(["--model_args=pretrained=smollm2-135m,peft=adapter"])
    assert "--model_args=pretrained=/cache/smollm2,peft=adapter" in argv

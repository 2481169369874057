"""``python -m benchmarks.quality`` end to end on a tiny random Llama and a tiny fake data folder (seconds).

Checks the machinery, not the numbers: every method builds a stock model of the right width, the
evaluation covers the tasks found in the folder (names unlike the real ones), the results JSON,
table and plot are written, and an already-pruned checkpoint is evaluated without training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from benchmarks.quality import cli

WORDS = ["red", "blue", "cat", "dog", "sun", "tree", "big", "small", "runs", "eats", "the", "a", "is", "of"]


def _char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;?!/#'\n-=@":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _tiny_model_folder(root: Path) -> Path:
    tokenizer = _char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = root / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _record(rng: random.Random, kind: str) -> dict:
    question = " ".join(rng.choice(WORDS) for _ in range(4))
    if kind == "boolean":
        answer = rng.choice(["true", "false"])
        instruction = (
            f"Please answer the following question with true or false, question: {question}?\n\n"
            "Answer format: true/false"
        )
    else:
        texts = [" ".join(rng.choice(WORDS) for _ in range(2)) for _ in range(3)]
        answer = f"option{rng.randint(1, 3)}"
        listed = " ".join(f"Option{i + 1}: {t}" for i, t in enumerate(texts))
        instruction = (
            f"Please choose the correct answer to the question: {question}\n\n{listed}\n\n"
            "Answer format: option1/option2/option3"
        )
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def _fake_data(root: Path) -> Path:
    rng = random.Random(0)
    data = root / "data"
    for task, kind in (("yesno-task", "boolean"), ("pick3", "choice")):
        folder = data / "commonsense" / task
        folder.mkdir(parents=True)
        for split, n in (("train", 24), ("test", 6)):
            (folder / f"{split}.json").write_text(json.dumps([_record(rng, kind) for _ in range(n)]))
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + " ." for _ in range(40))
    (data / "wikitext-2-raw").mkdir(parents=True)
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text(text)
    return data


def test_benchmark_end_to_end_on_tiny_model(tmp_path):
    model_dir, data = _tiny_model_folder(tmp_path), _fake_data(tmp_path)
    out = tmp_path / "results"
    common = ["--model", str(model_dir), "--data-dir", str(data), "--no-progress", "--ppl-context", "64",
              "--ppl-tokens", "256", "--seq-len", "96", "--batch-size", "4", "--lora-rank", "4",
              "--device", "cpu"]  # fmt: skip
    payload = cli.main([*common, "--output", str(out), "--steps", "4", "--sparsities", "0.25,0.5",
                        "--subsample", "5", "--calibration-batches", "2", "--scoring", "text,label",
                        "--save-models"])  # fmt: skip

    runs = {(r["method"], r["sparsity"]): r for r in payload["runs"]}
    assert payload["data"]["train_tasks"] == ["pick3", "yesno-task"]
    assert payload["model"]["kept_width"] == {0.25: 24, 0.5: 16}
    expected = {("dense", 0.0), ("lora", 0.0)} | {
        (m, s) for m in ("pat", "prune_then_tune", "tune_then_prune", "torch_pruning") for s in (0.25, 0.5)
    }
    assert set(runs) == expected
    tp_missing = __import__("importlib").util.find_spec("torch_pruning") is None
    for key, run in runs.items():
        if key[0] == "torch_pruning" and tp_missing:
            assert "torch-pruning is not installed" in run["error"]
            continue
        assert "error" not in run, run.get("traceback", run.get("error"))
        width = 32 if key[1] == 0.0 else payload["model"]["kept_width"][key[1]]
        assert run["kept_width"] == width == run["hidden_size"]
        assert torch.isfinite(torch.tensor(run["wikitext2"]["perplexity"]))
        assert run["wikitext2"]["windows"] == 4 and run["wikitext2"]["tokens_scored"] == 4 * 63
        for mode in ("text", "label"):
            tasks = run[f"accuracy_{mode}"]["tasks"]
            assert set(tasks) == {"pick3", "yesno-task"}
            assert all(t["n"] == 5 and 0.0 <= t["acc_norm"] <= 1.0 and len(t["correct"]) == 5 for t in tasks.values())
        if key[0] in ("lora", "pat", "prune_then_tune", "torch_pruning"):
            assert run["train"]["steps"] == 4 and len(run["train"]["loss_curve"]) == 4
    assert runs[("dense", 0.0)]["accuracy_text"]["mean"]["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert runs[("pat", 0.25)]["train"]["pat_mask"] == {"hard": True, "kept": 24}
    # the pruned models are smaller, and PAT and the post-hoc cut keep the same width
    assert runs[("pat", 0.5)]["parameters"] == runs[("prune_then_tune", 0.5)]["parameters"]
    assert runs[("pat", 0.5)]["parameters"] < runs[("pat", 0.25)]["parameters"] < runs[("dense", 0.0)]["parameters"]
    assert any(c["pat_minus"] == "prune_then_tune" for c in payload["comparisons"])
    for name in ("quality.json", "quality.md", "quality.png"):
        assert (out / name).stat().st_size > 0
    assert "PAT" in (out / "quality.md").read_text()

    # an already-pruned checkpoint is evaluated without retraining, with the same numbers
    saved = runs[("prune_then_tune", 0.5)]["saved_to"]
    again = cli.main([*common, "--output", str(tmp_path / "ckpt"), "--subsample", "5", "--scoring", "text,label",
                      "--evaluate-checkpoint", saved])  # fmt: skip
    (run,) = again["runs"]
    assert run["kept_width"] == 16 and "train" not in run
    assert run["wikitext2"]["perplexity"] == pytest.approx(runs[("prune_then_tune", 0.5)]["wikitext2"]["perplexity"])
    assert (
        run["accuracy_text"]["tasks"]["pick3"]["correct"]
        == (runs[("prune_then_tune", 0.5)]["accuracy_text"]["tasks"]["pick3"]["correct"])
    )


def test_candidates_are_read_from_the_instruction():
    from benchmarks.quality.commonsense import TaskDataError, parse_choice

    record = {
        "instruction": "Please choose the correct answer to the question: Why?\n\nAnswer1: because. Answer2: "
        "no reason\n\nAnswer format: answer1/answer2",
        "output": "the correct answer is answer2",
        "answer": "answer2",
    }
    item = parse_choice(record, "t", "here")
    assert item.text_context == "Question: Why?\nAnswer:"
    assert item.text_candidates == (" because.", " no reason") and item.gold == 1
    assert item.label_candidates == (" answer1", " answer2")
    assert item.label_context.endswith("### Response:\nthe correct answer is")
    with pytest.raises(TaskDataError, match="not one of the candidates"):
        parse_choice({**record, "answer": "answer3"}, "t", "here")
    with pytest.raises(TaskDataError, match="Answer format"):
        parse_choice({**record, "instruction": "Why?"}, "t", "here")


def test_adapter_checkpoint_is_merged_then_evaluated(tmp_path):
    """--evaluate-checkpoint on a PAT adapter folder: base from the adapter config, merge_and_prune, evaluate."""
    from peft import get_peft_model

    from peft_pat import PATConfig
    from peft_pat.pretrained import load_causal_lm

    model_dir, data = _tiny_model_folder(tmp_path), _fake_data(tmp_path)
    base, _ = load_causal_lm(str(model_dir))
    model = get_peft_model(base, PATConfig(task_type="CAUSAL_LM", target_sparsity=0.5, r=2))
    model.base_model.harden_mask()
    model.save_pretrained(tmp_path / "adapter")
    payload = cli.main(["--data-dir", str(data), "--no-progress", "--ppl-context", "64", "--ppl-tokens", "128",
                        "--subsample", "3", "--output", str(tmp_path / "out"),
                        "--evaluate-checkpoint", str(tmp_path / "adapter")])  # fmt: skip
    (run,) = payload["runs"]
    assert payload["checkpoint"]["kind"].startswith("adapter")
    assert run["kept_width"] == 16 and run["hidden_size"] == 16
    assert set(run["accuracy_text"]["tasks"]) == {"pick3", "yesno-task"}


def test_loss_on_full_labels_every_token_and_answer_only_the_answer():
    from benchmarks.quality.commonsense import IGNORE, encode_example

    record = {
        "instruction": "Is the sun big? Answer format: true/false",
        "input": "",
        "output": "true",
        "answer": "true",
    }
    tokenizer = _char_tokenizer()
    ids, answer_labels = encode_example(record, tokenizer, 200, "answer")
    ids_full, full_labels = encode_example(record, tokenizer, 200, "full")
    assert ids == ids_full and full_labels == ids
    answer_len = len("true") + 1  # character tokens + EOS
    assert answer_labels[-answer_len:] == ids[-answer_len:]
    assert set(answer_labels[:-answer_len]) == {IGNORE}

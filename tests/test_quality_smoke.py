"""``python -m benchmarks.quality`` end to end on a tiny random Llama and a tiny fake data folder (seconds).

Checks the machinery, not the numbers: every method builds a stock model of the right width through
the shared Trainer setup (the post-hoc rivals distilling from the dense model), the evaluation covers
the tasks found in the folder (names unlike the real ones), the paired comparisons against the best
post-hoc pipeline, the results JSON, table and plot are written, and an already-pruned checkpoint is
evaluated without training.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from benchmarks.quality import budget, cli, merge
from benchmarks.quality.results import write_results

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


@pytest.fixture
def one_thread():
    """Tiny matrices: one torch thread is faster, and much faster on a shared, loaded CPU (no thread contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_benchmark_end_to_end_on_tiny_model(tmp_path, one_thread, capsys):
    model_dir, data = _tiny_model_folder(tmp_path), _fake_data(tmp_path)
    out = tmp_path / "results"
    common = ["--model", str(model_dir), "--data-dir", str(data), "--no-progress", "--ppl-context", "64",
              "--ppl-windows", "4", "--seq-len", "96", "--batch-size", "4", "--lora-rank", "4",
              "--device", "cpu"]  # fmt: skip
    payload = cli.main([*common, "--output", str(out), "--steps", "4", "--sparsities", "0.25,0.5",
                        "--subsample", "5", "--calibration-batches", "2", "--scoring", "text,label",
                        "--save-models"])  # fmt: skip

    runs = {(r["method"], r["sparsity"]): r for r in payload["runs"]}
    assert payload["data"]["train_tasks"] == ["pick3", "yesno-task"]
    assert payload["model"]["kept_width"] == {0.25: 24, 0.5: 16}  # the hidden width alone (Torch-Pruning, pat_hidden)
    pruning = ("pat", "pat_hidden", "prune_then_tune", "prune_mlp_then_tune", "prune_hidden_then_tune",
               "tune_then_prune", "torch_pruning")  # fmt: skip
    expected = {("dense", 0.0), ("lora", 0.0)} | {(m, s) for m in pruning for s in (0.25, 0.5)}
    assert set(runs) == expected
    tp_missing = __import__("importlib").util.find_spec("torch_pruning") is None
    for key, run in runs.items():
        if key[0] == "torch_pruning" and tp_missing:
            assert "torch-pruning is not installed" in run["error"]
            continue
        assert "error" not in run, run.get("traceback", run.get("error"))
        assert run["kept_width"] == run["hidden_size"]
        assert torch.isfinite(torch.tensor(run["wikitext2"]["perplexity"]))
        assert run["wikitext2"]["windows"] == 4 and run["wikitext2"]["tokens_scored"] == 4 * 63
        for mode in ("text", "label"):
            tasks = run[f"accuracy_{mode}"]["tasks"]
            assert set(tasks) == {"pick3", "yesno-task"}
            assert all(t["n"] == 5 and 0.0 <= t["acc_norm"] <= 1.0 and len(t["correct"]) == 5 for t in tasks.values())
        if key[0] not in ("dense", "tune_then_prune"):
            train = run["train"]
            assert train["steps"] == 4 and len(train["loss_curve"]) == len(train["train_loss_curve"]) == 4
            assert all(map(math.isfinite, train["loss_curve"]))
        if key[0].startswith("prune") or key[0] == "torch_pruning":  # the rivals distil from the dense model
            assert run["train"]["loss"] == "distill"
            assert run["train"]["train_loss_curve"] != run["train"]["loss_curve"]  # KL optimised, task CE logged
    assert runs[("dense", 0.0)]["accuracy_text"]["mean"]["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    pat_quarter = runs[("pat", 0.25)]
    assert pat_quarter["train"]["pat_mask"] == {"hard": True, "kept": pat_quarter["kept_width"]}
    assert len(pat_quarter["train"]["pat_curves"]["pat/kept_channels"]) == 4  # PATCallback's logs, per step
    assert runs[("lora", 0.0)]["train"]["loss"].startswith("full")  # distilling dense into itself is a no-op
    dense = runs[("dense", 0.0)]
    for s in (0.25, 0.5):
        # PAT cuts both axes by default; each post-hoc twin has its PAT's shape; all at the same parameter budget
        pat, hidden = runs[("pat", s)], runs[("pat_hidden", s)]
        assert pat["kept_width"] < 32 and pat["intermediate_size"] < dense["intermediate_size"]
        assert hidden["intermediate_size"] == dense["intermediate_size"] and hidden["kept_width"] == (24, 16)[s == 0.5]
        for twin, of in (("prune_then_tune", pat), ("tune_then_prune", pat), ("prune_hidden_then_tune", hidden)):
            assert (runs[(twin, s)]["kept_width"], runs[(twin, s)]["intermediate_size"]) == (
                of["kept_width"],
                of["intermediate_size"],
            ) and runs[(twin, s)]["parameters"] == of["parameters"]
        assert runs[("prune_mlp_then_tune", s)]["kept_width"] == 32
        for run in (pat, runs[("prune_mlp_then_tune", s)]):
            assert abs(run["parameters"] / dense["parameters"] - (1 - s)) < 0.05
    assert runs[("pat", 0.5)]["parameters"] < runs[("pat", 0.25)]["parameters"] < dense["parameters"]
    # every pruned method against the best post-hoc pipeline (lowest PPL) at its sparsity, and each PAT run
    # against its same-shape twin, paired
    for sparsity in (0.25, 0.5):
        rows = [c for c in payload["comparisons"] if c["sparsity"] == sparsity and c["reference"] == "best post-hoc"]
        best = rows[0]["best_posthoc"]
        assert best in ("prune_then_tune", "prune_mlp_then_tune", "prune_hidden_then_tune", "tune_then_prune",
                        "torch_pruning")  # fmt: skip
        assert {c["method"] for c in rows} == {m for m, s in runs if s == sparsity and "error" not in runs[m, s]} - {
            best
        }
        twins = {c["method"]: c["best_posthoc"] for c in payload["comparisons"]
                 if c["sparsity"] == sparsity and c["reference"] == "same shape"}  # fmt: skip
        assert twins == {"pat": "prune_then_tune", "pat_hidden": "prune_hidden_then_tune"}
        assert [c["best_posthoc"] for c in payload["comparisons"]
                if c["sparsity"] == sparsity and c["reference"] == "hidden-only PAT"] == ["pat_hidden"]  # fmt: skip
        assert all(math.isfinite(c["nll_difference_stderr"]) and c["ppl_ratio"] > 0 for c in payload["comparisons"])
    targets = {t["reference"]: t for t in payload["pat_targets"] if t["sparsity"] == 0.25}
    for reference, target in targets.items():
        assert target["ppl_ratio_pat_over_best_posthoc"] == pytest.approx(
            pat_quarter["wikitext2"]["perplexity"] / runs[(target["best_posthoc"], 0.25)]["wikitext2"]["perplexity"]
        )
        assert target["ppl_target"] == {"same shape": 0.85, "best post-hoc": 0.75, "hidden-only PAT": 0.75}[reference]
    assert set(targets) == {"same shape", "best post-hoc", "hidden-only PAT"}
    assert payload["estimate"]["train_runs"] == 1 + 2 * (5 if tp_missing else 6)
    for name in ("quality.json", "quality.md", "quality.png"):
        assert (out / name).stat().st_size > 0
    assert "PAT / best post-hoc" in (out / "quality.md").read_text()

    # an already-pruned checkpoint is evaluated without retraining, with the same numbers
    saved = runs[("prune_then_tune", 0.5)]["saved_to"]
    again = cli.main([*common, "--output", str(tmp_path / "ckpt"), "--subsample", "5", "--scoring", "text,label",
                      "--evaluate-checkpoint", saved])  # fmt: skip
    (run,) = again["runs"]
    assert run["kept_width"] == runs[("prune_then_tune", 0.5)]["kept_width"] and "train" not in run
    assert run["wikitext2"]["perplexity"] == pytest.approx(runs[("prune_then_tune", 0.5)]["wikitext2"]["perplexity"])
    assert (
        run["accuracy_text"]["tasks"]["pick3"]["correct"]
        == (runs[("prune_then_tune", 0.5)]["accuracy_text"]["tasks"]["pick3"]["correct"])
    )

    # the same run split into two pieces (as a long preset is run on a CPU) merges back to the same results
    whole = json.loads((out / "quality.json").read_text())
    pieces = []
    for keep in (lambda r: r["sparsity"] in (0.0, 0.25), lambda r: r["sparsity"] == 0.5):
        piece = json.loads(json.dumps(whole))
        piece["runs"] = [r for r in piece["runs"] if keep(r)]
        piece["options"]["sparsities"] = sorted({r["sparsity"] for r in piece["runs"]} - {0.0})
        piece["options"]["output"] = f"elsewhere-{len(pieces)}"
        pieces.append(piece)
    merged = merge.merge_payloads(pieces[::-1], ["b.json", "a.json"])
    write_results(merged, tmp_path / "merged")
    assert [(r["method"], r["sparsity"]) for r in merged["runs"]] == [
        (r["method"], r["sparsity"]) for r in whole["runs"]
    ]
    assert merged["comparisons"] == whole["comparisons"] and merged["pat_targets"] == whole["pat_targets"]
    assert [s["file"] for s in merged["sources"]] == ["b.json", "a.json"]
    assert (tmp_path / "merged" / "quality.md").read_text() == (out / "quality.md").read_text()
    other = json.loads(json.dumps(pieces[1]))
    other["options"]["lr"] = 5e-4
    with pytest.raises(merge.IncompatibleResults, match=r"other options than a\.json \(lr: 0\.001 vs 0\.0005\)"):
        merge.merge_payloads([pieces[0], other], ["a.json", "c.json"])
    with pytest.raises(merge.IncompatibleResults, match=r"PAT at sparsity 0\.5 is in both b\.json and d\.json"):
        merge.merge_payloads([pieces[1], pieces[1]], ["b.json", "d.json"])
    # --replace: a later piece that re-measured PAT (say, after a default changed) supersedes the earlier run
    remeasured = json.loads(json.dumps(pieces[1]))
    remeasured["runs"] = [r for r in remeasured["runs"] if r["method"] == "pat"]
    remeasured["runs"][0]["wikitext2"]["perplexity"] = 1.0
    replaced = merge.merge_payloads([*pieces, remeasured], ["a.json", "b.json", "new.json"], replace=True)
    assert len(replaced["runs"]) == len(whole["runs"])
    pat_at_half = [r for r in replaced["runs"] if (r["method"], r["sparsity"]) == ("pat", 0.5)]
    assert [r["wikitext2"]["perplexity"] for r in pat_at_half] == [1.0]
    assert replaced["sources"][1]["replaced_by_later_piece"] == ["pat@0.5"]
    assert "replaced_by_later_piece" not in replaced["sources"][0]
    # the command line: files in, the same three files out; a refusal is a usage error naming the problem
    files = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, piece in zip(files, pieces):
        path.write_text(json.dumps(piece))
    merge.main([*map(str, files), "--output", str(tmp_path / "cli")])
    assert (tmp_path / "cli" / "quality.md").read_text() == (out / "quality.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        merge.main([str(files[0]), str(files[0]), "--output", str(tmp_path / "refused")])
    assert exit_info.value.code == 2 and not (tmp_path / "refused").exists()
    assert "keep it in one piece only" in capsys.readouterr().err
    # a piece measured under an older default joins under the method's current name (FILE:OLD=NEW, OLD=-: left out)
    old = json.loads(json.dumps(pieces[1]))
    old["runs"] = [r for r in old["runs"] if r["method"] in ("pat", "prune_then_tune")]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    only_dense = json.loads(json.dumps(pieces[0]))
    only_dense["runs"] = [r for r in only_dense["runs"] if r["method"] == "dense"]
    (tmp_path / "dense.json").write_text(json.dumps(only_dense))
    joined = merge.main([str(tmp_path / "dense.json"), f"{path}:pat=pat_hidden,prune_then_tune=-",
                         "--output", str(tmp_path / "renamed")])  # fmt: skip
    assert [(r["method"], r["label"]) for r in joined["runs"]] == [
        ("dense", "dense (no training)"),
        ("pat_hidden", "PAT, hidden width only"),
    ]
    assert joined["sources"][1]["renamed"] == {"pat": "pat_hidden", "prune_then_tune": "-"}

    # the budget curve: one piece per step count, each PAT run against its same-shape twin, paired
    longer = json.loads(json.dumps(whole))
    longer["options"]["steps"] = 8
    for path, piece in ((tmp_path / "s4.json", whole), (tmp_path / "s8.json", longer)):
        path.write_text(json.dumps(piece))
    rows = budget.main([str(tmp_path / "s8.json"), str(tmp_path / "s4.json"), "--output", str(tmp_path / "budget")])
    same_shape = {(c["sparsity"], c["method"]): c for c in whole["comparisons"] if c["reference"] == "same shape"}
    assert [(r["sparsity"], r["method"], r["steps"]) for r in rows] == [
        (s, m, n) for s, m in sorted(same_shape) for n in (4, 8)
    ]  # by sparsity, method, then steps, whatever the order of the files
    for r in rows:
        assert r["ppl_ratio"] == same_shape[r["sparsity"], r["method"]]["ppl_ratio"]
        assert r["rival"] == {"pat": "prune_then_tune", "pat_hidden": "prune_hidden_then_tune"}[r["method"]]
        assert r["ppl"] == runs[(r["method"], r["sparsity"])]["wikitext2"]["perplexity"]
    for name in ("budget.json", "budget.md", "budget.png"):
        assert (tmp_path / "budget" / name).stat().st_size > 0
    quarter = budget.main([str(tmp_path / "s4.json"), "--sparsities", "0.25", "--output", str(tmp_path / "b25")])
    assert {r["sparsity"] for r in quarter} == {0.25} and len(quarter) == 2  # pat and pat_hidden
    other = json.loads(json.dumps(longer))
    other["options"]["lr"] = 5e-4
    with pytest.raises(merge.IncompatibleResults, match=r"lr: 0\.001 vs 0\.0005"):
        budget.budget_rows([whole, other], ["s4.json", "lr.json"])  # only the steps may differ
    with pytest.raises(merge.IncompatibleResults, match=r"after 4 steps is in both s4\.json and again\.json"):
        budget.budget_rows([whole, whole], ["s4.json", "again.json"])
    with pytest.raises(SystemExit) as exit_info:
        budget.main([str(tmp_path / "dense.json"), "--output", str(tmp_path / "no-pairs")])
    assert exit_info.value.code == 2 and not (tmp_path / "no-pairs").exists()
    assert "no PAT run has its same-shape rival" in capsys.readouterr().err


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


def test_adapter_checkpoint_is_merged_then_evaluated(tmp_path, one_thread):
    """--evaluate-checkpoint on a PAT adapter folder: base from the adapter config, merge_and_prune, evaluate."""
    from peft import get_peft_model

    from peft_pat import PATConfig
    from peft_pat.offline_models import load_causal_lm

    model_dir, data = _tiny_model_folder(tmp_path), _fake_data(tmp_path)
    base, _ = load_causal_lm(str(model_dir))
    model = get_peft_model(base, PATConfig(task_type="CAUSAL_LM", target_sparsity=0.5, r=2))
    model.base_model.harden_mask()
    model.save_pretrained(tmp_path / "adapter")
    payload = cli.main(["--data-dir", str(data), "--no-progress", "--ppl-context", "64", "--ppl-windows", "2",
                        "--subsample", "3", "--output", str(tmp_path / "out"),
                        "--evaluate-checkpoint", str(tmp_path / "adapter")])  # fmt: skip
    (run,) = payload["runs"]
    assert payload["checkpoint"]["kind"].startswith("adapter")
    width = model.peft_config["default"].kept_width
    assert run["kept_width"] == width == run["hidden_size"] < 32
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


def test_pat_options_become_config_arguments_and_unknown_keys_are_refused(capsys):
    assert cli.parse_pat_options("hsm_rank=8, mask_lr=None,identity_loss=none") == {
        "hsm_rank": 8,
        "mask_lr": None,
        "identity_loss": "none",
    }
    assert cli.build_parser().parse_args([]).pat_options == {}  # default: the package defaults, nothing passed
    for text, message in (
        ("hsm_rank=8,not_an_option=1", "unknown PATConfig option 'not_an_option'; known options: "),
        ("target_sparsity=0.5", "set by the benchmark"),
        ("hsm_rank", "is not key=value"),
        ("mask_freeze=2", "PATConfig refuses"),
    ):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["--pat-options", text])
        assert message in capsys.readouterr().err


def test_distillation_loss_is_the_token_mean_of_the_teacher_to_student_kl():
    from benchmarks.quality.training import distillation_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(distillation_loss(teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-6)
    t = 2.0
    p, log_q = torch.softmax(teacher / t, -1), torch.log_softmax(student / t, -1)
    kl = (p * (p.log() - log_q)).sum(-1)
    expected = t**2 * kl[mask.bool()].mean()
    assert float(distillation_loss(student, teacher, mask, temperature=t)) == pytest.approx(float(expected), rel=1e-5)
    padded = student.clone()
    padded[0, 3:] = 100.0  # padding positions do not count
    assert float(distillation_loss(padded, teacher, mask, temperature=t)) == pytest.approx(float(expected), rel=1e-5)


def test_posthoc_rival_distils_from_a_frozen_dense_teacher_on_a_tiny_model(one_thread):
    """The prune -> LoRA rival with --loss distill: the same Trainer setup, KL to the dense model optimised
    (the first logged loss is the KL of the untrained student), the task CE logged, the teacher untouched."""
    import copy

    from peft import LoraConfig, get_peft_model

    from benchmarks.quality.posthoc import cut_by_activation
    from benchmarks.quality.training import distillation_loss, train
    from peft_pat import family_for_model
    from peft_pat.calibration import activation_channel_scores
    from peft_pat.testing import VOCAB, tiny_model

    teacher = tiny_model("llama").requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    family = family_for_model(teacher)
    ids = torch.randint(3, VOCAB, (3, 4, 10), generator=torch.Generator().manual_seed(0))
    batches = []
    for step in range(3):
        mask = torch.ones_like(ids[step])
        mask[0, 7:] = 0  # one padded row
        labels = ids[step].masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids[step], "attention_mask": mask, "labels": labels})
    student = copy.deepcopy(teacher)
    cut_by_activation(
        student, family, activation_channel_scores(student, batches[:1], family), torch.tensor([], dtype=torch.long), 48
    )
    student = get_peft_model(student, LoraConfig(r=4, lora_alpha=4, target_modules=list(family.lora_targets)))
    with torch.no_grad():
        fwd = {k: v for k, v in batches[0].items() if k != "labels"}
        first_kl = float(distillation_loss(student(**fwd).logits, teacher(**fwd).logits, fwd["attention_mask"]))
    info = train(student, batches, lr=1e-2, teacher=teacher, progress=False)
    assert info["steps"] == 3 and len(info["train_loss_curve"]) == 3
    assert info["train_loss_curve"][0] == pytest.approx(first_kl, abs=2e-4)
    assert all(math.isfinite(x) for x in info["loss_curve"]) and info["loss_curve"][0] > first_kl  # CE, not KL
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())

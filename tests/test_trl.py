"""PAT under TRL's SFTTrainer trains what it trains under the transformers Trainer.

SFTTrainer (trl 1.16) calls the model with ``fused_lm_head=True`` and builds its loss from the
per-token log-probabilities it gets back, ignoring ``outputs.loss``; the tuner must still put the
distillation and auxiliary terms into what reaches the optimizer. The reference is one Trainer step
on the very batches SFTTrainer built (its processed dataset and its collator).
"""

from __future__ import annotations

import string

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset
from peft import get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer

import peft_pat
from peft_pat.testing import tiny_model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: 4 specials, lower-case letters, digits and a few symbols."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in string.ascii_lowercase + string.digits + " ?.:":
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_dataset(records: int = 8) -> Dataset:
    """Prompt/completion pairs of different lengths (so batches pad, and prompt tokens carry no label)."""
    generator = torch.Generator().manual_seed(3)
    letters = string.ascii_lowercase
    rows = []
    for i in range(records):
        n = int(torch.randint(6, 14, (1,), generator=generator))
        word = "".join(letters[int(j)] for j in torch.randint(0, 26, (n,), generator=generator))
        rows.append({"prompt": f"q{i}: {word}?", "completion": f" {word[::-1][: 3 + i % 4]}."})
    return Dataset.from_list(rows)


class GradientCapture(TrainerCallback):
    """Keeps a copy of every trainable gradient just before the first optimizer step, then stops the run (the
    schedule is that of a 20-step run, so the mask is still soft and its active loss non-zero)."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {
                name: p.grad.detach().clone()
                for name, p in model.named_parameters()
                if p.requires_grad and p.grad is not None
            }

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = True


def common_args(accumulation: int) -> dict:
    return dict(
        max_steps=20,
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        dataloader_num_workers=0,
    )


def pat_config() -> peft_pat.PATConfig:
    """The package defaults, but a non-trivial start: with the identity start the student equals the teacher at
    the first step, so the distillation term would be zero and its gradient too."""
    return peft_pat.PATConfig(task_type="CAUSAL_LM", target_sparsity=0.25, init_weights=False)


def one_step(tmp_path, accumulation: int):
    """(SFTTrainer's and the Trainer's gradients of one optimizer step, and their logged losses)."""
    tokenizer = tiny_tokenizer()
    model_kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, tie_word_embeddings=True)
    sft_grads = GradientCapture()
    sft = SFTTrainer(
        model=tiny_model("llama", seed=0, **model_kwargs).train(),
        args=SFTConfig(output_dir=str(tmp_path / "sft"), completion_only_loss=True, **common_args(accumulation)),
        train_dataset=tiny_dataset(),
        processing_class=tokenizer,
        peft_config=pat_config(),
        callbacks=[peft_pat.PATCallback(), sft_grads],
    )
    start = {name: value.clone() for name, value in sft.model.state_dict().items()}
    sft.train()

    reference_grads = GradientCapture()
    model = get_peft_model(tiny_model("llama", seed=0, **model_kwargs).train(), pat_config())
    model.load_state_dict(start)  # the same random adapter start (SFTTrainer drew it at another RNG state)
    reference = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / "trainer"), **common_args(accumulation)),
        train_dataset=sft.train_dataset,  # the very records and collation SFTTrainer trained on
        data_collator=sft.data_collator,
        callbacks=[peft_pat.PATCallback(), reference_grads],
    )
    reference.train()
    losses = [next(e["loss"] for e in t.state.log_history if "loss" in e) for t in (sft, reference)]
    return sft_grads.grads, reference_grads.grads, losses, sft.model


@pytest.mark.parametrize("accumulation", [1, 2], ids=["one-batch", "accumulated"])
def test_sft_trainer_step_has_the_trainer_step_gradients(tmp_path, accumulation):
    sft, reference, (sft_loss, reference_loss), model = one_step(tmp_path, accumulation)
    assert sorted(sft) == sorted(reference)
    logged = model.base_model.last_auxiliary_losses
    assert {"distillation_loss", "active_loss", "identity_loss"} <= set(logged)  # what SFTTrainer trained on
    assert logged["distillation_loss"] > 1e-3 and logged["polarization_loss"] > 0
    masks = [name for name in sft if "pat_mask" in name]
    assert masks and all(sft[name].abs().sum() > 0 for name in masks)  # the auxiliary losses reach the mask
    for name in reference:
        torch.testing.assert_close(sft[name], reference[name], rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    assert sft_loss == pytest.approx(reference_loss, rel=1e-5)


def test_evaluation_under_sft_trainer_keeps_trl_log_probabilities(tmp_path):
    """Outside a training step the fused call goes to TRL's head untouched: real per-token log-probabilities."""
    tokenizer = tiny_tokenizer()
    sft = SFTTrainer(
        model=tiny_model("llama", seed=0, vocab_size=len(tokenizer), tie_word_embeddings=True),
        args=SFTConfig(output_dir=str(tmp_path / "sft"), completion_only_loss=True, **common_args(1)),
        train_dataset=tiny_dataset(),
        processing_class=tokenizer,
        peft_config=pat_config(),
        callbacks=[peft_pat.PATCallback()],
    )
    batch = sft.data_collator([sft.train_dataset[i] for i in range(4)])
    model = sft.model.eval()
    with torch.no_grad():
        fused = model(**batch, fused_lm_head=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.log_softmax(logits[:, :-1].float(), -1)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    torch.testing.assert_close(fused.log_probs[keep], expected[keep].gather(-1, labels[keep][:, None])[:, 0])


def test_quality_benchmark_trains_pat_alike_with_both_trainers():
    """`python -m benchmarks.quality --trainer trl`: the same batches and arguments give the Trainer's run."""
    from benchmarks.quality.training import train

    tokenizer = tiny_tokenizer()
    generator = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(4):
        ids = torch.randint(4, len(tokenizer), (2, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    logs = {}
    for name in ("trainer", "trl"):
        base = tiny_model("llama", seed=0, vocab_size=len(tokenizer)).train()
        torch.manual_seed(1)  # the same random adapter start both times, as the benchmark seeds it
        model = get_peft_model(base, pat_config())
        logs[name] = train(model, batches, lr=1e-3, pat=True, progress=False, trainer_name=name, tokenizer=tokenizer)
    assert logs["trl"]["trainer"] == "trl"
    for key in ("loss_curve", "train_loss_curve"):
        assert logs["trl"][key] == pytest.approx(logs["trainer"][key], rel=1e-4)
    assert logs["trl"]["pat_last"]["pat/distillation_loss"] > 0


def test_a_custom_loss_that_drops_the_pat_terms_warns(tmp_path):
    """SFTTrainer with compute_loss_func builds the loss from a plain forward's logits: PAT's terms are left out,
    which the tuner can only see from TRL's extra no-grad fused call for the metrics; it says what to remove."""
    tokenizer = tiny_tokenizer()

    def plain_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1])
        return torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)

    sft = SFTTrainer(
        model=tiny_model("llama", seed=0, vocab_size=len(tokenizer)).train(),
        args=SFTConfig(output_dir=str(tmp_path / "sft"), completion_only_loss=True, **common_args(1)),
        train_dataset=tiny_dataset(),
        processing_class=tokenizer,
        peft_config=pat_config(),
        callbacks=[peft_pat.PATCallback(), GradientCapture()],
        compute_loss_func=plain_loss,
    )
    with pytest.warns(UserWarning, match="remove compute_loss_func"):
        sft.train()

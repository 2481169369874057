"""PAT end to end: wrap a model, train with the Trainer, save/reload the adapter, merge and prune,
save the smaller stock model and reload it with plain transformers.

    python examples/quickstart.py                      # real SmolLM2-135M (offline pip package), ~2 min on a CPU
    python examples/quickstart.py --model Qwen/Qwen2.5-0.5B --steps 200
    python examples/quickstart.py --tiny               # tiny random Llama, seconds (used by the tests)

The training data is a small built-in instruction set (two-number arithmetic), so the example needs
no dataset download; examples/train_commonsense.py trains on real instruction data.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import peft_pat
from peft_pat.pretrained import load_causal_lm

PROMPT = "Question: What is {a} plus {b}?\nAnswer:"


def arithmetic_examples(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        pairs.append((PROMPT.format(a=a, b=b), f" {a + b}"))
    return pairs


class InstructionDataset(torch.utils.data.Dataset):
    """Prompt + answer tokens; the loss covers the answer (and EOS) only."""

    def __init__(self, pairs, tokenizer, max_length=48):
        self.items = []
        for prompt, answer in pairs:
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = (p + a)[:max_length]
            labels = ([-100] * len(p) + a)[:max_length]
            pad = max_length - len(ids)
            self.items.append(
                {
                    "input_ids": torch.tensor(ids + [tokenizer.pad_token_id] * pad),
                    "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
                    "labels": torch.tensor(labels + [-100] * pad),
                }
            )

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def tiny_model_and_tokenizer():
    """A tiny random Llama with a character-level tokenizer, for smoke tests without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = list("0123456789 ?:\nQuestionWhatisplusAnswer")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tokenizer


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def answer(model, tokenizer, prompt: str, max_new_tokens: int = 4) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="hub id, local folder, or 'smollm2-135m'")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random Llama instead (seconds)")
    parser.add_argument("--sparsity", type=float, default=0.25, help="fraction of hidden channels removed")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output", default="outputs/quickstart", help="where the adapter and pruned model go")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    out = Path(args.output)
    if args.tiny:
        base, tokenizer = tiny_model_and_tokenizer()
        reload_base = tiny_model_and_tokenizer
    else:
        base, tokenizer = load_causal_lm(args.model)
        reload_base = lambda: load_causal_lm(args.model)  # noqa: E731
    params_before = parameter_count(base)
    probe = PROMPT.format(a=23, b=19)
    print(f"base model: {type(base).__name__}, hidden_size={base.config.hidden_size}, {params_before:,} parameters")
    print(f"before tuning, '{probe.splitlines()[0]}' -> {answer(base, tokenizer, probe)!r}")

    # 1. Wrap: identical outputs to the base model right after this line.
    config = peft_pat.PATConfig(task_type="CAUSAL_LM", target_sparsity=args.sparsity, r=16, lora_alpha=32)
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    print(f"kept width will be {config.kept_width} of {config.base_hidden_size} hidden channels")

    # 2. Train with an unchanged Trainer script plus PATCallback.
    train = InstructionDataset(arithmetic_examples(512, args.seed), tokenizer)
    trainer_args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20),
        logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
    )  # fmt: skip
    start = time.time()
    Trainer(model=model, args=trainer_args, train_dataset=train, callbacks=[peft_pat.PATCallback()]).train()
    train_seconds = time.time() - start
    model.eval()

    # 3. Save the adapter; a fresh base model + PeftModel.from_pretrained restores it exactly.
    model.save_pretrained(out / "adapter")
    check = tokenizer(probe, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        pat_logits = model(**check).logits
    fresh_base, _ = reload_base()
    reloaded = PeftModel.from_pretrained(fresh_base, out / "adapter").eval()
    with torch.no_grad():
        reload_diff = float((reloaded(**check).logits - pat_logits).abs().max())

    # 4. Merge and prune into a smaller stock model, save it, reload it with plain transformers.
    small = model.merge_and_prune()
    with torch.no_grad():
        merge_diff = float((small(**check).logits - pat_logits).abs().max())
    small.save_pretrained(out / "pruned")
    tokenizer.save_pretrained(out / "pruned")
    stock = AutoModelForCausalLM.from_pretrained(out / "pruned").eval()

    summary = {
        "model": "tiny" if args.tiny else args.model,
        "hidden_size_before": config.base_hidden_size,
        "hidden_size_after": stock.config.hidden_size,
        "parameters_before": params_before,
        "parameters_after": parameter_count(stock),
        "max_logit_diff_adapter_reload": reload_diff,
        "max_logit_diff_pat_vs_merged": merge_diff,
        "train_seconds": round(train_seconds, 1),
        "answer_after": answer(stock, tokenizer, probe),
        "output": str(out),
    }
    print(f"after PAT + merge_and_prune, '{probe.splitlines()[0]}' -> {summary['answer_after']!r}")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

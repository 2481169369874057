"""PAT end to end: wrap a model, train with the Trainer, save/reload the adapter, merge and prune,
save the smaller stock model and reload it with plain transformers.

    python examples/quickstart.py                      # real SmolLM2-135M (offline pip package), 2.5 min on 2 cores
    python examples/quickstart.py --model Qwen/Qwen2.5-0.5B --steps 200
    python examples/quickstart.py --tiny               # tiny random Llama, seconds (used by the tests)

The training data is a small built-in instruction set (two-number arithmetic), so the example needs
no dataset download; examples/train_commonsense.py trains on real instruction data.
"""

from __future__ import annotations

import time
from pathlib import Path

from peft import get_peft_model
from transformers import Trainer, TrainingArguments, set_seed

import peft_pat

from _common import (
    ARITHMETIC_PROMPT,
    PromptAnswerDataset,
    arithmetic_pairs,
    base_parser,
    device_options,
    finish,
    greedy_answer,
    load_model,
    pad_batch,
    parameter_count,
    trained_model,
)


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, steps=60, batch_size=8, lr=1e-3, output="outputs/quickstart")
    args = parser.parse_args(argv)
    set_seed(args.seed)
    base, tokenizer, reload_base = load_model(args)
    probe = ARITHMETIC_PROMPT.format(a=23, b=19)
    size = f"hidden_size={base.config.hidden_size}, {parameter_count(base):,} parameters"
    print(f"base model: {type(base).__name__}, {size}")
    print(f"before tuning, '{probe.splitlines()[0]}' -> {greedy_answer(base, tokenizer, probe, 4)!r}")

    # 1. Wrap: identical outputs to the base model right after this line.
    config = peft_pat.PATConfig(task_type="CAUSAL_LM", target_sparsity=args.sparsity, r=16, lora_alpha=32)
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    print(f"kept width will be {config.kept_width} of {config.base_hidden_size} hidden channels")

    # 2. Train with an unchanged Trainer script plus PATCallback.
    train = PromptAnswerDataset(arithmetic_pairs(512, args.seed), tokenizer, max_length=48)
    trainer_args = TrainingArguments(
        output_dir=str(Path(args.output) / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        logging_steps=max(1, args.steps // 10),
        seed=args.seed,
        **device_options(),
    )
    trainer = Trainer(
        model=model,
        args=trainer_args,
        train_dataset=train,
        data_collator=pad_batch(tokenizer.pad_token_id),
        callbacks=[peft_pat.PATCallback()],
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start

    # 3. Save the adapter, merge and prune, save the stock model, reload it with AutoModelForCausalLM.
    summary = finish(
        trained_model(trainer), tokenizer, reload_base, args, probe,
        hidden_size_before=config.base_hidden_size, train_seconds=round(train_seconds, 1),
    )  # fmt: skip
    print(f"after PAT + merge_and_prune, '{probe.splitlines()[0]}' -> {summary['answer_after']!r}")
    return summary


if __name__ == "__main__":
    main()

"""Instruction tuning with PAT on the commonsense train sets, with transformers' Trainer, ending with a
smaller stock model.

    python examples/train_commonsense.py                                  # SmolLM2-135M, 4 tasks, 100 steps
    python examples/train_commonsense.py --tasks boolq,ARC-Easy --steps 300 --sparsity 0.5
    python examples/train_commonsense.py --model Qwen/Qwen2.5-0.5B --data /path/to/data
    python examples/train_commonsense.py --tiny                           # tiny random Llama, fake records

Data: ``<data>/commonsense/<task>/train.json``, each a JSON list of records
``{"instruction", "input", "output", "answer"}`` (the LLM-Adapters format). Each record becomes

    ### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n{output}</s>

and the loss covers ``{output}</s>`` only. Tasks are concatenated and shuffled. ``--tiny`` needs no
data folder: it trains on a few generated records. Score the pruned model zero-shot with
``python -m benchmarks.quality --evaluate-checkpoint <output>/pruned``.
"""

from __future__ import annotations

import time
from pathlib import Path

from peft import get_peft_model
from transformers import Trainer, TrainingArguments, set_seed

import peft_pat

from _common import (
    PromptAnswerDataset,
    add_commonsense_options,
    base_parser,
    commonsense_pairs,
    device_options,
    finish,
    last_logged,
    load_model,
    pad_batch,
    trained_model,
)


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, steps=100, batch_size=8, lr=5e-4, output="outputs/commonsense")
    add_commonsense_options(parser)
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument(
        "--checkpointing", action="store_true", help="activation checkpointing: less memory, more compute"
    )
    args = parser.parse_args(argv)
    set_seed(args.seed)

    pairs, source = commonsense_pairs(args)  # fails early, with the fix, when the data folder is missing
    base, tokenizer, reload_base = load_model(args)
    train = PromptAnswerDataset(pairs, tokenizer, args.max_length)
    print(f"{len(train)} training examples from {source}")

    config = peft_pat.PATConfig(task_type="CAUSAL_LM", target_sparsity=args.sparsity)
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    print(f"kept width: {config.kept_width} of {config.base_hidden_size} hidden channels")

    trainer_args = TrainingArguments(
        output_dir=str(Path(args.output) / "trainer"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        activation_checkpointing=args.checkpointing, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20), max_grad_norm=1.0, logging_steps=max(1, args.steps // 20),
        seed=args.seed, **device_options(),
    )  # fmt: skip
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

    return finish(
        trained_model(trainer), tokenizer, reload_base, args, pairs[0][0],
        data=source, examples=len(train), hidden_size_before=config.base_hidden_size,
        train_seconds=round(train_seconds, 1), last_logged_task_loss=last_logged(trainer, "pat/task_loss"),
    )  # fmt: skip


if __name__ == "__main__":
    main()

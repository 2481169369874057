"""PAT with TRL's SFTTrainer: pass a PATConfig as ``peft_config`` and add PATCallback, nothing else.

    python examples/sft_trl.py                        # SmolLM2-135M on the commonsense train sets, 100 steps
    python examples/sft_trl.py --tasks boolq --steps 300
    python examples/sft_trl.py --tiny                 # tiny random Llama, generated records (used by the tests)

Needs ``pip install trl`` (tested with trl 1.16.0, which installs next to torch 2.13, transformers 5.24
and peft 0.21 without changing them). The data is the same prompt/completion pairs as
examples/train_commonsense.py; SFTTrainer puts the loss on the completion only and appends EOS.
SFTTrainer builds the PEFT model itself from ``peft_config``, so the PAT tuner goes in exactly where a
LoraConfig would. It trains what the Trainer trains: SFTTrainer builds its loss from the per-token values
of a ``fused_lm_head=True`` call, and the tuner answers that call with its objective (distillation from
the dense model and the auxiliary losses; docs/training.md, TRL). The summary's
``last_logged_distillation_loss`` shows the distillation term at work.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from transformers import set_seed

import peft_pat

from _common import (
    add_commonsense_options,
    base_parser,
    commonsense_pairs,
    device_options,
    finish,
    last_logged,
    load_model,
    trained_model,
)


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, steps=100, batch_size=8, lr=5e-4, output="outputs/sft_trl")
    add_commonsense_options(parser)
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast; default: TRL's (on). The examples' float32 exactness checks run after unwrapping it",
    )
    args = parser.parse_args(argv)
    precision = {} if args.bf16 is None else {"bf16": args.bf16}
    try:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
    except ImportError as error:
        raise SystemExit(f"This example needs TRL: pip install trl ({error}).") from error
    set_seed(args.seed)

    pairs, source = commonsense_pairs(args)
    base, tokenizer, reload_base = load_model(args)
    dataset = Dataset.from_list([{"prompt": prompt, "completion": answer} for prompt, answer in pairs])
    print(f"{len(dataset)} prompt/completion pairs from {source}")

    config = peft_pat.PATConfig(task_type="CAUSAL_LM", target_sparsity=args.sparsity)
    sft_args = SFTConfig(
        output_dir=str(Path(args.output) / "trainer"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20), max_grad_norm=1.0, logging_steps=max(1, args.steps // 20),
        max_length=args.max_length, completion_only_loss=True, seed=args.seed, **precision, **device_options(),
    )  # fmt: skip
    trainer = SFTTrainer(
        model=base,
        args=sft_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=config,  # SFTTrainer calls get_peft_model(base, config): PAT is a registered PEFT type
        callbacks=[peft_pat.PATCallback()],
    )
    model = trainer.model
    model.print_trainable_parameters()
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start

    return finish(
        trained_model(trainer), tokenizer, reload_base, args, pairs[0][0],
        data=source, examples=len(dataset), hidden_size_before=config.base_hidden_size,
        train_seconds=round(train_seconds, 1), last_logged_task_loss=last_logged(trainer, "pat/task_loss"),
        last_logged_distillation_loss=last_logged(trainer, "pat/distillation_loss"),
        kept_channels_logged=last_logged(trainer, "pat/kept_channels"),
    )  # fmt: skip


if __name__ == "__main__":
    main()

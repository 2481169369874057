"""PAT in a plain PyTorch training loop (no Trainer): what PATCallback does for you, written out.

    python examples/plain_loop.py                     # SmolLM2-135M, 60 steps, ~2-4 min on a CPU
    python examples/plain_loop.py --grad-accum 4 --weight-decay 0.01
    python examples/plain_loop.py --tiny              # tiny random Llama, seconds (used by the tests)

The three things a custom loop owes PAT:

1. ``model.set_step(step, total_steps, learning_rate=peak_lr)`` once before the first step and after
   every optimizer step. It drives the mask schedule (temperature, offset, exact top-N freeze at
   ``mask_freeze``); ``learning_rate`` (the optimizer's *peak* rate, once is enough) gives the mask
   logits their own learning rate ``PATConfig.mask_lr`` through a reparametrisation, so no param
   group needs a special rate (this assumes an Adam-type optimizer).
2. No weight decay on the mask logits: ``peft_pat.optimizer_param_groups(model, weight_decay)``
   returns the param groups for that.
3. The auxiliary losses (and the distillation from the dense model) are already in
   ``model(**batch, labels=...).loss``: back-propagate it as is (divided by the accumulation steps,
   like the task loss).
4. ``model.calibrate(batches)`` once before the first step: the importance-aware mask start from the
   first ``PATConfig.calibration_batches`` training batches (forward only; it also protects
   massive-activation channels).

With ``--plots`` (default on) it records the mask every few steps and writes the PNGs of
:mod:`peft_pat.plotting` next to the pruned model.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import get_cosine_schedule_with_warmup, set_seed

import peft_pat
from peft_pat.diagnostics import MaskHistory

from _common import (
    ARITHMETIC_PROMPT,
    PromptAnswerDataset,
    arithmetic_pairs,
    base_parser,
    finish,
    load_model,
    pad_batch,
)


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, steps=60, batch_size=8, lr=1e-3, output="outputs/plain_loop")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay (never on the mask logits)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs (they need matplotlib)")
    args = parser.parse_args(argv)
    set_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    output = Path(args.output)

    base, tokenizer, reload_base = load_model(args)
    config = peft_pat.PATConfig(task_type="CAUSAL_LM", target_sparsity=args.sparsity, r=16, lora_alpha=32)
    model = get_peft_model(base, config).to(device)
    model.print_trainable_parameters()

    train = PromptAnswerDataset(arithmetic_pairs(512, args.seed), tokenizer, max_length=48)
    loader = torch.utils.data.DataLoader(
        train,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=pad_batch(tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(args.seed),
    )
    optimizer = torch.optim.AdamW(peft_pat.optimizer_param_groups(model, args.weight_decay), lr=args.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, args.steps // 20), args.steps)
    history = MaskHistory()
    record_every = max(1, args.steps // 30)

    model.train()
    model.set_step(0, args.steps, learning_rate=args.lr)  # the peak rate: the mask's own rate is derived from it
    calibration = [{k: v.to(device) for k, v in batch.items()} for _, batch in zip(range(8), loader)]
    model.calibrate(calibration)  # importance-aware mask start; protects massive-activation channels
    history.record(model)
    batches = iter(loader)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        for _ in range(args.grad_accum):
            batch = next(batches, None)
            if batch is None:  # next epoch
                batches = iter(loader)
                batch = next(batches)
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss  # task + PAT auxiliary losses
            (loss / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        model.set_step(step, args.steps)  # after every optimizer step; hardens the mask at the freeze step
        if step % record_every == 0 or step == args.steps:
            history.record(model)
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            stats = model.base_model.pat_stats()
            print(
                f"step {step:4d}  loss {float(loss):.4f}  task {stats.get('task_loss', float('nan')):.4f}  "
                f"kept {stats['kept_channels']:.0f}/{config.base_hidden_size}  tau {stats['temperature']:.3g}  "
                f"beta {stats['offset']:.3f}  hard {bool(stats['hard'])}"
            )
    train_seconds = time.perf_counter() - start

    plots = []
    if not args.no_plots:
        from peft_pat.plotting import plot_hsm_norms, plot_mask_evolution

        plots = [str(output / "plots" / "mask_evolution.png"), str(output / "plots" / "hsm_norms.png")]
        plot_mask_evolution(history, plots[0])
        plot_hsm_norms(model, plots[1])

    return finish(
        model, tokenizer, reload_base, args, ARITHMETIC_PROMPT.format(a=23, b=19),
        hidden_size_before=config.base_hidden_size, mask_snapshots=len(history),
        train_seconds=round(train_seconds, 1), plots=plots,
    )  # fmt: skip


if __name__ == "__main__":
    main()

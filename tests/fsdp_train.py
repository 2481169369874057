"""Train PAT with a plain loop under FSDP2 (``fully_shard``) on a tiny Llama and save what the run ends with.

Run by tests/test_fsdp.py twice: as ``torchrun --nproc_per_node 2`` (gloo on the CPU, ``fully_shard`` on every
decoder layer and then on the PEFT model) and as one plain process, with the same global batches: at step s
one process takes rows 4s..4s+3 of a fixed data set, rank r of two takes rows 4s+2r, 4s+2r+1. Every row has
the same number of target tokens, so the mean of the ranks' mean losses is the global batch's mean loss.
The loop is examples/plain_loop.py's (``set_step``, ``calibrate``, ``optimizer_param_groups``, ``.loss``,
gradient clipping) with the package defaults: calibration, distillation and every auxiliary loss on.

After calibration and after every optimizer step the script checks that every rank holds the same masks
(logits in full, hard mask, schedule and calibration buffers) and stops with an error otherwise. Before
training it checks that ``model.calibrate`` refuses the sharded model with a PATStateError, after training
that ``merge_and_prune()`` and a plain ``save_pretrained`` do; it then gathers the full state dict
(``get_model_state_dict(..., full_state_dict=True)``) and saves the adapter with it. Writes
``<out>/result.pt`` (rank 0: logged losses, kept channels and units, the adapter tensors, the refusals)
and ``<out>/adapter``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model

import peft_pat
from peft_pat.sharding import full
from peft_pat.testing import VOCAB, tiny_model

ROWS, LENGTH, GLOBAL_BATCH, CALIBRATION_BATCHES = 96, 12, 4, 8


def data() -> torch.Tensor:
    return torch.randint(3, VOCAB, (ROWS, LENGTH), generator=torch.Generator().manual_seed(0))


def local_batch(ids: torch.Tensor, index: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's rows of global batch ``index``."""
    per_rank = GLOBAL_BATCH // world
    rows = ids[index * GLOBAL_BATCH + rank * per_rank : index * GLOBAL_BATCH + (rank + 1) * per_rank]
    return {"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": rows}


def mask_state(tuner) -> dict[str, torch.Tensor]:
    """Every mask tensor of the model in full (the logits gathered when sharded)."""
    state = {}
    for i, mask in enumerate(tuner.all_masks()):
        state[f"{i}.logits"] = full(mask.logits).detach().clone()
        for name, buffer in mask.named_buffers():
            state[f"{i}.{name}"] = buffer.detach().clone()
    return state


def check_same_on_every_rank(tuner, when: str) -> None:
    """Stop unless every rank holds exactly the masks rank 0 holds."""
    if not dist.is_initialized():
        return
    state = mask_state(tuner)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    for rank, other in enumerate(gathered):
        for key, value in state.items():
            if not torch.equal(other[key], value):
                raise AssertionError(f"{when}: mask tensor {key} differs between this rank and rank {rank}")


def refusal(call) -> str | None:
    """The message of the PATStateError ``call`` raises, or None if it raises none."""
    try:
        call()
    except peft_pat.PATStateError as error:
        return str(error)
    return None


def train_with_trainer(model, args) -> tuple[list[float], peft_pat.PATCallback]:
    """The Trainer with PATCallback (calibration, schedule, decay kept off the logits, logs, mask snapshots) on
    tests/ddp_train.py's data: rows with different target counts, so the auxiliary losses are weighted by
    each micro-batch's token share."""
    from ddp_train import SequentialTrainer, VariableTargets
    from transformers import TrainingArguments

    callback = peft_pat.PATCallback(record_mask_every=2)
    training = TrainingArguments(
        output_dir=str(args.out / "trainer"), max_steps=args.steps, per_device_train_batch_size=GLOBAL_BATCH,
        learning_rate=args.lr, weight_decay=0.01, max_grad_norm=1.0, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = SequentialTrainer(model=model, args=training, train_dataset=VariableTargets(), callbacks=[callback])
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e], callback


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prune-axes", default=None, help="comma separated, e.g. hidden,mlp (default: the package's)")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument(
        "--uncalibrated",
        action="store_true",
        help="calibration_batches=0 and the paper's schedule (freeze at step 2 of 8): the mask hardens to the "
        "top-N of its trained logits",
    )
    parser.add_argument("--trainer", action="store_true", help="train with the Trainer and PATCallback instead")
    parser.add_argument("--shard", action="store_true", help="fully_shard also in a single process (a 1-rank group)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    elif args.shard:
        dist.init_process_group("gloo", init_method=f"file://{args.out.parent / (args.out.name + '.rendezvous')}",
                                rank=0, world_size=1)  # fmt: skip
    rank = dist.get_rank() if world > 1 else 0

    torch.manual_seed(0)
    axes = args.prune_axes.split(",") if args.prune_axes else None
    extra = {"calibration_batches": 0, "mask_milestone": 1 / 3, "mask_freeze": 0.8 / 3} if args.uncalibrated else {}
    config = peft_pat.PATConfig(task_type="CAUSAL_LM", target_sparsity=0.25, prune_axes=axes, **extra)
    model = get_peft_model(tiny_model("llama"), config)
    sharded = dist.is_initialized()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    tuner = model.base_model
    ids = data()
    if args.trainer:
        losses, callback = train_with_trainer(model, args)
        if rank == 0:
            result = {
                "losses": losses,
                "kept": {axis: mask.kept_indices() for axis, mask in tuner.masks_of("default").items()},
                "adapter": {k: full(v).detach().clone() for k, v in model.state_dict().items() if "pat_" in k},
                "mask_history": callback.mask_history.stacked("logits"),
            }
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save(result, args.out / "result.pt")
        if sharded:
            dist.destroy_process_group()
        return
    optimizer = torch.optim.AdamW(peft_pat.optimizer_param_groups(model), lr=args.lr)

    model.train()
    model.set_step(0, args.steps, learning_rate=args.lr)
    calibration = [local_batch(ids, i, rank, world) for i in range(CALIBRATION_BATCHES)]
    refused = {}
    if sharded:  # refused before it reads a batch or changes anything
        refused["calibrate"] = refusal(lambda: model.calibrate(calibration))
    summary = None if args.uncalibrated else peft_pat.calibrate(model, calibration)
    check_same_on_every_rank(tuner, "after calibration")
    losses, trace = [], []  # trace: every mask's logits (full) after each step
    for step in range(1, args.steps + 1):
        batch = local_batch(ids, CALIBRATION_BATCHES + step - 1, rank, world)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.set_step(step, args.steps)
        logged = loss.detach().clone()
        if world > 1:
            dist.all_reduce(logged)
            logged /= world
        losses.append(float(logged))
        check_same_on_every_rank(tuner, f"after step {step}")
        trace.append({axis: full(mask.logits).detach().clone() for axis, mask in tuner.masks_of("default").items()})

    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        refused["merge_and_prune"] = refusal(lambda: model.merge_and_prune())
        refused["save_pretrained"] = refusal(lambda: model.save_pretrained(str(args.out / "refused")))
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    else:
        state = model.state_dict()
    if rank == 0:
        masks = {axis: mask.kept_indices() for axis, mask in tuner.masks_of("default").items()}
        model.save_pretrained(str(args.out / "adapter"), state_dict=state)
        result = {
            "world_size": world,
            "losses": losses,
            "logits": trace,
            "kept": masks,
            "calibration": summary,
            "adapter": {k: v.detach().clone() for k, v in state.items() if "pat_" in k},
            "refused": refused,
        }
        torch.save(result, args.out / "result.pt")
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

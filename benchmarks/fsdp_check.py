"""PAT under accelerate's FSDP2 on one GPU, against the same Trainer run without FSDP.

accelerate applies FSDP only on accelerators, so the multi-process CPU tests (tests/test_fsdp.py) call
``fully_shard`` directly. This check runs the path a user takes on a GPU: ``TrainingArguments(fsdp="full_shard",
fsdp_config={"version": 2, ...})`` with ``PATCallback``, launched as one process (``torchrun --nproc_per_node 1``),
where every sharded parameter is still a DTensor: the calibration forward through the sharded model, the
mask's top-N, the identity loss on the decoder layers' L0, the callback's gradient check, weight-decay undo,
logs and mask snapshots all take their sharded code paths. Then it saves with ``trainer.save_model()`` (the
Trainer gathers a full state dict under ``state_dict_type=FULL_STATE_DICT``), reloads that adapter in this
process and merges it.

    python -m benchmarks.fsdp_check                          # tiny random Llama, 8 steps (seconds)
    python -m benchmarks.fsdp_check --model smollm2-135m --steps 20
    python -m benchmarks.fsdp_check --output /tmp/fsdp_check.json

Prints, and writes as JSON: the logged losses of both runs and their largest relative difference, whether
the kept channels agree, the relative L2 distance of the two adapters, whether the mask logits were DTensors
during the FSDP run, and the largest logit difference between the reloaded FSDP adapter and its merged
model. Exits 1 when a check fails (losses or adapter beyond 1e-3 relative, different kept channels, the
masks not sharded, or an inexact merge), 0 otherwise. Without CUDA it says so and exits 0 having run nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TOLERANCE = 1e-3  # relative, for the losses and the adapter (measured on CPU with fully_shard: <= 8.6e-7)


class RandomTokens(torch.utils.data.Dataset):
    """Seeded random rows with 3..10 ignored leading labels (different token counts per micro-batch)."""

    def __init__(self, vocab: int, rows: int = 128, length: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (rows, length), generator=generator)
        self.labels = self.ids.clone()
        for i in range(rows):
            self.labels[i, : 3 + i % 8] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def base_model(name: str):
    if name == "tiny":
        from peft_pat.testing import tiny_model

        return tiny_model("llama")
    from peft_pat.offline_models import load_causal_lm

    return load_causal_lm(name)[0]


def worker(args: argparse.Namespace) -> None:
    """One Trainer run (``--fsdp``: under accelerate FSDP2) writing its losses, kept units and adapter."""
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import peft_pat
    from peft_pat.sharding import full, is_sharded

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class SeesDTensors(TrainerCallback):
        sharded_masks: bool | None = None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if self.sharded_masks is None:
                tuner = peft_pat.find_pat_tuner(model)
                self.sharded_masks = all(is_sharded(m.logits) for m in tuner.all_masks())

    torch.manual_seed(0)
    base = base_model(args.model)
    model = get_peft_model(base, peft_pat.PATConfig(task_type="CAUSAL_LM", target_sparsity=0.25))
    layer_cls = type(base.model.layers[0]).__name__
    fsdp = {
        "fsdp": "full_shard",
        "fsdp_config": {
            "version": 2,
            "transformer_layer_cls_to_wrap": [layer_cls],
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
        },
    }
    training = TrainingArguments(
        output_dir=str(args.out / "trainer"), max_steps=args.steps, per_device_train_batch_size=4,
        learning_rate=1e-3, weight_decay=0.01, max_grad_norm=1.0, logging_steps=1, report_to=[],
        save_strategy="no", disable_tqdm=True, seed=0, **(fsdp if args.fsdp else {}),
    )  # fmt: skip
    sees = SeesDTensors()
    trainer = SequentialTrainer(
        model=model, args=training, train_dataset=RandomTokens(base.config.vocab_size),
        callbacks=[peft_pat.PATCallback(record_mask_every=2), sees],
    )  # fmt: skip
    trainer.train()
    trainer.save_model(str(args.out / "adapter"))
    tuner = peft_pat.find_pat_tuner(trainer.model)
    state = trainer.model.state_dict()
    adapter = {k: full(v).detach().float().cpu() for k, v in state.items() if "pat_" in k}  # gathers: every rank
    if trainer.args.process_index == 0:
        result = {
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "kept": {axis: m.kept_indices().cpu() for axis, m in tuner.masks_of("default").items()},
            "adapter": adapter,
            "sharded_masks": sees.sharded_masks,
        }
        torch.save(result, args.out / "result.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relative_l2(got: dict, expected: dict) -> float:
    num = sum(float((got[k] - v).pow(2).sum()) for k, v in expected.items())
    return (num / max(sum(float(v.pow(2).sum()) for v in expected.values()), 1e-30)) ** 0.5


def compare(folder: Path, model_name: str) -> dict:
    from peft import PeftModel

    plain = torch.load(folder / "plain" / "result.pt", weights_only=False)
    fsdp = torch.load(folder / "fsdp" / "result.pt", weights_only=False)
    loss_diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(fsdp["losses"], plain["losses"], strict=True))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = PeftModel.from_pretrained(base_model(model_name), str(folder / "fsdp" / "adapter")).to(device).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
        small = model.merge_and_prune()
        got = small(input_ids=ids).logits.float()
    merge_diff = float((got - expected).abs().max())
    report = {
        "steps": len(plain["losses"]),
        "losses_plain": plain["losses"],
        "losses_fsdp": fsdp["losses"],
        "max_relative_loss_difference": loss_diff,
        "kept_equal": all(torch.equal(fsdp["kept"][a], k) for a, k in plain["kept"].items()),
        "adapter_relative_l2": relative_l2(fsdp["adapter"], plain["adapter"]),
        "masks_were_dtensors": bool(fsdp["sharded_masks"]),
        "merged_width": small.config.hidden_size,
        "merge_max_logit_difference": merge_diff,
        "logit_scale": float(expected.abs().max()),
    }
    report["ok"] = bool(
        loss_diff <= TOLERANCE
        and report["kept_equal"]
        and report["adapter_relative_l2"] <= TOLERANCE
        and report["masks_were_dtensors"]
        and merge_diff <= 2e-5 * max(1.0, report["logit_scale"])
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (random 2-layer Llama), smollm2-135m, or a folder")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--output", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if not torch.cuda.is_available():
        print("fsdp_check: no CUDA GPU here; accelerate applies FSDP only on accelerators, so nothing was run.")
        return 0
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory(prefix="fsdp_check-") as tmp:
        folder = Path(tmp)
        common = ["-m", "benchmarks.fsdp_check", "--worker", "--model", args.model, "--steps", str(args.steps)]
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
        for name, command in (
            ("plain", [sys.executable, *common, "--out", str(folder / "plain")]),
            ("fsdp", [*launch, "--master_port", str(free_port()), *common, "--fsdp", "--out", str(folder / "fsdp")]),
        ):
            done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"fsdp_check: the {name} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
                return 1
        report = compare(folder, args.model)
    report["device"] = torch.cuda.get_device_name(0)
    print(json.dumps(report, indent=2))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    print("fsdp_check:", "OK" if report["ok"] else "MISMATCH")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

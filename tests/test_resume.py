"""A Trainer run killed midway and resumed from its checkpoint ends bit-exactly where an uninterrupted run
ends (CPU, fixed seeds): same mask, same adapter weights. The schedule state lives in the checkpoint's
adapter_model.safetensors, not only in Python attributes.

Schedule over 12 steps: s0 = round(2/3 * 12) = 8, freeze at round(0.6 * 12) = 7. Checkpoints every 3 steps;
the run is killed right after checkpoint 6 (soft mask, before the freeze) or 9 (hard mask). Weight decay
(PATCallback undoes it on the mask logits), the mask's own learning rate and LoRA dropout (RNG state) are on.
"""

import json
import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from peft_pat import AdapterMismatchError, PATCallback
from peft_pat.mask import milestone_step, offset, temperature
from peft_pat.testing import tiny_model
from peft_pat.training.checkpoints import LOCK_NAME, MARKER, checkpoint_problem, mark_complete, set_aside_incomplete

from helpers import TokenDataset, wrap

TOTAL, FREEZE, S0 = 12, 7, 8
LEARNING_RATE, MASK_LR = 5e-3, 0.05
PAT_SETTINGS = {"mask_milestone": 2 / 3, "mask_freeze": 0.6, "mask_lr": MASK_LR, "lora_dropout": 0.1}
MASK_STATE = ("logits", "step", "total_steps", "is_hard", "hard_mask", "lr_ratio", "base_lr", "bad_grad_events")


class Killed(Exception):
    pass


class KillAfterCheckpoint(TrainerCallback):
    """Simulates the process dying right after checkpoint ``step`` was written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed


def train(output_dir, kill_at=None, resume_from=None, **pat_settings):
    """A fresh model and Trainer (as after a restart); returns the PEFT model after training."""
    torch.manual_seed(0)
    model = wrap(tiny_model("llama"), **{**PAT_SETTINGS, **pat_settings})
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=TOTAL,
        per_device_train_batch_size=4,
        learning_rate=LEARNING_RATE,
        weight_decay=0.1,
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        seed=7,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    callbacks = [PATCallback()] + ([KillAfterCheckpoint(kill_at)] if kill_at else [])
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=24, length=12), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return model


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Every adapter parameter and every mask buffer (the full trained state), cloned."""
    state = {k: v.detach().clone() for k, v in model.named_parameters() if "pat_" in k}
    state.update({k: v.clone() for k, v in model.named_buffers() if "pat_mask" in k or "pat_unit_masks" in k})
    return state


# the hidden mask alone, and with the per-layer masks of every other axis (query heads, KV heads, MLP units)
AXES = {
    "hidden": {"prune_axes": ["hidden"]},
    "all-axes": {"prune_axes": ["hidden", "mlp", "heads", "kv_heads"], "target_width": 48,
                 "target_intermediate_size": 64, "target_num_attention_heads": 1, "target_num_key_value_heads": 1},
}  # fmt: skip


@pytest.fixture(scope="module", params=list(AXES))
def uninterrupted(request, tmp_path_factory):
    model = train(tmp_path_factory.mktemp("uninterrupted"), **AXES[request.param])
    masks = model.base_model.masks_of("default")
    assert len(masks) == 1 + 3 * (request.param != "hidden")
    assert all(mask.hardened and int(mask.step) == TOTAL for mask in masks.values())
    return request.param, adapter_state(model)


@pytest.mark.parametrize("kill_at", [6, 9], ids=["before-freeze", "after-freeze"])
def test_killed_and_resumed_run_is_bit_exact(tmp_path, uninterrupted, kill_at):
    axes, uninterrupted = uninterrupted
    with pytest.raises(Killed):
        train(tmp_path, kill_at=kill_at, **AXES[axes])
    checkpoint = tmp_path / f"checkpoint-{kill_at}"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")) == [
        f"checkpoint-{s}" for s in range(3, kill_at + 1, 3)
    ]

    # The schedule state is in the checkpoint's adapter file.
    saved = load_file(checkpoint / "adapter_model.safetensors")
    mask_state = {k.rsplit(".", 1)[-1]: v for k, v in saved.items() if ".pat_mask." in k}
    assert set(MASK_STATE) <= set(mask_state)
    assert int(mask_state["step"]) == kill_at and int(mask_state["total_steps"]) == TOTAL
    assert bool(mask_state["is_hard"]) == (kill_at >= FREEZE)
    assert float(mask_state["base_lr"]) == LEARNING_RATE
    assert float(mask_state["lr_ratio"]) == pytest.approx(MASK_LR / LEARNING_RATE)

    # ... and a model loaded from it (no Trainer, no callback) has its Python-side mirrors rebuilt from it.
    loaded = PeftModel.from_pretrained(tiny_model("llama"), checkpoint, is_trainable=True).base_model.pat_mask
    mask = loaded["default"]
    assert milestone_step(TOTAL, mask.milestone_fraction) == S0
    assert mask.hardened == (kill_at >= FREEZE) and mask.learning_rate_ratio == float(mask_state["lr_ratio"])
    assert float(mask.tau) == pytest.approx(temperature(kill_at, S0))
    assert float(mask.beta) == pytest.approx(offset(kill_at, S0))

    resumed = adapter_state(train(tmp_path, resume_from=checkpoint, **AXES[axes]))
    assert resumed.keys() == uninterrupted.keys()
    different = [k for k in uninterrupted if not torch.equal(resumed[k], uninterrupted[k])]
    assert not different, f"resumed run differs from the uninterrupted one in {different}"


# ---------------------------------------------------------------- a width setting edited before the resume
@pytest.mark.parametrize(
    ("kill_at", "edit", "old_format"),
    [
        (9, {"target_sparsity": 0.5}, False),
        (6, {"target_sparsity": None, "target_width": 32}, False),
        (9, {"target_sparsity": 0.5}, True),
    ],
    ids=["hard-mask-sparsity-edited", "soft-mask-width-edited", "hard-mask-adapter-without-kept-target"],
)
def test_resume_with_an_edited_width_is_refused(tmp_path, kill_at, edit, old_format):
    """The checkpoint's mask keeps 48 channels; a script edited to keep 32 must not resume into a mixed state."""
    with pytest.raises(Killed):
        train(tmp_path, kill_at=kill_at)
    checkpoint = tmp_path / f"checkpoint-{kill_at}"
    if old_format:  # written by peft-pat 0.4 (no kept_target, no marker): the hard mask tells the width
        weights = checkpoint / "adapter_model.safetensors"
        save_file({k: v for k, v in load_file(weights).items() if not k.endswith("kept_target")}, weights)
        (checkpoint / MARKER).unlink()
    setting = next(f"{k}={v}" for k, v in edit.items() if v is not None)
    with pytest.raises(AdapterMismatchError, match=rf"keeps 48 of 64 .*PATConfig \({setting}\) keeps 32.*restore the "
                       r"original setting \(target_width=48.*start a new run in another output_dir"):  # fmt: skip
        train(tmp_path, resume_from=checkpoint, **edit)


# ---------------------------------------------------------------- which checkpoint folders count as complete
def fake_checkpoint(root, step: int):
    """The files the Trainer writes for a PEFT model, small: adapter weights, optimizer, trainer state (last)."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PAT"}))
    save_file({"w": torch.arange(64.0)}, folder / "adapter_model.safetensors")
    torch.save({"state": {0: torch.ones(64)}}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def tear(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("none", None),
        ("trainer_state.json", "does not parse"),
        ("adapter_model.safetensors", "adapter_model.safetensors"),
        ("optimizer.pt", "optimizer.pt is not a whole torch archive"),
        ("adapter_config.json", "adapter_config.json does not parse"),
        ("no trainer state", "no trainer_state.json"),
        ("another step", "names step 7"),
    ],
)
def test_a_checkpoint_without_a_marker_is_judged_by_its_contents(tmp_path, damage, reason):
    folder = fake_checkpoint(tmp_path, 6)
    if damage == "no trainer state":
        (folder / "trainer_state.json").unlink()
    elif damage == "another step":
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    elif damage != "none":
        tear(folder / damage)
    problem = checkpoint_problem(folder)
    assert problem is None if reason is None else reason in problem


def test_the_marker_lists_the_files_of_the_complete_checkpoint(tmp_path):
    folder = fake_checkpoint(tmp_path, 6)
    mtime = folder.stat().st_mtime_ns
    mark_complete(folder)
    assert folder.stat().st_mtime_ns == mtime  # rotation (save_total_limit) orders checkpoints by mtime
    assert checkpoint_problem(folder) is None
    (folder / "optimizer.pt").unlink()  # e.g. a rotation killed half way through deleting the folder
    assert "optimizer.pt is missing" in checkpoint_problem(folder)


def test_incomplete_checkpoints_are_moved_aside_never_deleted(tmp_path):
    complete, torn = fake_checkpoint(tmp_path, 3), fake_checkpoint(tmp_path, 6)
    (torn / "trainer_state.json").unlink()
    tear(torn / "optimizer.pt")
    before = {p.name: p.read_bytes() for p in torn.iterdir()}
    with pytest.warns(RuntimeWarning, match=r"checkpoint-6 -> \.checkpoint-6\.incomplete-\w+ \(it has no trainer_stat"):
        moved = set_aside_incomplete(tmp_path)
    (aside,) = moved.values()
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == before
    assert get_last_checkpoint(str(tmp_path)) == str(complete)
    fake_checkpoint(tmp_path, 9)
    rotate_checkpoints(str(tmp_path), save_total_limit=1)  # counts and deletes only checkpoint-N folders
    assert sorted(p.name for p in tmp_path.iterdir()) == [aside.name, "checkpoint-9"]


def test_a_live_run_keeps_its_checkpoints(tmp_path):
    """Another process trains into output_dir (it holds the lock): a second Trainer moves nothing."""
    fcntl = pytest.importorskip("fcntl")
    torn = fake_checkpoint(tmp_path, 6)
    (torn / "trainer_state.json").unlink()  # what a live run's save looks like half way
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a second open file: conflicts like another process
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
        with pytest.warns(RuntimeWarning, match="another process is training into"):
            PATCallback._set_aside_incomplete_checkpoints(args)
        assert torn.is_dir()
    finally:
        os.close(fd)
    with pytest.warns(RuntimeWarning, match="moved aside"):
        PATCallback._set_aside_incomplete_checkpoints(args)
    assert not torn.exists()


def test_a_run_below_later_checkpoints_is_warned(tmp_path):
    """transformers writes over checkpoint-6 and -9 in place when a run from step 3 reaches them: their markers go."""
    for step in (3, 6, 9):
        mark_complete(fake_checkpoint(tmp_path, step))
    args = TrainingArguments(output_dir=str(tmp_path), save_strategy="steps", report_to=[], use_cpu=True)
    callback = PATCallback()
    with pytest.warns(RuntimeWarning, match=r"later steps than this run starts from \(checkpoint-6, checkpoint-9\)"):
        callback._hold_output_dir(args, TrainerState(global_step=3))
    try:
        assert [p.parent.name for p in sorted(tmp_path.glob(f"*/{MARKER}"))] == ["checkpoint-3"]
        assert all(checkpoint_problem(tmp_path / f"checkpoint-{s}") is None for s in (3, 6, 9))  # by content
    finally:
        callback.on_train_end(args, None, None)
    assert callback._locked_output_dir is None

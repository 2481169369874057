"""Training glue for transformers' Trainer (and TRL, which builds on it).

:class:`PATCallback` drives the mask schedule from the Trainer's step counter (``set_step`` after
every optimizer step and at the start, so resumed runs continue the schedule), keeps the mask logits
out of weight decay, and adds the PAT numbers (kept channels, temperature, offset, each auxiliary
loss) to the Trainer's logs so TensorBoard / W&B / the console show them. It also makes checkpoints
safe to resume from after a kill at any moment (:mod:`peft_pat.training.checkpoints`): each finished save gets
a completion marker, and incomplete ``checkpoint-N`` folders are moved aside when the Trainer is built,
before ``train(resume_from_checkpoint=True)`` picks the newest folder.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..diagnostics import MaskHistory
from ..errors import PATTypeError
from ..model import calibrate, find_pat_tuner
from ..sharding import full
from . import checkpoints

LOG_PREFIX = "pat/"


def _inner_optimizer(optimizer: Any):
    return getattr(optimizer, "optimizer", optimizer)


def _distributed_barrier() -> None:
    """Wait for every process of a running torch.distributed job (nothing without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _saves_checkpoints(args) -> bool:
    return str(getattr(args, "save_strategy", "no")).rsplit(".", 1)[-1].lower() != "no"


class PATCallback(TrainerCallback):
    """Add to ``Trainer(callbacks=[...])``; nothing else in the training script changes.

    ``record_mask_every=N`` keeps a :class:`~peft_pat.diagnostics.MaskHistory` in ``self.mask_history``:
    a snapshot of the mask at the start, every N optimizer steps and at the last step, for
    :func:`peft_pat.plotting.plot_mask_evolution`. Off by default (each snapshot holds 3 vectors of
    ``hidden_size`` values on the CPU).
    """

    def __init__(self, log: bool = True, record_mask_every: int | None = None) -> None:
        if record_mask_every is not None and (
            isinstance(record_mask_every, bool) or not isinstance(record_mask_every, int) or record_mask_every < 1
        ):
            raise PATTypeError(
                f"PATCallback(record_mask_every=...) must be a positive int (steps between snapshots) or None, "
                f"got {record_mask_every!r}."
            )
        self.log = log
        self.record_mask_every = record_mask_every
        self.mask_history = MaskHistory() if record_mask_every is not None else None
        self._decay_undo: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        self._warned_optimizer = False
        self._locked_output_dir: str | None = None

    # -------------------------------------------------------------- ordering
    def on_init_end(self, args, state, control, **kwargs):
        """Run first among the callbacks, and move incomplete checkpoints of ``output_dir`` aside.

        The second happens here because ``Trainer(...)`` fires this event before ``train()`` resolves
        ``resume_from_checkpoint=True`` to the newest ``checkpoint-N`` (``on_train_begin`` comes after the
        checkpoint is loaded). The first puts the PAT numbers in ``logs`` before reporters see them:
        transformers (5.24) has no supported way to do this from a callback: the Trainer puts the
        ``report_to`` integrations before user callbacks, ``TrainerCallback`` has no priority, and
        ``CallbackHandler.call_event`` passes the model, optimizer, scheduler and dataloaders but neither
        the handler nor the Trainer (whose ``pop_callback`` / ``add_callback`` only append). So the handler
        is found up the call stack (it calls this event); if it is not found, the order stays as it was.
        """
        frame = sys._getframe(1)
        while frame is not None:
            handler = frame.f_locals.get("self")
            callbacks = getattr(handler, "callbacks", None)
            if isinstance(callbacks, list) and self in callbacks:
                callbacks.remove(self)
                callbacks.insert(0, self)
                break
            frame = frame.f_back
        del frame
        self._set_aside_incomplete_checkpoints(args)

    # -------------------------------------------------------------- checkpoints (peft_pat/training/checkpoints.py)
    @staticmethod
    def _set_aside_incomplete_checkpoints(args) -> None:
        """Move incomplete ``checkpoint-N`` folders of ``output_dir`` aside before ``train()`` resolves
        ``resume_from_checkpoint=True``: the process that writes checkpoints does it while the others wait."""
        output_dir = getattr(args, "output_dir", None)
        if not output_dir:
            return
        with args.main_process_first(local=args.save_on_each_node, desc="PAT checkpoint check"):
            if not args.should_save or not Path(output_dir).is_dir():
                return
            if not checkpoints.acquire_output_lock(output_dir):
                warnings.warn(
                    f"PATCallback: another process is training into {output_dir} (it holds "
                    f"{Path(output_dir) / checkpoints.LOCK_NAME}), so its checkpoints are left as they are; a "
                    "half-written one is not moved aside. Use another output_dir, or wait for that run to end.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return
            try:
                checkpoints.set_aside_incomplete(output_dir)
            finally:
                checkpoints.release_output_lock(output_dir)

    def _hold_output_dir(self, args, state) -> None:
        """While training: hold ``output_dir``'s lock and drop the markers of later checkpoints this run rewrites."""
        if not args.should_save or not _saves_checkpoints(args) or self._locked_output_dir is not None:
            return
        if not checkpoints.acquire_output_lock(args.output_dir):
            warnings.warn(
                f"PATCallback: another process is training into {args.output_dir} (it holds its "
                f"{checkpoints.LOCK_NAME}); two runs writing the same checkpoint folders overwrite each other. Use "
                "another output_dir for this run.",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self._locked_output_dir = str(args.output_dir)
        later = []
        for folder in sorted(Path(args.output_dir).iterdir()):
            match = checkpoints.CHECKPOINT_NAME.match(folder.name)
            if match and folder.is_dir() and int(match[1]) > state.global_step and checkpoints.drop_marker(folder):
                later.append(folder.name)
        if later:
            warnings.warn(
                f"PATCallback: {args.output_dir} holds checkpoints of later steps than this run starts from "
                f"({', '.join(later)}); the Trainer writes over them in place when it reaches those steps. Their "
                "completion markers were removed, so until then they are judged by their contents. Start the run "
                "in a new output_dir to keep them apart.",
                RuntimeWarning,
                stacklevel=3,
            )

    def on_save(self, args, state, control, **kwargs):
        """Mark the checkpoint just written complete (the Trainer has written and rotated every file by now)."""
        _distributed_barrier()  # every rank has returned from its part of the save
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            checkpoints.mark_complete(folder)

    # -------------------------------------------------------------- schedule
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tuner = find_pat_tuner(model)
        if tuner is None:
            raise PATTypeError(
                f"PATCallback: the model being trained ({type(model).__name__}) has no PAT adapter, so there is no "
                "mask to schedule. Wrap the base model with get_peft_model(base, PATConfig(task_type='CAUSAL_LM')) "
                "before building the Trainer, or remove PATCallback."
            )
        self._hold_output_dir(args, state)
        tuner.set_step(state.global_step, max(state.max_steps, 1), learning_rate=args.learning_rate)
        self._calibrate(tuner, kwargs.get("train_dataloader"), model)
        if self.mask_history is not None:
            self.mask_history.record(tuner)

    @staticmethod
    def _calibrate(tuner, dataloader, model) -> None:
        """Importance-aware mask start from the first batches of the training dataloader, once per adapter.

        Skipped when the adapter was calibrated already (a resumed run loads it from the checkpoint).
        The random state is forked, so the training batches that follow are the ones an uncalibrated
        run would see.
        """
        names = [n for n in tuner.pat_mask if n in tuner.active_adapters and tuner.needs_calibration(n)]
        if not names:
            return
        if dataloader is None:
            raise PATTypeError(
                "PATCallback: the Trainer passed no train_dataloader, so the PAT mask cannot be calibrated. Call "
                "model.calibrate(batches) before training, or set PATConfig(calibration_batches=0)."
            )
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            for name in names:
                calibrate(model, dataloader, adapter_name=name)  # through model: a sharded one gathers its weights

    def on_step_end(self, args, state, control, model=None, **kwargs):
        tuner = find_pat_tuner(model)
        if tuner is not None:
            tuner.set_step(min(state.global_step, state.max_steps), max(state.max_steps, 1))
            every = self.record_mask_every
            if every is not None and (state.global_step % every == 0 or state.global_step >= state.max_steps):
                self.mask_history.record(tuner)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._locked_output_dir is not None:
            checkpoints.release_output_lock(self._locked_output_dir)
            self._locked_output_dir = None
        tuner = find_pat_tuner(model)
        if tuner is None:
            return
        soft = [name for name in tuner.pat_mask if not all(m.hardened for m in tuner.masks_of(name).values())]
        if soft:
            warnings.warn(
                f"PAT: training ended before the mask froze for adapter(s) {soft}; merge_and_prune() will harden it "
                "to the exact top-N channels. Lower mask_freeze or train longer for train = deploy.",
                stacklevel=2,
            )

    # -------------------------------------------------------------- optimizer treatment of the mask
    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Zero non-finite mask gradients (after clipping) and record the decay the optimizer will apply."""
        tuner = find_pat_tuner(model)
        self._decay_undo = []
        if tuner is None:
            return
        masks = tuner.all_masks()
        logits = [m.logits for m in masks if m.logits.requires_grad]
        for p in logits:
            if p.grad is not None:
                if not bool(torch.isfinite(full(p.grad)).all()):  # the whole gradient: every rank decides alike
                    p.grad = torch.where(torch.isfinite(p.grad), p.grad, torch.zeros_like(p.grad))
                    for mask in masks:
                        if mask.logits is p:
                            mask.bad_grad_events.add_(1)
        inner = _inner_optimizer(optimizer)
        if inner is None:
            return
        for group in inner.param_groups:
            decay = float(group.get("weight_decay", 0.0) or 0.0)
            if decay == 0.0:
                continue
            for p in logits:
                if not any(p is q for q in group["params"]):
                    continue
                if not isinstance(inner, torch.optim.AdamW):
                    if not self._warned_optimizer:
                        warnings.warn(
                            f"PATCallback: weight_decay={decay} applies to the PAT mask logits and the optimizer "
                            f"{type(inner).__name__} does not decay decoupled, so it cannot be undone; use AdamW "
                            "(the Trainer default) or a param group with weight_decay=0 for the mask.",
                            stacklevel=2,
                        )
                        self._warned_optimizer = True
                    continue
                self._decay_undo.append((p, p.detach().clone(), float(group["lr"]) * decay))

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Give back what AdamW's decoupled decay took from the mask logits: p += lr * wd * p_before."""
        with torch.no_grad():
            for p, before, factor in self._decay_undo:
                if not torch.equal(p, before):  # the step ran (an fp16 overflow skips it)
                    p.add_(before * factor)
        self._decay_undo = []

    # -------------------------------------------------------------- logging
    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self.log or logs is None:
            return
        tuner = find_pat_tuner(model)
        if tuner is None:
            return
        entries: dict[str, float] = {}
        for name in tuner.pat_mask:
            suffix = "" if len(tuner.pat_mask) == 1 else f"/{name}"
            for axis, mask in tuner.masks_of(name).items():
                prefix = "" if axis == "hidden" else f"{axis}_"
                for key, value in mask.stats().items():
                    if key != "step":
                        entries[f"{LOG_PREFIX}{prefix}{key}{suffix}"] = value
        for key, value in tuner.last_auxiliary_losses.items():
            entries[f"{LOG_PREFIX}{key}"] = value
        logs.update(entries)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)

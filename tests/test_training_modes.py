"""PAT under the training modes people switch on: gradient checkpointing, gradient accumulation,
bf16 autocast and torch.compile."""

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_pat import PATCallback
from peft_pat.testing import VOCAB, tiny_inputs, tiny_model

from helpers import assert_bf16_autocast_step, assert_logits_close, logits, wrap


def trainable_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------ checkpointing
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("phase_step", [3, 12])  # soft gate (step 3 of 30) and hard gate (after the freeze at 8)
@pytest.mark.parametrize("distillation_weight", [0.0, 1.0])
def test_checkpointing_gives_the_same_gradients(use_reentrant, phase_step, distillation_weight):
    """The gate is recomputed inside every checkpointed layer during backward, never cached per forward; the
    teacher forward (no grad, PAT bypassed) runs through the same checkpointed layers."""
    ids = tiny_inputs(length=9)
    grads = []
    for checkpointing in (False, True):
        base = tiny_model("llama")
        if checkpointing:
            base.activation_checkpointing_enable({"use_reentrant": use_reentrant})
        model = wrap(base, init_weights=False, distillation_weight=distillation_weight)
        model.set_step(phase_step, 30)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(trainable_grads(model))
    assert grads[0].keys() == grads[1].keys()
    assert "base_model.pat_mask.default.logits" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------ accumulation
class VariableTargets(torch.utils.data.Dataset):
    """8 rows whose number of target tokens differs (2..9), so token-weighted averaging matters."""

    def __init__(self, identical_rows=False):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (8, 10), generator=g)
        if identical_rows:
            self.ids[:] = self.ids[0]
        self.labels = self.ids.clone()
        for i in range(8):
            self.labels[i, : 1 + (0 if identical_rows else i)] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class SequentialTrainer(Trainer):
    """Fixed sample order, so a run with accumulation sees exactly the batch of a run without."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


class FirstStepGradients(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = trainable_grads(model)


def first_step(tmp_path, batch_size, accumulation, dataset, **config):
    torch.manual_seed(0)
    model = wrap(tiny_model("llama"), init_weights=False, **config)
    grab = FirstStepGradients()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=1e-3, max_grad_norm=0.0, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = SequentialTrainer(model=model, args=args, train_dataset=dataset, callbacks=[PATCallback(), grab])
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "pat/task_loss" in entry)
    return grab.grads, logged


@pytest.mark.parametrize("distillation_weight", [0.0, 0.5])
def test_gradient_accumulation_counts_the_auxiliary_loss_once(tmp_path, distillation_weight):
    """Same global batch of 4 as 1 x 4, 2 micro-batches x 2 and 4 x 1: the Trainer normalises the task loss
    by the step's token count (num_items_in_batch) and PATModel weights the auxiliary loss by each
    micro-batch's token share and the distillation loss by its distilled tokens over the step's label
    tokens, so every gradient (mask logits, L0 via the identity loss) is the same."""
    dataset = VariableTargets()
    reference, _ = first_step(tmp_path, 4, 1, dataset, distillation_weight=distillation_weight)
    assert reference["base_model.pat_mask.default.logits"].abs().max() > 0
    for batch_size, accumulation in ((2, 2), (1, 4)):
        grads, _ = first_step(tmp_path, batch_size, accumulation, dataset, distillation_weight=distillation_weight)
        for name in reference:
            # atol: float32 rounding at the gradient's own scale (summation order differs per micro-batch)
            atol = 1e-6 * float(reference[name].abs().max())
            torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=atol, msg=name)


def test_logged_task_loss_is_a_per_token_mean_under_accumulation(tmp_path):
    """With num_items_in_batch the model's loss is a share of the step's loss; the log shows the mean."""
    dataset = VariableTargets(identical_rows=True)
    _, plain = first_step(tmp_path, 4, 1, dataset)
    _, accumulated = first_step(tmp_path, 2, 2, dataset)
    assert accumulated["pat/task_loss"] == pytest.approx(plain["pat/task_loss"], rel=1e-5)
    auxiliary = sum(plain[f"pat/{key}_loss"] for key in ("active", "polarization", "identity"))
    assert plain["pat/task_loss"] == pytest.approx(plain["loss"] - auxiliary, rel=1e-4)


# ------------------------------------------------------------------------------------------ bf16 autocast
@pytest.mark.parametrize("distillation_weight", [0.0, 1.0])
def test_bf16_autocast_trains_the_mask_in_float32(distillation_weight):
    model = wrap(tiny_model("llama"), init_weights=False, distillation_weight=distillation_weight)
    assert_bf16_autocast_step(model, tiny_inputs(length=9), "cpu", rel=2e-2)
    mask = model.base_model.pat_mask["default"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mask.gate().dtype == torch.float32  # the gate itself is computed in float32 under autocast


def test_trainer_with_bf16_then_exact_merge(tmp_path):
    """Trainer(bf16=True) on the CPU autocasts; after training, the float32 model merges exactly. The
    Trainer leaves autocast wrapped around model.forward: unwrap it before comparing float32 outputs."""
    model = wrap(tiny_model("llama"))
    dataset = VariableTargets()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3, bf16=True,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[PATCallback()])
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    assert model.base_model.pat_mask["default"].hardened
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    ids = tiny_inputs()
    expected = logits(model, ids)
    assert_logits_close(logits(model.merge_and_prune(), ids), expected)


# ------------------------------------------------------------------------------------------ torch.compile
def compile_counters():
    from torch._dynamo.utils import counters

    return counters


@pytest.mark.slow
def test_compiled_training_recompiles_only_at_the_freeze():
    """The schedule moves every step (tau, beta are buffers, so no guard sees them); the only recompile is
    the switch from the soft gate to the exact hard mask, and the forward has no graph break. Uses the
    aot_eager backend: guards, graph breaks and AOT autograd are the same as with inductor, minus codegen."""
    torch._dynamo.reset()
    counters = compile_counters()
    counters.clear()
    model = wrap(tiny_model("llama"))
    ids = tiny_inputs(length=9)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    compiled = torch.compile(model, backend="aot_eager")
    total = 10  # the mask freezes at step 3 (mask_freeze 0.8/3)
    model.train()
    model.set_step(0, total, learning_rate=1e-3)
    graphs = []
    for step in range(total):
        compiled(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.set_step(step + 1, total)
        graphs.append(counters["stats"]["unique_graphs"])
    assert model.base_model.pat_mask["default"].hardened
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[0] == 1  # one graph for the whole forward
    assert graphs[-1] == 2 and len(set(graphs)) == 2  # one recompile, at the freeze, never again


@pytest.mark.slow
def test_compiled_forward_and_backward_match_eager():
    """Inductor: the soft-phase forward matches eager and the backward reaches the mask logits."""
    torch._dynamo.reset()
    results = []
    for compile_it in (False, True):
        model = wrap(tiny_model("llama", num_hidden_layers=1), init_weights=False)  # 1 layer: less codegen
        model.set_step(2, 30, learning_rate=1e-3)
        model.train()
        ids = tiny_inputs(length=9)
        run = torch.compile(model) if compile_it else model
        out = run(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), trainable_grads(model)))
    (eager_logits, eager_grads), (compiled_logits, compiled_grads) = results
    assert_logits_close(compiled_logits, eager_logits)
    assert compiled_grads["base_model.pat_mask.default.logits"].abs().max() > 0
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)

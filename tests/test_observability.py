"""What PAT shows while it trains: mask history (PATCallback(record_mask_every=N)), HSM norms, PNG plots."""

import sys

import pytest
import torch
from transformers import Trainer, TrainingArguments

from peft_pat import PATCallback, PATStateError, PATTypeError
from peft_pat.diagnostics import MaskHistory, hsm_norms, lowrank_frobenius_norm
from peft_pat.testing import tiny_model

from helpers import TokenDataset, wrap

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """9 Trainer steps (the mask freezes at step round(9 * 0.8 / 3) = 2), a snapshot every 2 steps, logs every step."""
    torch.manual_seed(0)
    model = wrap(tiny_model("llama"), target_sparsity=0.25)
    callback = PATCallback(record_mask_every=2)
    args = TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("run")), max_steps=9, per_device_train_batch_size=4,
        learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback])
    trainer.train()
    return model, callback.mask_history, trainer.state.log_history


def test_callback_records_the_mask_every_n_steps_and_at_the_end(trained):
    model, history, _ = trained
    assert history.steps == [0, 2, 4, 6, 8, 9]
    mask = model.base_model.pat_mask["default"]
    first, last = history.snapshots[0], history.snapshots[-1]
    assert not first.hard and first.offset == pytest.approx(0.5) and first.temperature == pytest.approx(1.0)
    assert last.hard and torch.equal(last.kept, mask.hard_mask > 0.5) and int(last.kept.sum()) == 48
    assert torch.equal(last.gate, mask.hard_mask)
    assert [s.hard for s in history.snapshots] == [False, True, True, True, True, True]
    changes = history.kept_set_changes()
    assert len(changes) == 6 and changes[0] == 0 and changes[-1] == 0  # frozen set never changes
    assert history.stacked("logits").shape == (6, 64)


def test_history_round_trips_through_torch_save(trained, tmp_path):
    _, history, _ = trained
    torch.save(history.state_dict(), tmp_path / "history.pt")
    restored = MaskHistory.from_state_dict(torch.load(tmp_path / "history.pt"))
    assert restored.steps == history.steps and restored.kept_width == 48
    assert torch.equal(restored.stacked("logits"), history.stacked("logits"))


def test_record_mask_every_must_be_a_positive_int():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(PATTypeError, match="record_mask_every"):
            PATCallback(record_mask_every=bad)
    assert PATCallback().mask_history is None


def test_hsm_norms_at_initialisation_and_against_the_dense_product():
    model = wrap(tiny_model("llama", num_hidden_layers=3))
    rows = hsm_norms(model)
    assert [(r.layer, r.branch) for r in rows[:3]] == [
        (None, "embedding"),
        (0, "mlp.down_proj"),
        (0, "self_attn.o_proj"),
    ]
    assert len(rows) == 1 + 2 * 3
    assert all(r.lowrank_norm == 0.0 and r.scale_mean_abs == 1.0 for r in rows)  # L1 = 0, s = 1 at the start
    random_model = wrap(tiny_model("llama"), init_weights=False)
    o_proj = random_model.base_model.model.model.layers[1].self_attn.o_proj
    down, up = o_proj.hsm_factors("default")
    dense = float(torch.linalg.matrix_norm(up.detach() @ down.detach()))
    row = next(r for r in hsm_norms(random_model) if r.module == "model.layers.1.self_attn.o_proj")
    assert row.lowrank_norm == pytest.approx(dense, rel=1e-5) == pytest.approx(lowrank_frobenius_norm(down, up))
    assert row.scale_mean_abs != 1.0


def test_plots_are_written_as_png(trained, tmp_path):
    pytest.importorskip("matplotlib")
    from peft_pat.plotting import plot_hsm_norms, plot_mask_evolution, plot_training_curves

    model, history, log_history = trained
    paths = [tmp_path / "mask.png", tmp_path / "sub" / "hsm.png", tmp_path / "curves.png"]
    plot_mask_evolution(history, paths[0])
    plot_hsm_norms(model, paths[1])
    figure = plot_training_curves(log_history, paths[2])
    assert len(figure.axes) >= 2
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, path


def test_plots_refuse_what_they_cannot_draw(trained):
    pytest.importorskip("matplotlib")
    from peft_pat.plotting import plot_hsm_norms, plot_mask_evolution, plot_training_curves

    _, history, _ = trained
    with pytest.raises(PATStateError, match="at least 2 snapshots"):
        plot_mask_evolution(MaskHistory(snapshots=history.snapshots[:1], kept_width=48))
    with pytest.raises(PATTypeError, match="needs a MaskHistory"):
        plot_mask_evolution([1, 2])
    with pytest.raises(PATStateError, match="no training log entries"):
        plot_training_curves([{"epoch": 1.0}])
    with pytest.raises(PATTypeError, match="no PAT adapter"):
        plot_hsm_norms(tiny_model("llama"))


def test_missing_matplotlib_is_a_clear_error(trained, monkeypatch):
    from peft_pat import plotting

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes `import matplotlib.figure` fail
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plotting.plot_mask_evolution(trained[1])

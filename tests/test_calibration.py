"""peft_pat.calibration: channel statistics from a forward pass, massive-activation detection, top-N."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_pat import PATConfig
from peft_pat.calibration import (
    activation_channel_scores,
    channel_statistics,
    massive_channels,
    residual_norms,
    top_channels,
)
from peft_pat.families import family_for_model
from peft_pat.testing import tiny_inputs, tiny_model


def reference_scores(model, batches):
    """Direct recomputation: run each norm on its recorded input, no hooks shared with the package."""
    family = family_for_model(model)
    norms = residual_norms(model, family)
    inputs = {i: [] for i in range(len(norms))}
    handles = [
        n.register_forward_hook(lambda m, a, o, i=i: inputs[i].append(a[0].detach())) for i, n in enumerate(norms)
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    score = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    energy = torch.zeros_like(score)
    for i, norm in enumerate(norms):
        rows_h, rows_y = [], []
        for batch, h in zip(batches, inputs[i]):
            keep = batch["attention_mask"].bool()
            rows_h.append(h[keep].double())
            rows_y.append(norm(h)[keep].detach().double())
        h, y = torch.cat(rows_h), torch.cat(rows_y)
        score += y.pow(2).mean(0).sqrt()
        energy = torch.maximum(energy, h.pow(2).mean(0))
    return score, energy


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_statistics_match_direct_computation_and_skip_padding(family):
    model = tiny_model(family).eval()
    ids = tiny_inputs(batch=2, length=9)
    attention = torch.ones_like(ids)
    attention[1, :4] = 0  # left padding on the second row
    batches = [{"input_ids": ids, "attention_mask": attention, "labels": ids}]
    stats = channel_statistics(model, batches)
    score, energy = reference_scores(model, batches)
    torch.testing.assert_close(stats.score, score, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(stats.energy, energy, rtol=1e-6, atol=1e-9)
    assert stats.tokens == int(attention.sum())
    torch.testing.assert_close(activation_channel_scores(model, batches), score, rtol=1e-6, atol=1e-9)


def test_statistics_through_a_pat_model_equal_the_base_at_start():
    base = tiny_model("llama").eval()
    batches = [{"input_ids": tiny_inputs(batch=2, length=6)}]
    expected = channel_statistics(base, batches)
    peft_model = get_peft_model(tiny_model("llama"), PATConfig(target_sparsity=0.25)).train()
    got = channel_statistics(peft_model, batches)
    torch.testing.assert_close(got.score, expected.score, rtol=1e-5, atol=1e-8)
    assert peft_model.training  # the caller's mode is restored


def test_massive_channels_and_protected_top_channels():
    energy = torch.ones(16, dtype=torch.float64)
    energy[3] = 500.0
    energy[11] = 99.0  # below the 100x default ratio
    assert massive_channels(energy).tolist() == [3]
    assert massive_channels(energy, ratio=50.0).tolist() == [3, 11]
    scores = torch.arange(16, dtype=torch.float64)  # channel 3 scores low
    assert top_channels(scores, 4).tolist() == [12, 13, 14, 15]
    assert top_channels(scores, 4, protected=torch.tensor([3])).tolist() == [3, 13, 14, 15]


def test_empty_calibration_is_refused():
    model = tiny_model("llama")
    ids = tiny_inputs(batch=1, length=4)
    with pytest.raises(ValueError, match="no \\(non-padding\\) token"):
        channel_statistics(model, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}])


def test_calibrate_by_hand_with_calibration_batches_0_reads_a_bounded_number_of_batches():
    """calibration_batches=0 (no automatic start) and an endless batch iterator used to hang calibrate()."""
    import itertools

    from peft_pat.testing import tiny_inputs, tiny_model

    from helpers import wrap

    model = wrap(tiny_model("llama"), calibration_batches=0)
    seen = []

    def endless():
        for i in itertools.count():
            seen.append(i)
            yield {"input_ids": tiny_inputs(length=6)}

    summary = model.base_model.calibrate(endless())
    assert summary["batches"] == 8 and len(seen) == 8

"""The shared mask: schedule (Eqs. 8-10), exact top-N hardening, auxiliary losses, NaN guard."""

import math

import pytest
import torch

from peft_pat import PATConfigError, PATTypeError
from peft_pat.mask import PATMask, freeze_step, milestone_step, offset, temperature


def make_mask(d=16, kept=12, **kw):
    kw = {"milestone": 1 / 3, "freeze": 0.8 / 3, **kw}
    return PATMask(d, kept, **kw)


def test_schedule_matches_paper_example():
    # docs/method.md §3: s0 = 10k gives tau = 1, 2, 4, 6.6, 13.3 at steps 1, 100, 1k, 2.5k, 5k.
    s0 = 10_000
    for step, tau in [(1, 1.0), (100, 2.0), (1000, 4.0), (2500, 6.64), (5000, 13.29)]:
        assert temperature(step, s0) == pytest.approx(tau, rel=5e-3)
    assert temperature(int(0.8 * s0), s0) == pytest.approx(math.log(s0) / math.log(1.25), rel=1e-6)
    for step, beta in [(0, 0.5), (100, 0.49), (1000, 0.4), (2500, 0.25), (5000, 0.0), (9000, 0.0)]:
        assert offset(step, s0) == pytest.approx(beta)


def test_schedule_points_as_fractions():
    assert milestone_step(30_000, 1 / 3) == 10_000
    assert freeze_step(30_000, 0.8 / 3) == 8_000
    assert milestone_step(3, 1 / 3) == 2  # never below 2 (ln s0 > 0)


def test_identity_gate_at_start():
    mask = make_mask()
    assert torch.equal(mask.gate(), torch.ones(16))  # sigmoid(0) + 0.5


def test_hardens_to_exact_top_n_at_freeze():
    mask = make_mask(d=16, kept=12)
    with torch.no_grad():
        mask.logits.copy_(torch.linspace(-1, 1, 16))
    total = 30
    hardened_at = [s for s in range(total + 1) if mask.set_step(s, total)]
    assert hardened_at == [freeze_step(total, 0.8 / 3)]
    gate = mask.gate()
    assert set(gate.unique().tolist()) == {0.0, 1.0}
    assert int(gate.sum()) == 12
    assert mask.kept_indices().tolist() == list(range(4, 16))  # the 12 largest logits
    assert bool(mask.is_hard)


def test_ties_are_broken_by_index_and_count_is_exact():
    mask = make_mask(d=10, kept=4)
    mask.harden()  # all logits equal (0): keep the first four channels
    assert mask.kept_indices().tolist() == [0, 1, 2, 3]
    assert torch.equal(torch.sign(mask.logits), mask.hard_mask * 2 - 1)


def test_gradients_reach_logits_before_freeze_only():
    mask = make_mask()
    mask.set_step(1, 100)
    mask.gate().sum().backward()
    assert mask.logits.grad is not None and mask.logits.grad.abs().sum() > 0
    mask.logits.grad = None
    mask.harden()
    assert not mask.gate().requires_grad


def test_own_learning_rate_scales_logits_not_gradients():
    a, b = make_mask(), make_mask(mask_lr=1e-2)
    assert b.configure_learning_rate(1e-3, 100) == pytest.approx(10.0)  # kappa = mask_lr / lr
    with torch.no_grad():
        a.logits.fill_(0.2)
        b.logits.fill_(0.02)
    for m in (a, b):
        m.set_step(3, 100)
    assert torch.allclose(a.gate(), b.gate())  # same effective logits w = kappa * theta
    a.gate().sum().backward()
    b.gate().sum().backward()
    assert torch.allclose(a.logits.grad, b.logits.grad)  # clipping sees the gradient of w, unscaled


def test_automatic_mask_lr_is_two_over_s0_and_idempotent():
    mask = make_mask()
    with torch.no_grad():
        mask.logits.fill_(0.3)
    kappa = mask.configure_learning_rate(2e-4, 3000)  # s0 = 1000: mask_lr = 2e-3
    assert kappa == pytest.approx(10.0)
    assert torch.allclose(mask.effective_logits(), torch.full((16,), 0.3))  # values kept
    theta = mask.logits.detach().clone()
    mask.set_step(5, 3000, learning_rate=2e-4)
    assert torch.equal(mask.logits.detach(), theta)


def test_adam_moves_logits_at_the_mask_learning_rate():
    mask = make_mask(mask_lr=0.05)
    mask.configure_learning_rate(1e-3, 100)
    optimizer = torch.optim.Adam([mask.logits], lr=1e-3)
    mask.effective_logits().sum().backward()
    optimizer.step()
    assert torch.allclose(mask.effective_logits().detach(), torch.full((16,), -0.05), atol=1e-6)


def test_active_loss_counts_and_pushes_all_logits_together():
    mask = make_mask(d=8, kept=4)
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([0.3, 0.2, 0.1, 0.4, 0.5, -0.1, 0.6, 0.7]))
    losses = mask.mask_losses()
    assert losses["active"].item() == pytest.approx(abs(7 - 4) / 4)
    losses["active"].backward()
    assert torch.allclose(mask.logits.grad, torch.full((8,), 1 / 4))


def test_polarisation_is_finite_when_one_side_is_empty():
    mask = make_mask(d=8, kept=4)
    with torch.no_grad():
        mask.logits.fill_(1.0)
    polar = mask.mask_losses()["polarization"]
    assert torch.isfinite(polar) and polar.item() == pytest.approx(0.25)


def test_nonfinite_gradients_are_zeroed_and_counted():
    mask = make_mask()
    mask.set_step(2, 100)
    (mask.gate() * float("nan")).sum().backward()
    assert torch.equal(mask.logits.grad, torch.zeros(16))
    assert int(mask.bad_grad_events) == 1


def test_nonfinite_update_is_restored_at_next_step():
    mask = make_mask()
    mask.set_step(1, 100)
    good = mask.logits.detach().clone()
    with torch.no_grad():
        mask.logits[3] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        mask.set_step(2, 100)
    assert torch.equal(mask.logits.detach(), good)


@pytest.mark.parametrize(("step", "total"), [(-1, 10), (11, 10), (0, 0)])
def test_set_step_outside_run(step, total):
    with pytest.raises(PATConfigError):
        make_mask().set_step(step, total)


def test_set_step_types():
    with pytest.raises(PATTypeError):
        make_mask().set_step(1.0, 10)


def test_state_survives_state_dict_roundtrip():
    mask = make_mask()
    with torch.no_grad():
        mask.logits.copy_(torch.randn(16))
    for s in range(10):
        mask.set_step(s, 30)
    copy = make_mask()
    copy.load_state_dict(mask.state_dict())
    assert copy.hardened == mask.hardened and torch.equal(copy.gate(), mask.gate())
    assert float(copy.tau) == float(mask.tau) and int(copy.step) == 9


# ---------------------------------------------------------------------------------------------- per-layer masks
def test_grouped_mask_keeps_exactly_n_in_every_group():
    """One mask mechanism for per-layer axes: logits (groups, units), top-N per row, losses per row."""
    torch.manual_seed(0)
    mask = PATMask(10, 4, groups=3, milestone=1 / 3, freeze=0.8 / 3, random_init=True)
    mask.set_step(0, 30)
    assert mask.gate().shape == (3, 10)
    losses = mask.mask_losses()
    w = mask.effective_logits().detach()
    per_row = ((w >= 0).sum(-1).float() - 4).abs() / 4
    assert float(losses["active"]) == pytest.approx(float(per_row.mean()))
    mask.harden()
    assert mask.hard_mask.sum(-1).tolist() == [4.0, 4.0, 4.0]
    kept = mask.kept_indices()
    assert kept.shape == (3, 4)
    for row in range(3):
        assert kept[row].tolist() == sorted(torch.topk(w[row], 4).indices.tolist())
    assert mask.stats()["kept_channels"] == 4.0


def test_grouped_importance_start_ranks_within_each_group():
    mask = PATMask(6, 2, groups=2, milestone=1 / 3, freeze=0.8 / 3)
    scores = torch.tensor([[0.0, 5, 1, 2, 9, 3], [9.0, 8, 7, 6, 5, 4]])
    gate = mask.start_from_importance(scores, torch.zeros(2, 6, dtype=torch.bool), margin=1.0)
    assert gate.shape == (2, 6)
    assert mask.fade_target.tolist() == [[0, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0]]
    mask.harden()
    assert mask.kept_indices().tolist() == [[1, 4], [0, 1]]

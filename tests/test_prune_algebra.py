"""Pure folding/pruning algebra against direct computation (no models)."""

import math

import pytest
import torch

from peft_pat import prune


def rms_norm(x, gain, eps, offset=0.0):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (offset + gain)


def test_fold_producer_equals_hsm_after_linear():
    torch.manual_seed(0)
    d_in, d, r = 12, 10, 3
    w, b = torch.randn(d, d_in), torch.randn(d)
    a, bb = torch.randn(4, d_in), torch.randn(d, 4)
    down, up, g = torch.randn(r, d), torch.randn(d, r), torch.rand(d)
    x = torch.randn(5, d_in)
    delta = prune.lora_delta(a, bb, 0.5)
    y = x @ (w + delta).T + b
    expected = (y + (y @ down.T) @ up.T) * g
    new_w, new_b = prune.fold_producer(w, b, delta, down, up, g)
    assert torch.allclose(x @ new_w.T + new_b, expected, atol=1e-5)


def test_fold_embedding_equals_hsm_after_lookup():
    torch.manual_seed(0)
    vocab, d, r = 50, 8, 2
    e, down, up, g = torch.randn(vocab, d), torch.randn(r, d), torch.randn(d, r), torch.rand(d)
    ids = torch.tensor([3, 7, 49])
    y = e[ids]
    expected = (y + (y @ down.T) @ up.T) * g
    assert torch.allclose(prune.fold_embedding(e, down, up, g)[ids], expected, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_width_factor_makes_rms_norm_exact_including_eps(offset):
    """norm_d'(c * x_K) with gain[K] / c equals norm_d(x)[K] when x is zero outside K, eps unchanged."""
    torch.manual_seed(0)
    d, eps = 16, 0.5  # a large eps, so an epsilon bug cannot hide
    keep = torch.tensor([0, 2, 3, 7, 8, 9, 12, 15])
    x = torch.zeros(4, d)
    x[:, keep] = torch.randn(4, keep.numel())
    gain = torch.rand(d)
    c = prune.width_factor(d, keep.numel())
    assert c == pytest.approx(math.sqrt(8 / 16))
    full = rms_norm(x, gain, eps, offset)[:, keep]
    new_gain = prune.rescale_norm_gain(gain, keep, offset, 1 / c)
    pruned = rms_norm(c * x[:, keep], new_gain, eps, offset)
    assert torch.allclose(pruned, full, atol=1e-6)


def test_divide_norm_gain_leaves_zero_divisors():
    gain, div = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 0.0, 0.5])
    assert torch.allclose(prune.divide_norm_gain(gain, div, 0.0), torch.tensor([0.5, 2.0, 6.0]))
    assert torch.allclose(prune.divide_norm_gain(gain, div, 1.0), torch.tensor([0.0, 2.0, 7.0]))


def test_prune_keeps_dtype():
    w = torch.randn(6, 4, dtype=torch.bfloat16)
    keep = torch.tensor([1, 3])
    assert prune.prune_rows(w, keep, 0.5).dtype == torch.bfloat16
    assert prune.prune_columns(w, keep).shape == (6, 2)

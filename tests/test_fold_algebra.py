"""Pure folding/pruning algebra against direct computation (no models)."""

import math

import pytest
import torch

from peft_pat.merge import fold


def _lora_delta(lora_a, lora_b, scaling):
    """dW = scaling * B A, whole and float32: the reference the chunked LoRA folds are checked against."""
    return scaling * (lora_b.float() @ lora_a.float())


def rms_norm(x, gain, eps, offset=0.0):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (offset + gain)


def test_fold_producer_equals_hsm_after_linear():
    torch.manual_seed(0)
    d_in, d, r = 12, 10, 3
    w, b = torch.randn(d, d_in), torch.randn(d)
    a, bb = torch.randn(4, d_in), torch.randn(d, 4)
    down, up, g = torch.randn(r, d), torch.randn(d, r), torch.rand(d)
    x = torch.randn(5, d_in)
    delta = _lora_delta(a, bb, 0.5)
    y = x @ (w + delta).T + b
    expected = (y + (y @ down.T) @ up.T) * g
    new_w, new_b = fold.fold_producer(w, delta, down, up, g), fold.fold_bias(b, down, up, g)
    assert torch.allclose(x @ new_w.T + new_b, expected, atol=1e-5)


def test_fold_embedding_equals_hsm_after_lookup():
    torch.manual_seed(0)
    vocab, d, r = 50, 8, 2
    e, down, up, g = torch.randn(vocab, d), torch.randn(r, d), torch.randn(d, r), torch.rand(d)
    ids = torch.tensor([3, 7, 49])
    y = e[ids]
    expected = (y + (y @ down.T) @ up.T) * g
    assert torch.allclose(fold.fold_embedding(e, down, up, g)[ids], expected, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_width_factor_makes_rms_norm_exact_including_eps(offset):
    """norm_d'(c * x_K) with gain[K] / c equals norm_d(x)[K] when x is zero outside K, eps unchanged."""
    torch.manual_seed(0)
    d, eps = 16, 0.5  # a large eps, so an epsilon bug cannot hide
    keep = torch.tensor([0, 2, 3, 7, 8, 9, 12, 15])
    x = torch.zeros(4, d)
    x[:, keep] = torch.randn(4, keep.numel())
    gain = torch.rand(d)
    c = fold.width_factor(d, keep.numel())
    assert c == pytest.approx(math.sqrt(8 / 16))
    full = rms_norm(x, gain, eps, offset)[:, keep]
    new_gain = fold.rescale_norm_gain(gain, keep, offset, 1 / c)
    pruned = rms_norm(c * x[:, keep], new_gain, eps, offset)
    assert torch.allclose(pruned, full, atol=1e-6)


def test_divide_norm_gain_leaves_zero_divisors():
    gain, div = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 0.0, 0.5])
    assert torch.allclose(fold.divide_norm_gain(gain, div, 0.0), torch.tensor([0.5, 2.0, 6.0]))
    assert torch.allclose(fold.divide_norm_gain(gain, div, 1.0), torch.tensor([0.0, 2.0, 7.0]))


def test_prune_keeps_dtype():
    w = torch.randn(6, 4, dtype=torch.bfloat16)
    keep = torch.tensor([1, 3])
    assert fold.prune_rows(w, keep, 0.5).dtype == torch.bfloat16
    assert fold.prune_columns(w, keep).shape == (6, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_in_place_and_fused_folds_agree_bit_for_bit(dtype, monkeypatch):
    """A fold in place, a fold then a cut, and a cut fold (keep=) give the very same bits."""
    monkeypatch.setattr(fold, "CHUNK_BYTES", 200)  # force many chunks
    torch.manual_seed(0)
    d, n, vocab, r = 16, 12, 30, 3
    keep = torch.tensor([0, 3, 4, 9, 10, 15])
    c = fold.width_factor(d, keep.numel())
    w, e = torch.randn(d, n).to(dtype), torch.randn(vocab, d).to(dtype)
    consumer = torch.randn(n, d).to(dtype)
    lora = fold.LoRAUpdate(torch.randn(2, n), torch.randn(d, 2), 0.5)
    consumer_lora = fold.LoRAUpdate(torch.randn(2, d), torch.randn(n, 2), 0.5)
    down, up, g = torch.randn(r, d), torch.randn(d, r), torch.rand(d)

    folded = fold.fold_producer(w, lora, down, up, g)
    in_place = w.clone()
    fold.fold_producer(in_place, lora, down, up, g, out=in_place)
    assert torch.equal(in_place, folded)
    assert torch.equal(fold.fold_producer(w, lora, down, up, g, keep, c), fold.prune_rows(folded, keep, c))
    full_delta = fold.fold_producer(w, _lora_delta(lora.lora_a, lora.lora_b, 0.5), down, up, g, dtype=torch.float32)
    torch.testing.assert_close(folded.float(), full_delta.to(dtype).float())

    for e_down, e_up in ((down, up), (None, None)):
        folded_e = fold.fold_embedding(e, e_down, e_up, g)
        in_place = e.clone()
        fold.fold_embedding(in_place, e_down, e_up, g, out=in_place)
        assert torch.equal(in_place, folded_e)
        cut = fold.fold_embedding(e, e_down, e_up, g, keep, c)
        assert torch.equal(cut, fold.prune_columns(folded_e, keep, c))
        rows = fold.row_chunks(vocab, d)  # a block of rows at a time (peft-pat merge reads them so)
        assert len(rows) > 1
        blocks = torch.cat([fold.fold_embedding(e[r], e_down, e_up, g, keep, c) for r in rows])
        assert torch.equal(blocks, cut)

    merged = fold.merge_lora(consumer, consumer_lora)
    in_place = consumer.clone()
    fold.merge_lora(in_place, consumer_lora, out=in_place)
    assert torch.equal(in_place, merged)
    assert torch.equal(fold.merge_lora(consumer, consumer_lora, keep), fold.prune_columns(merged, keep))

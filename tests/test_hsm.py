"""The fused low-rank HSM (peft_pat/hsm.py) against the same math composed in plain autograd, on the test device
(the `device` fixture: cpu unless $PEFT_PAT_TEST_DEVICE says otherwise)."""

import pytest
import torch

from peft_pat.hsm import low_rank_hsm


def reference(y, down, up, gate):
    return (y + (y @ down.T) @ up.T) * gate


def inputs(dtype, shape=(2, 5, 12), rank=3, requires_grad=(True, True, True, True), seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    tensors = [
        torch.randn(*shape, generator=g),
        torch.randn(rank, d, generator=g),
        torch.randn(d, rank, generator=g),
        torch.rand(d, generator=g) + 0.5,
    ]
    tensors[3][1] = 0.0  # a hard-masked channel
    return [t.to(device, dtype).requires_grad_(r) for t, r in zip(tensors, requires_grad)]


def test_gradcheck_float64(device):
    assert torch.autograd.gradcheck(low_rank_hsm, inputs(torch.float64, device=device))


@pytest.mark.parametrize(
    "requires_grad",
    [(True, True, True, True), (False, True, True, True), (True, False, False, True), (False, False, False, True)],
)
def test_matches_autograd_float32(requires_grad, device):
    fused_in = inputs(torch.float32, requires_grad=requires_grad, device=device)
    ref_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in fused_in]
    out, expected = low_rank_hsm(*fused_in), reference(*ref_in)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for a, b in zip(fused_in, ref_in):
        if b.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
        else:
            assert a.grad is None


def test_bfloat16_close_to_float32(device):
    low = inputs(torch.bfloat16, shape=(4, 16, 64), rank=8, device=device)
    high = [t.detach().float().requires_grad_() for t in low]
    out, expected = low_rank_hsm(*low), reference(*high)
    assert out.dtype == torch.bfloat16
    assert float((out.float() - expected).abs().max()) <= 2e-2 * float(expected.detach().abs().max())
    grad = torch.randn_like(expected)
    out.backward(grad.bfloat16())
    expected.backward(grad)
    for a, b in zip(low, high):
        assert a.grad.dtype == torch.bfloat16
        scale = float(b.grad.abs().max())
        assert float((a.grad.float() - b.grad).abs().max()) <= 3e-2 * scale


def test_non_contiguous_grad_and_no_grad_mode(device):
    y, down, up, gate = inputs(torch.float32, device=device)
    out = low_rank_hsm(y, down, up, gate)
    grad = torch.randn(out.shape[::-1], device=device).permute(2, 1, 0)  # non-contiguous upstream gradient
    out.backward(grad)
    ref = [t.detach().clone().requires_grad_() for t in (y, down, up, gate)]
    reference(*ref).backward(grad)
    for a, b in zip((y, down, up, gate), ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(low_rank_hsm(y, down, up, gate), reference(y, down, up, gate))

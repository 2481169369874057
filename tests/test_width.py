"""Kept-width rounding (docs/method.md §6)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_pat import PATConfigError
from peft_pat.width import AUTO_TOLERANCE, resolve_kept_width


@pytest.mark.parametrize(
    ("d", "heads", "sparsity", "expected"),
    [
        (4096, 32, 0.25, 3072),  # Llama-2-7B at 25%: the paper's 3072
        (4096, 32, 0.50, 2048),
        (4096, 32, 0.30, 2816),  # nearest multiple of 128
        (576, 9, 0.25, 432),  # SmolLM2-135M: 9 heads allow no multiple of 64 below 576
        (576, 9, 0.50, 288),
        (64, 4, 0.25, 48),
    ],
)
def test_known_widths(d, heads, sparsity, expected):
    assert resolve_kept_width(d, heads, sparsity, None) == expected


def test_default_sparsity_is_a_quarter():
    assert resolve_kept_width(4096, 32, None, None) == 3072


def test_explicit_width_must_divide_by_heads():
    assert resolve_kept_width(64, 4, None, 40) == 40
    with pytest.raises(PATConfigError, match=r"not a multiple of 4 .* Use one of \[40, 44\]"):
        resolve_kept_width(64, 4, None, 42)


@pytest.mark.parametrize("width", [0, 64, 100])
def test_unreachable_explicit_width(width):
    with pytest.raises(PATConfigError, match="cannot be reached"):
        resolve_kept_width(64, 4, None, width)


def test_unreachable_sparsity():
    # 8 heads on a width of 16: the only valid widths are 8, so 5% sparsity rounds to 16 = d.
    with pytest.raises(PATConfigError, match="cannot be reached on hidden_size=16"):
        resolve_kept_width(16, 8, 0.05, None)


def test_explicit_multiple():
    assert resolve_kept_width(4096, 32, 0.3, None, width_multiple=256) % 256 == 0


@settings(max_examples=200, deadline=None)
@given(
    heads=st.integers(1, 48),
    head_dim=st.integers(1, 160),
    sparsity=st.floats(0.05, 0.95),
)
def test_width_is_valid_and_close(heads, head_dim, sparsity):
    d = heads * head_dim
    try:
        n = resolve_kept_width(d, heads, sparsity, None)
    except PATConfigError:
        # Only legitimate when no multiple of `heads` lies strictly inside (0, d) near the target.
        target = (1 - sparsity) * d
        nearest = round(target / heads) * heads
        assert not 0 < nearest < d
        return
    assert 0 < n < d and n % heads == 0
    best = round((1 - sparsity) * d / heads) * heads
    assert abs(n - (1 - sparsity) * d) <= max(AUTO_TOLERANCE * d, abs(best - (1 - sparsity) * d)) + 1e-9
    assert math.gcd(n, heads) == heads

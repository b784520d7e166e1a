"""The attention entry point (backends agree with the eager reference) and both RoPE layouts."""

import pytest
import torch

from unimodal.attention import apply_rope, attention, rope_inv_freq, rotary
from unimodal.masks import block_causal_mask


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_backends_match_eager_reference(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16) for _ in range(3))
    pos = torch.arange(7).expand(2, 7)
    valid = torch.tensor([[1] * 7, [1] * 5 + [0] * 2], dtype=torch.bool)
    mask = block_causal_mask(pos, pos, 3, valid, valid)
    ref = attention(q, k, v, mask, "eager")
    torch.testing.assert_close(attention(q, k, v, mask, backend), ref, atol=1e-5, rtol=1e-5)


def test_unknown_backend_and_mask_shape_errors():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        attention(q, q, q, None, "fast")
    pos = torch.arange(3)[None]
    with pytest.raises(ValueError, match="mask covers"):
        attention(q, q, q, block_causal_mask(pos, pos, 1))


def _complex_rotation(x, positions, inv_freq, pairs):
    """Reference: rotate channel pairs (i, j) as complex numbers x_i + i x_j by angle pos * f."""
    out = x.clone()
    for f_idx, (i, j) in enumerate(pairs):
        angle = positions[:, None, :].float() * inv_freq[f_idx]
        z = torch.complex(x[..., i], x[..., j]) * torch.exp(1j * angle)
        out[..., i], out[..., j] = z.real, z.imag
    return out


def test_neox_rope_rotates_half_split_pairs():
    torch.manual_seed(0)
    x, pos = torch.randn(2, 2, 5, 8), torch.randint(0, 50, (2, 5))
    inv = rope_inv_freq(8, 5e5)
    expected = _complex_rotation(x, pos, inv, [(i, i + 4) for i in range(4)])
    torch.testing.assert_close(apply_rope(x, rotary(pos, inv, "neox")), expected, atol=1e-5, rtol=1e-5)


def test_interleaved_rope_rotates_adjacent_pairs_of_the_first_channels_only():
    torch.manual_seed(0)
    x, pos = torch.randn(2, 2, 5, 10), torch.randint(0, 50, (2, 5))
    inv = rope_inv_freq(6, 1e4)  # rotate channels 0..5, pass 6..9 through
    expected = _complex_rotation(x, pos, inv, [(0, 1), (2, 3), (4, 5)])
    out = apply_rope(x, rotary(pos, inv, "interleaved"))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[..., 6:], x[..., 6:])


def test_rope_is_relative():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    inv = rope_inv_freq(8, 1e4)
    pos = torch.arange(4)[None]
    rot, rot17 = rotary(pos, inv), rotary(pos + 17, inv)
    scores = apply_rope(q, rot) @ apply_rope(k, rot).transpose(-1, -2)
    shifted = apply_rope(q, rot17) @ apply_rope(k, rot17).transpose(-1, -2)
    torch.testing.assert_close(scores, shifted, atol=1e-4, rtol=1e-4)

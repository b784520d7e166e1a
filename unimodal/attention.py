"""Rotary position embeddings and the one attention entry point every model calls.

Design choices
--------------
* **Two RoPE layouts, one formula.** The released Cola DLM uses both conventions: the Text VAE
  rotates the full head with the NeoX *half-split* layout (channel ``i`` pairs with ``i + D/2``,
  theta 5e5), the DiT rotates only the first ``rope_dim`` channels with the GPT-J *interleaved*
  layout (channel ``2i`` pairs with ``2i + 1``, theta 1e4). Both are ``x * cos + rot(x) * sin``;
  they differ only in which channels form a pair, so :func:`apply_rope` takes a ``style``.
  Angles are computed in fp32 from explicit integer positions ``(B, L)`` (never from a cache
  of ``0..n-1``) once per forward (:func:`rotary`), shared by every layer, and the rotated result
  is cast back to the input dtype.
* **One attention function, swappable backends.** ``attention(q, k, v, mask, backend)`` with
  ``q, k, v`` of shape ``(B, H, L, D)``. ``"eager"`` is the written-out reference
  (``softmax(q * D**-0.5 @ k^T + mask) @ v`` with fp32 softmax) that the tests compare the others
  against; ``"sdpa"`` (default) calls PyTorch's fused kernels with the dense boolean mask;
  ``"flex"`` uses ``flex_attention`` with a block mask (GPU; it has no CPU backward);
  ``"xformers"`` is an optional GPU extra. Masks come from :mod:`unimodal.masks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from unimodal.masks import AttentionMask

BACKENDS = ("eager", "sdpa", "flex", "xformers")


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies ``1 / theta^(2i/dim)``, i = 0..dim/2-1, in fp32 (the released formula)."""
    if dim % 2:
        raise ValueError(f"rotary dim must be even, got {dim}")
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


@dataclass
class Rotary:
    """cos/sin tables for one set of positions, built once per forward and shared by every layer.

    cos, sin: (B, 1, L, R) fp32 for R rotated channels; ``style`` says which channels pair up.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    style: str
    signed_sin: torch.Tensor | None = field(default=None, repr=False)  # interleaved: sin * (-1, +1, ...)

    def __post_init__(self) -> None:
        if self.style == "interleaved" and self.signed_sin is None:
            sign = torch.ones(self.sin.shape[-1], dtype=self.sin.dtype, device=self.sin.device)
            sign[0::2] = -1.0
            self.signed_sin = self.sin * sign


def rotary(positions: torch.Tensor, inv_freq: torch.Tensor, style: str = "neox") -> Rotary:
    """The rotation tables of ``positions`` (B, L) for frequencies ``inv_freq`` (R/2,).

    ``style="neox"`` pairs channel i with i + R/2; ``style="interleaved"`` pairs 2i with 2i+1.
    """
    angles = positions.to(torch.float32)[:, None, :, None] * inv_freq.to(positions.device, torch.float32)
    if style == "neox":
        angles = torch.cat((angles, angles), dim=-1)  # (B,1,L,R): [f0..f_{R/2-1} | f0..]
    elif style == "interleaved":
        angles = angles.repeat_interleave(2, dim=-1)  # (B,1,L,R): f0 f0 f1 f1 ...
    else:
        raise ValueError(f"unknown rope style {style!r}; expected 'neox' or 'interleaved'")
    return Rotary(angles.cos(), angles.sin(), style)


def apply_rope(x: torch.Tensor, rope: Rotary) -> torch.Tensor:
    """Rotate the first R channels of ``x`` (B, H, L, D) in fp32; channels R..D-1 pass through."""
    rot = rope.cos.shape[-1]
    if rot > x.shape[-1]:
        raise ValueError(f"rotary dim {rot} exceeds head dim {x.shape[-1]}")
    xr, x_pass = x[..., :rot].float(), x[..., rot:]  # .float() is free for fp32 inputs
    if rope.style == "neox":
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)  # (x1, x2) -> (-x2, x1)
        out = xr * rope.cos + rotated * rope.sin
    else:  # (a, b) -> (-b, a): the pair swapped, the sign folded into the sin table (exact)
        swapped = xr.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (..., R): (b, a) per pair
        out = xr * rope.cos + swapped * rope.signed_sin
    out = out.to(x.dtype)
    return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)


# ----------------------------------------------------------------------------- attention


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)  # (B,H,Lq,Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    return probs @ v


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    try:
        import xformers.ops as xops
    except ImportError as err:  # pragma: no cover - GPU extra
        raise ImportError("attention backend 'xformers' needs `pip install unimodal[gpu]`") from err
    bias = None
    if mask is not None:  # xformers wants an additive bias broadcast over heads, (B,H,Lq,Lk)
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out = xops.memory_efficient_attention(  # takes (B, L, H, D)
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
    )
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Scaled dot-product attention: softmax(q k^T / sqrt(D) + mask) v.

    q: (B, H, Lq, D), k/v: (B, H, Lk, D), mask: an :class:`AttentionMask` over (B, Lq, Lk).
    Returns (B, H, Lq, D).
    """
    if mask is not None and (mask.q_len, mask.kv_len) != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"mask covers {(mask.q_len, mask.kv_len)} but attention is {(q.shape[2], k.shape[2])}"
        )
    if backend == "eager":
        return _eager(q, k, v, None if mask is None else mask.dense())
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.dense())
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        block_mask = None if mask is None else mask.block_mask(q.device)
        return flex_attention(q, k, v, block_mask=block_mask, scale=1.0 / math.sqrt(q.shape[-1]))
    if backend == "xformers":
        return _xformers(q, k, v, None if mask is None else mask.dense())
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")

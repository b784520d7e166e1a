"""Attention masks as small named factories.

Every mask here is a *relation* "query (b, i) may attend key (b, j)", written once as a
``mask_mod(b, h, q_idx, kv_idx) -> bool`` over per-token metadata (positions, block size,
which copy a token belongs to, padding). The same function gives both forms the backends need:

* :meth:`AttentionMask.dense` evaluates it on index grids: a boolean ``(B, 1, Lq, Lk)`` tensor
  (``True`` = may attend) for SDPA, the eager reference and the tests;
* :meth:`AttentionMask.block_mask` hands it to ``flex_attention.create_block_mask`` (GPU).

Batches are padded by default: "same sample" is the batch index. Packed batches (several
documents in one row, positions restarting at 0 for each) pass per-token document ids
(``q_doc``/``k_doc``, or ``doc`` for the 2L mask) and attention never crosses documents. Blocks
are counted from each token's *position*, so a query that is the suffix of its keys (cached
inference) and a key that sits in a KV cache need no special case.

Padding: keys with ``k_valid = False`` are never attended by real queries. A padding query
(``q_valid = False``) may attend whatever the structure allows, itself included, so no row is
ever fully masked (a fully masked softmax row is NaN, and NaN * 0 is still NaN in a loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class AttentionMask:
    """A boolean attention relation over ``(batch, query, key)`` defined by a flex-style mask_mod."""

    mask_mod: MaskMod
    batch: int
    q_len: int
    kv_len: int
    device: torch.device
    _dense: torch.Tensor | None = field(default=None, repr=False)
    _block_mask: object | None = field(default=None, repr=False)

    def dense(self) -> torch.Tensor:
        """(B, 1, Lq, Lk) bool, True where attention is allowed (computed once, then reused)."""
        if self._dense is None:
            b = torch.arange(self.batch, device=self.device)[:, None, None]
            q = torch.arange(self.q_len, device=self.device)[None, :, None]
            kv = torch.arange(self.kv_len, device=self.device)[None, None, :]
            self._dense = self.mask_mod(b, None, q, kv).expand(self.batch, self.q_len, self.kv_len)[:, None]
        return self._dense

    def block_mask(self, device: torch.device | str | None = None):
        """A flex_attention BlockMask of the same relation (used on GPU; built once, then reused)."""
        from torch.nn.attention.flex_attention import create_block_mask

        if self._block_mask is None:
            self._block_mask = create_block_mask(
                self.mask_mod, self.batch, None, self.q_len, self.kv_len, device=device or self.device
            )
        return self._block_mask


def _block_index(positions: torch.Tensor, block_size: int | torch.Tensor) -> torch.Tensor:
    """Block id of every token: position // block size (block size per sample allowed)."""
    bs = torch.as_tensor(block_size, device=positions.device)
    if bs.ndim == 1:
        bs = bs[:, None]  # (B, 1)
    if torch.any(bs < 1):
        raise ValueError(f"block size must be >= 1, got {block_size}")
    return torch.div(positions, bs, rounding_mode="floor")


def _ones(ref: torch.Tensor) -> torch.Tensor:
    return torch.ones(ref.shape, dtype=torch.bool, device=ref.device)


def block_causal_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    block_size: int | torch.Tensor,
    q_valid: torch.Tensor | None = None,
    k_valid: torch.Tensor | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> AttentionMask:
    """Block-causal attention: a query sees every key whose block is not later than its own.

    q_pos: (B, Lq), k_pos: (B, Lk) int64 positions; block_size: int or (B,) per-sample sizes.
    Block size 1 is strictly causal. Queries may be the suffix of the keys (cached inference:
    keys = [cache | current block]); block ids come from positions, so nothing else changes.

    Example, 6 tokens, block size 2 (x = may attend)::

              k0 k1 k2 k3 k4 k5
        q0     x  x  .  .  .  .
        q1     x  x  .  .  .  .
        q2     x  x  x  x  .  .
        q3     x  x  x  x  .  .
        q4     x  x  x  x  x  x
        q5     x  x  x  x  x  x
    """
    q_blk, k_blk = _block_index(q_pos, block_size), _block_index(k_pos, block_size)
    return block_id_mask(q_blk, k_blk, q_valid, k_valid, q_doc, k_doc)


def block_id_mask(
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    q_valid: torch.Tensor | None = None,
    k_valid: torch.Tensor | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> AttentionMask:
    """Block-causal attention over explicit block ids: a query sees keys whose block id <= its own.

    q_blocks: (B, Lq), k_blocks: (B, Lk) int. For layouts where blocks are not position // size,
    e.g. a multimodal sequence ``[text blocks 0..3 | one image block 4]`` (the image's tokens all
    carry id 4: bidirectional inside the image, causal with respect to the text before it).
    """
    q_valid = _ones(q_blocks) if q_valid is None else q_valid
    k_valid = _ones(k_blocks) if k_valid is None else k_valid
    q_doc = torch.zeros_like(q_blocks) if q_doc is None else q_doc
    k_doc = torch.zeros_like(k_blocks) if k_doc is None else k_doc

    def mask_mod(b, h, q, kv):
        same_doc = k_doc[b, kv] == q_doc[b, q]
        return same_doc & (k_blocks[b, kv] <= q_blocks[b, q]) & (k_valid[b, kv] | ~q_valid[b, q])

    return AttentionMask(mask_mod, q_blocks.shape[0], q_blocks.shape[1], k_blocks.shape[1], q_blocks.device)


def windowed(
    mask: AttentionMask, q_blocks: torch.Tensor, k_blocks: torch.Tensor, window: int
) -> AttentionMask:
    """``mask`` limited to keys whose block lies fewer than ``window`` blocks before the query's.

    q_blocks: (B, Lq), k_blocks: (B, Lk) int block ids. Example, block-causal over 5 tokens
    (block size 1), window 2 (x = may attend)::

              k0 k1 k2 k3 k4
        q0     x  .  .  .  .
        q1     x  x  .  .  .
        q2     .  x  x  .  .
        q3     .  .  x  x  .
        q4     .  .  .  x  x
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 block, got {window}")
    inner = mask.mask_mod

    def mask_mod(b, h, q, kv):
        return inner(b, h, q, kv) & (q_blocks[b, q] - k_blocks[b, kv] < window)

    return AttentionMask(mask_mod, mask.batch, mask.q_len, mask.kv_len, mask.device)


def causal_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_valid: torch.Tensor | None = None,
    k_valid: torch.Tensor | None = None,
) -> AttentionMask:
    """Strictly causal attention (block size 1): a query sees keys at positions <= its own."""
    return block_causal_mask(q_pos, k_pos, 1, q_valid, k_valid)


def two_l_mask(
    positions: torch.Tensor,
    noisy: torch.Tensor,
    block_size: int | torch.Tensor,
    valid: torch.Tensor | None = None,
    doc: torch.Tensor | None = None,
) -> AttentionMask:
    """The "2L" teacher-forcing mask: one pass trains every block of ``[z0 ; z_t]``.

    positions: (B, 2L) shared by both copies; noisy: (B, 2L) bool, True for the z_t copy;
    block_size: int or (B,). Three named rules (bd3lms' sub-masks):

    * block-diagonal  — noisy block b sees the noisy tokens of block b (bidirectional);
    * offset-causal   — noisy block b sees the clean tokens of blocks < b (strictly earlier);
    * clean causal    — clean block b sees the clean tokens of blocks <= b; never a noisy one.

    Example, L = 4, block size 2, layout [clean c0..c3 | noisy n0..n3]::

              c0 c1 c2 c3 n0 n1 n2 n3
        c0     x  x  .  .  .  .  .  .
        c1     x  x  .  .  .  .  .  .
        c2     x  x  x  x  .  .  .  .
        c3     x  x  x  x  .  .  .  .
        n0     .  .  .  .  x  x  .  .
        n1     .  .  .  .  x  x  .  .
        n2     x  x  .  .  .  .  x  x
        n3     x  x  .  .  .  .  x  x
    """
    return two_l_block_mask(_block_index(positions, block_size), noisy, valid, doc)


def two_l_block_mask(
    block_ids: torch.Tensor,
    noisy: torch.Tensor,
    valid: torch.Tensor | None = None,
    doc: torch.Tensor | None = None,
) -> AttentionMask:
    """The 2L mask over explicit block ids (B, 2L), shared by both copies: :func:`two_l_mask`'s three
    rules for layouts whose blocks are not ``position // block_size``.

    Example, image->text: ``[image i0 i1 (block 0)][text t0 t1 (block 1)]``, clean copy first::

              ci0 ci1 ct0 ct1 ni0 ni1 nt0 nt1
        ci0    x   x   .   .   .   .   .   .
        ci1    x   x   .   .   .   .   .   .
        ct0    x   x   x   x   .   .   .   .
        ct1    x   x   x   x   .   .   .   .
        ni0    .   .   .   .   x   x   .   .
        ni1    .   .   .   .   x   x   .   .
        nt0    x   x   .   .   .   .   x   x
        nt1    x   x   .   .   .   .   x   x

    The noisy image (block 0) sees only itself (unconditional image generation); the noisy caption
    sees the clean image and itself (captioning).
    """
    blk = block_ids
    valid = _ones(blk) if valid is None else valid
    doc = torch.zeros_like(blk) if doc is None else doc

    def mask_mod(b, h, q, kv):
        qb, kb, qn, kn = blk[b, q], blk[b, kv], noisy[b, q], noisy[b, kv]
        block_diagonal = qn & kn & (kb == qb)
        offset_causal = qn & ~kn & (kb < qb)
        clean_causal = ~qn & ~kn & (kb <= qb)
        same_doc = doc[b, kv] == doc[b, q]
        return same_doc & (block_diagonal | offset_causal | clean_causal) & (valid[b, kv] | ~valid[b, q])

    return AttentionMask(mask_mod, blk.shape[0], blk.shape[1], blk.shape[1], blk.device)

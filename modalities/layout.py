"""Layouts: a sample as an ordered list of modality segments, placed one after another in one sequence.

Design choices
--------------
* **A layout is a tuple of** :class:`Segment` ``(modality, role)``; role ``context`` is given
  (encoded and prefilled at inference), ``generated`` is produced by the prior. The named layouts::

      text_to_text    [text ctx][text gen ...]
      image_to_text   [image ctx][text gen ...]
      text_to_image   [text ctx][image gen]
      text            [text gen ...]            (a text-only row; unconditional text)

  In training every segment is a target of the flow loss (the 2L pass trains each block given the
  clean blocks before it), so ``text_to_image`` rows also train unconditional text and
  ``image_to_text`` rows unconditional images; the roles only tell the sampler what it is given.
* **Placement** (:func:`place_segments`): each row's segments follow its own order. The first
  segment starts at position 0 and block 0; each next one starts at the previous one's valid
  length (positions continue, so 1-D RoPE sees one sequence) and one block after the previous
  one's last valid block (block ids only need order: a token attends to keys of blocks <= its own).
  A segment absent from a row's order is marked invalid in that row. Text blocks are
  ``in-segment position // block_size``; an image is one block (all its tokens share one id).
* **Drawn example**, ``text_to_image`` with a 6-token caption, text block size 4, a 4-token image::

      token      t0 t1 t2 t3 t4 t5 | i0 i1 i2 i3
      position    0  1  2  3  4  5 |  6  7  8  9
      block       0  0  0  0  1  1 |  2  2  2  2

  and ``image_to_text`` of the same pair: image positions 0..3 block 0, text positions 4..9 blocks
  1, 1, 1, 1, 2, 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from modalities.registry import LatentSequence, get_modality

ROLES = ("context", "generated")


@dataclass(frozen=True)
class Segment:
    """One part of a layout: which modality, and whether it is given or generated."""

    modality: str
    role: str = "generated"

    def __post_init__(self) -> None:
        get_modality(self.modality)  # unknown modality -> ValueError naming it
        if self.role not in ROLES:
            raise ValueError(f"segment role {self.role!r} is not one of {ROLES}")


LAYOUTS: dict[str, tuple[Segment, ...]] = {
    "text_to_text": (Segment("text", "context"), Segment("text", "generated")),
    "image_to_text": (Segment("image", "context"), Segment("text", "generated")),
    "text_to_image": (Segment("text", "context"), Segment("image", "generated")),
    "text": (Segment("text", "generated"),),
}


def get_layout(name: str) -> tuple[Segment, ...]:
    """The named layout (``text_to_text``, ``image_to_text``, ``text_to_image``, ``text``)."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; available: {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def segment_order(layout: Sequence[Segment]) -> tuple[str, ...]:
    """The modalities of a layout's distinct segments, in order (a text ctx + text gen is one text segment)."""
    order: list[str] = []
    for seg in layout:
        if not order or order[-1] != seg.modality:
            order.append(seg.modality)
    if len(set(order)) != len(order):
        raise ValueError(f"layout {layout} interleaves a modality; one segment per modality is supported")
    return tuple(order)


def place_segments(
    segments: dict[str, LatentSequence], orders: Sequence[Sequence[str]]
) -> dict[str, LatentSequence]:
    """Lay each row's segments out one after another in its own order (see the module docstring).

    segments: {modality: LatentSequence (B, N_m, d_m)} with in-segment positions and block ids (from
    0); orders: per row, the modalities in sequence order (a subset of ``segments``). Returns the
    same segments with positions and block ids shifted per row, and invalid in rows that omit them.
    """
    batch = next(iter(segments.values())).batch_size
    if len(orders) != batch:
        raise ValueError(f"need one order per row: {len(orders)} orders for batch {batch}")
    for seq in segments.values():
        if seq.batch_size != batch:
            raise ValueError(f"segments disagree on the batch size: {seq.batch_size} != {batch}")
    length = {m: s.valid.sum(1).tolist() for m, s in segments.items()}  # per row valid tokens
    blocks = {m: (s.block_ids.masked_fill(~s.valid, -1).amax(1) + 1).tolist() for m, s in segments.items()}
    pos_off = {m: [0] * batch for m in segments}
    blk_off = {m: [0] * batch for m in segments}
    present = {m: [False] * batch for m in segments}
    for b, order in enumerate(orders):
        unknown = [m for m in order if m not in segments]
        if unknown or len(set(order)) != len(order):
            raise ValueError(
                f"row {b} order {tuple(order)} must name distinct modalities of {sorted(segments)}"
            )
        p = k = 0
        for m in order:
            pos_off[m][b], blk_off[m][b], present[m][b] = p, k, True
            p, k = p + length[m][b], k + blocks[m][b]
    out = {}
    for m, seq in segments.items():
        dev = seq.latents.device
        shifted = seq.offset(torch.tensor(pos_off[m], device=dev), torch.tensor(blk_off[m], device=dev))
        keep = torch.tensor(present[m], device=dev)[:, None]
        out[m] = replace(shifted, valid=shifted.valid & keep)
    return out


__all__ = ["LAYOUTS", "ROLES", "Segment", "get_layout", "place_segments", "segment_order"]

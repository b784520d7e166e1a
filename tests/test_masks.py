"""Mask factories: the drawn examples, padding rules, and dense == flex relations."""

import torch

from unimodal.attention import attention
from unimodal.masks import block_causal_mask, block_id_mask, causal_mask, two_l_mask


def test_block_causal_matches_the_drawn_example():
    pos = torch.arange(6)[None]
    dense = block_causal_mask(pos, pos, 2).dense()[0, 0].int()
    expected = torch.tensor([[1, 1, 0, 0, 0, 0]] * 2 + [[1, 1, 1, 1, 0, 0]] * 2 + [[1] * 6] * 2)
    assert torch.equal(dense, expected)
    assert torch.equal(causal_mask(pos, pos).dense()[0, 0], torch.ones(6, 6, dtype=torch.bool).tril())


def test_two_l_matches_the_drawn_example():
    pos = torch.cat([torch.arange(4), torch.arange(4)])[None]
    noisy = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    dense = two_l_mask(pos, noisy, 2).dense()[0, 0].int()
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [1, 1, 0, 0, 0, 0, 1, 1],
            [1, 1, 0, 0, 0, 0, 1, 1],
        ]
    )
    assert torch.equal(dense, expected)


def test_queries_as_suffix_of_keys_and_per_sample_block_sizes():
    k_pos = torch.arange(8).expand(2, 8)
    q_pos = k_pos[:, 4:]
    full = block_causal_mask(k_pos, k_pos, torch.tensor([4, 2])).dense()
    suffix = block_causal_mask(q_pos, k_pos, torch.tensor([4, 2])).dense()
    assert torch.equal(suffix, full[:, :, 4:])
    assert not torch.equal(full[0], full[1])


def test_padding_keys_are_never_seen_and_no_row_is_empty():
    pos = torch.arange(5).expand(2, 5)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    dense = block_causal_mask(pos, pos, 4, valid, valid).dense()[:, 0]
    assert not dense[0][valid[0]][:, ~valid[0]].any()  # real queries never see pads
    assert dense.any(dim=-1).all()  # pad queries still attend somewhere: no NaN rows
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    assert torch.isfinite(attention(q, k, v, block_causal_mask(pos, pos, 4, valid, valid), "sdpa")).all()


def test_block_id_mask_for_a_multimodal_layout():
    blocks = torch.tensor([[0, 0, 1, 1, 2, 2, 2]])  # two text blocks, then one image block
    dense = block_id_mask(blocks, blocks).dense()[0, 0]
    assert dense[4:, :].all()  # image tokens see the text and each other
    assert not dense[:4, 4:].any()  # text never sees the image after it
    pos = torch.arange(7)[None]
    assert torch.equal(block_id_mask(pos // 2, pos // 2).dense(), block_causal_mask(pos, pos, 2).dense())


def test_dense_and_flex_relations_agree():
    from torch.nn.attention.flex_attention import create_mask

    pos = torch.arange(6).expand(2, 6)
    mask = block_causal_mask(pos, pos, torch.tensor([2, 3]))
    flex_dense = create_mask(mask.mask_mod, 2, None, 6, 6, device="cpu")
    assert torch.equal(flex_dense, mask.dense())


def test_packed_documents_never_attend_across():
    # two documents of lengths 3 and 5 packed in one row, positions restarting per document
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    packed = block_causal_mask(pos, pos, 2, q_doc=doc, k_doc=doc).dense()[0, 0]
    assert not packed[:3, 3:].any() and not packed[3:, :3].any()
    padded_a = block_causal_mask(pos[:, :3], pos[:, :3], 2).dense()[0, 0]
    padded_b = block_causal_mask(pos[:, 3:], pos[:, 3:], 2).dense()[0, 0]
    assert torch.equal(packed[:3, :3], padded_a) and torch.equal(packed[3:, 3:], padded_b)
    # the 2L mask of a packed row: [clean a | clean b | noisy a | noisy b]
    pos2 = torch.cat([pos, pos], dim=1)
    doc2 = torch.cat([doc, doc], dim=1)
    noisy = torch.tensor([[0] * 8 + [1] * 8], dtype=torch.bool)
    two_l = two_l_mask(pos2, noisy, 2, doc=doc2).dense()[0, 0]
    assert not (two_l & (doc2[0][:, None] != doc2[0][None, :])).any()

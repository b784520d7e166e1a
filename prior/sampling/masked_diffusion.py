"""LLaDA's sampler for the masked-diffusion baseline: semi-autoregressive blocks, low-confidence remasking.

The generated span starts fully masked after the prompt and is filled block by block (``block_len``
tokens, left to right). Inside a block, each of ``steps`` forward passes predicts every masked
token, and the ``k`` masked tokens of the current block with the highest confidence (the
probability of their predicted token; ``remasking="random"``: a uniform draw instead) are
committed, the rest stay masked ("low-confidence remasking"); ``k`` follows
:func:`unmask_schedule`, the same number each step up to one (the remainder goes to the first
steps, as LLaDA's ``get_num_transfer_tokens``). Greedy by default; ``temperature > 0`` samples the
predictions with Gumbel noise from ``generator``.

Batched: prompts of different lengths are left-padded (pad slots are invalid keys and every row
has its own positions ``0..n-1``), so a row of a batch gives its single-prompt result. Blocks are
yielded as they finish: a consumer that stops iterating (the pipeline's stop rule, once every row
has stopped) ends the loop, so a short answer does not pay for the whole span.

    prompt | block 0 (filled)        | block 1 (current)        | block 2
    p p p  | a b c d                 | e M g M    <- 2 of 4 left | M M M M  (M = mask id)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

REMASKING = ("low_confidence", "random")


@dataclass
class MaskedDiffusionSamplingConfig:
    """The sampler settings a masked-diffusion export keeps (``model_index.json``): tokens per
    semi-autoregressive block and how the tokens to commit are chosen. Steps per block are
    ``GenerationConfig.num_inference_steps``."""

    block_length: int = 16
    remasking: str = "low_confidence"  # one of REMASKING

    def __post_init__(self) -> None:
        if self.block_length < 1:
            raise ValueError(f"block_length must be >= 1, got {self.block_length}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking={self.remasking!r}; expected one of {REMASKING}")


def unmask_schedule(block_len: int, steps: int) -> list[int]:
    """Tokens committed at each of ``steps`` steps of a ``block_len`` block (they sum to ``block_len``)."""
    if block_len < 1 or not 1 <= steps <= block_len:
        raise ValueError(f"need block_len >= 1 and 1 <= steps <= block_len, got {block_len}, {steps}")
    base, extra = divmod(block_len, steps)
    return [base + (i < extra) for i in range(steps)]


@dataclass
class MaskedDiffusionBlock:
    """One finished block: its ids per row, the tokens committed at each step, forwards so far."""

    index: int
    token_ids: list[list[int]]  # (B, block_len)
    committed: list[int]
    num_forwards: int


@dataclass
class MaskedDiffusionOutput:
    token_ids: list[list[int]]  # the generated tokens per row (prompt excluded)
    committed: list[int]  # tokens committed at every step, in order
    num_forwards: int


def _left_padded(prompts: list[list[int]], pad_id: int, gen_len: int, mask_id: int):
    """ids (B, P + G) with the span masked, valid (B, P + G), positions (B, P + G), P."""
    batch, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((batch, longest + gen_len), pad_id, dtype=torch.long)
    valid = torch.zeros(batch, longest + gen_len, dtype=torch.bool)
    positions = torch.zeros(batch, longest + gen_len, dtype=torch.long)
    for i, row in enumerate(prompts):
        start = longest - len(row)
        ids[i, start:longest] = torch.tensor(row, dtype=torch.long)
        valid[i, start:] = True
        positions[i, start:] = torch.arange(len(row) + gen_len)
    ids[:, longest:] = mask_id
    return ids, valid, positions, longest


@torch.no_grad()
def masked_diffusion_blocks(
    model: nn.Module,
    prompts: list[list[int]],
    mask_id: int,
    gen_len: int,
    block_len: int,
    steps_per_block: int,
    *,
    pad_id: int = 0,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Iterator[MaskedDiffusionBlock]:
    """Yield the ``gen_len // block_len`` blocks after ``prompts`` one by one (see the module docstring)."""
    if gen_len < 1 or gen_len % block_len:
        raise ValueError(f"gen_len={gen_len} must be a positive multiple of block_len={block_len}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r}; expected one of {REMASKING}")
    if not prompts or not all(prompts):
        raise ValueError("every prompt needs at least one token (the pipeline starts each with EOS)")
    schedule = unmask_schedule(block_len, steps_per_block)
    device = next(model.parameters()).device
    ids, valid, positions, n = _left_padded(prompts, pad_id, gen_len, mask_id)
    ids, valid, positions = ids.to(device), valid.to(device), positions.to(device)
    forwards = 0
    for b in range(gen_len // block_len):
        lo, hi = n + b * block_len, n + (b + 1) * block_len
        for k in schedule:
            logits = model(ids, positions=positions, valid=valid).logits[:, lo:hi].float()  # (B, block, V)
            logits[..., mask_id] = float("-inf")
            forwards += 1
            if temperature > 0:
                u = torch.rand(logits.shape, generator=generator).clamp_min(1e-20).to(device)
                pred = (logits / temperature - torch.log(-torch.log(u))).argmax(-1)  # Gumbel-max
            else:
                pred = logits.argmax(-1)  # (B, block): only the current block may be committed
            if remasking == "low_confidence":
                conf = logits.softmax(-1).gather(-1, pred[..., None])[..., 0]  # (B, block)
            else:
                conf = torch.rand(pred.shape, generator=generator).to(device)
            conf = torch.where(ids[:, lo:hi] == mask_id, conf, torch.full_like(conf, -1.0))
            chosen = conf.topk(k, dim=-1).indices  # (B, k)
            block = ids[:, lo:hi]
            block.scatter_(1, chosen, pred.gather(1, chosen))
        yield MaskedDiffusionBlock(b, ids[:, lo:hi].tolist(), list(schedule), forwards)


@torch.no_grad()
def masked_diffusion_sample(
    model: nn.Module,
    prompt_ids: list[int] | list[list[int]],
    mask_id: int,
    gen_len: int = 32,
    block_len: int = 8,
    steps_per_block: int = 4,
    **kwargs,
) -> MaskedDiffusionOutput:
    """All blocks at once, for one prompt (a list of ids) or a batch (a list of lists)."""
    batched = bool(prompt_ids) and isinstance(prompt_ids[0], (list, tuple))
    prompts = [list(p) for p in prompt_ids] if batched else [list(prompt_ids)]
    rows: list[list[int]] = [[] for _ in prompts]
    committed, forwards = [], 0
    for block in masked_diffusion_blocks(
        model, prompts, mask_id, gen_len, block_len, steps_per_block, **kwargs
    ):
        for acc, new in zip(rows, block.token_ids):
            acc.extend(new)
        committed += block.committed
        forwards = block.num_forwards
    return MaskedDiffusionOutput(rows if batched else rows[0], committed, forwards)


__all__ = [
    "REMASKING",
    "MaskedDiffusionSamplingConfig",
    "MaskedDiffusionBlock",
    "MaskedDiffusionOutput",
    "masked_diffusion_blocks",
    "masked_diffusion_sample",
    "unmask_schedule",
]

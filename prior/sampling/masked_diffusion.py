"""LLaDA's sampler for the masked-diffusion baseline: semi-autoregressive blocks, low-confidence remasking.

The generated span starts fully masked after the prompt and is filled block by block (``block_len``
tokens, left to right). Inside a block, each of ``steps`` forward passes predicts every masked
token, and the ``k`` masked tokens of the current block with the highest confidence (the
probability of their predicted token) are committed, the rest stay masked ("low-confidence
remasking"); ``k`` follows :func:`unmask_schedule`, the same number each step up to one (the
remainder goes to the first steps, as LLaDA's ``get_num_transfer_tokens``). Greedy by default;
``temperature > 0`` samples the predictions with Gumbel noise from ``generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


def unmask_schedule(block_len: int, steps: int) -> list[int]:
    """Tokens committed at each of ``steps`` steps of a ``block_len`` block (they sum to ``block_len``)."""
    if block_len < 1 or not 1 <= steps <= block_len:
        raise ValueError(f"need block_len >= 1 and 1 <= steps <= block_len, got {block_len}, {steps}")
    base, extra = divmod(block_len, steps)
    return [base + (i < extra) for i in range(steps)]


@dataclass
class MaskedDiffusionOutput:
    token_ids: list[int]  # the generated tokens (prompt excluded)
    committed: list[int]  # tokens committed at every step, in order
    num_forwards: int


@torch.no_grad()
def masked_diffusion_sample(
    model: nn.Module,
    prompt_ids: list[int],
    mask_id: int,
    gen_len: int = 32,
    block_len: int = 8,
    steps_per_block: int = 4,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> MaskedDiffusionOutput:
    """Generate ``gen_len`` tokens after ``prompt_ids`` (one sequence) with ``model`` (bidirectional)."""
    if gen_len % block_len:
        raise ValueError(f"gen_len={gen_len} must be a multiple of block_len={block_len}")
    device = next(model.parameters()).device
    n = len(prompt_ids)
    x = torch.tensor([list(prompt_ids) + [mask_id] * gen_len], device=device)  # (1, n + gen_len)
    committed, forwards = [], 0
    for b in range(gen_len // block_len):
        lo, hi = n + b * block_len, n + (b + 1) * block_len
        for k in unmask_schedule(block_len, steps_per_block):
            logits = model(x).logits.float()[0]  # (L, V)
            logits[:, mask_id] = float("-inf")
            forwards += 1
            if temperature > 0:
                gumbel = -torch.log(
                    -torch.log(torch.rand(logits.shape, generator=generator).clamp_min(1e-20))
                )
                pred = (logits / temperature + gumbel.to(logits.device)).argmax(-1)
            else:
                pred = logits.argmax(-1)  # (L,)
            conf = logits.softmax(-1).gather(-1, pred[:, None])[:, 0]  # (L,)
            candidate = torch.zeros_like(conf, dtype=torch.bool)
            candidate[lo:hi] = x[0, lo:hi] == mask_id
            conf = torch.where(candidate, conf, torch.full_like(conf, -1.0))
            chosen = conf.topk(k).indices
            x[0, chosen] = pred[chosen]
            committed.append(k)
    return MaskedDiffusionOutput(x[0, n:].tolist(), committed, forwards)


__all__ = ["MaskedDiffusionOutput", "masked_diffusion_sample", "unmask_schedule"]

"""Token sampling on decoded logits: repetition penalty, greedy, temperature / top-k / top-p.

Design choices
--------------
* **Repetition penalty, released semantics**: every id sampled in *earlier* blocks of a sample
  (pinned prompt positions included), once per distinct id, at every position of the block:
  ``logit * p`` if the logit is negative, else ``logit / p``.
* **Greedy** when ``temperature < 1e-5``: the first index on ties (``argmax``).
* **Sampling**: temperature, then top-k, then top-p (nucleus; the most likely token is always
  kept), then one multinomial draw per position with the caller's generator, or, given a list
  of generators (one per row, the diffusers convention), row ``i``'s draws from generator ``i``:
  a row's tokens then do not depend on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def row_randn(shape: tuple[int, ...], generator: Generators, device: torch.device | str) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...): one draw with ``generator``, or, for a list of
    per-row generators, row ``i`` drawn from generator ``i`` (the same values as drawing it alone)."""
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator]
        return torch.cat(rows).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, T, V), seen (B, V) bool: each seen id, at every position: ``l*p`` if l < 0 else ``l/p``."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen[:, None, :], penalised, logits)


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> 0, +inf -> 1e4, -inf -> -1e4 (the released loop's guard before sampling)."""
    return torch.nan_to_num(logits, nan=0.0, posinf=1e4, neginf=-1e4)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """logits (B, T, V) -> ids (B, T): greedy when ``temperature < 1e-5``, else top-k/top-p sampling
    (``generator``: one, or one per row)."""
    if temperature < 1e-5:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, T, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # shift right: always keep the most likely token
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)  # (B, T, V)
    if isinstance(generator, Sequence):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {probs.shape[0]}")
        rows = [
            torch.multinomial(p.to(g.device), 1, generator=g).to(logits.device)
            for p, g in zip(probs, generator)
        ]
        return torch.stack(rows).view(logits.shape[:-1])
    flat = probs.flatten(0, 1)  # (B*T, V)
    draws = torch.multinomial(flat.to(generator.device) if generator else flat, 1, generator=generator)
    return draws.to(logits.device).view(logits.shape[:-1])


__all__ = ["Generators", "apply_repetition_penalty", "finite_logits", "row_randn", "sample_tokens"]

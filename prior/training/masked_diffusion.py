"""The LLaDA-style masked-diffusion objective (the masked-diffusion baseline's loss).

A row draws ``t ~ U(t_min, 1)``; each valid token is replaced by the mask id with probability
``t``; a bidirectional transformer (``ARTransformer(causal=False)``, vocabulary + 1 for the mask
id) predicts the original tokens, and the loss is the cross-entropy on the masked tokens weighted
by ``1 / t`` (the ELBO weight of LLaDA eq. 3), summed and divided by the number of valid tokens.
The mask id's own logit is never a target (it is set to -inf before the softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MaskedDiffusionLoss:
    loss: torch.Tensor  # () differentiable
    masked: torch.Tensor  # (B, L) bool, the tokens that were masked
    t: torch.Tensor  # (B,) masking ratio per row


def masked_diffusion_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    mask_id: int,
    valid: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    masked: torch.Tensor | None = None,
    t_min: float = 1e-3,
    generator: torch.Generator | None = None,
) -> MaskedDiffusionLoss:
    """input_ids (B, L) -> the 1/t-weighted masked-token cross-entropy. ``t`` (B,) and ``masked``
    (B, L) override the draws (tests)."""
    batch, length = input_ids.shape
    dev = input_ids.device
    valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.bool()
    if t is None:
        t = t_min + (1 - t_min) * torch.rand(batch, generator=generator, device=dev)
    if masked is None:
        masked = torch.rand(batch, length, generator=generator, device=dev) < t[:, None]
    masked = masked & valid
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    logits = model(noisy, valid=valid).logits.float()  # (B, L, V)
    logits[..., mask_id] = float("-inf")
    ce = F.cross_entropy(logits.flatten(0, 1), input_ids.flatten(), reduction="none").view(batch, length)
    weighted = torch.where(masked, ce / t[:, None], torch.zeros_like(ce))
    return MaskedDiffusionLoss(weighted.sum() / valid.sum().clamp_min(1), masked, t)


__all__ = ["MaskedDiffusionLoss", "masked_diffusion_loss"]

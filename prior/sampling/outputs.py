"""What the block samplers return and pass around: per-block and per-run outputs, the step
callback's view, the state of clean latents waiting for a commit, and a prefilled context."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unimodal.kv_cache import KVCache


@dataclass
class Context:
    """Segments already in the prior's cache before the text segment (e.g. an image to caption)."""

    cache: KVCache  # the prior cache, prefilled (committed) with the context segments
    positions: torch.Tensor  # (B,) int64 position where the text segment starts in each row
    blocks: torch.Tensor  # (B,) int64 block id of the text segment's first block
    prior_calls: int = 0  # prior forwards spent on the context


@dataclass
class Pending:
    """Clean latents not yet in the prior cache: the prompt's whole blocks, or the block just
    generated. With ``merge_commit`` the next prior forward carries them (t = 0) and commits them."""

    x: torch.Tensor  # (B, Lp, d)
    positions: torch.Tensor  # (B, Lp) prior positions
    valid: torch.Tensor  # (B, Lp) bool
    block_ids: torch.Tensor | None  # (B, Lp), or None: position // block_size


@dataclass
class StepState:
    """What a step callback sees (after the Euler update of ``step`` in ``block``)."""

    block: int
    step: int
    timestep: float  # grid value of this step (0..1000)
    timesteps: torch.Tensor  # (B, bs) per-token timesteps fed to the prior (0 at pinned positions)
    model_input: torch.Tensor  # (B, bs, d) latents fed to the prior (after pinning)
    velocity_cond: torch.Tensor  # (B, bs, d)
    velocity_uncond: torch.Tensor | None  # (B, bs, d); None when the block runs without guidance
    velocity: torch.Tensor  # (B, bs, d) guided velocity
    latents: torch.Tensor  # (B, bs, d) after the update (and re-pinning)


@dataclass
class BlockOutput:
    """One generated block (what :meth:`BlockSampler.stream` yields)."""

    block: int
    token_ids: list[list[int]]  # new output tokens of this block per sample (may be empty)
    sampled_ids: torch.Tensor  # (B, bs * p) all ids sampled in the block, pinned positions included
    latents: torch.Tensor  # (B, bs, d) final latents of the block (decoded and committed)
    finished: list[bool]  # per sample: ended by a stop id
    num_prior_calls: int  # cumulative


@dataclass
class SamplerOutput:
    token_ids: list[list[int]]  # generated tokens per sample (prompt tokens trimmed)
    block_latents: list[torch.Tensor]  # per block (B, bs, d)
    block_ids: list[torch.Tensor]  # per block (B, bs * p) untrimmed sampled ids
    num_prior_calls: int
    num_blocks: int
    finished: list[bool]
    trim: list[int]  # prompt tokens trimmed from each sample's first block


__all__ = ["BlockOutput", "Context", "Pending", "SamplerOutput", "StepState"]

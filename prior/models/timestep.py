"""The timestep side of the MMDiT: sinusoid, embedding MLP, the per-token conditioning gather and
the per-run adaLN cache (``prior/models/mmdit.py`` uses them; see its docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

TIME_FREQ_DIM = 256  # sinusoid width of the timestep embedding (released: fixed)


@dataclass
class Conditioning:
    """SiLU(timestep embedding) of the distinct timesteps, and which one each token uses.

    Timesteps repeat heavily (one per block in training, one per sample when sampling, 0 on every
    clean token), so the embedding MLP and every adaLN linear run on the U distinct values and
    their outputs are gathered per token: ``rows(linear) = linear(table)[index]``.
    """

    table: torch.Tensor  # (U, D)
    index: torch.Tensor  # (B, T) int64 into table; T = tokens of the segment, or 1 (per sample)
    memo: dict | None = None  # linear -> linear(table), from an AdaLNCache entry

    def rows(self, linear: nn.Module) -> torch.Tensor:
        out = None if self.memo is None else self.memo.get(linear)
        if out is None:
            out = linear(self.table)  # (U, out)
            if self.memo is not None:
                self.memo[linear] = out
        # a gather as F.embedding: its backward (a sorted index-add) is ~3x faster on CPU than the
        # scatter behind tensor[index]
        return F.embedding(self.index, out)  # (B, T, out)


class AdaLNCache:
    """The timestep embedding and every adaLN linear's output for timestep sets already seen.

    A sampler evaluates the same K grid values in every block (and t = 0 on every clean token), so
    per run the timestep MLP and the adaLN linears need to run once per distinct set of timesteps:
    keyed by the distinct values of a forward, an entry keeps SiLU(embedding) and, per linear, its
    output. Valid while the weights do not change: a sampler makes one per generation; training
    never passes one. An explicit object, like the KV cache: the model keeps no state.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[float, ...], dict] = {}

    def entry(self, distinct: torch.Tensor) -> dict:
        """The memo of the distinct timesteps (U,) of one forward (created empty on first use)."""
        return self._entries.setdefault(tuple(distinct.tolist()), {})

    def __len__(self) -> int:
        return len(self._entries)


def timestep_freqs(dim: int = TIME_FREQ_DIM, max_period: float = 1e4) -> torch.Tensor:
    """f_k = exp(-ln(max_period) k / (dim/2)), k < dim/2: the exponent in fp32 as released, the exp in fp64
    rounded once, so the table is the same on every platform. fp32 ``exp`` is not: it can differ by an ulp
    between CPUs (golden set A's machine differs from ours at k = 12, 13), and at t ~ 1000 one ulp of f_k
    moves the angle by ~5e-5 and the released DiT's velocity by ~1e-5."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32) / half
    return torch.exp(exponent.double()).float()


def timestep_sinusoid(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """[sin | cos](t * f_k) in fp32 (sin first). t: (...,) on the 0..1000 scale -> (..., 2 * len(freqs))."""
    args = t.float()[..., None] * freqs.to(t.device)  # (..., half)
    return torch.cat((args.sin(), args.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    """Sinusoid (256) -> Linear -> SiLU -> Linear -> SiLU -> Linear (released ``emb_in``)."""

    def __init__(self, width: int):
        super().__init__()
        self.proj_in = nn.Linear(TIME_FREQ_DIM, width)
        self.proj_hid = nn.Linear(width, width)
        self.proj_out = nn.Linear(width, width)

    def forward(self, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:  # (...,) -> (..., D)
        emb = timestep_sinusoid(t, freqs).to(self.proj_in.weight.dtype)
        return self.proj_out(F.silu(self.proj_hid(F.silu(self.proj_in(emb)))))


__all__ = [
    "TIME_FREQ_DIM",
    "AdaLNCache",
    "Conditioning",
    "TimestepEmbedding",
    "timestep_freqs",
    "timestep_sinusoid",
]

"""The two baselines of ``scripts/bench_sampler.py``: a no-cache loop and the released loop, re-built.

Both run on our models (a :class:`~unimodal.text_vae.TextVAE` and a :class:`~prior.models.mmdit.MMDiT`),
batch 1, with the same time grid, noise, greedy decoding and repetition penalty as our sampler, so
that the benchmark compares equivalent computations:

* :class:`RecomputeLoop`: no KV cache; every Euler step re-runs the prior over ``[context | block]``
  and every block re-runs the VAE decoder over the whole sequence.
* :class:`ReleasedLoop`: the released inference loop (docs/released-format.md §6): KV caches, but
  CFG as two prior calls (conditional with the cache, unconditional on the block alone) and the
  additive block-causal mask rebuilt by a Python loop over the samples on every call, as the
  released ``create_na_block_causal_mask`` (docs/released-format.md §5) does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from tqdm import tqdm

from prior.models.mmdit import MMDiT
from prior.sampling.tokens import apply_repetition_penalty, sample_tokens
from unimodal.attention import rope_inv_freq, rotary
from unimodal.kv_cache import KVCache
from unimodal.masks import AttentionMask
from unimodal.text_vae import TextVAE

# ----------------------------------------------------------------------------- the released mask


def na_block_causal_mask(
    k_lens: Sequence[int], q_lens: Sequence[int], block_size: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """The released ``create_na_block_causal_mask``: additive (1, 1, sum Lq, sum Lk).

    Samples are concatenated on one axis; queries are the suffix of their sample's keys. Allowed
    (0) iff same sample and ``q_local // bs >= k_local // bs``; elsewhere ``finfo(dtype).min``.
    Built like the released helper: a Python loop over the samples, on every call.
    """
    k_sample, k_local, q_sample, q_local = [], [], [], []
    for s, (k_len, q_len) in enumerate(zip(k_lens, q_lens)):
        k_sample.append(torch.full((k_len,), s))
        k_local.append(torch.arange(k_len))
        q_sample.append(torch.full((q_len,), s))
        q_local.append(torch.arange(k_len - q_len, k_len))
    ks, kj, qs, qj = (torch.cat(parts).to(device) for parts in (k_sample, k_local, q_sample, q_local))
    allowed = (qs[:, None] == ks[None, :]) & (qj[:, None] // block_size >= kj[None, :] // block_size)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]  # (1, 1, Lq, Lk)


def as_attention_mask(additive: torch.Tensor) -> AttentionMask:
    """Wrap an additive (1, 1, Lq, Lk) mask (batch 1 = the NA layout of one sample) for our models."""
    allowed = additive == 0  # (1, 1, Lq, Lk) bool
    _, _, q_len, kv_len = allowed.shape
    return AttentionMask(
        lambda b, h, q, kv: allowed[b, 0, q, kv], 1, q_len, kv_len, allowed.device, _dense=allowed
    )


# ----------------------------------------------------------------------------- the loops


class _ReferenceLoop(ABC):
    """Block loop shared by the two baselines: K Euler steps with CFG, decode, greedy + penalty.

    Subclasses say how a velocity is computed (:meth:`velocities`), how the prompt is prepared
    (:meth:`start`) and how a finished block is committed and decoded (:meth:`finish`).
    """

    def __init__(self, vae: TextVAE, prior: MMDiT, steps: int, guidance: float, repetition_penalty: float):
        self.vae, self.prior = vae, prior
        self.guidance, self.penalty = guidance, repetition_penalty
        self.grid = torch.linspace(1000.0, 0.0, steps + 1, dtype=torch.float32)  # released fp32 grid

    def generate(self, prompt: list[int], noise: torch.Tensor, bar: tqdm) -> tuple[list[int], torch.Tensor]:
        """noise (blocks, 1, bs, d) -> (token ids, latents (blocks, bs, d))."""
        z = self.vae.encode(torch.tensor([prompt])).latents.float()  # (1, P, d)
        self.start(z)
        seen = torch.zeros(1, self.vae.config.vocab_size, dtype=torch.bool)
        ids, latents = [], []
        for eps in noise:  # (1, bs, d)
            x = eps.clone()
            for s in range(len(self.grid) - 1):
                t = torch.full(x.shape[:2], float(self.grid[s]))  # (1, bs)
                v_c, v_u = self.velocities(x, t)
                v = self.guidance * (v_c - v_u) + v_u
                x = x - float((self.grid[s] - self.grid[s + 1]) / 1000) * v
            logits = self.finish(x).float()  # (1, bs, V)
            block = sample_tokens(apply_repetition_penalty(logits, seen, self.penalty))  # greedy (1, bs)
            seen[0, block[0]] = True
            ids += block[0].tolist()
            latents.append(x[0])
            bar.update()
        return ids, torch.stack(latents)

    def _prior(self, x, t, positions, **kwargs) -> torch.Tensor:
        out = self.prior(x.to(self.prior.dtype), t, positions=positions, **kwargs)
        return out.velocity.float()

    @abstractmethod
    def start(self, z: torch.Tensor) -> None:
        """Take the prompt's clean latents z (1, P, d)."""

    @abstractmethod
    def velocities(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) velocities of the current block x (1, bs, d)."""

    @abstractmethod
    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Commit the finished block and decode it: logits (1, bs, V)."""


class RecomputeLoop(_ReferenceLoop):
    """No cache: every step re-runs the prior over ``[context | block]`` (conditional branch; the
    unconditional one is the block alone, a second call), and every block re-runs the VAE decoder
    over the whole sequence. ``2K`` prior calls per block, no prefill, no commit."""

    def start(self, z: torch.Tensor) -> None:
        self.context = z  # (1, S, d) clean latents: the prompt, then every finished block

    def velocities(self, x, t):
        seq = torch.cat((self.context, x), dim=1)  # (1, S + bs, d)
        t_seq = torch.cat((torch.zeros(self.context.shape[:2]), t), dim=1)
        positions = torch.arange(seq.shape[1])[None]
        v_c = self._prior(seq, t_seq, positions)[:, -x.shape[1] :]
        v_u = self._prior(x, t, torch.arange(x.shape[1])[None])
        return v_c, v_u

    def finish(self, x):
        self.context = torch.cat((self.context, x), dim=1)
        return self.vae.decode(self.context.to(self.vae.dtype)).logits[:, -x.shape[1] :]


class ReleasedLoop(_ReferenceLoop):
    """The released loop (docs/released-format.md §6), batch 1: KV caches, but CFG as two calls
    (conditional with the cache, unconditional alone) and the additive NA mask rebuilt by a Python
    loop on every call. ``2K + 1`` prior calls per block and one cached VAE-decoder call."""

    def __init__(self, *args, mask_dtype: torch.dtype = torch.float32, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_dtype = mask_dtype
        cfg = self.vae.config
        self.vae_inv_freq = rope_inv_freq(cfg.dim // cfg.num_heads, cfg.rope_theta)

    def _mask(self, k_len: int, q_len: int, block_size: int) -> AttentionMask:
        return as_attention_mask(na_block_causal_mask([k_len], [q_len], block_size, self.mask_dtype, "cpu"))

    def start(self, z: torch.Tensor) -> None:
        self.prior_cache = KVCache(self.prior.config.num_layers)
        self.vae_cache = self.vae.new_kv_cache()
        if z.shape[1]:  # prefill both caches at t = 0
            n = z.shape[1]
            mask = self._mask(n, n, self.prior.config.block_size)
            positions = torch.arange(n)[None]
            self._prior(z, torch.zeros(1, n), positions, attn_mask=mask, kv_cache=self.prior_cache,
                        update_cache=True)  # fmt: skip
            self._decode(z)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """The released cached decoder call: its own NA mask, the cache appended. -> logits (1, n, V)."""
        cache, n = self.vae_cache, x.shape[1]
        positions = (cache.seq_len + torch.arange(n))[None]  # (1, n)
        mask = self._mask(cache.seq_len + n, n, self.vae.config.block_size)
        rope = rotary(positions, self.vae_inv_freq, "neox")
        logits = self.vae.decoder(x.to(self.vae.dtype), rope, mask, cache, self.vae.attn_backend)
        cache.advance(positions, torch.ones(1, n, dtype=torch.bool))
        return logits

    def velocities(self, x, t):
        bs, cached = x.shape[1], self.prior_cache.seq_len
        block = self.prior.config.block_size
        positions = (cached + torch.arange(bs))[None]
        v_c = self._prior(x, t, positions, attn_mask=self._mask(cached + bs, bs, block),
                          kv_cache=self.prior_cache)  # fmt: skip
        v_u = self._prior(x, t, torch.arange(bs)[None], attn_mask=self._mask(bs, bs, block))
        return v_c, v_u

    def finish(self, x):
        bs, cached = x.shape[1], self.prior_cache.seq_len
        positions = (cached + torch.arange(bs))[None]
        mask = self._mask(cached + bs, bs, self.prior.config.block_size)
        self._prior(x, torch.zeros(1, bs), positions, attn_mask=mask, kv_cache=self.prior_cache,
                    update_cache=True)  # fmt: skip
        return self._decode(x)


__all__ = ["RecomputeLoop", "ReleasedLoop", "as_attention_mask", "na_block_causal_mask"]

"""Block-wise, KV-cached sampling of text from a Cola DLM (DESIGN §4, spec §6).

One :class:`BlockSampler` owns the block loop and both KV caches::

    encode prompt -> prefill (prior at t=0 and VAE decoder, update_cache=True)
    for each block:  noise -> K Euler steps with CFG (cache read-only)
                     -> commit (prior at t=0, update_cache=True)
                     -> decode (VAE decoder, its cache appended) -> sample tokens -> stop?

Design choices
--------------
* **The scheduler owns the time grid and the update.** diffusers'
  ``FlowMatchEulerDiscreteScheduler`` is given ``sigmas = linspace(1, 0, K + 1)[:-1]`` (computed as
  the released fp32 grid ``linspace(1000, 0, K + 1) / 1000``); its ``shift`` warps them SD3-style
  (``shift * s / (1 + (shift - 1) s)``). With shift 1 the model timesteps are the released grid
  values exactly, and ``scheduler.step`` computes ``x + (sigma_next - sigma) v``, i.e. the released
  ``x - dt v`` (checked by a test).
* **CFG in one (2B) forward.** Rows ``[0, B)`` are the conditional branch (block after the
  cache, positions continuing each sample); rows ``[B, 2B)`` are the unconditional branch: the
  block alone at positions ``0..bs-1`` (released): the prior reads its batch-B cache for the
  first rows only and runs the others' attention over their own block. ``v = w (v_c - v_u) + v_u`` with ``w`` per sample; ``w = 1`` for samples whose prefix
  is empty in the first block (released). When every ``w`` of a block is 1 the unconditional half
  is skipped. A block costs ``K`` prior calls + 1 commit (the released loop makes ``2K + 1``).
* **First block** when the prompt does not end on a block boundary (``first_block``):

  - ``clean_repaint`` (default): the prefix is the prompt's whole blocks; the first block's known
    latents are held at their clean values with timestep 0 before every step and after every
    update. The prompt is encoded *without* padding (the block-causal encoder makes those latents
    depend on prompt tokens only).
  - ``partial_repaint``: same layout, but for the first ``ceil(repaint_fraction * K)`` steps the
    known positions are re-noised to the current level, ``(1 - sigma) z0 + sigma eps`` (``eps`` =
    the block's own initial noise), at the current timestep (RePaint); afterwards they are free.
  - ``left_pad`` / ``right_pad``: the prompt is padded with the pad id to a multiple of the block
    (pads are real tokens, encoded and seen); the prefix is all of it, nothing is pinned;
    generation starts right after the (right) pads.

  With patch size ``p > 1`` and a prompt that is not a multiple of ``p``, the partial patch is
  completed with the pad id, encoded and pinned like the other known latents (DESIGN §4 "encode
  the partial patch and repaint it"); its prompt tokens are trimmed from the output.
* **Released-compatible preset** (``released_compat=True``, see :meth:`SamplerConfig.released`):
  clean repaint with the prompt right-padded to a block multiple and encoded *with* the pads (the
  pads are visible to the prompt tokens of their block), unshifted grid, ``w = 1`` for an empty
  prefix, repetition penalty over earlier blocks, the first-block prompt tokens trimmed, whole
  blocks, NaN/inf logits replaced, a sample flagged as finished when *any* position of a block
  (pinned ones included) holds a stop id, nothing cut at EOS, and the loop stops when every
  sample is flagged or ``k * bs * p >= max_new_tokens`` after block ``k``.
* **Default (non-compat) output**: new tokens only, cut after the first stop id (kept) and at
  ``max_new_tokens`` (unless ``whole_blocks``); the loop stops when every sample has stopped or has
  ``max_new_tokens`` new tokens. Stop ids at pinned positions do not count.
* **Per-sample timesteps**: when no position of a block is pinned, every token of a sample shares
  its timestep, so the prior gets a (B,) timestep and computes each adaLN modulation once per
  sample instead of once per token (the commit and prefill pass a scalar 0).
* **Token sampling** on the decoded logits: repetition penalty with the released semantics (every
  id sampled in *earlier* blocks of the sample, pinned positions included, once per distinct id,
  at every position of the block: ``logit * p`` if negative else ``logit / p``), then greedy
  (``temperature == 0``, first index on ties) or temperature / top-k / top-p / multinomial.
* **An empty prompt** is unconditional generation: no prefix, no prefill, ``w = 1`` in the first
  block (the released code cannot run it; this is our definition).
* **Batches** of prompts of different lengths are padded internally; every sample has its own
  prefix length, positions and caches rows, so a batch gives each sample's single-prompt result
  (up to float rounding) for the same noise.
* **Noise**: ``noise`` is a list of per-block tensors or a callable ``noise(block, shape)``; a
  tensor of shape ``(B * bs, d)`` (the released, sample-major draw) or ``(B, bs, d)`` is accepted.
  Otherwise ``torch.randn`` with ``generator``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from unimodal.kv_cache import KVCache

FIRST_BLOCK_STRATEGIES = ("clean_repaint", "partial_repaint", "left_pad", "right_pad")
NoiseSource = Sequence[torch.Tensor] | Callable[[int, tuple[int, ...]], torch.Tensor] | None


# ----------------------------------------------------------------------------- config and outputs


@dataclass
class SamplerConfig:
    """Settings of one sampling run (YAML ``sampler:`` section)."""

    num_inference_steps: int = 16  # K Euler steps per block
    guidance_scale: float = 7.0  # CFG weight w (1 = no guidance, 0 = unconditional)
    shift: float = 1.0  # SD3-style time shift of the grid (1 = the released uniform grid)
    first_block: str = "clean_repaint"  # see FIRST_BLOCK_STRATEGIES
    repaint_fraction: float = 0.5  # partial_repaint: fraction of the steps that re-noise known latents
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None  # None/0 = off
    top_p: float | None = None  # None/1 = off
    repetition_penalty: float = 1.0  # 1 = off; released default 1.1
    stop_on_eos: bool = True
    stop_token_ids: list[int] = field(default_factory=list)  # EOS (and e.g. <|im_end|>)
    pad_token_id: int | None = None  # needed for left/right padding and the released preset
    whole_blocks: bool | None = None  # keep whole blocks past max_new_tokens; None = released_compat
    released_compat: bool = False  # the released inference loop (module docstring)

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.first_block not in FIRST_BLOCK_STRATEGIES:
            raise ValueError(
                f"unknown first_block {self.first_block!r}; expected one of {FIRST_BLOCK_STRATEGIES}"
            )
        if not 0.0 <= self.repaint_fraction <= 1.0:
            raise ValueError(f"repaint_fraction must be in [0, 1], got {self.repaint_fraction}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.released_compat:
            if self.first_block != "clean_repaint":
                raise ValueError(f"released_compat uses clean_repaint, got first_block={self.first_block!r}")
            if self.shift != 1.0:
                raise ValueError(f"released_compat uses the unshifted grid, got shift={self.shift}")
            if self.whole_blocks is False:
                raise ValueError("released_compat generates whole blocks, got whole_blocks=False")
        self.stop_token_ids = [int(i) for i in self.stop_token_ids]

    @property
    def keep_whole_blocks(self) -> bool:
        return self.released_compat if self.whole_blocks is None else self.whole_blocks

    @classmethod
    def released(cls, **overrides) -> SamplerConfig:
        """The released defaults (spec §6): 16 steps, CFG 7, 32 new tokens, greedy, top-k 50 /
        top-p 0.9 (unused when greedy), repetition penalty 1.1, whole blocks, released_compat."""
        values = dict(
            num_inference_steps=16, guidance_scale=7.0, max_new_tokens=32, temperature=0.0, top_k=50,
            top_p=0.9, repetition_penalty=1.1, whole_blocks=True, released_compat=True,
        )  # fmt: skip
        return cls(**{**values, **overrides})


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
    finished: list[bool]  # per sample: stopped (stop id, or max_new_tokens outside released_compat)
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


@dataclass
class _Layout:
    """Per-sample arrangement of the prompt: what to encode, the prefix, the pinned latents."""

    encode_ids: list[list[int]]  # token ids given to the VAE encoder
    prefix: list[int]  # latents that go to the prefill (whole blocks)
    pinned: list[int]  # known latents at the start of the first block
    trim: list[int]  # prompt tokens to drop from the first block's output


# ----------------------------------------------------------------------------- token sampling


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, T, V), seen (B, V) bool: each seen id, at every position: ``l*p`` if l < 0 else ``l/p``."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen[:, None, :], penalised, logits)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, T, V) -> ids (B, T): greedy when ``temperature < 1e-5``, else top-k/top-p sampling."""
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
    probs = logits.softmax(dim=-1).flatten(0, 1)  # (B*T, V)
    draws = torch.multinomial(probs.to(generator.device) if generator else probs, 1, generator=generator)
    return draws.to(logits.device).view(logits.shape[:-1])


# ----------------------------------------------------------------------------- sampler


class BlockSampler:
    """KV-cached block-wise sampler over a Text VAE, a block-causal prior and a flow-match scheduler.

    vae: :class:`~unimodal.text_vae.TextVAE`; prior: :class:`~prior.models.mmdit.MMDiT` (one modality);
    scheduler: diffusers ``FlowMatchEulerDiscreteScheduler`` (its ``shift`` is set from the config).
    """

    def __init__(self, vae, prior, scheduler, config: SamplerConfig | None = None) -> None:
        self.vae, self.prior, self.scheduler = vae, prior, scheduler
        self.config = config or SamplerConfig()
        self.block_size = int(prior.config.block_size)  # latents per block
        self.patch_size = int(vae.config.patch_size)  # tokens per latent
        self.latent_dim = int(vae.config.latent_dim)
        if list(prior.config.in_channels) != [self.latent_dim]:
            raise ValueError(
                f"prior in_channels {prior.config.in_channels} != VAE latent_dim [{self.latent_dim}]"
            )
        if self.block_size % vae.config.block_size:
            raise ValueError(
                f"prior block_size {self.block_size} must be a multiple of the VAE block_size "
                f"{vae.config.block_size}"
            )
        if getattr(scheduler.config, "use_dynamic_shifting", False):
            raise ValueError(
                "the scheduler uses dynamic shifting; set use_dynamic_shifting=False (use `shift`)"
            )
        self.max_tokens = int(vae.config.max_seq_len)

    # ------------------------------------------------------------------ public API

    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        generator: torch.Generator | None = None,
        noise: NoiseSource = None,
        step_callback: Callable[[StepState], torch.Tensor | None] | None = None,
    ) -> SamplerOutput:
        """Generate continuations of ``prompt_ids`` (a list of token id lists, lengths may differ)."""
        token_ids = [[] for _ in prompt_ids]
        latents, ids, last = [], [], None
        for out in self.stream(prompt_ids, generator=generator, noise=noise, step_callback=step_callback):
            for acc, new in zip(token_ids, out.token_ids):
                acc.extend(new)
            latents.append(out.latents)
            ids.append(out.sampled_ids)
            last = out
        _, layout = self._check_prompts(prompt_ids)
        return SamplerOutput(
            token_ids=token_ids,
            block_latents=latents,
            block_ids=ids,
            num_prior_calls=last.num_prior_calls,
            num_blocks=len(latents),
            finished=last.finished,
            trim=layout.trim,
        )

    @torch.no_grad()
    def stream(
        self,
        prompt_ids: Sequence[Sequence[int]],
        generator: torch.Generator | None = None,
        noise: NoiseSource = None,
        step_callback: Callable[[StepState], torch.Tensor | None] | None = None,
    ) -> Iterator[BlockOutput]:
        """Yield one :class:`BlockOutput` per generated block (same tokens as :meth:`sample`)."""
        cfg, bs = self.config, self.block_size
        prompts, layout = self._check_prompts(prompt_ids)
        batch, device = len(prompts), self._device()
        prefix_len = torch.tensor(layout.prefix, device=device)  # (B,)
        prefix, prefix_valid, known, known_mask = self._encode(layout, device)

        # 1. prefill both caches with the prompt's whole blocks
        prior_cache = KVCache(self.prior.config.num_layers)
        vae_cache = self.vae.new_kv_cache()
        calls = 0
        if prefix.shape[1] > 0:
            positions = torch.arange(prefix.shape[1], device=device).expand(batch, -1)  # (B, P)
            zeros = torch.zeros(batch, device=device)  # t = 0 for every prefix token
            self._prior(prefix, zeros, positions, prior_cache, True, valid=prefix_valid)
            calls += 1
            self.vae.decode(prefix.to(self.vae.dtype), prefix_valid, positions, vae_cache, update_cache=True)

        guidance = torch.full((batch,), float(cfg.guidance_scale), device=device)
        seen = torch.zeros(batch, self.vae.config.vocab_size, dtype=torch.bool, device=device)
        finished = [False] * batch  # stopped on a stop id (sticky)
        counts = [0] * batch  # new output tokens so far
        for k in range(self._max_blocks(layout)):
            # 2. transport one block from noise to clean latents (cache read-only)
            positions = prefix_len[:, None] + k * bs + torch.arange(bs, device=device)  # (B, bs)
            w = torch.where(prefix_len == 0, 1.0, guidance) if k == 0 else guidance
            eps = self._noise(noise, k, batch, generator, device)
            pin = (known, known_mask) if k == 0 else None
            x, steps = self._transport(eps, positions, w, pin, prior_cache, k, step_callback)
            calls += steps
            # 3. commit the block to the prior cache, decode it with the VAE decoder's cache
            self._prior(x, torch.zeros(batch, device=device), positions, prior_cache, True)
            calls += 1
            logits = self.vae.decode(
                x.to(self.vae.dtype), None, positions, vae_cache, update_cache=True
            ).logits
            # 4. sample tokens, apply the stop rules
            ids = self._sample(logits.float(), seen, generator)  # (B, bs*p)
            new_tokens = []
            for i in range(batch):
                row = ids[i].tolist()
                start = layout.trim[i] if k == 0 else 0
                new_tokens.append(self._take(row, start, i, finished, counts))
            seen[torch.arange(batch, device=device)[:, None], ids] = True
            yield BlockOutput(k, new_tokens, ids, x, list(finished), calls)
            if self._done(k, finished, counts):
                break

    # ------------------------------------------------------------------ prompt layout and encoding

    def _check_prompts(self, prompt_ids: Sequence[Sequence[int]]) -> tuple[list[list[int]], _Layout]:
        """Validated prompts (lists of ints) and their layout."""
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty: pass at least one (possibly empty) prompt")
        vocab = self.vae.config.vocab_size
        prompts = [[int(t) for t in ids] for ids in prompt_ids]
        for i, ids in enumerate(prompts):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} holds token id {bad[0]} outside the vocabulary [0, {vocab})")
        layout = self._layout(prompts)
        for i, pre in enumerate(layout.prefix):
            needed = (pre + self.block_size) * self.patch_size
            if needed > self.max_tokens:
                raise ValueError(
                    f"prompt {i} is too long: {len(prompts[i])} tokens plus one block exceed the model "
                    f"maximum of {self.max_tokens} tokens"
                )
        return prompts, layout

    def _layout(self, prompts: list[list[int]]) -> _Layout:
        cfg, bs, p = self.config, self.block_size, self.patch_size
        chunk = bs * p
        enc, prefix, pinned, trim = [], [], [], []
        for i, ids in enumerate(prompts):
            n = len(ids)
            if cfg.first_block in ("left_pad", "right_pad"):
                pads = [self._pad_id(i, n, chunk)] * ((-n) % chunk)
                e = pads + ids if cfg.first_block == "left_pad" else ids + pads
                enc.append(e)
                prefix.append(len(e) // p)
                pinned.append(0)
                trim.append(0)
            else:  # clean / partial repaint (and the released preset)
                multiple = chunk if cfg.released_compat else p
                pads = [self._pad_id(i, n, multiple)] * ((-n) % multiple)
                start = (n // chunk) * bs  # whole blocks of the prompt
                enc.append(ids + pads)
                prefix.append(start)
                pinned.append(math.ceil(n / p) - start)
                trim.append(n - start * p)
        return _Layout(enc, prefix, pinned, trim)

    def _pad_id(self, i: int, n: int, multiple: int) -> int:
        if n % multiple and self.config.pad_token_id is None:
            raise ValueError(
                f"prompt {i} of {n} tokens must be padded to a multiple of {multiple}: set pad_token_id"
            )
        return -1 if self.config.pad_token_id is None else int(self.config.pad_token_id)

    def _encode(self, layout: _Layout, device: torch.device):
        """-> prefix (B, P, d), prefix_valid (B, P), known (B, bs, d), known_mask (B, bs)."""
        batch, bs, d = len(layout.encode_ids), self.block_size, self.latent_dim
        longest = max(len(e) for e in layout.encode_ids)
        p_max = max(layout.prefix)
        prefix = torch.zeros(batch, p_max, d, device=device)
        known = torch.zeros(batch, bs, d, device=device)
        if longest > 0:
            ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
            valid = torch.zeros(batch, longest, dtype=torch.bool, device=device)
            for i, e in enumerate(layout.encode_ids):
                ids[i, : len(e)] = torch.tensor(e, dtype=torch.long, device=device)
                valid[i, : len(e)] = True
            latents = self.vae.encode(ids, valid).latents.float()  # (B, longest / p, d)
            for i, (pre, pin) in enumerate(zip(layout.prefix, layout.pinned)):
                prefix[i, :pre] = latents[i, :pre]
                known[i, :pin] = latents[i, pre : pre + pin]
        arange_p = torch.arange(p_max, device=device)
        prefix_valid = arange_p[None] < torch.tensor(layout.prefix, device=device)[:, None]  # (B, P)
        known_mask = (
            torch.arange(bs, device=device)[None] < torch.tensor(layout.pinned, device=device)[:, None]
        )
        return prefix, prefix_valid, known, known_mask

    # ------------------------------------------------------------------ transport

    @staticmethod
    def set_grid(scheduler, config: SamplerConfig, device: torch.device | str | None = None) -> None:
        """Give ``scheduler`` the block's time grid: sigmas = the released fp32 grid
        ``linspace(1000, 0, K + 1)[:-1] / 1000`` warped by ``config.shift``; with shift 1 the model
        timesteps are the released grid values exactly. Also resets the scheduler's step index."""
        k = config.num_inference_steps
        grid = torch.linspace(1000.0, 0.0, k + 1, dtype=torch.float32)[:-1]  # (K,)
        scheduler.set_shift(config.shift)
        if config.shift == 1.0:
            scheduler.set_timesteps(sigmas=(grid / 1000).numpy(), timesteps=grid.numpy(), device=device)
        else:
            scheduler.set_timesteps(sigmas=(grid / 1000).numpy(), device=device)
        scheduler.set_begin_index(0)

    def _transport(self, eps, positions, w, pin, cache: KVCache, block: int, callback):
        """K Euler steps on one block. eps (B, bs, d), positions (B, bs), w (B,). -> (x, prior calls)."""
        cfg, sched = self.config, self.scheduler
        batch, bs, _ = eps.shape
        guided = bool((w != 1).any())
        alone = torch.arange(bs, device=eps.device).expand(batch, bs)  # unconditional: block alone
        model_pos = torch.cat((positions, alone)) if guided else positions
        known, mask = pin if pin is not None else (None, None)
        has_pin = mask is not None and bool(mask.any())
        clean = has_pin and cfg.first_block == "clean_repaint"
        renoise_steps = (
            math.ceil(cfg.repaint_fraction * cfg.num_inference_steps) if has_pin and not clean else 0
        )
        self.set_grid(sched, cfg, eps.device)
        x = eps.clone()
        for s, t in enumerate(sched.timesteps):
            tt = torch.full((batch, bs), float(t), device=eps.device)  # (B, bs)
            if clean:
                x = torch.where(mask[..., None], known, x)
                tt = tt.masked_fill(mask, 0.0)
            elif s < renoise_steps:
                sigma = sched.sigmas[s].to(eps.device)
                x = torch.where(mask[..., None], (1 - sigma) * known + sigma * eps, x)
            x_in = torch.cat((x, x)) if guided else x
            t_in = tt if has_pin else tt[:, 0]  # (B, bs), or (B,): one adaLN modulation per sample
            v_all = self._prior(x_in, torch.cat((t_in, t_in)) if guided else t_in, model_pos, cache, False)
            v_c, v_u = v_all.chunk(2) if guided else (v_all, None)
            v = w[:, None, None] * (v_c - v_u) + v_u if guided else v_c  # (B, bs, d)
            x_new = sched.step(v, t, x).prev_sample
            if clean:
                x_new = torch.where(mask[..., None], known, x_new)
            if callback is not None:
                state = StepState(block, s, float(t), tt, x, v_c, v_u, v, x_new)
                replaced = callback(state)
                x_new = x_new if replaced is None else replaced.to(x_new)
            x = x_new
        return x, len(sched.timesteps)

    def _prior(self, x, t, positions, cache: KVCache, update: bool, valid=None) -> torch.Tensor:
        # one prior forward: x (B, L, d) fp32 -> velocity (B, L, d) fp32
        dtype = self.prior.dtype
        out = self.prior(
            x.to(dtype), t, positions=positions, valid=valid, kv_cache=cache, update_cache=update
        )
        return out.velocity.float()

    def _noise(self, noise: NoiseSource, block: int, batch: int, generator, device) -> torch.Tensor:
        shape = (batch, self.block_size, self.latent_dim)
        if noise is None:
            gen_device = generator.device if generator is not None else device
            eps = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
        elif callable(noise):
            eps = noise(block, shape)
        else:
            if block >= len(noise):
                raise ValueError(f"noise holds {len(noise)} blocks but block {block} needs one")
            eps = noise[block]
        if eps.numel() != math.prod(shape):
            raise ValueError(
                f"noise for block {block} has shape {tuple(eps.shape)}; expected {shape} or (B*bs, d)"
            )
        return eps.reshape(shape).to(device=device, dtype=torch.float32)

    # ------------------------------------------------------------------ tokens and stopping

    def _sample(self, logits: torch.Tensor, seen: torch.Tensor, generator) -> torch.Tensor:
        cfg = self.config
        if cfg.released_compat:
            logits = torch.nan_to_num(logits, nan=0.0, posinf=1e4, neginf=-1e4)
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        return sample_tokens(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)

    def _take(self, row: list[int], start: int, i: int, finished: list[bool], counts: list[int]) -> list[int]:
        """The output tokens of sample i from its sampled row; updates its stop flag and count."""
        cfg, stops = self.config, set(self.config.stop_token_ids)
        if cfg.released_compat:  # keep everything; flag on a stop id anywhere in the block
            if cfg.stop_on_eos and stops.intersection(row):
                finished[i] = True
            counts[i] += len(row) - start
            return row[start:]
        if finished[i] or counts[i] >= cfg.max_new_tokens:
            return []
        new = row[start:]
        if cfg.stop_on_eos:
            cut = next((j for j, t in enumerate(new) if t in stops), None)
            if cut is not None:
                new, finished[i] = new[: cut + 1], True
        if not cfg.keep_whole_blocks:
            new = new[: cfg.max_new_tokens - counts[i]]
        counts[i] += len(new)
        return new

    def _done(self, k: int, finished: list[bool], counts: list[int]) -> bool:
        cfg = self.config
        if cfg.released_compat:
            return all(finished) or (k + 1) * self.block_size * self.patch_size >= cfg.max_new_tokens
        return all(f or c >= cfg.max_new_tokens for f, c in zip(finished, counts))

    def _max_blocks(self, layout: _Layout) -> int:
        """Blocks that fit in the model's maximum length (the loop normally stops earlier)."""
        room = self.max_tokens // self.patch_size - max(layout.prefix)
        return max(room // self.block_size, 1)

    def _device(self) -> torch.device:
        return next(self.prior.parameters()).device


__all__ = [
    "FIRST_BLOCK_STRATEGIES",
    "NoiseSource",
    "BlockOutput",
    "BlockSampler",
    "SamplerConfig",
    "SamplerOutput",
    "StepState",
    "apply_repetition_penalty",
    "sample_tokens",
]

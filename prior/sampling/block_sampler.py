"""Block-wise, KV-cached sampling of text from a Cola DLM (the inference loop of docs/design.md).

One :class:`BlockSampler` owns the block loop and both KV caches::

    encode prompt -> prefill (prior at t=0 and VAE decoder, update_cache=True)
    for each block:  noise -> K Euler steps with CFG (cache read-only)
                     -> commit (prior at t=0, update_cache=True)
                     -> decode (VAE decoder, its cache appended) -> sample tokens -> stop rule

It sits between three seams: the text modality (:class:`~modalities.text.TextModality`: ids <->
latents, the cached decoder), the prior (:class:`~prior.models.mmdit.MMDiT`: a velocity) and
diffusers' ``FlowMatchEulerDiscreteScheduler`` (the grid and the update). Settings come from one
:class:`~prior.sampling.config.GenerationConfig`; per-sample state and the stop rules live in
:mod:`prior.sampling.stopping`, token sampling in :mod:`prior.sampling.tokens`.

Design choices
--------------
* **The scheduler owns the time grid and the update.** It is given
  ``sigmas = linspace(1, 0, K + 1)[:-1]`` (computed as the released fp32 grid
  ``linspace(1000, 0, K + 1) / 1000``); its ``shift`` warps them SD3-style
  (``shift * s / (1 + (shift - 1) s)``). With shift 1 the model timesteps are the released grid
  values exactly, and ``scheduler.step`` computes ``x + (sigma_next - sigma) v``, i.e. the released
  ``x - dt v`` (checked by a test). ``shift=None`` uses the scheduler's configured shift.
* **CFG in one (2B) forward.** Rows ``[0, B)`` are the conditional branch (block after the cache,
  positions continuing each sample); rows ``[B, 2B)`` are the unconditional branch, passed to the
  prior as ``context_free_rows=B``: the block alone at positions ``0..bs-1`` (released).
  ``v = w (v_c - v_u) + v_u`` with ``w`` per sample; ``w = 1`` for samples whose prefix is empty
  in the first block (released). When every ``w`` of a block is 1 the unconditional half is
  skipped.
* **K sequential prior passes per block** (``merge_commit``, default): a finished block is not
  committed by a pass of its own; its clean latents (t = 0) ride in front of the next block's
  noisy latents in that block's first denoising step, which writes only them to the cache
  (``commit_tokens``). Under the block-causal mask the clean tokens never see the noisy ones
  (higher block ids) and the noisy ones see the clean block as history, exactly the 2L training
  layout, so the result equals the unmerged loop (``merge_commit=False``: K steps + 1 commit per
  block, the prompt prefilled by its own pass) up to float rounding; the prompt's whole blocks
  ride in block 0's first step the same way, and the last block is never committed (nothing
  reads it). In CFG steps the unconditional rows carry an invalid copy of the clean part, so
  both branches keep one batched forward. The released loop makes ``2K + 1`` passes per block.
  ``guidance_interval=[lo, hi]`` applies guidance only at steps whose noise level is in it (the
  other steps run the conditional branch alone); ``noise_scale`` scales the initial noise;
  ``project_latents`` puts each finished block on the encoder's output sphere before it is decoded
  and committed (``TextVAE.project_latents``).
* **Prior extensions** (off in the release): a ``self_condition`` prior gets each Euler step's
  clean estimate ``x - t v`` (guided ``v``) at the next step of the block; a ``history="tokens"``
  prior is committed ``embed_history`` of the prompt's and each block's sampled ids (pinned prompt
  ids in the first block) instead of clean latents, so its blocks are sampled before the commit.
* **First block** when the prompt does not end on a block boundary (``first_block``):

  - ``clean_repaint`` (default): the prefix is the prompt's whole blocks; the first block's known
    latents are held at their clean values with timestep 0 before every step and after every
    update. The prompt is encoded *without* padding (the block-causal encoder makes those latents
    depend on prompt tokens only), or right-padded to a block multiple with the pads visible to
    its block when ``pad_prompt_to_block`` (released).
  - ``partial_repaint``: same layout, but for the first ``ceil(repaint_fraction * K)`` steps the
    known positions are re-noised to the current level, ``(1 - sigma) z0 + sigma eps`` (``eps`` =
    the block's own initial noise), at the current timestep (RePaint); afterwards they are free.
  - ``left_pad`` / ``right_pad``: the prompt is padded with the pad id to a multiple of the block
    (pads are real tokens, encoded and seen); the prefix is all of it, nothing is pinned;
    generation starts right after the (right) pads.

  With patch size ``p > 1`` and a prompt that is not a multiple of ``p`` (``patch_boundary``):
  ``pin`` (default) completes the partial patch with the pad id, encodes it and pins it like the
  other known latents (its prompt tokens are trimmed from the output; the pad slot is generated
  over); ``shift`` puts the missing ``(-n) % p`` pad ids *before* the prompt instead, so the
  prompt ends on a patch boundary and generation starts right after its last token (the pads are
  part of the prompt: encoded, seen, trimmed). ``scripts/study_patch_parity.py`` compares them.
* **bf16 autocast** (``autocast="bfloat16"``): the prior's forwards run under ``torch.autocast``,
  one region per block, so every weight is cast to bf16 once per block and the K passes reuse the
  casts; norms, softmax, the categorical head's clean estimate and the Euler update stay fp32, the
  VAE decoder (one pass per block) runs in its own dtype. README "Speed" gives its token agreement
  with fp32 (``scripts/bench_precision.py``).
* **Per-run constants**: the timestep embedding and every adaLN output of the K grid values
  (and of t = 0) are computed in the first block and reused (``AdaLNCache``); the prior's dtype
  is read once per run.
* **Per-sample timesteps**: when no position of a block is pinned, every token of a sample shares
  its timestep, so the prior gets a (B,) timestep and computes each adaLN modulation once per
  sample instead of once per token (the commit and prefill pass a scalar 0).
* **An empty prompt** is unconditional generation: no prefix, no prefill, ``w = 1`` in the first
  block (the released code cannot run it; this is our definition).
* **Batches** of prompts of different lengths are padded internally; every sample has its own
  prefix length, positions and caches rows, so a batch gives each sample's single-prompt result
  (up to float rounding) for the same noise.
* **Noise**: ``noise`` is a list of per-block tensors or a callable ``noise(block, shape)``; a
  tensor of shape ``(B * bs, d)`` (the released, sample-major draw) or ``(B, bs, d)`` is accepted.
  Otherwise ``torch.randn`` with ``generator``; a list of generators (one per prompt, as diffusers
  pipelines take them) draws each row's noise and tokens from its own generator, so a row's output
  does not depend on what else is in the batch (a server batching requests relies on it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from modalities.text import TextModality
from prior.models.timestep import AdaLNCache
from prior.sampling.config import GenerationConfig
from prior.sampling.outputs import BlockOutput, Context, Pending, SamplerOutput, StepState
from prior.sampling.stopping import RowState, make_stop_rule
from prior.sampling.tokens import apply_repetition_penalty, finite_logits, row_randn, sample_tokens
from unimodal.kv_cache import KVCache

NoiseSource = Sequence[torch.Tensor] | Callable[[int, tuple[int, ...]], torch.Tensor] | None


# ----------------------------------------------------------------------------- sampler


class BlockSampler:
    """KV-cached block-wise sampler over a text modality, a block-causal prior and a flow-match scheduler.

    text: :class:`~modalities.text.TextModality` (its ``block_size`` must be the prior's);
    prior: :class:`~prior.models.mmdit.MMDiT` (one modality); scheduler: diffusers
    ``FlowMatchEulerDiscreteScheduler``. ``config.stop_token_ids`` / ``pad_token_id`` are used as
    given (None: no stop ids / no pad id); the pipeline fills them from its tokenizer.
    """

    def __init__(self, text: TextModality, prior, scheduler, config: GenerationConfig | None = None) -> None:
        if not isinstance(text, TextModality):
            raise TypeError(f"text must be a TextModality, got {type(text).__name__}")
        self.text, self.prior, self.scheduler = text, prior, scheduler
        self.config = config or GenerationConfig()
        self.block_size = int(prior.config.block_size)  # latents per block
        self.patch_size = text.patch_size  # tokens per latent
        self.latent_dim = text.latent_dim
        if text.block_size != self.block_size:
            raise ValueError(
                f"text modality block_size {text.block_size} != prior block_size {self.block_size}"
            )
        channels = dict(zip(prior.config.modalities, prior.config.in_channels))
        if channels.get("text") != self.latent_dim:
            raise ValueError(
                f"prior in_channels {prior.config.in_channels} (modalities {prior.config.modalities}) have "
                f"no text stream of the VAE latent_dim {self.latent_dim}"
            )
        self.multimodal = len(channels) > 1  # the prior takes {modality: latents}
        self.history_tokens = getattr(prior.config, "history", "latents") == "tokens"  # embed_history(ids)
        self.self_condition = bool(getattr(prior.config, "self_condition", False))
        if self.history_tokens and self.patch_size != 1:
            raise ValueError(
                f"a history='tokens' prior needs patch size 1, the text modality has {self.patch_size}"
            )
        self._dtype = prior.dtype  # read once: diffusers' ModelMixin.dtype walks the parameters
        self._adaln_cache = AdaLNCache()  # per run (_new_run): the weights must not change inside one
        if self.block_size % text.vae.config.block_size:
            raise ValueError(
                f"prior block_size {self.block_size} must be a multiple of the VAE block_size "
                f"{text.vae.config.block_size}"
            )
        if getattr(scheduler.config, "use_dynamic_shifting", False):
            raise ValueError(
                "the scheduler uses dynamic shifting; set use_dynamic_shifting=False (use `shift`)"
            )

    # ------------------------------------------------------------------ public API

    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        generator: torch.Generator | None = None,
        noise: NoiseSource = None,
        step_callback: Callable[[StepState], torch.Tensor | None] | None = None,
    ) -> SamplerOutput:
        """Generate continuations of ``prompt_ids`` (a list of token id lists, lengths may differ)."""
        rows = self.layout(prompt_ids)
        return self._collect(rows, self._blocks(rows, generator, noise, step_callback))

    @staticmethod
    def _collect(rows: list[RowState], blocks: Iterator[BlockOutput]) -> SamplerOutput:
        """Run the block loop to its end and gather its blocks into one output."""
        token_ids = [[] for _ in rows]
        latents, ids, last = [], [], None
        for out in blocks:
            for acc, new in zip(token_ids, out.token_ids):
                acc.extend(new)
            latents.append(out.latents)
            ids.append(out.sampled_ids)
            last = out
        return SamplerOutput(
            token_ids=token_ids,
            block_latents=latents,
            block_ids=ids,
            num_prior_calls=last.num_prior_calls,
            num_blocks=len(latents),
            finished=last.finished,
            trim=[r.trim for r in rows],
        )

    def stream(
        self,
        prompt_ids: Sequence[Sequence[int]],
        generator: torch.Generator | None = None,
        noise: NoiseSource = None,
        step_callback: Callable[[StepState], torch.Tensor | None] | None = None,
    ) -> Iterator[BlockOutput]:
        """Yield one :class:`BlockOutput` per generated block (same tokens as :meth:`sample`)."""
        yield from self._blocks(self.layout(prompt_ids), generator, noise, step_callback)

    # ------------------------------------------------------------------ prompt layout and encoding

    def layout(self, prompt_ids: Sequence[Sequence[int]]) -> list[RowState]:
        """Validate the prompts and lay each out (what to encode, prefix, pinned latents, trim)."""
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty: pass at least one (possibly empty) prompt")
        cfg, bs, p = self.config, self.block_size, self.patch_size
        chunk = bs * p
        rows = []
        for i, ids in enumerate(prompt_ids):
            ids = self._check_ids(i, ids)
            if p > 1 and cfg.patch_boundary == "shift" and len(ids) % p:
                ids = [self._pad_id(i, len(ids), p)] * ((-len(ids)) % p) + ids
            n = len(ids)
            if cfg.first_block in ("left_pad", "right_pad"):
                pads = [self._pad_id(i, n, chunk)] * ((-n) % chunk)
                enc = pads + ids if cfg.first_block == "left_pad" else ids + pads
                row = RowState(enc, prefix=len(enc) // p, pinned=0, trim=0)
            else:  # clean / partial repaint
                multiple = chunk if cfg.pad_prompt_to_block else p
                pads = [self._pad_id(i, n, multiple)] * ((-n) % multiple)
                start = (n // chunk) * bs  # whole blocks of the prompt
                row = RowState(ids + pads, prefix=start, pinned=math.ceil(n / p) - start, trim=n - start * p)
            if (row.prefix + bs) * p > self.text.max_tokens:
                raise ValueError(
                    f"prompt {i} is too long: {n} tokens plus one block exceed the model "
                    f"maximum of {self.text.max_tokens} tokens"
                )
            rows.append(row)
        return rows

    def _check_ids(self, i: int, ids: Sequence[int]) -> list[int]:
        """Prompt ``i``'s ids as ints; an id outside the vocabulary is one ValueError naming it."""
        ids, vocab = [int(t) for t in ids], self.text.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} holds token id {bad[0]} outside the vocabulary [0, {vocab})")
        return ids

    def _pad_id(self, i: int, n: int, multiple: int) -> int:
        if n % multiple and self.config.pad_token_id is None:
            raise ValueError(
                f"prompt {i} of {n} tokens must be padded to a multiple of {multiple}: set pad_token_id"
            )
        return -1 if self.config.pad_token_id is None else int(self.config.pad_token_id)

    def _encode(self, rows: list[RowState], device: torch.device):
        """-> prefix (B, P, d), prefix_valid (B, P), known (B, bs, d), known_mask (B, bs)."""
        batch, bs, d = len(rows), self.block_size, self.latent_dim
        p_max = max(r.prefix for r in rows)
        prefix = torch.zeros(batch, p_max, d, device=device)
        known = torch.zeros(batch, bs, d, device=device)
        if any(r.encode_ids for r in rows):
            latents = self.text.encode_ids([r.encode_ids for r in rows]).latents.to(device)  # (B, N, d)
            for i, r in enumerate(rows):
                prefix[i, : r.prefix] = latents[i, : r.prefix]
                known[i, : r.pinned] = latents[i, r.prefix : r.prefix + r.pinned]
        prefix_len = torch.tensor([r.prefix for r in rows], device=device)
        prefix_valid = torch.arange(p_max, device=device)[None] < prefix_len[:, None]  # (B, P)
        pinned = torch.tensor([r.pinned for r in rows], device=device)
        known_mask = torch.arange(bs, device=device)[None] < pinned[:, None]  # (B, bs)
        return prefix, prefix_valid, known, known_mask

    @staticmethod
    def _history_ids(rows: list[RowState], length: int, device, after_prefix: bool = False) -> torch.Tensor:
        """(B, length) the first ``length`` ids each row encodes (``after_prefix``: those after its
        prefix, the first block's pinned part), 0 past their end (slots masked or overwritten)."""
        out = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            lo = r.prefix if after_prefix else 0
            ids = list(r.encode_ids[lo : lo + length])
            if ids:
                out[i, : len(ids)] = torch.tensor(ids, device=device)
        return out

    # ------------------------------------------------------------------ the block loop

    @torch.no_grad()
    def _blocks(
        self, rows: list[RowState], generator, noise, step_callback, context: Context | None = None
    ) -> Iterator[BlockOutput]:
        """The text loop. ``context``: a prior cache already prefilled with earlier segments (an image
        before the caption) and where the text segment starts in it (positions and blocks, per row)."""
        cfg, bs, text = self.config, self.block_size, self.text
        batch, device = len(rows), self._device()
        self._new_run()
        rule = make_stop_rule(
            cfg.stop_rule, cfg.stop_token_ids or [], cfg.stop_on_eos, cfg.max_new_tokens, cfg.whole_blocks
        )
        prefix_len = torch.tensor([r.prefix for r in rows], device=device)  # (B,)
        prefix, prefix_valid, known, known_mask = self._encode(rows, device)

        # 1. the prompt's whole blocks (after the context, if any): the decoder cache now, the prior
        # cache in block 0's first step (merge_commit) or by a pass of its own
        prior_cache = KVCache(self.prior.config.num_layers) if context is None else context.cache
        pos0 = None if context is None else context.positions.to(device)[:, None]  # (B, 1) text start
        blk0 = None if context is None else context.blocks.to(device)[:, None]
        decoder_cache = text.new_decoder_cache()
        calls = 0 if context is None else context.prior_calls
        pending = None  # clean latents the next prior forward commits (merge_commit)
        if prefix.shape[1] > 0:
            positions = torch.arange(prefix.shape[1], device=device).expand(batch, -1)  # (B, P)
            blocks = None if context is None else blk0 + positions // bs
            shifted = positions if context is None else pos0 + positions
            history = self._history_ids(rows, prefix.shape[1], device) if self.history_tokens else None
            history = prefix if history is None else self.prior.embed_history(history)
            pending, calls = self._stage(history, shifted, prefix_valid, blocks, prior_cache, calls)
            text.decode_logits(prefix, positions, decoder_cache, prefix_valid, update_cache=True)

        guidance = torch.full((batch,), float(cfg.guidance_scale), device=device)
        seen = torch.zeros(batch, text.vocab_size, dtype=torch.bool, device=device)
        for k in range(self._max_blocks(rows)):
            # 2. transport one block from noise to clean latents (the first step commits `pending`)
            positions = prefix_len[:, None] + k * bs + torch.arange(bs, device=device)  # (B, bs)
            conditioned = prefix_len > 0 if context is None else torch.ones_like(prefix_len, dtype=torch.bool)
            w = torch.where(conditioned, guidance, 1.0) if k == 0 else guidance
            eps = self._noise(noise, k, batch, generator, device)
            pin = (known, known_mask) if k == 0 else None
            shifted, blocks = positions, None  # prior positions and block ids of the block
            if context is not None:
                shifted, blocks = pos0 + positions, (blk0 + positions // bs).expand(batch, bs)
            x, steps = self._transport(
                eps, shifted, w, pin, prior_cache, k, step_callback, block_ids=blocks, pending=pending
            )
            calls += steps
            if cfg.project_latents:  # onto the sphere the encoder's posterior mode lies on
                x = text.vae.project_latents(x)
            # 3. commit the block to the prior cache (merged: in the next block's first step), decode
            # it with the VAE decoder's cache and sample its tokens; a history="tokens" prior commits
            # the embeddings of those tokens (the prompt's where they are pinned), so after sampling
            ones = torch.ones(batch, bs, dtype=torch.bool, device=device)
            if not self.history_tokens:
                pending, calls = self._stage(x, shifted, ones, blocks, prior_cache, calls)
            logits = text.decode_logits(x, positions, decoder_cache, update_cache=True)
            ids = self._sample(logits, seen, generator)  # (B, bs*p)
            if self.history_tokens:
                pinned = self._history_ids(rows, bs, device, after_prefix=True) if k == 0 else None
                hist = self.prior.embed_history(
                    ids if pinned is None else torch.where(known_mask, pinned, ids)
                )
                pending, calls = self._stage(hist, shifted, ones, blocks, prior_cache, calls)
            # 4. apply the stop rule
            new_tokens = [
                rule.take(row, ids[i].tolist(), row.trim if k == 0 else 0) for i, row in enumerate(rows)
            ]
            seen[torch.arange(batch, device=device)[:, None], ids] = True
            yield BlockOutput(k, new_tokens, ids, x, [r.finished for r in rows], calls)
            if rule.done(rows, k + 1, bs * self.patch_size):
                break

    # ------------------------------------------------------------------ transport

    @staticmethod
    def set_grid(scheduler, config: GenerationConfig, device: torch.device | str | None = None) -> None:
        """Give ``scheduler`` the block's time grid: sigmas = the released fp32 grid
        ``linspace(1000, 0, K + 1)[:-1] / 1000`` warped by the shift (``config.shift``, or the
        scheduler's configured one); with shift 1 the model timesteps are the released grid values
        exactly. Also resets the scheduler's step index."""
        k = config.num_inference_steps
        shift = float(scheduler.config.shift) if config.shift is None else float(config.shift)
        grid = torch.linspace(1000.0, 0.0, k + 1, dtype=torch.float32)[:-1]  # (K,)
        scheduler.set_shift(shift)
        if shift == 1.0:
            scheduler.set_timesteps(sigmas=(grid / 1000).numpy(), timesteps=grid.numpy(), device=device)
        else:
            scheduler.set_timesteps(sigmas=(grid / 1000).numpy(), device=device)
        scheduler.set_begin_index(0)

    def _new_run(self) -> None:
        """Per-run constants start afresh (the weights may have changed since the last run)."""
        self._dtype = self.prior.dtype
        self._adaln_cache = AdaLNCache()

    def _stage(
        self, clean, positions, valid, blocks, cache: KVCache, calls: int
    ) -> tuple[Pending | None, int]:
        """Clean latents (B, L, d) for the prior cache: pending for the next forward to commit
        (merge_commit), or committed now by a pass of their own. -> (pending or None, prior calls)."""
        pending = Pending(clean.float(), positions, valid, blocks)
        if self.config.merge_commit:
            return pending, calls
        return None, calls + self._commit(pending, cache)

    def _commit(self, seg: Pending, cache: KVCache) -> int:
        """Write clean latents to the prior cache with a pass of their own (-> 1 prior call)."""
        zeros = torch.zeros(seg.x.shape[0], device=seg.x.device)  # t = 0
        self._prior(seg.x, zeros, seg.positions, cache, update=True, valid=seg.valid, block_ids=seg.block_ids)
        return 1

    def _transport(self, eps, *args, **kwargs):
        """K Euler steps on one block (:meth:`_transport_steps`), under the prior's autocast when
        ``config.autocast`` is set: one region per block, so each weight is cast once per block (a
        step callback runs inside the region too)."""
        with self._autocast(eps.device):
            return self._transport_steps(eps, *args, **kwargs)

    def _autocast(self, device: torch.device):
        """``config.autocast``'s region (prior forwards only); a no-op context when it is None."""
        dtype = self.config.autocast
        return torch.autocast(
            device.type, dtype=getattr(torch, dtype or "bfloat16"), enabled=dtype is not None
        )

    def _transport_steps(
        self, eps, positions, w, pin, cache: KVCache, block: int, callback, block_ids=None, modality: str = "text",
        rope=None, pending: Pending | None = None,
    ):  # fmt: skip
        """K Euler steps on one block of ``modality``. eps (B, bs, d), positions (B, bs), w (B,),
        block_ids (B, bs) or None (``position // block_size``); ``rope``: (cond, alone) RoPE
        coordinates (B, bs, A) of an axial prior, or None; ``pending``: clean latents the first
        step commits (merge_commit). -> (x, prior calls)."""
        cfg, sched = self.config, self.scheduler
        batch, bs, _ = eps.shape
        lo, hi = cfg.guidance_interval or (0.0, 1.0)
        alone = torch.arange(bs, device=eps.device).expand(batch, bs)  # unconditional: block alone
        both_blocks = None if block_ids is None else torch.cat((block_ids, torch.zeros_like(block_ids)))
        known, mask = pin if pin is not None else (None, None)
        has_pin = mask is not None and bool(mask.any())
        clean = has_pin and cfg.first_block == "clean_repaint"
        renoise_steps = (
            math.ceil(cfg.repaint_fraction * cfg.num_inference_steps) if has_pin and not clean else 0
        )
        self.set_grid(sched, cfg, eps.device)
        x = eps.clone()
        x0_prev = None  # a self-conditioned prior's previous clean estimate (None: zeros)
        any_guidance, sigmas = bool((w != 1).any()), sched.sigmas.tolist()
        for s, t in enumerate(sched.timesteps):
            guided = any_guidance and lo <= sigmas[s] <= hi  # CFG at this noise level
            tt = torch.full((batch, bs), float(t), device=eps.device)  # (B, bs)
            if clean:
                x = torch.where(mask[..., None], known, x)
                tt = tt.masked_fill(mask, 0.0)
            elif s < renoise_steps:
                sigma = sched.sigmas[s].to(eps.device)
                x = torch.where(mask[..., None], (1 - sigma) * known + sigma * eps, x)
            t_in = tt if has_pin else tt[:, 0]  # (B, bs), or (B,): one adaLN modulation per sample
            if s == 0 and pending is not None:
                if rope is not None:
                    raise ValueError("merge_commit does not support axial RoPE coordinates")
                v_c, v_u = self._merged_step(
                    x, tt, positions, alone, cache, guided, block_ids, pending, modality
                )
                v = v_c if v_u is None else w[:, None, None] * (v_c - v_u) + v_u
            elif guided:
                v_all = self._prior(
                    torch.cat((x, x)), torch.cat((t_in, t_in)), torch.cat((positions, alone)), cache,
                    context_free_rows=batch, block_ids=both_blocks, modality=modality,
                    rope_positions=None if rope is None else torch.cat(rope),
                    self_cond=None if x0_prev is None else torch.cat((x0_prev, x0_prev)),
                )  # fmt: skip
                v_c, v_u = v_all.chunk(2)
                v = w[:, None, None] * (v_c - v_u) + v_u  # (B, bs, d)
            else:
                v_c = v = self._prior(
                    x, t_in, positions, cache, block_ids=block_ids, modality=modality,
                    rope_positions=None if rope is None else rope[0], self_cond=x0_prev,
                )  # fmt: skip
                v_u = None
            if self.self_condition:
                x0_prev = x - (tt[..., None] / 1000.0) * v  # (B, bs, d) the clean estimate at this step
            x_new = sched.step(v, t, x).prev_sample
            if clean:
                x_new = torch.where(mask[..., None], known, x_new)
            if callback is not None:
                state = StepState(block, s, float(t), tt, x, v_c, v_u, v, x_new)
                replaced = callback(state)
                x_new = x_new if replaced is None else replaced.to(x_new)
            x = x_new
        return x, len(sched.timesteps)

    def _merged_step(
        self, x, tt, positions, alone, cache, guided: bool, block_ids, pending: Pending, modality
    ):
        """The first step of a block with the pending clean latents in front (module docstring).

        Conditional rows: [clean (t = 0) ; block (tt)] at their positions, committing the clean part;
        unconditional rows (when ``guided``): [invalid copy ; block alone at 0..bs-1]. -> (v_c, v_u)."""
        batch, bs = tt.shape
        lp, device = pending.x.shape[1], x.device
        ones = torch.ones(batch, bs, dtype=torch.bool, device=device)
        x_in = torch.cat((pending.x, x), dim=1)  # (B, Lp + bs, d)
        t_in = torch.cat((torch.zeros(batch, lp, device=device), tt), dim=1)
        pos = torch.cat((pending.positions, positions), dim=1)
        valid = torch.cat((pending.valid, ones), dim=1)
        blk = None if block_ids is None else torch.cat((pending.block_ids, block_ids), dim=1)
        rows = 0
        if guided:
            x_in, t_in = torch.cat((x_in, x_in)), torch.cat((t_in, t_in))
            pos = torch.cat((pos, torch.cat((torch.zeros_like(pending.positions), alone), dim=1)))
            valid = torch.cat((valid, torch.cat((torch.zeros_like(pending.valid), ones), dim=1)))
            if blk is not None:
                blk = torch.cat((blk, torch.zeros_like(blk)))
            rows = batch
        v = self._prior(
            x_in, t_in, pos, cache, update=True, valid=valid, context_free_rows=rows, block_ids=blk,
            modality=modality, commit_tokens=lp,
        )[:, lp:]  # fmt: skip
        return (v[:batch], v[batch:]) if guided else (v, None)

    def _prior(
        self, x, t, positions, cache: KVCache, update: bool = False, valid=None, context_free_rows: int = 0,
        block_ids=None, modality: str = "text", rope_positions=None, commit_tokens: int | None = None,
        self_cond=None,
    ) -> torch.Tensor:  # fmt: skip
        # one prior forward of one segment: x (B, L, d) fp32 -> velocity (B, L, d) fp32
        x = x.to(self._dtype)
        extra = {"adaln_cache": self._adaln_cache}
        if self_cond is not None:
            extra["self_cond"] = self_cond.to(self._dtype)
        if rope_positions is not None:
            extra["rope_positions"] = rope_positions
        if commit_tokens is not None:
            extra["commit_tokens"] = commit_tokens
        with self._autocast(x.device):  # nested in a block's region, it keeps that region's weight casts
            out = self.prior(
                {modality: x} if self.multimodal else x, t, positions=positions, valid=valid, kv_cache=cache,
                update_cache=update, context_free_rows=context_free_rows, block_ids=block_ids, **extra,
            )  # fmt: skip
        return (out.velocity[modality] if self.multimodal else out.velocity).float()

    def _noise(self, noise: NoiseSource, block: int, batch: int, generator, device) -> torch.Tensor:
        shape = (batch, self.block_size, self.latent_dim)
        if noise is None:
            eps = row_randn(shape, generator, device)
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
        return self.config.noise_scale * eps.reshape(shape).to(device=device, dtype=torch.float32)

    # ------------------------------------------------------------------ tokens

    def _sample(self, logits: torch.Tensor, seen: torch.Tensor, generator) -> torch.Tensor:
        cfg = self.config
        if cfg.finite_logits:
            logits = finite_logits(logits)
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        return sample_tokens(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)

    def _max_blocks(self, rows: list[RowState]) -> int:
        """Blocks that fit in the model's maximum length (the loop normally stops earlier)."""
        room = self.text.max_tokens // self.patch_size - max(r.prefix for r in rows)
        return max(room // self.block_size, 1)

    def _device(self) -> torch.device:
        return next(self.prior.parameters()).device


__all__ = ["BlockOutput", "BlockSampler", "Context", "NoiseSource", "SamplerOutput", "StepState"]

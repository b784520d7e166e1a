"""One KV-cached sampler for every layout: text->text, image->text and text->image.

:class:`MultimodalSampler` is the text :class:`~prior.sampling.block_sampler.BlockSampler` plus an
image modality, over an MMDiT with a ``text`` and an ``image`` stream. Every layout runs the same
three moves (docs/design.md §5)::

    encode the context segments -> prefill the prior's KV cache (t = 0, committed)
    for each generated segment:   text  -> the block loop (K Euler steps + CFG, commit, decode) per block
                                  image -> one block: K Euler steps + CFG, decode with the image VAE

Design choices
--------------
* **text->text** is the inherited :meth:`BlockSampler.sample` unchanged (golden parity holds).
* **image->text** (:meth:`image_to_text`): the image is encoded by the image VAE (posterior mode),
  patchified, prefilled as block 0 at positions ``0..N-1``; the caption then starts at position
  ``N`` and block 1 (the layout of :mod:`modalities.layout`) and runs the text block loop, with
  guidance from its first block on (the image is its condition). An optional text prompt
  continues after the image as the caption's known prefix.
* **text->image** (:meth:`text_to_image`): the prompt's tokens are encoded and prefilled (every
  token, the last block may be partial: the image is a later block and sees all of it), then the
  image is one bidirectional block at positions ``n..n+N-1`` and block id ``ceil(n / block)``.
  CFG runs in one batched forward whose unconditional rows are the image alone (positions
  ``0..N-1``, block 0), as the text loop's are the block alone; an empty prompt is unconditional
  (``w = 1``). The finished image needs no commit (nothing follows it); its latents are
  unpatchified and decoded.
* **Noise** for an image is ``(B, N, d)`` (``noise=`` a tensor of that shape, else ``torch.randn``
  with ``generator``), scaled by ``config.noise_scale`` as text noise is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from modalities.image import ImageModality
from modalities.text import TextModality
from prior.sampling.block_sampler import BlockSampler, Context, NoiseSource, SamplerOutput, StepState
from prior.sampling.config import GenerationConfig
from prior.sampling.tokens import row_randn
from unimodal.kv_cache import KVCache


@dataclass
class ImageSamplerOutput:
    latents: torch.Tensor  # (B, N, d) final image tokens (normalised, patchified)
    images: torch.Tensor  # (B, 3, H, W) decoded, nominally in [-1, 1] (unclamped)
    grid_size: tuple[int, int]  # token grid (rows, columns)
    num_prior_calls: int


class MultimodalSampler(BlockSampler):
    """The block sampler over a text + image MMDiT (see the module docstring)."""

    def __init__(
        self,
        text: TextModality,
        image: ImageModality,
        prior,
        scheduler,
        config: GenerationConfig | None = None,
    ) -> None:
        super().__init__(text, prior, scheduler, config)
        if not isinstance(image, ImageModality):
            raise TypeError(f"image must be an ImageModality, got {type(image).__name__}")
        channels = dict(zip(prior.config.modalities, prior.config.in_channels))
        if channels.get("image") != image.latent_dim:
            raise ValueError(
                f"prior modalities {prior.config.modalities} have no image stream of the image latent dim "
                f"{image.latent_dim} (in_channels {prior.config.in_channels})"
            )
        self.image = image

    # ------------------------------------------------------------------ image -> text

    def prefill_images(self, images: torch.Tensor) -> Context:
        """Encode images (B, 3, H, W) in [-1, 1] and commit them to a fresh prior cache as block 0."""
        seq = self.image.encode(images.to(self._device()))  # (B, N, d), positions 0..N-1, block 0
        batch, n = seq.latents.shape[:2]
        cache = KVCache(self.prior.config.num_layers)
        zeros = torch.zeros(batch, device=seq.latents.device)
        rope = seq.rope_coordinates(self.prior.config.rope_axes)  # (row, column) for an axial prior
        self._prior(
            seq.latents, zeros, seq.positions, cache, update=True, block_ids=seq.block_ids, modality="image",
            rope_positions=rope,
        )  # fmt: skip
        ones = torch.ones(batch, dtype=torch.long, device=seq.latents.device)
        return Context(cache, positions=n * ones, blocks=ones, prior_calls=1)

    @torch.no_grad()
    def image_to_text(
        self,
        images: torch.Tensor,
        prompt_ids: Sequence[Sequence[int]] | None = None,
        generator: torch.Generator | None = None,
        noise: NoiseSource = None,
        step_callback: Callable[[StepState], torch.Tensor | None] | None = None,
    ) -> SamplerOutput:
        """Captions of ``images`` (B, 3, H, W) in [-1, 1]; ``prompt_ids`` an optional known caption start."""
        if images.ndim != 4:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        prompt_ids = [[] for _ in range(images.shape[0])] if prompt_ids is None else prompt_ids
        if len(prompt_ids) != images.shape[0]:
            raise ValueError(f"{len(prompt_ids)} prompts for {images.shape[0]} images")
        rows = self.layout(prompt_ids)
        context = self.prefill_images(images)
        return self._collect(rows, self._blocks(rows, generator, noise, step_callback, context=context))

    # ------------------------------------------------------------------ text -> image

    @torch.no_grad()
    def text_to_image(
        self,
        prompt_ids: Sequence[Sequence[int]],
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        step_callback: Callable[[StepState], torch.Tensor | None] | None = None,
    ) -> ImageSamplerOutput:
        """Images (B, 3, height, width) for ``prompt_ids`` (ragged id lists; an empty one is unconditional)."""
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty: pass at least one (possibly empty) prompt")
        grid = self.image.grid_size(height, width)  # fails on sizes the latent patches cannot tile
        n_img, d_img, device, bs = grid[0] * grid[1], self.image.latent_dim, self._device(), self.block_size
        batch, p = len(prompt_ids), self.patch_size
        rows = []
        for i, ids in enumerate(prompt_ids):
            ids = self._check_ids(i, ids)
            if len(ids) > self.text.max_tokens:
                raise ValueError(
                    f"prompt {i} is {len(ids)} tokens, more than the maximum {self.text.max_tokens}"
                )
            rows.append(ids + [self._pad_id(i, len(ids), p)] * ((-len(ids)) % p))
        lengths = torch.tensor([len(r) // p for r in rows], device=device)  # (B,) prompt latents

        # 1. encode the prompt and prefill the prior cache (every token, t = 0)
        self._new_run()
        cache, calls = KVCache(self.prior.config.num_layers), 0
        if int(lengths.max()) > 0:
            seq = self.text.encode_ids([r or [0] * p for r in rows])  # empty rows: one masked dummy latent
            valid = seq.valid & (torch.arange(seq.num_tokens, device=device)[None] < lengths[:, None])
            zeros = torch.zeros(batch, device=device)
            self._prior(
                seq.latents.to(device), zeros, seq.positions.to(device), cache, update=True, valid=valid
            )
            calls += 1

        # 2. one image block after the prompt: K Euler steps with CFG against the image alone
        positions = lengths[:, None] + torch.arange(n_img, device=device)  # (B, N)
        blocks = (-(-lengths // bs))[:, None].expand(batch, n_img)  # ceil(n / block): after the prompt
        w = torch.where(lengths > 0, float(self.config.guidance_scale), 1.0)
        if noise is None:
            noise = row_randn((batch, n_img, d_img), generator, device)
        if tuple(noise.shape) != (batch, n_img, d_img):
            raise ValueError(f"image noise must be {(batch, n_img, d_img)}, got {tuple(noise.shape)}")
        eps = self.config.noise_scale * noise.to(device=device, dtype=torch.float32)
        rope = None
        if self.prior.config.rope_axes > 1:  # (row, column) of the grid, shifted like the positions
            alone = self.image.layout(eps, grid_size=grid).rope_coordinates(self.prior.config.rope_axes)
            rope = (alone + lengths[:, None, None], alone)
        x, steps = self._transport(
            eps, positions, w, None, cache, 0, step_callback, block_ids=blocks, modality="image", rope=rope
        )
        images = self.image.decode(x, grid_size=grid)  # (B, 3, H, W)
        return ImageSamplerOutput(x, images.float(), grid, calls + steps)


__all__ = ["ImageSamplerOutput", "MultimodalSampler"]

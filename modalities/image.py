"""The image modality: images <-> patchified ``AutoencoderKL`` latents, one block per image.

Design choices
--------------
* **Latents.** :class:`~unimodal.image_vae.ImageVAE` gives normalised latents ``(B, C, h, w)``
  (``h = H / f`` for the VAE's downsampling factor ``f``); they are cut into ``p x p`` patches
  (default ``p = 2``, as SD3/FLUX) and flattened into tokens ``(B, (h/p) * (w/p), C*p*p)``.
* **Token order and channel layout.** Tokens are in row-major raster order (token
  ``i * (w/p) + j`` is the patch at row ``i``, column ``j``); inside a token the channels are laid
  out ``(c, ph, pw)``. :func:`patchify` and :func:`unpatchify` are exact inverses (pure reshapes).
* **Positions are the raster index 0..N-1**, and every token also carries its grid coordinates
  ``coords = (row, column)``. A 1-D RoPE prior (the default) sees the image in raster order (a
  horizontal neighbour is 1 position away, a vertical one ``w/p``); an axial-RoPE prior
  (``MMDiT(rope_axes=2)``, FLUX-style) rotates by (row, column) instead. README "Image
  positions" compares the two.
* **One block per image.** Every token has block id 0: the whole image is one bidirectional
  block (generated at once by the prior, attended as a unit by later blocks).
* **Decoding needs the grid.** A token count alone does not fix a non-square grid, so ``decode``
  takes ``grid_size=(h/p, w/p)``; without it the grid must be square. All image tokens are valid
  (images of a batch share one size, so there is no padding).
"""

from __future__ import annotations

import math

import torch

from modalities.registry import LatentSequence, Modality, register_modality
from unimodal.image_vae import ImageVAE


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """latents (B, C, h, w) -> tokens (B, (h/p)*(w/p), C*p*p), raster order, channels (c, ph, pw)."""
    if latents.ndim != 4:
        raise ValueError(f"latents must be (B, C, h, w), got shape {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent grid {h}x{w} is not divisible by patch_size {p}")
    x = latents.reshape(b, c, h // p, p, w // p, p)  # (B, C, gh, ph, gw, pw)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, ph, pw)
    return x.reshape(b, (h // p) * (w // p), c * p * p)  # (B, N, C*p*p)


def unpatchify(tokens: torch.Tensor, patch_size: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """tokens (B, gh*gw, C*p*p) -> latents (B, C, gh*p, gw*p): the inverse of :func:`patchify`."""
    gh, gw = grid_size
    p = patch_size
    if tokens.ndim != 3 or tokens.shape[1] != gh * gw or tokens.shape[2] % (p * p):
        raise ValueError(
            f"tokens must be (B, {gh}*{gw}, C*{p}*{p}) for grid {gh}x{gw}, got shape {tuple(tokens.shape)}"
        )
    b, _, d = tokens.shape
    c = d // (p * p)
    x = tokens.reshape(b, gh, gw, c, p, p)  # (B, gh, gw, C, ph, pw)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, gh, ph, gw, pw)
    return x.reshape(b, c, gh * p, gw * p)  # (B, C, h, w)


@register_modality("image")
class ImageModality(Modality):
    """Images (B, 3, H, W) in [-1, 1] <-> tokens (B, (H/fp) * (W/fp), C*p*p); one block per image."""

    def __init__(self, image_vae: ImageVAE, patch_size: int = 2) -> None:
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.image_vae, self.patch_size = image_vae, int(patch_size)

    def layout(
        self,
        latents: torch.Tensor,
        valid: torch.Tensor | None = None,
        grid_size: tuple[int, int] | None = None,
    ) -> LatentSequence:
        """Raster positions, block 0 and (row, column) coordinates on ``grid_size`` (default square)."""
        seq = super().layout(latents, valid)
        gh, gw = grid_size or (self._square(seq.num_tokens),) * 2
        if gh * gw != seq.num_tokens:
            raise ValueError(f"{seq.num_tokens} tokens do not fill a {gh}x{gw} grid")
        seq.coords = torch.stack((seq.positions // gw, seq.positions % gw), dim=-1)  # (B, N, 2)
        return seq

    @staticmethod
    def _square(n: int) -> int:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} tokens do not form a square grid; pass grid_size")
        return side

    @property
    def latent_dim(self) -> int:
        return self.image_vae.latent_channels * self.patch_size**2

    def block_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(positions)  # (B, N): the whole image is block 0

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (rows, columns) of an ``height x width`` image."""
        step = self.image_vae.downsample_factor * self.patch_size
        if height % step or width % step or height < 1 or width < 1:
            raise ValueError(f"image size {height}x{width} must be a positive multiple of {step}")
        return height // step, width // step

    def num_tokens(self, height: int, width: int) -> int:
        """Number of tokens of an ``height x width`` image (e.g. to allocate a generated segment)."""
        gh, gw = self.grid_size(height, width)
        return gh * gw

    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> LatentSequence:
        """images (B, 3, H, W) in [-1, 1] -> tokens (B, N, C*p*p), raster positions, block 0."""
        if images.ndim == 4:
            self.grid_size(*images.shape[-2:])  # fail early on sizes the patches cannot tile
        latents = self.image_vae.encode(images, sample=sample, generator=generator)  # (B, C, h, w)
        grid = (latents.shape[2] // self.patch_size, latents.shape[3] // self.patch_size)
        return self.layout(patchify(latents, self.patch_size), grid_size=grid)

    def decode(
        self, sequence: LatentSequence | torch.Tensor, grid_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Tokens (B, N, C*p*p) or a LatentSequence -> images (B, 3, H, W) (unclamped)."""
        tokens = sequence.latents if isinstance(sequence, LatentSequence) else sequence  # (B, N, C*p*p)
        if tokens.ndim != 3 or tokens.shape[-1] != self.latent_dim:
            raise ValueError(f"image tokens must be (B, N, {self.latent_dim}), got {tuple(tokens.shape)}")
        if grid_size is None:
            grid_size = (self._square(tokens.shape[1]),) * 2
        return self.image_vae.decode(unpatchify(tokens, self.patch_size, grid_size))  # (B, 3, H, W)


__all__ = ["ImageModality", "patchify", "unpatchify"]

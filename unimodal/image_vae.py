"""Image VAE: a thin adapter over ``diffusers.AutoencoderKL`` with the prior-boundary normalisation.

Design choices
--------------
* **Reuse, don't re-implement.** The autoencoder is diffusers' ``AutoencoderKL`` unchanged (any
  SD / SDXL / SD3 / FLUX VAE folder loads with :meth:`ImageVAE.from_pretrained`); this file only
  fixes the conventions the prior relies on.
* **Normalised latents at the boundary.** :meth:`ImageVAE.encode` returns
  ``(z - shift_factor) * scaling_factor`` with both values read from the autoencoder's config
  (``shift_factor`` None = 0, as SD 1.x/2.x/XL ship it). :meth:`ImageVAE.decode` inverts it,
  ``z = latents / scaling_factor + shift_factor``, before ``AutoencoderKL.decode``: the usual
  diffusers convention for images (unlike the Text VAE, whose decoder consumes normalised latents).
* **Mode by default.** ``encode(..., sample=False)`` takes the posterior mode (its mean), so a
  prompt image always maps to the same latents; ``sample=True`` draws
  ``mean + std * eps`` with an optional ``torch.Generator``.
* **Fail loudly.** Images must be ``(B, in_channels, H, W)`` in [-1, 1] with H, W multiples of the
  spatial downsampling factor; out-of-range pixels (e.g. a [0, 255] tensor) raise instead of being
  rescaled. Per-channel ``latents_mean`` / ``latents_std`` configs are refused (not this convention).
* **Dtype/device.** Inputs are moved to the autoencoder's device and dtype; outputs keep that dtype.
  Decoded images are returned unclamped (clamp to [-1, 1] for display).
* **Training here** (``task: image_vae``): :class:`ImageVAEConfig` builds a small ``AutoencoderKL``
  (or loads ``pretrained``); :meth:`ImageVAE.loss` is reconstruction MSE (per pixel, on the
  posterior sample) + ``kl_weight`` x KL to N(0, I) (per latent element). After training,
  :meth:`ImageVAE.fit_normalization` sets ``shift_factor`` to the latents' mean and
  ``scaling_factor`` to 1 / their std over data (the SD recipe's fitted constants), written into
  the autoencoder's config so ``save_pretrained`` carries them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import AutoencoderKL


@dataclass
class ImageVAEOutput:
    """The training objective of one batch (all scalars)."""

    loss: torch.Tensor
    recon: torch.Tensor  # per-pixel MSE of the reconstruction from a posterior sample
    kl: torch.Tensor  # KL to N(0, I), mean per latent element
    psnr: torch.Tensor  # dB of the posterior-mode reconstruction on the [-1, 1] range (detached)


@dataclass
class ImageVAEConfig:
    """A tiny ``AutoencoderKL`` to train here, or a pretrained one (YAML ``image_vae:`` section)."""

    pretrained: str | None = None  # a folder with an AutoencoderKL (e.g. an SD VAE); None: build one
    subfolder: str | None = None  # e.g. "vae" inside a pipeline folder
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # downsample 2**(n-1)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    mid_block_add_attention: bool = True
    kl_weight: float = 1e-4

    def __post_init__(self) -> None:
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            raise ValueError(f"image_vae.block_out_channels={self.block_out_channels} must be positive")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"image_vae.block_out_channels={self.block_out_channels} must be multiples of "
                f"norm_num_groups={self.norm_num_groups}"
            )
        if self.kl_weight < 0:
            raise ValueError(f"image_vae.kl_weight={self.kl_weight} must be >= 0")


class ImageVAE(nn.Module):
    """``AutoencoderKL`` plus the latent normalisation: images (B, 3, H, W) <-> latents (B, C, h, w)."""

    def __init__(self, autoencoder: AutoencoderKL) -> None:
        super().__init__()
        if not isinstance(autoencoder, AutoencoderKL):
            raise TypeError(
                f"autoencoder must be a diffusers AutoencoderKL, got {type(autoencoder).__name__}"
            )
        cfg = autoencoder.config
        for key in ("latents_mean", "latents_std"):
            if getattr(cfg, key, None) is not None:
                raise ValueError(
                    f"AutoencoderKL config sets {key}; per-channel normalisation is not supported"
                )
        if not cfg.scaling_factor:
            raise ValueError(f"AutoencoderKL scaling_factor must be non-zero, got {cfg.scaling_factor!r}")
        self.autoencoder = autoencoder

    # ------------------------------------------------------------------------- config views

    @property
    def scaling_factor(self) -> float:
        return float(self.autoencoder.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        shift = self.autoencoder.config.shift_factor
        return 0.0 if shift is None else float(shift)

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def image_channels(self) -> int:
        return int(self.autoencoder.config.in_channels)

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction H / h: one 2x downsampling per encoder block but the last."""
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    # ------------------------------------------------------------------------- normalisation

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw autoencoder latents -> prior latents: ``(z - shift) * scale``."""
        return (z - self.shift_factor) * self.scaling_factor

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Prior latents -> raw autoencoder latents: ``latents / scale + shift``."""
        return latents / self.scaling_factor + self.shift_factor

    # ------------------------------------------------------------------------- encode / decode

    def _check_images(self, images: torch.Tensor) -> None:
        c, f = self.image_channels, self.downsample_factor
        if images.ndim != 4 or images.shape[1] != c:
            raise ValueError(f"images must be (B, {c}, H, W), got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % f or w % f or h == 0 or w == 0:
            raise ValueError(f"image size {h}x{w} must be a positive multiple of the downsample factor {f}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype}")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1.0 or hi > 1.0:
            raise ValueError(f"images must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]")

    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/f, W/f)."""
        self._check_images(images)
        ae = self.autoencoder
        posterior = ae.encode(images.to(ae.device, ae.dtype)).latent_dist  # DiagonalGaussianDistribution
        z = posterior.sample(generator=generator) if sample else posterior.mode()  # (B, C, h, w)
        return self.normalize(z)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, h*f, w*f), nominally in [-1, 1] (unclamped)."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.latent_channels}, h, w), got shape {tuple(latents.shape)}"
            )
        ae = self.autoencoder
        z = self.denormalize(latents.to(ae.device, ae.dtype))  # (B, C, h, w) raw
        return ae.decode(z).sample  # (B, 3, H, W)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mode: ``decode(encode(images))``."""
        return self.decode(self.encode(images))

    # ------------------------------------------------------------------------- training

    @classmethod
    def from_config(cls, cfg: ImageVAEConfig) -> ImageVAE:
        """The autoencoder ``cfg`` names: ``pretrained`` loaded, or a fresh tiny ``AutoencoderKL``."""
        if cfg.pretrained:
            return cls.from_pretrained(cfg.pretrained, subfolder=cfg.subfolder)
        n = len(cfg.block_out_channels)
        autoencoder = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.norm_num_groups,
            mid_block_add_attention=cfg.mid_block_add_attention,
            scaling_factor=1.0,  # fitted on the data after training (fit_normalization)
        )
        return cls(autoencoder)

    def loss(
        self, images: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None
    ) -> ImageVAEOutput:
        """Reconstruction MSE from a posterior sample + ``kl_weight`` x KL(q(z|x) || N(0, I))."""
        self._check_images(images)
        ae = self.autoencoder
        posterior = ae.encode(images.to(ae.device, ae.dtype)).latent_dist
        recon = ae.decode(posterior.sample(generator=generator)).sample  # (B, 3, H, W)
        mse = (recon.float() - images.float()).pow(2).mean()
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).float().mean()
        with torch.no_grad():
            mode = ae.decode(posterior.mode()).sample.float().clamp(-1, 1)
            psnr = psnr_db(mode, images.float())
        return ImageVAEOutput(mse + kl_weight * kl, mse.detach(), kl.detach(), psnr)

    @torch.no_grad()
    def fit_normalization(self, images: torch.Tensor) -> tuple[float, float]:
        """Set ``shift_factor`` = mean and ``scaling_factor`` = 1 / std of the raw posterior-mode latents
        of ``images`` (B, 3, H, W); returns (shift, scale). Written into the autoencoder's config."""
        self._check_images(images)
        ae = self.autoencoder
        z = ae.encode(images.to(ae.device, ae.dtype)).latent_dist.mode().float()
        shift, std = float(z.mean()), float(z.std())
        if not std > 0:
            raise ValueError(f"latents have std {std}: cannot fit the scaling factor")
        ae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
        return shift, 1.0 / std

    # ------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | os.PathLike, subfolder: str | None = None, **kwargs
    ) -> ImageVAE:
        """Load an ``AutoencoderKL`` from a local folder (offline) or a hub id.

        ``subfolder`` selects e.g. ``"vae"`` inside a pipeline repository; ``kwargs`` (``torch_dtype``,
        ``revision``, ...) go to ``AutoencoderKL.from_pretrained``. A missing path, a folder without an
        autoencoder, or a hub id that cannot be fetched raises FileNotFoundError.
        """
        path = Path(path_or_id).expanduser()
        name = str(path_or_id)
        if path.exists():
            folder = path / subfolder if subfolder else path
            if not folder.is_dir():
                raise FileNotFoundError(f"image VAE folder not found: {folder}")
            kwargs.setdefault("local_files_only", True)
            name = str(path)
        elif name.startswith((".", "/", "~")):
            raise FileNotFoundError(f"image VAE path not found: {name}")
        try:
            autoencoder = AutoencoderKL.from_pretrained(name, subfolder=subfolder, **kwargs)
        except OSError as e:  # hub ids: not found, offline, or no config.json
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(f"image VAE {name!r} could not be loaded ({first})") from e
        return cls(autoencoder)


def psnr_db(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean PSNR (dB) of images against the reference, both (B, 3, H, W) on the [-1, 1] range (peak 2)."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)  # (B,)
    return (10 * torch.log10(4.0 / mse)).mean()


__all__ = ["ImageVAE", "ImageVAEConfig", "ImageVAEOutput", "psnr_db"]

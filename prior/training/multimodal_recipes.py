"""Training recipes of the unified text-image path, through the one trainer.

* ``task: image_vae``: a diffusers ``AutoencoderKL`` (``image_vae:``) trained on ``image_data:``
  images by reconstruction + KL (:meth:`~unimodal.image_vae.ImageVAE.loss`); every export first
  fits ``shift_factor`` / ``scaling_factor`` on ``FIT_IMAGES`` training images (the SD recipe's
  fitted constants), then writes ``image_vae/`` (``AutoencoderKL.save_pretrained``).
* ``task: multimodal``: the text+image MMDiT (:mod:`prior.training.multimodal`) from a frozen
  Text VAE (``multimodal.text_vae``, a Stage-1 run on the captions) and a frozen image VAE
  (``multimodal.image_vae``); ``prior.in_channels`` derived from both (text first), ``vocab_size``
  of a categorical prior from the Text VAE. Exports are
  :class:`~prior.pipelines.pipeline_cola_multimodal.ColaTextToImagePipeline` folders (they load
  as ``ColaImageToTextPipeline`` too).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import FlowMatchEulerDiscreteScheduler

from modalities.image import ImageModality
from modalities.text import TextModality
from prior.checkpoints.run_folders import resolve_export
from prior.pipelines.pipeline_cola_multimodal import ColaTextToImagePipeline
from prior.training.multimodal import MultimodalModel, multimodal_loss_fn
from prior.training.outputs import LossOutput, TrainResult
from prior.training.recipes import _derive, _millions, build_prior
from prior.training.run_config import RunConfig
from prior.training.trainer import Trainer
from unimodal.config import ConfigError, to_yaml
from unimodal.image_text_data import ImageTextCollator, build_image_text_datasets
from unimodal.image_vae import ImageVAE
from unimodal.text_vae import TextVAE
from unimodal.tokenization import load_tokenizer

FIT_IMAGES = 512


class ImageVAEObjective(nn.Module):
    """The trainer's model for ``task: image_vae``: ``forward(images)`` is the loss (DDP-safe)."""

    def __init__(self, vae: ImageVAE, kl_weight: float) -> None:
        super().__init__()
        self.vae, self.kl_weight = vae, float(kl_weight)

    def forward(self, images: torch.Tensor) -> LossOutput:
        out = self.vae.loss(images, self.kl_weight)
        logs = {"recon": out.recon, "kl": out.kl, "psnr": out.psnr}
        return LossOutput(loss=out.loss, logs=logs, num_tokens=images.shape[0] * images[0, 0].numel())


def image_vae_loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> LossOutput:
    return model(batch["images"])


def _start(cfg: RunConfig, model: nn.Module, loss_fn, collate, save_model_fn, describe, tokenizer=None):
    """The shared tail: image-text datasets, the trainer, the run record, a summary, training."""
    run_dir = Path(cfg.train.output_dir)
    train_ds, val_ds = build_image_text_datasets(cfg.image_data)
    trainer = Trainer(
        model, loss_fn, train_ds, val_ds if len(val_ds) else None, cfg.train,
        save_model_fn=save_model_fn, collate_fn=collate,
    )  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(run_dir / "tokenizer")
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    print(describe(train_ds, val_ds))
    return trainer.train()


def fit_images(cfg: RunConfig) -> torch.Tensor:
    """The first ``FIT_IMAGES`` training images, preprocessed (what the normalisation is fitted on)."""
    train_ds, _ = build_image_text_datasets(cfg.image_data)
    collate = ImageTextCollator(cfg.image_data.resolution)
    return collate([train_ds[i] for i in range(min(FIT_IMAGES, len(train_ds)))])["images"]


def save_image_vae_export(model: ImageVAEObjective, images: torch.Tensor, out_dir: str | Path) -> None:
    """Fit the latent normalisation on ``images``, then write ``out_dir/image_vae``."""
    was_training = model.training
    model.eval()
    model.vae.fit_normalization(images)
    model.train(was_training)
    model.vae.autoencoder.save_pretrained(Path(out_dir) / "image_vae")


def train_image_vae(cfg: RunConfig) -> TrainResult:
    """``task: image_vae``: train (or fine-tune a pretrained) AutoencoderKL on the image data."""
    torch.manual_seed(cfg.train.seed)
    vae = ImageVAE.from_config(cfg.image_vae)
    vae.autoencoder.register_to_config(sample_size=cfg.image_data.resolution)
    model = ImageVAEObjective(vae, cfg.image_vae.kl_weight)
    images = fit_images(cfg)
    return _start(
        cfg, model, image_vae_loss_fn, ImageTextCollator(cfg.image_data.resolution),
        lambda m, d: save_image_vae_export(m, images, d),
        lambda tr, va: f"image VAE: {_millions(vae)} parameters, latents {vae.latent_channels}x"
        f"{cfg.image_data.resolution // vae.downsample_factor}^2; data: {len(tr)} train / {len(va)} val images",
    )  # fmt: skip


# ----------------------------------------------------------------------------- the multimodal prior


def load_image_vae(path: str | Path) -> ImageVAE:
    """An image VAE from a ``task: image_vae`` run folder / export (``image_vae/``) or any AutoencoderKL folder."""
    path = Path(path).expanduser()
    try:
        return ImageVAE.from_pretrained(resolve_export(path, "image_vae") / "image_vae")
    except FileNotFoundError:
        return ImageVAE.from_pretrained(path)


def build_multimodal_model(cfg: RunConfig):
    """The frozen autoencoders, the text+image MMDiT and the Text VAE run's tokenizer."""
    mm = cfg.multimodal
    if not mm.text_vae or not mm.image_vae:
        raise ConfigError("task: multimodal needs multimodal.text_vae and multimodal.image_vae (run folders)")
    export = resolve_export(mm.text_vae, "text_vae")
    tokenizer, text_vae = load_tokenizer(export / "tokenizer"), TextVAE.from_pretrained(export / "text_vae")
    image_vae = load_image_vae(mm.image_vae)
    if cfg.image_data.max_caption_tokens > text_vae.config.max_seq_len:
        raise ConfigError(
            f"image_data.max_caption_tokens={cfg.image_data.max_caption_tokens} exceeds the Text VAE's "
            f"max_seq_len={text_vae.config.max_seq_len}"
        )
    kwargs = dataclasses.asdict(cfg.prior)
    if list(kwargs["modalities"]) != ["text", "image"]:
        raise ConfigError(
            f"prior.modalities={kwargs['modalities']} must be [text, image] for task: multimodal"
        )
    text = TextModality(text_vae, tokenizer, kwargs["block_size"])
    image = ImageModality(image_vae, mm.patch_size)
    _derive(kwargs, "prior", "in_channels", [text.latent_dim, image.latent_dim], "the two VAEs' latent dims")
    if kwargs["prediction"] == "categorical" and (
        text_vae.config.encoder_context != "token" or text_vae.config.patch_size != 1
    ):
        raise ConfigError(
            "prior.prediction=categorical needs a token-local Text VAE (encoder_context=token, patch 1)"
        )
    prior = build_prior(kwargs, text_vae, cfg.train.seed)
    return MultimodalModel(text, image, prior, mm, cfg.flow, seed=cfg.train.seed), tokenizer


def save_multimodal_export(model: MultimodalModel, tokenizer, cfg: RunConfig, out_dir: str | Path) -> None:
    """A pipeline folder that loads as ColaTextToImagePipeline or ColaImageToTextPipeline."""
    shift = 1.0 if cfg.generation.shift is None else cfg.generation.shift
    pipe = ColaTextToImagePipeline(
        text_vae=model.text_vae, image_vae=model.image_vae.autoencoder, prior=model.prior,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), tokenizer=tokenizer,
        patch_size=cfg.multimodal.patch_size,
    )  # fmt: skip
    pipe.generation_config = cfg.generation
    pipe.save_pretrained(out_dir)


def train_multimodal(cfg: RunConfig) -> TrainResult:
    """``task: multimodal``: the unified prior on mixed text->image / image->text / text rows."""
    model, tokenizer = build_multimodal_model(cfg)
    collate = ImageTextCollator(cfg.image_data.resolution, tokenizer, cfg.image_data.max_caption_tokens)
    return _start(
        cfg, model, multimodal_loss_fn, collate, lambda m, d: save_multimodal_export(m, tokenizer, cfg, d),
        lambda tr, va: f"multimodal prior: {_millions(model.prior)} parameters (text {model.text.latent_dim}-d, "
        f"image {model.image.latent_dim}-d tokens); data: {len(tr)} image-caption pairs",
        tokenizer=tokenizer,
    )  # fmt: skip


MULTIMODAL_TRAINERS = {"image_vae": train_image_vae, "multimodal": train_multimodal}

__all__ = [
    "MULTIMODAL_TRAINERS",
    "build_multimodal_model",
    "load_image_vae",
    "train_image_vae",
    "train_multimodal",
]

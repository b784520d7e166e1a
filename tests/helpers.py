"""Shared builders for tests: a tiny random Cola text pipeline with a BPE trained on a few sentences."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from prior.models.mmdit import MMDiT
from prior.pipelines.pipeline_cola_text import ColaTextPipeline
from unimodal.text_vae import TextVAE
from unimodal.tokenization import model_vocab_size, train_bpe_tokenizer


def perturb(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Add seeded Gaussian noise to every parameter (so no path is trivially zero or identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))


def tiny_pipeline(
    sentences: list[str], max_seq_len: int = 256, prior_layers: int = 1, perturb_scale: float | None = None
) -> ColaTextPipeline:
    """Text VAE (d=32, latent 4, block 2) + MMDiT (width 32, block 4) + a 300-token BPE; eval mode."""
    tokenizer = train_bpe_tokenizer(sentences, vocab_size=300)
    torch.manual_seed(0)
    vae = TextVAE(
        vocab_size=model_vocab_size(tokenizer), dim=32, ffn_dim=64, num_heads=2, encoder_num_blocks=1,
        decoder_num_blocks=1, latent_dim=4, block_size=2, max_seq_len=max_seq_len,
    )  # fmt: skip
    prior = MMDiT(in_channels=[4], width=32, heads=2, head_dim=16, rope_dim=8, num_layers=prior_layers,
                  block_size=4, adaln_zero_init=False)  # fmt: skip
    if perturb_scale is not None:
        perturb(vae, 1, perturb_scale / 2)
        perturb(prior, 2, perturb_scale)
    pipe = ColaTextPipeline(vae.eval(), prior.eval(), FlowMatchEulerDiscreteScheduler(), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_multimodal_pipeline(perturb_scale: float = 0.05, prediction: str = "velocity", rope_axes: int = 1):
    """A random text+image ColaTextToImagePipeline: the tiny Text VAE + a 2-level AutoencoderKL
    (16x16x3 -> 8x8x2, patch 2: 16 image tokens of 8 channels) + a 2-layer two-stream MMDiT."""
    from diffusers import AutoencoderKL

    from prior.pipelines.pipeline_cola_multimodal import ColaTextToImagePipeline
    from unimodal.shapes import caption, draw_attributes

    tokenizer = train_bpe_tokenizer([caption(draw_attributes(i)) for i in range(200)], vocab_size=300)
    torch.manual_seed(0)
    vocab = model_vocab_size(tokenizer)
    vae = TextVAE(
        vocab_size=vocab, dim=32, ffn_dim=64, num_heads=2, encoder_num_blocks=1, decoder_num_blocks=1,
        latent_dim=4, block_size=1, max_seq_len=64, encoder_context="token",
    )  # fmt: skip
    image_vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=2, norm_num_groups=4, sample_size=16,
    )  # fmt: skip
    prior = MMDiT(
        modalities=["text", "image"], in_channels=[4, 8], width=32, heads=2, head_dim=16, rope_dim=8,
        num_layers=2, block_size=4, adaln_zero_init=False, prediction=prediction,
        vocab_size=vocab if prediction == "categorical" else 0, rope_axes=rope_axes,
    )  # fmt: skip
    perturb(vae, 1, perturb_scale / 2)
    perturb(prior, 2, perturb_scale)
    pipe = ColaTextToImagePipeline(
        text_vae=vae.eval(), image_vae=image_vae.eval(), prior=prior.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(), tokenizer=tokenizer, patch_size=2,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe

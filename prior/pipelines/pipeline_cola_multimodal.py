"""Diffusers pipelines for the unified prior: text -> image and image -> text with one MMDiT.

Both pipelines have the same components, so one ``task: multimodal`` export loads as either:
``text_vae`` (:class:`~unimodal.text_vae.TextVAE`), ``tokenizer``, ``image_vae`` (diffusers
``AutoencoderKL`` with its fitted ``scaling_factor`` / ``shift_factor``), ``prior`` (an
:class:`~prior.models.mmdit.MMDiT` with ``text`` and ``image`` streams) and ``scheduler``
(``FlowMatchEulerDiscreteScheduler``). The sampler is
:class:`~prior.sampling.multimodal_sampler.MultimodalSampler`; settings are one
:class:`~prior.sampling.config.GenerationConfig` (``generation_config.json`` in the folder).

Design choices
--------------
* **Pre/post-processing is diffusers' ``VaeImageProcessor``** (``vae_scale_factor`` = the VAE's
  downsampling x the patch size): input images of another size are **resized** to the model's
  ``height x width`` (default: the image VAE's ``sample_size``) and RGBA / greyscale images are
  **converted to RGB**, as diffusers pipelines do; outputs are ``pil`` / ``np`` / ``pt`` images or
  the ``latent`` (B, C, h, w) normalised latents.
* **Fail loudly**: a height or width that is not a positive multiple of ``vae_scale_factor``, a
  prompt longer than the Text VAE's maximum, and a checkpoint without an image modality (a text-only
  ``ColaTextPipeline`` folder, or a prior without an ``image`` stream) are one ValueError line each.
* **A text->image prompt is a whole caption**: it is tokenized as the captions were in training
  (no special tokens, then EOS), so the image block follows a finished caption. (Without the EOS
  the same checkpoint's colour accuracy fell from 0.81 to 0.42 on held-out captions.)
* ``ColaTextToImagePipeline(prompt, height, width, num_images_per_prompt, num_inference_steps,
  guidance_scale, generator, output_type, return_dict)`` returns diffusers' ``ImagePipelineOutput``;
  ``ColaImageToTextPipeline(image, prompt=None, max_new_tokens, ..., generator)`` returns texts
  (:class:`~prior.pipelines.pipeline_cola_text.ColaTextPipelineOutput`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor

from modalities.image import ImageModality, unpatchify
from modalities.text import TextModality
from prior.models.mmdit import MMDiT
from prior.pipelines.folders import pipeline_class_name
from prior.pipelines.pipeline_cola_text import ColaTextPipelineOutput
from prior.pipelines.text_generation import TextGenerationMixin
from prior.sampling.config import CONFIG_NAME, GenerationConfig
from prior.sampling.multimodal_sampler import MultimodalSampler
from unimodal.image_vae import ImageVAE
from unimodal.text_vae import TextVAE
from unimodal.tokenization import document_ids

MULTIMODAL_PIPELINES = ("ColaTextToImagePipeline", "ColaImageToTextPipeline")


class _ColaMultimodalMixin(TextGenerationMixin):
    """Components, the modality checks, the image processor and loading shared by both pipelines."""

    model_cpu_offload_seq = "text_vae->prior->image_vae"

    def __init__(
        self,
        text_vae: TextVAE,
        image_vae: AutoencoderKL,
        prior: MMDiT,
        scheduler: FlowMatchEulerDiscreteScheduler,
        tokenizer,
        patch_size: int = 2,
    ):
        super().__init__()
        modalities = list(prior.config.modalities)
        if "image" not in modalities or "text" not in modalities:
            raise ValueError(
                f"{type(self).__name__} needs a prior with text and image streams; this one has {modalities}"
            )
        self.register_modules(
            text_vae=text_vae, image_vae=image_vae, prior=prior, scheduler=scheduler, tokenizer=tokenizer
        )
        self.register_to_config(patch_size=int(patch_size))
        self.generation_config = GenerationConfig()
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True)

    @property
    def text_modality(self) -> TextModality:
        return TextModality(self.text_vae, self.tokenizer, self.prior.config.block_size)

    @property
    def image_modality(self) -> ImageModality:
        return ImageModality(ImageVAE(self.image_vae), self.config.patch_size)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per image token side: the VAE's downsampling x the patch size."""
        return 2 ** (len(self.image_vae.config.block_out_channels) - 1) * int(self.config.patch_size)

    @property
    def default_size(self) -> int:
        return int(self.image_vae.config.sample_size)

    def stop_token_ids(self) -> list[int]:
        return self.text_modality.stop_token_ids()

    def sampler(self, config: GenerationConfig) -> MultimodalSampler:
        return MultimodalSampler(self.text_modality, self.image_modality, self.prior, self.scheduler, config)

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        height = self.default_size if height is None else int(height)
        width = self.default_size if width is None else int(width)
        f = self.vae_scale_factor
        if height < 1 or width < 1 or height % f or width % f:
            raise ValueError(
                f"height and width must be positive multiples of {f} (the VAE's downsampling x the latent "
                f"patch), got {height}x{width}"
            )
        return height, width

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """diffusers' loading of a multimodal export (either pipeline class); a text-only folder is
        one ValueError line."""
        found = pipeline_class_name(pretrained_model_name_or_path)
        if found is not None and found not in MULTIMODAL_PIPELINES:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {found} checkpoint without an image modality; "
                f"{cls.__name__} needs a text+image export (task: multimodal)"
            )
        pipe = DiffusionPipeline.from_pretrained.__func__(cls, pretrained_model_name_or_path, **kwargs)
        folder = Path(pretrained_model_name_or_path)
        pipe.generation_config = (
            GenerationConfig.load(folder) if (folder / CONFIG_NAME).is_file() else GenerationConfig()
        )
        return pipe


class ColaTextToImagePipeline(_ColaMultimodalMixin, DiffusionPipeline):
    """Text -> image: prompt prefilled, one image block transported by K Euler steps with CFG."""

    output_types = ("pil", "np", "pt", "latent")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        generation_config: GenerationConfig | None = None,
        **overrides,
    ) -> ImagePipelineOutput | tuple:
        """Images for ``prompt``. ``latents``: the initial noise (B * num_images_per_prompt, N, d);
        ``num_inference_steps`` / ``guidance_scale`` / ``overrides`` override the generation config."""
        prompts = self.check_prompts(prompt, output_type)
        height, width = self.check_size(height, width)
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        named = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
        config = self.resolve_generation_config(
            generation_config, **{k: v for k, v in named.items() if v is not None}, **overrides
        )
        ids = document_ids(self.tokenizer, prompts)  # a prompt is a whole caption: + EOS, as in training
        prompt_ids = [row for row in ids for _ in range(num_images_per_prompt)]
        sampler = self.sampler(config)
        with self.progress_bar(total=config.num_inference_steps) as bar:
            out = sampler.text_to_image(
                prompt_ids, height, width, generator=generator, noise=latents,
                step_callback=lambda state: bar.update(),
            )  # fmt: skip
        if output_type == "latent":
            images = unpatchify(out.latents, self.config.patch_size, out.grid_size)  # (B, C, h, w)
        else:
            images = self.image_processor.postprocess(out.images.clamp(-1, 1), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class ColaImageToTextPipeline(_ColaMultimodalMixin, DiffusionPipeline):
    """Image -> text: the image prefilled as block 0, the caption generated block by block."""

    output_types = ("text", "ids")

    @torch.no_grad()
    def __call__(
        self,
        image,
        prompt: str | list[str] | None = None,
        generation_config: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "text",
        return_dict: bool = True,
        **overrides,
    ) -> ColaTextPipelineOutput | tuple:
        """Captions of ``image`` (a PIL image, a list of them, an array or a tensor in [0, 1] / [-1, 1]
        as ``VaeImageProcessor`` reads them); ``prompt`` an optional start of each caption;
        ``overrides``: generation config fields (``max_new_tokens``, ``temperature``, ...)."""
        height, width = self.check_size(height, width)
        pixels = self.image_processor.preprocess(image, height=height, width=width)  # (B, 3, H, W) in [-1, 1]
        batch = pixels.shape[0]
        prompts = [""] * batch if prompt is None else self.check_prompts(prompt, output_type)
        if len(prompts) == 1 and batch > 1:
            prompts = prompts * batch
        if len(prompts) != batch:
            raise ValueError(f"{len(prompts)} prompts for {batch} images")
        if output_type not in self.output_types:
            raise ValueError(f"output_type={output_type!r}; expected one of {self.output_types}")
        config = self.resolve_generation_config(generation_config, **overrides)
        text = self.text_modality
        prompt_ids = [ids if p else [] for p, ids in zip(prompts, text.prompt_ids(prompts))]
        sampler = self.sampler(config)
        with self.progress_bar(total=1) as bar:
            out = sampler.image_to_text(pixels, prompt_ids, generator=generator)
            bar.update()
        texts = text.detokenize(out.token_ids, config.skip_special_tokens) if output_type == "text" else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (texts if output_type == "text" else out.token_ids,)
        return ColaTextPipelineOutput(
            texts=texts,
            token_ids=out.token_ids,
            num_blocks=out.num_blocks,
            num_prior_calls=out.num_prior_calls,
        )


__all__ = ["MULTIMODAL_PIPELINES", "ColaImageToTextPipeline", "ColaTextToImagePipeline"]

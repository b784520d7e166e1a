"""A diffusers pipeline for text generation with Cola DLM: prompt in, continuation out.

Components: ``text_vae`` (:class:`~unimodal.text_vae.TextVAE`), ``prior``
(:class:`~prior.models.mmdit.MMDiT`), ``scheduler`` (``FlowMatchEulerDiscreteScheduler``) and
``tokenizer`` (a ``transformers`` fast tokenizer). The text <-> latents adapter is the registry's
:class:`~modalities.text.TextModality` built from ``text_vae`` + ``tokenizer``; the block loop is
:class:`~prior.sampling.block_sampler.BlockSampler`; the pipeline resolves the generation
settings, tokenizes, shows progress, calls the step callback and detokenizes. Stages, as in
diffusers' SD3 pipeline: 1. check inputs, 2. encode the prompt, 3. timesteps, 4. latents (noise),
5. the block loop, 6. decode.

Design choices
--------------
* **One generation config** (:class:`~prior.sampling.config.GenerationConfig`), the
  transformers habit: ``pipe(prompt, generation_config=None, **overrides)``; the base is the
  pipeline's own ``generation_config`` (saved as ``generation_config.json`` in the pipeline folder
  and restored by ``from_pretrained``; default ``GenerationConfig()``), ``overrides`` are its
  fields. ``GenerationConfig.released()`` is the released inference loop. Stop ids and the pad id
  left at None come from the tokenizer (EOS plus ``<|im_end|>`` when present; PAD).
* **``__call__`` is built on the streaming path**: both run :meth:`ColaTextPipeline._generate`,
  so a call and a stream with the same noise give the same tokens under any settings.
* ``save_pretrained`` / ``from_pretrained`` are diffusers': ``model_index.json`` names each
  component by its module (``unimodal.text_vae.TextVAE``, ``prior.models.mmdit.MMDiT``), so a saved
  pipeline reloads with nothing registered by hand. ``generation_config.json`` is read from a
  local folder. A folder that holds another pipeline (the AR baseline's ``ARTextPipeline``) is
  one ValueError line (:func:`~prior.pipelines.folders.check_pipeline_class`).
* Prompts are tokenized with the tokenizer's defaults (``add_special_tokens=True``, as the
  released ``Tokenizer.encode(text).ids``). Texts are decoded with ``skip_special_tokens`` from
  the config (the released preset keeps them).
* ``stream`` yields the new text of every block as soon as it is decoded; the text of a block is
  the difference between the decoded text after and before it, so multi-byte characters that
  straddle blocks come out whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput

from modalities.text import TextModality
from prior.models.mmdit import MMDiT
from prior.pipelines.text_generation import IncrementalDetokenizer, TextGenerationMixin, TextStreamChunk
from prior.sampling.block_sampler import BlockOutput, BlockSampler, NoiseSource, StepState
from prior.sampling.config import GenerationConfig
from unimodal.text_vae import TextVAE


@dataclass
class ColaTextPipelineOutput(BaseOutput):
    """texts: decoded continuations (``output_type="text"``); token_ids: the generated ids per
    prompt; latents: per-block final latents (B, bs, d) (``output_type="latents"``)."""

    texts: list[str] | None
    token_ids: list[list[int]]
    latents: list[torch.Tensor] | None = None
    num_blocks: int = 0
    num_prior_calls: int = 0


ColaTextStreamChunk = TextStreamChunk  # one step = one block


class ColaTextPipeline(TextGenerationMixin, DiffusionPipeline):
    """Cola DLM text generation: Text VAE + block-causal prior + flow-matching Euler scheduler."""

    output_types = ("text", "ids", "latents")
    model_cpu_offload_seq = "text_vae->prior"
    _callback_tensor_inputs = ["latents", "velocity"]

    def __init__(
        self, text_vae: TextVAE, prior: MMDiT, scheduler: FlowMatchEulerDiscreteScheduler, tokenizer
    ):
        super().__init__()
        self.register_modules(text_vae=text_vae, prior=prior, scheduler=scheduler, tokenizer=tokenizer)
        self.generation_config = GenerationConfig()

    # ------------------------------------------------------------------ stages

    @property
    def text_modality(self) -> TextModality:
        """The text <-> latents adapter over this pipeline's VAE and tokenizer (prior's block size)."""
        return TextModality(self.text_vae, self.tokenizer, self.prior.config.block_size)

    def stop_token_ids(self) -> list[int]:
        """The default stop ids: EOS, and ``<|im_end|>`` when the vocabulary has it."""
        return self.text_modality.stop_token_ids()

    def check_inputs(self, prompt, output_type: str, callback_tensor_inputs) -> list[str]:
        """1. Validate the call; returns the prompts as a list."""
        prompts = self.check_prompts(prompt, output_type)
        bad = [name for name in callback_tensor_inputs or [] if name not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback tensor input {bad[0]!r} is not one of {self._callback_tensor_inputs}")
        return list(prompts)

    # ------------------------------------------------------------------ generation

    def _generate(
        self,
        prompts: list[str],
        config: GenerationConfig,
        generator: torch.Generator | None,
        noise: NoiseSource,
        callback_on_step_end: Callable | None,
        callback_tensor_inputs: list[str],
        decode_text: bool = True,
    ) -> Iterator[tuple[BlockOutput, list[str]]]:
        """Stages 2-6: tokenize, run the block loop under a progress bar, decode block by block.
        Yields each block with the new text of every prompt (empty strings if not ``decode_text``)."""
        text = self.text_modality
        prompt_ids = text.prompt_ids(prompts)  # 2. encode the prompt (latents: in the sampler)
        sampler = BlockSampler(text, self.prior, self.scheduler, config)  # 3-5. grid, noise, loop
        steps = config.num_inference_steps

        def step_callback(state: StepState) -> torch.Tensor | None:
            if callback_on_step_end is None:
                return None
            tensors = {"latents": state.latents, "velocity": state.velocity}
            kwargs = {name: tensors[name] for name in callback_tensor_inputs}
            result = callback_on_step_end(self, state.block * steps + state.step, state.timestep, kwargs)
            return None if not result else result.get("latents")

        chunk = sampler.block_size * sampler.patch_size
        longest_trim = max(len(ids) % chunk for ids in prompt_ids)
        detok = IncrementalDetokenizer(
            len(prompts), lambda ids: text.detokenize([ids], config.skip_special_tokens)[0]
        )
        with self.progress_bar(total=math.ceil((config.max_new_tokens + longest_trim) / chunk)) as bar:
            for out in sampler.stream(
                prompt_ids, generator=generator, noise=noise, step_callback=step_callback
            ):
                bar.update()
                # 6. decode
                new_texts = [detok.add(i, new) if decode_text else "" for i, new in enumerate(out.token_ids)]
                yield out, new_texts

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        generation_config: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
        noise: NoiseSource = None,
        output_type: str = "text",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        **overrides,
    ) -> ColaTextPipelineOutput | tuple:
        """Generate a continuation of each prompt.

        ``generation_config``: the settings (default: ``self.generation_config``); ``overrides``: any
        of its fields (``max_new_tokens=64``, ``guidance_scale=3.0``, ...). ``noise``: per-block initial
        noise (a list of tensors or ``noise(block, shape)``), else drawn with ``generator``.
        ``callback_on_step_end(pipe, step, timestep, kwargs) -> dict`` is called after every Euler
        step (``step`` counts over blocks); a returned ``"latents"`` replaces the block's latents.
        Returns texts (``output_type="text"``), ids only (``"ids"``) or the block latents (``"latents"``).
        """
        # 1. check inputs
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        if hasattr(callback_on_step_end, "tensor_inputs"):  # diffusers PipelineCallback objects
            tensor_inputs = callback_on_step_end.tensor_inputs
        prompts = self.check_inputs(prompt, output_type, tensor_inputs)
        config = self.resolve_generation_config(generation_config, **overrides)
        # 2-6 on the streaming path
        token_ids = [[] for _ in prompts]
        block_latents, last = [], None
        blocks = self._generate(
            prompts, config, generator, noise, callback_on_step_end, tensor_inputs, decode_text=False
        )
        for out, _ in blocks:
            for acc, new in zip(token_ids, out.token_ids):
                acc.extend(new)
            block_latents.append(out.latents)
            last = out
        texts = None
        if output_type == "text":  # 6. decode, once, the whole continuation
            texts = self.text_modality.detokenize(token_ids, config.skip_special_tokens)
        self.maybe_free_model_hooks()
        if not return_dict:
            return ({"text": texts, "ids": token_ids, "latents": block_latents}[output_type],)
        return ColaTextPipelineOutput(
            texts=texts,
            token_ids=token_ids,
            latents=block_latents if output_type == "latents" else None,
            num_blocks=len(block_latents),
            num_prior_calls=last.num_prior_calls,
        )

    @torch.no_grad()
    def stream(
        self,
        prompt: str | list[str],
        generation_config: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
        noise: NoiseSource = None,
        **overrides,
    ) -> Iterator[ColaTextStreamChunk]:
        """Yield the new text of every prompt block by block (same settings as ``__call__``)."""
        prompts = self.check_inputs(prompt, "text", [])
        config = self.resolve_generation_config(generation_config, **overrides)
        for out, new_texts in self._generate(prompts, config, generator, noise, None, []):
            yield ColaTextStreamChunk(out.block, new_texts, out.token_ids, out.finished)


__all__ = ["ColaTextPipeline", "ColaTextPipelineOutput", "ColaTextStreamChunk"]

"""A diffusers pipeline for text generation with Cola DLM: prompt in, continuation out.

Components: ``text_vae`` (:class:`~unimodal.text_vae.TextVAE`), ``prior`` (:class:`~prior.models.mmdit.MMDiT`),
``scheduler`` (``FlowMatchEulerDiscreteScheduler``) and ``tokenizer`` (a ``transformers`` fast
tokenizer). The block loop itself lives in :class:`~prior.sampling.block_sampler.BlockSampler`; the pipeline
tokenizes, configures it, shows progress, calls the step callback and detokenizes. Stages, as in
diffusers' SD3 pipeline: 1. check inputs, 2. encode the prompt, 3. timesteps, 4. latents (noise),
5. the block loop, 6. decode.

Design choices
--------------
* ``save_pretrained`` / ``from_pretrained`` are diffusers': ``model_index.json`` names each
  component by its module (``unimodal.text_vae.TextVAE``, ``prior.models.mmdit.MMDiT``), so a saved
  pipeline reloads with nothing registered by hand.
* Prompts are tokenized with the tokenizer's defaults (``add_special_tokens=True``, as the released
  ``Tokenizer.encode(text).ids``). Stop ids default to EOS plus ``<|im_end|>`` when the tokenizer
  has it. Texts are decoded with ``skip_special_tokens=True``, except under ``released_compat``
  (``False``, and nothing is cut at EOS, as released).
* ``stream`` yields the new text of every block as soon as it is decoded; the text of a block is the
  difference between the decoded text after and before it, so multi-byte characters that straddle
  blocks come out whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput

from prior.models.mmdit import MMDiT
from prior.sampling.block_sampler import BlockOutput, BlockSampler, NoiseSource, SamplerConfig, StepState
from unimodal.text_vae import TextVAE
from unimodal.tokenization import IM_END_TOKEN

OUTPUT_TYPES = ("text", "ids", "latents")


@dataclass
class ColaTextPipelineOutput(BaseOutput):
    """texts: decoded continuations (``output_type="text"``); token_ids: the generated ids per
    prompt; latents: per-block final latents (B, bs, d) (``output_type="latents"``)."""

    texts: list[str] | None
    token_ids: list[list[int]]
    latents: list[torch.Tensor] | None = None
    num_blocks: int = 0
    num_prior_calls: int = 0


@dataclass
class ColaTextStreamChunk:
    """One block of a streamed generation: the new text and ids of every prompt."""

    block: int
    texts: list[str]
    token_ids: list[list[int]]
    finished: list[bool]


class ColaTextPipeline(DiffusionPipeline):
    """Cola DLM text generation: Text VAE + block-causal prior + flow-matching Euler scheduler."""

    model_cpu_offload_seq = "text_vae->prior"
    _callback_tensor_inputs = ["latents", "velocity"]

    def __init__(
        self, text_vae: TextVAE, prior: MMDiT, scheduler: FlowMatchEulerDiscreteScheduler, tokenizer
    ):
        super().__init__()
        self.register_modules(text_vae=text_vae, prior=prior, scheduler=scheduler, tokenizer=tokenizer)

    # ------------------------------------------------------------------ stages

    def check_inputs(
        self, prompt, max_new_tokens: int, output_type: str, callback_tensor_inputs
    ) -> list[str]:
        """1. Validate the call; returns the prompts as a list."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if (
            not isinstance(prompts, (list, tuple))
            or not prompts
            or not all(isinstance(p, str) for p in prompts)
        ):
            raise ValueError(
                f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
        bad = [name for name in callback_tensor_inputs or [] if name not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback tensor input {bad[0]!r} is not one of {self._callback_tensor_inputs}")
        return list(prompts)

    def encode_prompt(self, prompts: list[str]) -> list[list[int]]:
        """2. Tokenize (the latents are encoded by the sampler, which decides the padding)."""
        return [list(ids) for ids in self.tokenizer(prompts)["input_ids"]]

    def stop_token_ids(self) -> list[int]:
        ids = [self.tokenizer.eos_token_id]
        vocab = self.tokenizer.get_vocab()
        if IM_END_TOKEN in vocab:
            ids.append(vocab[IM_END_TOKEN])
        return [i for i in ids if i is not None]

    def sampler_config(self, shift: float | None = None, **kwargs) -> SamplerConfig:
        """3. The sampling settings (the time grid follows from steps and shift)."""
        shift = float(self.scheduler.config.shift) if shift is None else shift
        kwargs.setdefault("stop_token_ids", self.stop_token_ids())
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return SamplerConfig(shift=shift, **kwargs)

    # ------------------------------------------------------------------ generation

    def _blocks(
        self,
        prompts: list[str],
        config: SamplerConfig,
        generator: torch.Generator | None,
        noise: NoiseSource,
        callback_on_step_end: Callable | None,
        callback_tensor_inputs: list[str],
    ) -> Iterator[BlockOutput]:
        """Stages 2-5: tokenize, then run the block loop under a progress bar."""
        prompt_ids = self.encode_prompt(prompts)
        sampler = BlockSampler(self.text_vae, self.prior, self.scheduler, config)
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
        with self.progress_bar(total=math.ceil((config.max_new_tokens + longest_trim) / chunk)) as bar:
            for out in sampler.stream(
                prompt_ids, generator=generator, noise=noise, step_callback=step_callback
            ):
                bar.update()
                yield out

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        max_new_tokens: int = 32,
        num_inference_steps: int = 16,
        guidance_scale: float = 7.0,
        shift: float | None = None,
        generator: torch.Generator | None = None,
        noise: NoiseSource = None,
        output_type: str = "text",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        first_block: str = "clean_repaint",
        repaint_fraction: float = 0.5,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop_on_eos: bool = True,
        whole_blocks: bool | None = None,
        released_compat: bool = False,
    ) -> ColaTextPipelineOutput | tuple:
        """Generate a continuation of each prompt.

        ``noise``: per-block initial noise (a list of tensors or ``noise(block, shape)``), else drawn
        with ``generator``. ``callback_on_step_end(pipe, step, timestep, kwargs) -> dict`` is called
        after every Euler step (``step`` counts over blocks); a returned ``"latents"`` replaces the
        block's latents. ``shift`` defaults to the scheduler's. ``released_compat`` runs the released
        inference loop (see :mod:`prior.sampling.block_sampler`); ``repetition_penalty`` defaults to the released
        1.1 there and to 1.0 (off) otherwise. Returns texts (``output_type="text"``), ids only
        (``"ids"``) or the block latents (``"latents"``).
        """
        # 1. check inputs
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        if hasattr(callback_on_step_end, "tensor_inputs"):  # diffusers PipelineCallback objects
            tensor_inputs = callback_on_step_end.tensor_inputs
        prompts = self.check_inputs(prompt, max_new_tokens, output_type, tensor_inputs)
        if repetition_penalty is None:
            repetition_penalty = 1.1 if released_compat else 1.0
        # 3. timesteps and sampling settings
        config = self.sampler_config(
            shift=shift, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            first_block=first_block, repaint_fraction=repaint_fraction, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
            stop_on_eos=stop_on_eos, whole_blocks=whole_blocks, released_compat=released_compat,
        )  # fmt: skip
        # 2, 4, 5. encode the prompt, draw the noise block by block, run the block loop
        token_ids = [[] for _ in prompts]
        block_latents, last = [], None
        for out in self._blocks(prompts, config, generator, noise, callback_on_step_end, tensor_inputs):
            for acc, new in zip(token_ids, out.token_ids):
                acc.extend(new)
            block_latents.append(out.latents)
            last = out
        # 6. decode
        texts = None
        if output_type == "text":
            texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=not released_compat)
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
        max_new_tokens: int = 32,
        generator: torch.Generator | None = None,
        noise: NoiseSource = None,
        shift: float | None = None,
        **sampler_kwargs,
    ) -> Iterator[ColaTextStreamChunk]:
        """Yield the new text of every prompt block by block (``sampler_kwargs``: SamplerConfig fields)."""
        prompts = self.check_inputs(prompt, max_new_tokens, "text", [])
        config = self.sampler_config(shift=shift, max_new_tokens=max_new_tokens, **sampler_kwargs)
        skip = not config.released_compat
        token_ids = [[] for _ in prompts]
        texts = ["" for _ in prompts]
        for out in self._blocks(prompts, config, generator, noise, None, []):
            new_texts = []
            for i, new in enumerate(out.token_ids):
                token_ids[i].extend(new)
                full = self.tokenizer.decode(token_ids[i], skip_special_tokens=skip)
                new_texts.append(full[len(texts[i]) :] if full.startswith(texts[i]) else full)
                texts[i] = full
            yield ColaTextStreamChunk(out.block, new_texts, out.token_ids, out.finished)


__all__ = ["ColaTextPipeline", "ColaTextPipelineOutput", "ColaTextStreamChunk"]

"""A diffusers pipeline for the masked-diffusion baseline (LLaDA-style): prompt in, continuation out.

Components: ``transformer`` (a bidirectional :class:`~prior.models.ar.ARTransformer` whose last id
is the mask id) and ``tokenizer`` (the same fast tokenizer as the Cola and AR runs it is compared
with). Config (``model_index.json``): ``block_length`` (tokens per semi-autoregressive block) and
``remasking`` (``low_confidence`` | ``random``). The surface is
:class:`~prior.pipelines.pipeline_ar_text.ARTextPipeline`'s, so ``unimodal sample``,
``unimodal eval-samples`` and the sample report take it: ``pipe(prompt, generation_config=None,
generator=None, output_type="text", **overrides)``, ``pipe.stream(...)``.

Design choices
--------------
* **The project's generation config.** ``num_inference_steps`` is the number of forward passes
  per block (LLaDA's steps / blocks; at most ``block_length``: each pass commits
  ``block_length / steps`` tokens); ``max_new_tokens`` is rounded up to whole blocks for the
  transport and the output cut back to it; ``temperature`` (0 = greedy) samples the predictions
  with Gumbel noise; ``stop_token_ids`` / ``stop_on_eos`` / ``stop_rule`` cut each row's output as
  in Cola's block sampler (a "block" is one MDM block). The fields that only apply to a continuous
  transport or to sequential sampling (``guidance_scale``, ``shift``, ``first_block``,
  ``noise_scale``, ``top_k``, ``top_p``, ``repetition_penalty``) are ignored.
* **Every prompt starts a document** (one EOS before its ids), as in the Cola and AR pipelines.
* **No KV cache**: the model is bidirectional, so every pass reads the whole sequence (prompt +
  span); this is the sampler's cost model and the bench compares it as such.
* The loop stops after the block in which every row has stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from prior.models.ar import ARTransformer
from prior.pipelines.text_generation import GenerationStep, StepwiseGenerationMixin, TextGenerationMixin
from prior.sampling.config import GenerationConfig
from prior.sampling.masked_diffusion import MaskedDiffusionSamplingConfig, masked_diffusion_blocks
from prior.sampling.stopping import RowState, make_stop_rule
from unimodal.tokenization import check_special_tokens, model_vocab_size


@dataclass
class MDMTextPipelineOutput(BaseOutput):
    """texts: decoded continuations (``output_type="text"``, else None); token_ids: the generated
    ids per prompt; num_model_calls: forwards of the transformer."""

    texts: list[str] | None
    token_ids: list[list[int]]
    num_model_calls: int = 0


class MDMTextPipeline(StepwiseGenerationMixin, TextGenerationMixin, DiffusionPipeline):
    """Masked-diffusion text generation with the LLaDA-style baseline (see the module docstring)."""

    output_types = ("text", "ids")
    model_cpu_offload_seq = "transformer"
    output_class = MDMTextPipelineOutput

    @register_to_config
    def __init__(
        self,
        transformer: ARTransformer,
        tokenizer,
        block_length: int = 16,
        remasking: str = "low_confidence",
    ):
        super().__init__()
        if transformer.config.causal:
            raise ValueError("MDMTextPipeline needs a bidirectional transformer (causal=False)")
        check_special_tokens(tokenizer)
        if model_vocab_size(tokenizer) + 1 != transformer.config.vocab_size:
            raise ValueError(
                f"tokenizer has {model_vocab_size(tokenizer)} ids; the model must embed them + one mask id, "
                f"but embeds {transformer.config.vocab_size}"
            )
        MaskedDiffusionSamplingConfig(block_length, remasking)  # validates both (one error line each)
        self.register_modules(transformer=transformer, tokenizer=tokenizer)
        self.generation_config = GenerationConfig()

    @property
    def mask_id(self) -> int:
        return self.transformer.config.vocab_size - 1

    def _progress_total(self, config: GenerationConfig) -> int:  # blocks
        return math.ceil(config.max_new_tokens / self.config.block_length)

    def _generate(
        self, prompts: list[str], config: GenerationConfig, generator: torch.Generator | None
    ) -> Iterator[GenerationStep]:
        block_len = self.config.block_length
        steps = config.num_inference_steps
        if not 1 <= steps <= block_len:
            raise ValueError(
                f"num_inference_steps={steps} must be in [1, block_length={block_len}] for masked diffusion "
                "(each pass commits at least one token)"
            )
        rows = self.prompt_ids(prompts, vocab=self.mask_id)  # the mask id is not a prompt token
        gen_len = math.ceil(config.max_new_tokens / block_len) * block_len
        longest = max(len(r) for r in rows)
        if longest + gen_len > self.transformer.config.max_seq_len:
            raise ValueError(
                f"prompt of {longest - 1} tokens + {gen_len} generated exceeds the model maximum of "
                f"{self.transformer.config.max_seq_len} tokens"
            )
        rule = make_stop_rule(
            config.stop_rule, config.stop_token_ids or [], config.stop_on_eos, config.max_new_tokens,
            config.whole_blocks,
        )  # fmt: skip
        states = [RowState(encode_ids=row, prefix=len(row), pinned=0, trim=0) for row in rows]
        pad = config.pad_token_id if config.pad_token_id is not None else self.tokenizer.eos_token_id
        for block in masked_diffusion_blocks(
            self.transformer, rows, self.mask_id, gen_len, block_len, steps, pad_id=int(pad),
            remasking=self.config.remasking, temperature=config.temperature, generator=generator,
        ):  # fmt: skip
            new = [rule.take(state, ids, 0) for state, ids in zip(states, block.token_ids)]
            yield GenerationStep(block.index, new, [s.finished for s in states], block.num_forwards)
            if rule.done(states, block.index + 1, block_len):
                break


__all__ = ["MDMTextPipeline", "MDMTextPipelineOutput"]

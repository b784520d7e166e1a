"""A diffusers pipeline for the matched autoregressive baseline: prompt in, continuation out.

Components: ``transformer`` (:class:`~prior.models.ar.ARTransformer`) and ``tokenizer`` (the
same ``transformers`` fast tokenizer as the Cola runs it is compared with). The surface is
:class:`~prior.pipelines.pipeline_cola_text.ColaTextPipeline`'s where it makes sense, so the
sample report, ``unimodal sample`` and ``unimodal eval-samples`` take either pipeline:
``pipe(prompt, generation_config=None, generator=None, output_type="text", **overrides)``,
``pipe.stream(...)``, :meth:`resolve_generation_config`, ``generation_config`` (saved as
``generation_config.json``), ``tokenizer``.

Design choices
--------------
* **The project's one generation config and token sampling.**
  :class:`~prior.sampling.config.GenerationConfig` gives ``max_new_tokens``, ``temperature``,
  ``top_k``, ``top_p``, ``repetition_penalty``, ``finite_logits``, ``stop_token_ids``,
  ``stop_on_eos``, ``stop_rule`` and ``skip_special_tokens``; logits go through
  :mod:`prior.sampling.tokens` and each row's output through the stop rule of
  :mod:`prior.sampling.stopping`, exactly as in Cola's block sampler with a "block" of one token:
  the repetition penalty covers the ids generated earlier in the sample (not the prompt), and the
  output is cut after the first stop id and at ``max_new_tokens``. The fields that only apply to
  diffusion (``num_inference_steps``, ``guidance_scale``, ``shift``, ``first_block``,
  ``repaint_fraction``, ``pad_prompt_to_block``, ``whole_blocks``) are ignored.
* **Every prompt starts a document**: its ids (tokenized with the tokenizer's defaults, as in
  Cola) follow one EOS, the separator that precedes every document in the packed training rows.
  So the empty prompt is unconditional generation, as in Cola.
* **KV-cached and batched.** One prefill of all prompts, left-padded to the longest: pad slots are
  invalid keys and every row has its own positions ``0..n-1``, so a row of a batch gives its
  single-prompt result (up to float rounding). Then one cached forward per token over the batch
  (``update_cache=True`` writes that token's keys); finished rows stop adding output.
* ``__call__`` and ``stream`` come from :class:`~prior.pipelines.text_generation.StepwiseGenerationMixin`
  (shared with the masked-diffusion pipeline), both over :meth:`ARTextPipeline._generate`.
* ``from_pretrained`` of a folder that holds another pipeline (a Cola DLM) is one ValueError line
  (:func:`~prior.pipelines.folders.check_pipeline_class`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from prior.models.ar import ARTransformer
from prior.pipelines.text_generation import (
    GenerationStep,
    StepwiseGenerationMixin,
    TextGenerationMixin,
    TextStreamChunk,
)
from prior.sampling.config import GenerationConfig
from prior.sampling.stopping import RowState, make_stop_rule
from prior.sampling.tokens import apply_repetition_penalty, finite_logits, sample_tokens
from unimodal.tokenization import check_special_tokens, model_vocab_size


@dataclass
class ARTextPipelineOutput(BaseOutput):
    """texts: decoded continuations (``output_type="text"``, else None); token_ids: the generated
    ids per prompt; num_model_calls: forwards of the transformer (prefill included)."""

    texts: list[str] | None
    token_ids: list[list[int]]
    num_model_calls: int = 0


ARTextStreamChunk = TextStreamChunk  # one step = one token


class ARTextPipeline(StepwiseGenerationMixin, TextGenerationMixin, DiffusionPipeline):
    """Autoregressive text generation with the matched baseline (see the module docstring)."""

    output_types = ("text", "ids")
    model_cpu_offload_seq = "transformer"
    output_class = ARTextPipelineOutput

    def __init__(self, transformer: ARTransformer, tokenizer):
        super().__init__()
        check_special_tokens(tokenizer)
        if model_vocab_size(tokenizer) > transformer.config.vocab_size:
            raise ValueError(
                f"tokenizer has {model_vocab_size(tokenizer)} ids but the model embeds "
                f"{transformer.config.vocab_size}"
            )
        self.register_modules(transformer=transformer, tokenizer=tokenizer)
        self.generation_config = GenerationConfig()

    # ------------------------------------------------------------------ generation

    def _generate(
        self, prompts: list[str], config: GenerationConfig, generator: torch.Generator | None
    ) -> Iterator[GenerationStep]:
        """Prefill the prompts, then sample one token per step through the KV cache."""
        model = self.transformer
        device, vocab = model.device, model.config.vocab_size
        rows = self.prompt_ids(prompts, vocab)
        batch, longest = len(rows), max(len(r) for r in rows)
        room = model.config.max_seq_len - longest
        if room < 1:
            raise ValueError(
                f"prompt of {longest - 1} tokens leaves no room in the model maximum of "
                f"{model.config.max_seq_len} tokens"
            )
        pad = config.pad_token_id if config.pad_token_id is not None else self.tokenizer.eos_token_id
        ids = torch.full((batch, longest), int(pad), dtype=torch.long)  # (B, P), left-padded
        valid = torch.zeros(batch, longest, dtype=torch.bool)
        positions = torch.zeros(batch, longest, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, longest - len(row) :] = torch.tensor(row)
            valid[i, longest - len(row) :] = True
            positions[i, longest - len(row) :] = torch.arange(len(row))
        rule = make_stop_rule(
            config.stop_rule, config.stop_token_ids or [], config.stop_on_eos, config.max_new_tokens,
            config.whole_blocks,
        )  # fmt: skip
        states = [RowState(encode_ids=row, prefix=len(row), pinned=0, trim=0) for row in rows]
        cache = model.new_kv_cache()
        out = model(ids.to(device), positions.to(device), valid.to(device), cache, update_cache=True)
        logits, calls = out.logits[:, -1:].float(), 1  # (B, 1, V): after each row's last prompt token
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        every = torch.arange(batch, device=device)
        for step in range(room):
            if config.finite_logits:
                logits = finite_logits(logits)
            logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
            # (B, 1) ids, as Cola's block sampler draws them
            next_ids = sample_tokens(logits, config.temperature, config.top_k, config.top_p, generator)
            sampled = next_ids[:, 0].tolist()
            new = [rule.take(state, [token], 0) for state, token in zip(states, sampled)]
            seen[every, next_ids[:, 0]] = True
            yield GenerationStep(step, new, [s.finished for s in states], calls)
            if rule.done(states, step + 1, 1) or step + 1 == room:
                break
            logits = model(next_ids, kv_cache=cache, update_cache=True).logits.float()  # (B, 1, V)
            calls += 1


__all__ = ["ARTextPipeline", "ARTextPipelineOutput", "ARTextStreamChunk"]

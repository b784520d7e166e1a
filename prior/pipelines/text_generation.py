"""What every text pipeline shares: its generation config (saved with the folder), prompt checks,
the resolution of one call's settings, and the folder-kind check on loading.

:class:`TextGenerationMixin` sits before ``DiffusionPipeline`` in a text pipeline's bases
(``ColaTextPipeline``, ``ARTextPipeline``); the pipeline provides ``tokenizer`` (a component) and
``stop_token_ids()``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from prior.pipelines.folders import check_pipeline_class
from prior.sampling.config import CONFIG_NAME, GenerationConfig
from unimodal.tokenization import default_stop_token_ids


@dataclass
class TextStreamChunk:
    """One step of a streamed generation (a block; one token for the AR baseline): the new text
    and ids of every prompt, and which prompts have stopped."""

    block: int
    texts: list[str]
    token_ids: list[list[int]]
    finished: list[bool]


class IncrementalDetokenizer:
    """The new text of each prompt as its ids arrive: the decoded text after the new ids minus the
    text before them, so multi-byte characters split over steps come out whole."""

    def __init__(self, num_prompts: int, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.token_ids: list[list[int]] = [[] for _ in range(num_prompts)]
        self.texts = ["" for _ in range(num_prompts)]

    def add(self, i: int, new_ids: list[int]) -> str:
        """Append prompt ``i``'s new ids; return the text they add (re-decoded whole if it changed)."""
        if not new_ids:
            return ""
        self.token_ids[i].extend(new_ids)
        full, before = self.decode(self.token_ids[i]), self.texts[i]
        self.texts[i] = full
        return full[len(before) :] if full.startswith(before) else full


@dataclass
class GenerationStep:
    """What one step of a step-wise generation adds (a token for the AR baseline, a block for the
    masked-diffusion one): the new ids per prompt, who has stopped, model forwards so far."""

    index: int
    token_ids: list[list[int]]
    finished: list[bool]
    num_model_calls: int


class StepwiseGenerationMixin:
    """``__call__`` and ``stream`` of a baseline text pipeline whose ``_generate(prompts, config,
    generator)`` yields :class:`GenerationStep` s; ``output_class`` is its output dataclass
    (``texts``, ``token_ids``, ``num_model_calls``), ``_progress_total(config)`` its bar length.
    ``__call__`` is built on the streaming path, so both give the same ids."""

    output_class: type

    def stop_token_ids(self) -> list[int]:
        """The default stop ids: EOS, and ``<|im_end|>`` when the vocabulary has it."""
        return default_stop_token_ids(self.tokenizer)

    def prompt_ids(self, prompts: list[str], vocab: int | None = None) -> list[list[int]]:
        """EOS + the prompt's ids (tokenizer defaults) per prompt: every prompt starts a document.
        With ``vocab``, an id outside ``[0, vocab)`` is one ValueError naming the prompt."""
        rows = [
            [self.tokenizer.eos_token_id, *row]
            for row in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        ]
        for i, row in enumerate(rows if vocab is not None else []):
            bad = [t for t in row if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} holds token id {bad[0]} outside the vocabulary [0, {vocab})")
        return rows

    def _progress_total(self, config: GenerationConfig) -> int:
        return config.max_new_tokens

    def _decode(self, token_ids: list[list[int]], config: GenerationConfig) -> list[str]:
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=config.skip_special_tokens)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        generation_config: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "text",
        return_dict: bool = True,
        **overrides,
    ):
        """Generate a continuation of each prompt.

        ``generation_config``: the settings (default: ``self.generation_config``); ``overrides``: any
        of its fields (``max_new_tokens=64``, ``temperature=0.8``, ...); ``generator`` drives the
        token draws when sampling. Returns texts (``output_type="text"``) or ids only (``"ids"``).
        """
        prompts = self.check_prompts(prompt, output_type)
        config = self.resolve_generation_config(generation_config, **overrides)
        token_ids, calls = [[] for _ in prompts], 0
        with self.progress_bar(total=self._progress_total(config)) as bar:
            for step in self._generate(prompts, config, generator):
                bar.update()
                for acc, new in zip(token_ids, step.token_ids):
                    acc.extend(new)
                calls = step.num_model_calls
        texts = self._decode(token_ids, config) if output_type == "text" else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return ({"text": texts, "ids": token_ids}[output_type],)
        return self.output_class(texts=texts, token_ids=token_ids, num_model_calls=calls)

    @torch.no_grad()
    def stream(
        self,
        prompt: str | list[str],
        generation_config: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
        **overrides,
    ) -> Iterator[TextStreamChunk]:
        """Yield the new text of every prompt step by step (same settings and ids as ``__call__``).

        The text of a step is the difference between the decoded text after and before it, so
        multi-byte characters split over steps come out whole."""
        prompts = self.check_prompts(prompt, "text")
        config = self.resolve_generation_config(generation_config, **overrides)
        text = IncrementalDetokenizer(len(prompts), lambda ids: self._decode([ids], config)[0])
        for step in self._generate(prompts, config, generator):
            new_texts = [text.add(i, new) for i, new in enumerate(step.token_ids)]
            yield TextStreamChunk(step.index, new_texts, step.token_ids, step.finished)


class TextGenerationMixin:
    """``generation_config`` (default ``GenerationConfig()``; ``generation_config.json`` in the folder),
    ``check_prompts`` and ``resolve_generation_config`` for a diffusers text pipeline."""

    generation_config: GenerationConfig
    output_types: tuple[str, ...] = ("text", "ids")

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        self.generation_config.save(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """diffusers' loading, after checking the folder holds this kind of pipeline; the generation
        config comes from a local folder's ``generation_config.json`` when there is one."""
        check_pipeline_class(pretrained_model_name_or_path, cls.__name__)  # e.g. an AR folder for Cola
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = Path(pretrained_model_name_or_path)
        pipe.generation_config = (
            GenerationConfig.load(folder) if (folder / CONFIG_NAME).is_file() else GenerationConfig()
        )
        return pipe

    def check_prompts(self, prompt, output_type: str = "text") -> list[str]:
        """A string or a non-empty list of strings -> the list; ``output_type`` one of ``output_types``."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if (
            not isinstance(prompts, (list, tuple))
            or not prompts
            or not all(isinstance(p, str) for p in prompts)
        ):
            raise ValueError(
                f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}"
            )
        if output_type not in self.output_types:
            raise ValueError(f"output_type={output_type!r}; expected one of {self.output_types}")
        return list(prompts)

    def resolve_generation_config(
        self, generation_config: GenerationConfig | None = None, **overrides
    ) -> GenerationConfig:
        """The settings of one call: ``generation_config`` (default: the pipeline's) with
        ``overrides``; stop ids and pad id filled from the tokenizer when None."""
        base = self.generation_config if generation_config is None else generation_config
        if not isinstance(base, GenerationConfig):
            raise TypeError(f"generation_config must be a GenerationConfig, got {type(base).__name__}")
        config = base.replace(**overrides)
        fill = {}
        if config.stop_token_ids is None:
            fill["stop_token_ids"] = self.stop_token_ids()
        if config.pad_token_id is None and self.tokenizer.pad_token_id is not None:
            fill["pad_token_id"] = self.tokenizer.pad_token_id
        return dataclasses.replace(config, **fill) if fill else config


__all__ = [
    "GenerationStep",
    "IncrementalDetokenizer",
    "StepwiseGenerationMixin",
    "TextGenerationMixin",
    "TextStreamChunk",
]

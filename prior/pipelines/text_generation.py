"""What every text pipeline shares: its generation config (saved with the folder), prompt checks,
the resolution of one call's settings, and the folder-kind check on loading.

:class:`TextGenerationMixin` sits before ``DiffusionPipeline`` in a text pipeline's bases
(``ColaTextPipeline``, ``ARTextPipeline``); the pipeline provides ``tokenizer`` (a component) and
``stop_token_ids()``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prior.pipelines.folders import check_pipeline_class
from prior.sampling.config import CONFIG_NAME, GenerationConfig


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


__all__ = ["IncrementalDetokenizer", "TextGenerationMixin", "TextStreamChunk"]

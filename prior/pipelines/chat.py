"""A multi-turn chat over a Cola text pipeline: the chat template, block-by-block streaming, reset.

:class:`ChatSession` keeps the conversation (``{role, content}`` messages), renders it with
:func:`unimodal.chat_data.render_prompt` (the rendering SFT trains on), continues it with the
pipeline's :class:`~prior.sampling.block_sampler.BlockSampler` and streams the reply block by
block. The reply ends at the first ``<|im_end|>`` (a stop id when the tokenizer has it as one
token, else found in the text: the characters that could start the marker are held back until the
next block shows they do not), at EOS, or at ``max_new_tokens``. ``unimodal chat CHECKPOINT`` is a
terminal loop around it (``/reset`` clears the conversation, ``/exit`` or end of input quits).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from prior.pipelines.text_generation import IncrementalDetokenizer
from prior.sampling.block_sampler import BlockSampler
from prior.sampling.config import GenerationConfig
from unimodal.chat_data import IM_END, render_prompt, reply_text


class ChatSession:
    """One conversation with ``pipe`` (a ColaTextPipeline) under ``config`` (default: the pipeline's)."""

    def __init__(
        self, pipe, config: GenerationConfig | None = None, seed: int = 0, system: str | None = None
    ):
        self.pipe, self.system = pipe, system
        self.config = pipe.resolve_generation_config(config)
        self.generator = torch.Generator().manual_seed(seed)
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        """Forget every turn (the system message, if any, stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def stream_reply(self, user_text: str) -> Iterator[str]:
        """Add the user turn, then yield the reply's text as each block is decoded; the finished
        reply is appended to the conversation."""
        if not user_text.strip():
            raise ValueError("a user turn must not be empty")
        self.messages.append({"role": "user", "content": user_text})
        text = self.pipe.text_modality
        prompt = render_prompt(self.pipe.tokenizer, self.messages)
        sampler = BlockSampler(text, self.pipe.prior, self.pipe.scheduler, self.config)
        detok = IncrementalDetokenizer(1, lambda ids: text.detokenize([ids], skip_special_tokens=False)[0])
        shown = 0  # characters of the reply already yielded
        full = ""
        for out in sampler.stream([prompt], generator=self.generator):
            detok.add(0, out.token_ids[0])
            full = detok.texts[0]
            end = full.find(IM_END)
            safe = end if end >= 0 else max(shown, len(full) - len(IM_END) + 1)  # hold back a partial marker
            if safe > shown:
                yield full[shown:safe]
                shown = safe
            if end >= 0:
                break
        else:
            if len(full) > shown:
                yield full[shown:]
        self.messages.append({"role": "assistant", "content": reply_text(full)})


__all__ = ["ChatSession"]

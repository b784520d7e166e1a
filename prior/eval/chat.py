"""Answer accuracy on the embedded synthetic chats: the SFT effect, measured by a program.

Each held-out conversation (test split of :func:`unimodal.chat_data.synthetic_chat`) is rendered
up to the assistant header (:func:`~unimodal.chat_data.render_prompt`), continued by the pipeline's
block sampler with its generation config, and the reply (the text before the first end marker) is
compared with the answer by exact match. Reported per task and overall, next to chance (a uniform
guess over each task's answer set).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from prior.sampling.block_sampler import BlockSampler
from prior.sampling.config import GenerationConfig
from unimodal.chat_data import CHANCE, TASKS, check_answer, render_prompt, reply_text, synthetic_chat


@dataclass
class ChatAccuracy:
    num: int
    accuracy: dict[str, float]  # per task and "all"
    chance: dict[str, float]
    examples: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        parts = [f"{k} {self.accuracy[k]:.3f} (chance {self.chance[k]:.3f})" for k in (*TASKS, "all")]
        return f"answer accuracy on {self.num} held-out chats: " + ", ".join(parts)


@torch.no_grad()
def chat_accuracy(
    pipe,
    num: int = 200,
    generation_config: GenerationConfig | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> ChatAccuracy:
    """Exact-match answer accuracy of a ColaTextPipeline on ``num`` test-split synthetic chats."""
    config = pipe.resolve_generation_config(generation_config)
    text = pipe.text_modality
    sampler = BlockSampler(text, pipe.prior, pipe.scheduler, config)
    items = [synthetic_chat(i, "test") for i in range(num)]
    gen = torch.Generator().manual_seed(seed)
    replies: list[str] = []
    for start in range(0, num, batch_size):
        chunk = items[start : start + batch_size]
        prompts = [render_prompt(pipe.tokenizer, messages[:-1]) for messages, _, _ in chunk]
        out = sampler.sample(prompts, generator=gen)
        replies += [reply_text(t) for t in text.detokenize(out.token_ids, skip_special_tokens=False)]
    hits: dict[str, list[bool]] = {t: [] for t in TASKS}
    for (_, task, answer), reply in zip(items, replies):
        hits[task].append(check_answer(reply, answer))
    acc = {t: sum(h) / max(len(h), 1) for t, h in hits.items()}
    acc["all"] = sum(sum(h) for h in hits.values()) / max(num, 1)
    chance = {**CHANCE, "all": sum(CHANCE.values()) / len(CHANCE)}
    examples = [
        {"prompt": m[0]["content"], "answer": a, "reply": r} for (m, _, a), r in zip(items[:8], replies[:8])
    ]
    return ChatAccuracy(num, acc, chance, examples)


__all__ = ["ChatAccuracy", "chat_accuracy"]

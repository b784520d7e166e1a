"""Sample quality: cheap, reference-free figures for generated text, always printed beside real text.

At toy scale a sample's quality is best judged against two anchors measured the same way:
held-out real text (the ceiling) and words drawn from the training unigram distribution (word
salad). Three figures:

* **in-vocabulary words**: the fraction of generated words (whitespace-separated strings, exact,
  punctuation included) that occur as words of the training split. Real held-out text scores
  about 0.93 on the embedded corpus and unigram salad about 0.64 (its BPE pieces glue into
  non-words), in line with the toy-scale prototype's anchors (docs/design.md §8);
* **distinct-2**: distinct word bigrams / word bigrams (repetition shows up as a low value);
* **bigram log-likelihood**: mean per-token log-probability under an add-k smoothed token
  bigram model fit on the training split (fluency of local transitions).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def words(text: str) -> list[str]:
    """Whitespace-separated words, exactly as written (punctuation and case included)."""
    return text.split()


@dataclass
class QualityFigures:
    """Quality figures of a set of texts."""

    in_vocab: float  # fraction of words found in the training vocabulary
    distinct2: float  # distinct word bigrams / word bigrams
    bigram_logprob: float  # mean per-token log-likelihood under the training token bigram model
    num_words: int

    def row(self, name: str) -> str:
        return (
            f"{name:<28} in-vocab {self.in_vocab:.3f}   distinct-2 {self.distinct2:.3f}   "
            f"bigram logp/token {self.bigram_logprob:7.3f}   ({self.num_words} words)"
        )


class TextQuality:
    """Word vocabulary, token unigram and token bigram statistics of a training split."""

    def __init__(self, train_texts: Sequence[str], tokenizer, add_k: float = 0.1) -> None:
        self.tokenizer = tokenizer
        self.vocab = {w for text in train_texts for w in words(text)}
        if not self.vocab:
            raise ValueError("the training texts contain no words")
        ids = tokenizer(list(train_texts), add_special_tokens=False)["input_ids"]
        self.V = len(tokenizer)
        self.add_k = add_k
        self.unigram = Counter(t for seq in ids for t in seq)
        self.bigram = Counter((a, b) for seq in ids for a, b in zip(seq[:-1], seq[1:]))

    def bigram_logprob(self, token_ids: Sequence[int]) -> tuple[float, int]:
        """Sum of log p(b | a) over the sequence's transitions, and their count."""
        total = 0.0
        for a, b in zip(token_ids[:-1], token_ids[1:]):
            p = (self.bigram[(a, b)] + self.add_k) / (self.unigram[a] + self.add_k * self.V)
            total += math.log(p)
        return total, max(len(token_ids) - 1, 0)

    def figures(self, texts: Sequence[str]) -> QualityFigures:
        all_words = [words(t) for t in texts]
        flat = [w for ws in all_words for w in ws]
        bigrams = [(a, b) for ws in all_words for a, b in zip(ws[:-1], ws[1:])]
        logp, n = 0.0, 0
        for t in texts:
            s, c = self.bigram_logprob(self.tokenizer(t, add_special_tokens=False)["input_ids"])
            logp, n = logp + s, n + c
        return QualityFigures(
            in_vocab=sum(w in self.vocab for w in flat) / max(len(flat), 1),
            distinct2=len(set(bigrams)) / max(len(bigrams), 1),
            bigram_logprob=logp / max(n, 1),
            num_words=len(flat),
        )

    def unigram_texts(self, n: int, tokens_per_text: int, seed: int = 0) -> list[str]:
        """Word salad: token ids drawn i.i.d. from the training unigram distribution, decoded."""
        ids = torch.tensor(list(self.unigram.keys()))
        probs = torch.tensor(list(self.unigram.values()), dtype=torch.float64)
        gen = torch.Generator().manual_seed(seed)
        draws = ids[torch.multinomial(probs, n * tokens_per_text, replacement=True, generator=gen)]
        return self.tokenizer.batch_decode(draws.view(n, tokens_per_text).tolist(), skip_special_tokens=True)


@dataclass
class GenerationReport:
    """Samples of a text pipeline and their quality beside real held-out text and word salad."""

    prompts: list[str]
    samples: list[str]
    references: list[str]
    generated: QualityFigures
    real: QualityFigures
    unigram: QualityFigures
    seconds: float

    def format(self, show: int = 4) -> str:
        lines = []
        for prompt, sample in list(zip(self.prompts, self.samples))[:show]:
            lines += [f"PROMPT: {prompt!r}", f"  -> {sample!r}"]
        lines += [
            "quality (higher in-vocab / distinct-2 / bigram logp is better):",
            self.generated.row("generated continuations"),
            self.real.row("held-out real continuations"),
            self.unigram.row("unigram word salad"),
            f"generation: {len(self.samples)} prompts in {self.seconds:.1f}s",
        ]
        return "\n".join(lines)


@torch.no_grad()
def generation_report(
    pipe,
    train_texts: Sequence[str],
    val_texts: Sequence[str],
    num_prompts: int = 16,
    prompt_tokens: int = 16,
    seed: int = 0,
    generation_config=None,
    **overrides,
) -> GenerationReport:
    """Continue held-out prompts with ``pipe`` and score the continuations (module docstring).

    ``generation_config`` (default: the pipeline's) and ``overrides`` are the generation settings;
    the real continuations are ``max_new_tokens`` long like the generated ones."""
    config = pipe.resolve_generation_config(generation_config, **overrides)
    new_tokens = config.max_new_tokens
    tok = pipe.tokenizer
    prompts, references = [], []
    for text in val_texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens + new_tokens:
            prompts.append(tok.decode(ids[:prompt_tokens]))
            references.append(tok.decode(ids[prompt_tokens : prompt_tokens + new_tokens]))
        if len(prompts) == num_prompts:
            break
    if not prompts:
        raise ValueError(f"no held-out document has {prompt_tokens + new_tokens} tokens")
    start = time.perf_counter()
    out = pipe(prompts, config, generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    quality = TextQuality(train_texts, tok)
    return GenerationReport(
        prompts=prompts,
        samples=out.texts,
        references=references,
        generated=quality.figures(out.texts),
        real=quality.figures(references),
        unigram=quality.figures(quality.unigram_texts(len(prompts), new_tokens, seed=seed)),
        seconds=seconds,
    )

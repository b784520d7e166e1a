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

Each figure is pooled over the texts; the spread is the standard error over texts of the
per-text in-vocabulary fraction (``in_vocab_se``). One more figure judges the *conditioning*:

* **context sensitivity**: continuations of different prompts generated under the *same* noise
  (every row of the batch gets the same noise block), compared position by position; the figure
  is the mean share of identical tokens over all prompt pairs. A prior that ignores its history
  turns the same noise into the same words (high share); real conditioning drives it toward 0.
  For a pipeline without noise (the AR baseline) the same generator seed plays that role.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
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
    in_vocab_se: float = 0.0  # standard error over texts of the per-text in-vocabulary fraction

    def row(self, name: str) -> str:
        return (
            f"{name:<28} in-vocab {self.in_vocab:.3f} +- {self.in_vocab_se:.3f}   distinct-2 {self.distinct2:.3f}   "
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
        per_text = [sum(w in self.vocab for w in ws) / len(ws) for ws in all_words if ws]
        se = 0.0
        if len(per_text) > 1:
            mean = sum(per_text) / len(per_text)
            se = math.sqrt(sum((x - mean) ** 2 for x in per_text) / (len(per_text) - 1) / len(per_text))
        return QualityFigures(
            in_vocab=sum(w in self.vocab for w in flat) / max(len(flat), 1),
            distinct2=len(set(bigrams)) / max(len(bigrams), 1),
            bigram_logprob=logp / max(n, 1),
            num_words=len(flat),
            in_vocab_se=se,
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
    context_sensitivity: float | None = None  # share of identical tokens under shared noise

    def as_dict(self) -> dict:
        """The figures (not the texts), for tables and JSON."""
        out = {"context_sensitivity": self.context_sensitivity, "num_prompts": len(self.prompts)}
        for name in ("generated", "real", "unigram"):
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    def format(self, show: int = 4) -> str:
        lines = []
        for prompt, sample in list(zip(self.prompts, self.samples))[:show]:
            lines += [f"PROMPT: {prompt!r}", f"  -> {sample!r}"]
        lines += [
            "quality (higher in-vocab / distinct-2 / bigram logp is better):",
            self.generated.row("generated continuations"),
            self.real.row("held-out real continuations"),
            self.unigram.row("unigram word salad"),
        ]
        if self.context_sensitivity is not None:
            lines.append(
                f"context sensitivity (identical tokens across prompts under shared noise; 0 = fully "
                f"conditioned): {self.context_sensitivity:.3f}"
            )
        lines.append(f"generation: {len(self.samples)} prompts in {self.seconds:.1f}s")
        return "\n".join(lines)


def held_out_prompts(
    tokenizer, val_texts: Sequence[str], num: int, prompt_tokens: int, new_tokens: int
) -> tuple[list[str], list[str]]:
    """The first ``num`` held-out documents with ``prompt_tokens + new_tokens`` tokens, as (prompts:
    their first ``prompt_tokens`` tokens, references: the next ``new_tokens``), decoded."""
    prompts, references = [], []
    for text in val_texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens + new_tokens:
            prompts.append(tokenizer.decode(ids[:prompt_tokens]))
            references.append(tokenizer.decode(ids[prompt_tokens : prompt_tokens + new_tokens]))
        if len(prompts) == num:
            break
    if not prompts:
        raise ValueError(f"no held-out document has {prompt_tokens + new_tokens} tokens")
    return prompts, references


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
    prompts, references = held_out_prompts(tok, val_texts, num_prompts, prompt_tokens, new_tokens)
    start = time.perf_counter()
    out = pipe(prompts, config, generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    sensitivity = context_sensitivity(pipe, prompts[: min(len(prompts), 8)], config, seed)
    quality = TextQuality(train_texts, tok)
    return GenerationReport(
        prompts=prompts,
        samples=out.texts,
        references=references,
        generated=quality.figures(out.texts),
        real=quality.figures(references),
        unigram=quality.figures(quality.unigram_texts(len(prompts), new_tokens, seed=seed)),
        seconds=seconds,
        context_sensitivity=sensitivity,
    )


def shared_noise(seed: int) -> Callable[[int, tuple[int, ...]], torch.Tensor]:
    """``noise(block, (B, bs, d))`` giving every row the same block noise (drawn from ``seed``, block)."""

    def draw(block: int, shape: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
        return torch.randn(shape[1:], generator=gen).expand(shape).clone()

    return draw


def token_identity(rows: Sequence[Sequence[int]]) -> float | None:
    """Mean over pairs of rows of the share of positions (up to the shorter row) with equal ids."""
    shares = []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            n = min(len(rows[i]), len(rows[j]))
            if n:
                shares.append(sum(a == b for a, b in zip(rows[i][:n], rows[j][:n])) / n)
    return sum(shares) / len(shares) if shares else None


@torch.no_grad()
def context_sensitivity(pipe, prompts: Sequence[str], config, seed: int = 0) -> float | None:
    """The context-sensitivity figure of the module docstring over ``prompts`` (None if < 2 prompts)."""
    if len(prompts) < 2:
        return None
    kwargs = {"generator": torch.Generator().manual_seed(seed)}
    if "noise" in inspect.signature(pipe.__call__).parameters:  # a diffusion pipeline
        kwargs = {"noise": shared_noise(seed)}
    out = pipe(list(prompts), config, output_type="ids", **kwargs)
    return token_identity(out.token_ids)

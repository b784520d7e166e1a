"""Per-sample state of a generation and the rules that decide what a block adds and when to stop.

Every sample of a batch has a :class:`RowState`: how its prompt is laid out (what the encoder
sees, the whole prompt blocks that go to the prefill, the known latents pinned in the first block,
the prompt tokens to trim from the first block's output) and its progress (finished, tokens so
far). A :class:`StopRule` turns each block's sampled ids into output tokens and says when the
loop ends. Two rules (``GenerationConfig.stop_rule``):

* ``first_stop`` (default): a sample's output is cut after its first stop id (kept) and, unless
  ``whole_blocks``, at ``max_new_tokens``; stop ids at pinned prompt positions do not count; the
  loop ends when every sample has stopped or has ``max_new_tokens`` tokens.
* ``released``: everything is kept (nothing is cut at a stop id); a sample is flagged finished when
  *any* position of a block (pinned ones included) holds a stop id; the loop ends when every
  sample is flagged or ``k * tokens_per_block >= max_new_tokens`` after block ``k`` (1-based).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class RowState:
    """One sample: its prompt layout (fixed) and its progress (updated block by block)."""

    encode_ids: list[int]  # token ids given to the VAE encoder (prompt, maybe padded)
    prefix: int  # latents that go to the prefill (the prompt's whole blocks)
    pinned: int  # known latents at the start of the first block
    trim: int  # prompt tokens dropped from the first block's output
    finished: bool = False  # ended by a stop id (sticky)
    num_new: int = 0  # output tokens so far


class StopRule(ABC):
    """Base: what a block's sampled ids add to a sample, and when the loop is done."""

    def __init__(self, stop_ids: Sequence[int], stop_on_eos: bool, max_new_tokens: int, whole_blocks: bool):
        self.stop_ids = frozenset(int(i) for i in stop_ids) if stop_on_eos else frozenset()
        self.max_new_tokens, self.whole_blocks = max_new_tokens, whole_blocks

    @abstractmethod
    def take(self, row: RowState, sampled: list[int], start: int) -> list[int]:
        """Output tokens of one sample from its block of sampled ids (``start``: first non-prompt id)."""

    @abstractmethod
    def done(self, rows: Sequence[RowState], blocks: int, tokens_per_block: int) -> bool:
        """Whether the loop ends after ``blocks`` generated blocks."""


class FirstStop(StopRule):
    """Cut after the first stop id and at ``max_new_tokens`` (module docstring)."""

    def take(self, row: RowState, sampled: list[int], start: int) -> list[int]:
        if row.finished or row.num_new >= self.max_new_tokens:
            return []
        new = sampled[start:]
        cut = next((j for j, t in enumerate(new) if t in self.stop_ids), None)
        if cut is not None:
            new, row.finished = new[: cut + 1], True
        if not self.whole_blocks:
            new = new[: self.max_new_tokens - row.num_new]
        row.num_new += len(new)
        return new

    def done(self, rows: Sequence[RowState], blocks: int, tokens_per_block: int) -> bool:
        return all(r.finished or r.num_new >= self.max_new_tokens for r in rows)


class ReleasedStop(StopRule):
    """Keep everything; flag on a stop id anywhere in the block; stop on a block count (module docstring)."""

    def take(self, row: RowState, sampled: list[int], start: int) -> list[int]:
        if self.stop_ids.intersection(sampled):
            row.finished = True
        row.num_new += len(sampled) - start
        return sampled[start:]

    def done(self, rows: Sequence[RowState], blocks: int, tokens_per_block: int) -> bool:
        return all(r.finished for r in rows) or blocks * tokens_per_block >= self.max_new_tokens


STOP_RULE_CLASSES = {"first_stop": FirstStop, "released": ReleasedStop}


def make_stop_rule(
    name: str, stop_ids: Sequence[int], stop_on_eos: bool, max_new_tokens: int, whole_blocks: bool
) -> StopRule:
    """The stop rule called ``name`` (``GenerationConfig.stop_rule``)."""
    if name not in STOP_RULE_CLASSES:
        raise ValueError(f"unknown stop_rule {name!r}; expected one of {sorted(STOP_RULE_CLASSES)}")
    return STOP_RULE_CLASSES[name](stop_ids, stop_on_eos, max_new_tokens, whole_blocks)


__all__ = ["FirstStop", "ReleasedStop", "RowState", "StopRule", "make_stop_rule"]
